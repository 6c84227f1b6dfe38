"""Command line: ``python -m vllm_fp8_overlay {status,compat,demo}``."""

from __future__ import annotations

import argparse
import json
import sys


def _status(args) -> int:
    import vllm_fp8_overlay as overlay

    if args.import_vllm:
        # Import vLLM's reload package so that in-range patches actually attach.
        import importlib

        try:
            importlib.import_module("vllm.model_executor.model_loader.reload")
        except ImportError:
            pass
    rows = overlay.status()
    version = overlay.installed_vllm_version()
    if args.json:
        print(json.dumps({"vllm": str(version) if version else None, "patches": [r.as_dict() for r in rows]}, indent=2))
        return 0
    print(f"vllm-fp8-overlay {overlay.__version__}; vLLM {version or 'not installed'}")
    width = max(len(r.id) for r in rows)
    for r in rows:
        print(f"  {r.id:<{width}}  {r.state.value:<24} {r.reason}")
        print(f"  {'':<{width}}  serves vLLM {r.serves}; upstream {r.upstream}, fixed in {r.fixed_in}")
    return 0


def _compat(args) -> int:
    from pathlib import Path

    from . import compat

    record = compat.load_record()
    if args.merge:
        record = compat.merge_observations(Path(args.merge), record)
        compat.save_record(record)
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


def _demo(args, rest) -> int:
    from . import demo

    return demo.main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vllm_fp8_overlay", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="each patch's state for the installed vLLM, and why")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--no-import-vllm",
        dest="import_vllm",
        action="store_false",
        help="report declared states without importing vLLM",
    )
    p = sub.add_parser("compat", help="render COMPAT.md from declarations + compat/matrix.json")
    p.add_argument("--write", action="store_true", help="rewrite COMPAT.md")
    p.add_argument("--check", action="store_true", help="fail if COMPAT.md is stale")
    p.add_argument("--merge", metavar="DIR", help="fold recorded matrix observations from DIR in, then write")
    sub.add_parser("demo", help="end-to-end FP8 weight sync demo on real vLLM (see demo --help)", add_help=False)
    if argv and argv[0] == "demo":
        return _demo(None, argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "status":
        return _status(args)
    if args.cmd == "compat":
        return _compat(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
