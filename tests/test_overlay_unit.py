"""The overlay's own logic, without vLLM (declarations, gating, activation, COMPAT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

import vllm_fp8_overlay
from vllm_fp8_overlay import compat
from vllm_fp8_overlay.overlay import Patch, State
from vllm_fp8_overlay.patches import PATCH_CLASSES

ROOT = Path(__file__).resolve().parent.parent


def test_every_patch_declares_its_metadata():
    ids = set()
    for cls in PATCH_CLASSES:
        p = cls()
        assert p.id and p.id not in ids
        ids.add(p.id)
        assert p.title and p.upstream.startswith("vllm-project/vllm#")
        assert p.targets and all(t.startswith("vllm.") for t in p.targets)
        assert p.fixed_in == Version("0.20.0") or p.fixed_in == Version("0.19.0")
        # the range it serves ends where upstream fixed it
        assert not p.serves.contains(p.fixed_in)
        doc = sys.modules[cls.__module__].__doc__
        for heading in ("Why:", "How:", "Upstream:", "Remove when:"):
            assert heading in doc, (p.id, heading)
    for cls in PATCH_CLASSES:
        for dep in cls.requires:
            assert dep in ids


@pytest.mark.parametrize(
    "version, expected",
    [
        ("0.15.1", {"layer-size-without-skipped": "not needed", "skip-e-score-correction-bias": "not needed", "quiet-empty-modules": "not needed"}),
        ("0.16.0", {"layer-size-without-skipped": "applied", "skip-e-score-correction-bias": "applied", "quiet-empty-modules": "not needed"}),
        ("0.18.1", {"layer-size-without-skipped": "applied", "skip-e-score-correction-bias": "applied", "quiet-empty-modules": "not needed"}),
        ("0.19.0", {"layer-size-without-skipped": "retired upstream", "skip-e-score-correction-bias": "applied", "quiet-empty-modules": "applied"}),
        ("0.19.1", {"layer-size-without-skipped": "retired upstream", "skip-e-score-correction-bias": "applied", "quiet-empty-modules": "applied"}),
        ("0.20.0", {"layer-size-without-skipped": "retired upstream", "skip-e-score-correction-bias": "retired upstream", "quiet-empty-modules": "retired upstream"}),
        ("0.32.0", {"layer-size-without-skipped": "retired upstream", "skip-e-score-correction-bias": "retired upstream", "quiet-empty-modules": "retired upstream"}),
    ],
)
def test_declared_state_per_release(version, expected):
    got = {cls.id: cls().state_for(Version(version))[0].value for cls in PATCH_CLASSES}
    assert got == expected


def test_no_vllm_means_inactive():
    for cls in PATCH_CLASSES:
        assert cls().state_for(None)[0] is State.NO_VLLM


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != vllm_fp8_overlay.DISABLE_ENV}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_import_is_cheap_and_does_not_import_vllm():
    r = _run("import sys, vllm_fp8_overlay as o; print(o.is_active(), 'vllm' in sys.modules, 'torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False", "False"]


def test_env_var_switches_automatic_activation_off():
    code = (
        "import vllm_fp8_overlay as o; from vllm_fp8_overlay import plugin; plugin.register();"
        "print(o.is_active(), sorted({s.state.value for s in o.status()}))"
    )
    r = _run(code, FP8_OVERLAY_DISABLE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False ['disabled']"
    assert "deprecated" not in r.stderr
    # an explicit activate() still works
    r = _run("import vllm_fp8_overlay as o; o.activate(); o.activate(); print(o.is_active())", FP8_OVERLAY_DISABLE="1")
    assert r.stdout.strip() == "True"


def test_deprecated_env_var_name_still_switches_activation_off():
    code = (
        "import vllm_fp8_overlay as o; from vllm_fp8_overlay import plugin; plugin.register();"
        "print(o.is_active())"
    )
    r = _run(code, VLLM_FP8_OVERLAY_DISABLE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    assert "VLLM_FP8_OVERLAY_DISABLE is deprecated" in r.stderr
    # the new name wins over the old one
    r = _run(code, VLLM_FP8_OVERLAY_DISABLE="1", FP8_OVERLAY_DISABLE="0")
    assert r.stdout.strip() == "True"


def test_plugin_register_is_idempotent():
    r = _run("import vllm_fp8_overlay as o; from vllm_fp8_overlay import plugin; plugin.register(); plugin.register(); print(o.is_active())")
    assert r.returncode == 0 and r.stdout.strip() == "True"


def test_entry_point_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."vllm.general_plugins"]' in text
    assert 'vllm_fp8_overlay = "vllm_fp8_overlay.plugin:register"' in text


def test_cli_status_json_matches_declarations():
    r = subprocess.run(
        [sys.executable, "-m", "vllm_fp8_overlay", "status", "--json", "--no-import-vllm"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    version = Version(data["vllm"]) if data["vllm"] else None
    for row in data["patches"]:
        declared = next(cls for cls in PATCH_CLASSES if cls.id == row["id"])().state_for(version)[0]
        if declared is State.APPLIED:
            assert row["state"] in ("pending", "applied")
        else:
            assert row["state"] == declared.value


def test_compat_md_is_current():
    assert compat.COMPAT_MD.exists(), "COMPAT.md missing: python -m vllm_fp8_overlay compat --write"
    assert not compat.is_stale(), "COMPAT.md is stale: python -m vllm_fp8_overlay compat --write"


def test_compat_record_agrees_with_declarations():
    """Every recorded status observation equals the declared states."""
    record = compat.load_record()
    assert record, "vllm_fp8_overlay/matrix.json is empty"
    for version, sections in record.items():
        if "status" in sections:
            declared = {cls.id: cls().state_for(Version(version))[0].value for cls in PATCH_CLASSES}
            assert sections["status"]["states"] == declared, version


def test_compat_check_fails_on_a_different_observation(tmp_path, monkeypatch):
    monkeypatch.setenv(compat.OBS_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(compat.RECORD_ENV, raising=False)
    record = compat.load_record()
    version, sections = next(iter(record.items()))
    section, data = next(iter(sections.items()))
    compat.check_observation(version, section, data)  # the recorded one passes
    changed = json.loads(json.dumps(data))
    changed["__extra__"] = 1
    with pytest.raises(AssertionError, match="differs"):
        compat.check_observation(version, section, changed)


class _Fake(Patch):
    id = "fake"


def test_patch_wrap_and_revert_rebinds_every_alias():
    """wrap() rebinds all vllm.* aliases and revert() restores them (fake modules)."""
    import types

    def target(x):
        return x + 1

    defining = types.ModuleType("vllm._fake_defining")
    defining.target = target
    alias = types.ModuleType("vllm._fake_alias")
    alias.target = target
    sys.modules["vllm._fake_defining"] = defining
    sys.modules["vllm._fake_alias"] = alias
    try:
        p = _Fake()
        p.wrap("vllm._fake_defining", "target", lambda wrapped, inst, args, kw: wrapped(*args, **kw) * 10)
        assert defining.target(1) == 20 and alias.target(1) == 20
        assert defining.target is alias.target
        # a module imported after wrapping binds the wrapper itself
        late = types.ModuleType("vllm._fake_late")
        late.target = defining.target
        sys.modules["vllm._fake_late"] = late
        p.revert()
        assert defining.target is target and alias.target is target and late.target is target
    finally:
        for name in ("vllm._fake_defining", "vllm._fake_alias", "vllm._fake_late"):
            sys.modules.pop(name, None)


def test_uninspectable_target_skips_that_patch_and_the_next_still_applies():
    """A target whose check raises something other than TargetMismatch (e.g.
    ``inspect.signature`` on a C function) must not leave later patches
    pending forever."""
    from vllm_fp8_overlay.overlay import Overlay, Patch, State

    class _Fake(Patch):
        trigger_module = "json"  # already imported: the hook runs at once
        targets = ("json.dumps",)

        def state_for(self, version):
            return State.APPLIED, "test"

        def apply(self):
            pass

    class Uninspectable(_Fake):
        id = "uninspectable"

        def check(self):
            raise ValueError("no signature found for builtin")

    class Fine(_Fake):
        id = "fine"

        def check(self):
            pass

    import json  # noqa: F401

    ov = Overlay([Uninspectable(), Fine()])
    ov.activate()
    try:
        assert ov._runtime["uninspectable"][0] is State.SKIPPED
        assert "cannot be inspected" in ov._runtime["uninspectable"][1]
        assert ov._runtime["fine"][0] is State.APPLIED
    finally:
        ov.deactivate()
