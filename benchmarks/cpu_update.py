"""End-to-end weight update on CPU with real vLLM: time per stage and extra memory.

One command::

    eval "$(python tools/vllm_env.py env 0.32.0 .nox/matrix-vllm-0-32-0)"
    .nox/matrix-vllm-0-32-0/bin/python benchmarks/cpu_update.py --out results/cpu_update

builds a Llama-shaped model (default: 8 layers, hidden 1024, MLP 4096, vocab
8192) and its FP8 serving checkpoint (compressed-tensors, per-channel FP8
weights, dynamic per-token activations: the demo's format), starts vLLM on
CPU with the weight-sync worker extension, and pushes ``--steps`` updates per
mode through the demo's code path (``WeightSyncClient.push`` of perturbed
BF16 weights, quantized by the sender, gloo), alternating

* ``whole``: ``receive_weights(stream=False)``, the default: the complete
  step is received and validated, then loaded with vLLM's layerwise reload;
* ``stream``: ``receive_weights(stream=True)``: each bucket is validated and
  handed to the layerwise reload as it arrives.

Per step it records the trainer's quantize and transfer time, the worker's
receive / validate / load time, the trainer's wall time of the push, the
worker's peak extra memory during the update (resident-set high-water mark
above the level before: ``/proc/self/clear_refs`` + ``VmHWM``), the model's
and its largest decoder layer's parameter bytes, the largest bucket, and,
on the last step of each mode (``--cold every``: each step), whether the
updated model equals a cold start bitwise (digest of every vLLM parameter and
buffer against vLLM's ``get_model()`` on an offline checkpoint of the same
weights, as the demo does).

Writes ``results.json`` and ``results.md`` (a markdown table) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 1 << 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (results.json, results.md)")
    p.add_argument("--steps", type=int, default=3, help="updates per mode")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--bucket-mb", type=float, default=8.0, help="sender bucket size (MiB)")
    p.add_argument("--format", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--cold", choices=["last", "every", "none"], default="last",
                   help="warm == cold check: on the last step of each mode, on every step, or never")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary directory)")
    return p


def _say(msg: str) -> None:
    print(f"[cpu_update {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _mib(n) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def table(rows: list[dict]) -> str:
    head = ["step", "mode", "MiB sent", "buckets", "quantize s", "transfer s", "receive s", "validate s",
            "load s", "push wall s", "peak extra MiB", "layer + bucket MiB", "extra / (layer+bucket)",
            "warm==cold"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bound = (r["largest_layer_bytes"] or 0) + (r["max_bucket_bytes"] or 0)
        ratio = "-" if not bound or r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / bound:.2f}"
        out.append("| " + " | ".join([
            str(r["step"]), "stream" if r["stream"] else "whole", _mib(r["bytes"]), str(r["buckets"]),
            f"{r['quantize_s']:.2f}", f"{r['transfer_s']:.2f}", f"{r['receive_s']:.2f}",
            f"{r['validate_s']:.3f}", f"{r['load_s']:.2f}", f"{r['wall_s']:.2f}", _mib(r["peak_extra_bytes"]),
            _mib(bound), ratio, {True: "yes", False: "NO"}.get(r.get("warm_eq_cold"), "-"),
        ]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    import torch

    from vllm_fp8_overlay.demo import (
        CT_FP8_CHANNEL_DYNAMIC,
        EXTENSION,
        free_port,
        write_serving_checkpoint,
    )
    from vllm_fp8_overlay.demo_report import push_row
    from vllm_fp8_overlay.sync.client import WeightSyncClient
    from vllm_fp8_overlay.testing.harness import vllm_version
    from vllm_fp8_overlay.testing import tiny_models as tm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cpu_update_"))
    qcfg = CT_FP8_CHANNEL_DYNAMIC if args.format == "fp8" else None
    _say(f"building Llama {args.layers}x{args.hidden} (MLP {args.intermediate}, vocab {args.vocab}) in {work}")
    bf16_dir = tm.make_llama(work / "trainer_w0", layers=args.layers, hidden=args.hidden,
                             intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads,
                             vocab=args.vocab)
    config = tm.load_config(bf16_dir)
    w = tm.load_checkpoint(bf16_dir)
    serve_dir = write_serving_checkpoint(work / "serving_w0", w, config, qcfg)

    from vllm import LLM

    t = time.perf_counter()
    llm = LLM(model=str(serve_dir), skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
              max_model_len=128, max_num_seqs=4, seed=0, worker_extension_cls=EXTENSION)
    engine_s = time.perf_counter() - t
    _say(f"engine up in {engine_s:.1f}s")
    rows: list[dict] = []
    try:
        client = WeightSyncClient([llm], host="127.0.0.1", port=free_port(), backend="gloo",
                                  bucket_bytes=int(args.bucket_mb * MIB), timeout=600)
        modes = [m for _ in range(args.steps) for m in (False, True)]
        try:
            for i, stream in enumerate(modes, start=1):
                w = tm.perturb_state_dict(w, seed=1000 + i, scale=0.05)
                rep = client.push(w, i, stream=stream)
                row = push_row(rep)
                check = args.cold == "every" or (args.cold == "last" and i > len(modes) - 2)
                if check:
                    ckpt = write_serving_checkpoint(work / f"serving_w{i}", w, config, qcfg)
                    warm = llm.collective_rpc("weight_sync_digest")[0]["digest"]
                    cold = llm.collective_rpc("weight_sync_cold_digest", kwargs={"model_dir": str(ckpt)})[0]["digest"]
                    row["warm_eq_cold"] = warm == cold
                    with contextlib.suppress(OSError):
                        for f in ckpt.iterdir():
                            f.unlink()
                rows.append(row)
                _say(f"step {i} ({'stream' if stream else 'whole'}): quantize {row['quantize_s']:.2f}s transfer "
                     f"{row['transfer_s']:.2f}s load {row['load_s']:.2f}s, peak extra {_mib(row['peak_extra_bytes'])} "
                     f"MiB (model {_mib(row['model_bytes'])}, largest layer {_mib(row['largest_layer_bytes'])}, "
                     f"bucket {_mib(row['max_bucket_bytes'])}) warm==cold {row.get('warm_eq_cold', '-')}")
        finally:
            client.close()
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()

    meta = {
        "date": datetime.date.today().isoformat(), "vllm": vllm_version(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""), "format": args.format,
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab},
        "bucket_bytes": int(args.bucket_mb * MIB), "engine_start_s": engine_s,
        "model_bytes": rows[0]["model_bytes"] if rows else None,
        "largest_layer_bytes": rows[0]["largest_layer_bytes"] if rows else None,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = (f"vLLM {meta['vllm']} (CPU), torch {meta['torch']}, {meta['cpus']} CPUs, {meta['date']}; "
          f"Llama {args.layers} layers x hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}, "
          f"{args.format}; model {_mib(meta['model_bytes'])} MiB of parameters in vLLM, largest layer "
          f"{_mib(meta['largest_layer_bytes'])} MiB; bucket {args.bucket_mb:g} MiB\n\n" + table(rows) + "\n")
    (out / "results.md").write_text(md)
    print("\n" + md)
    bad = [r["step"] for r in rows if r.get("warm_eq_cold") is False]
    if bad:
        print(f"warm != cold at steps {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
