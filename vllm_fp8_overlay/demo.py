"""End-to-end demo: a trainer pushes new weights into a running vLLM every step.

``python -m vllm_fp8_overlay demo --steps 3`` builds a tiny Llama and its FP8
serving checkpoint (compressed-tensors, per-channel FP8 weights, dynamic
per-token activations, written by this package's quantizer), starts real vLLM
on it with :class:`~vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension`,
and then, per step, perturbs the BF16 weights like an optimizer step would,
quantizes and broadcasts them (gloo on CPU, NCCL on GPUs), lets vLLM validate
and load them, and checks **warm == cold**: every vLLM parameter after the
update equals, bit for bit, what vLLM builds at a cold start from an offline
FP8 checkpoint of the same weights.

The cold reference (``--cold reload``, default) is built inside the served
worker by ``WeightSyncExtension.weight_sync_cold_digest``: vLLM's own
``get_model()`` -- what a cold start runs: construct the model, read the
offline checkpoint of W_k with the default loader,
``process_weights_after_loading`` -- into a second model object that is
hashed and dropped. That this equals a fresh engine is checked first: on the
W0 checkpoint it must reproduce the digest of the freshly started engine.
``--cold fresh`` instead starts a whole new engine per step (slow on small
machines); ``--cold none`` skips the check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "CT_FP8_CHANNEL_DYNAMIC",
    "write_serving_checkpoint",
    "free_port",
    "main",
]

#: compressed-tensors FP8-dynamic (per-channel weights, per-token dynamic
#: activations), as llm-compressor writes it
CT_FP8_CHANNEL_DYNAMIC: dict[str, Any] = {
    "config_groups": {
        "group_0": {
            "input_activations": {
                "actorder": None, "block_structure": None, "dynamic": True, "group_size": None,
                "num_bits": 8, "observer": None, "observer_kwargs": {}, "strategy": "token",
                "symmetric": True, "type": "float",
            },
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
                "num_bits": 8, "observer": "minmax", "observer_kwargs": {}, "strategy": "channel",
                "symmetric": True, "type": "float",
            },
        }
    },
    "format": "float-quantized",
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}

EXTENSION = "vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension"
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11]]


def write_serving_checkpoint(
    directory: str | os.PathLike[str],
    bf16_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    quantization_config: Mapping[str, Any] | None,
) -> Path:
    """Offline serving checkpoint of ``bf16_state``: FP8 via this package's
    quantizer when ``quantization_config`` is given, else the BF16 tensors."""
    from .formats import detect_layout, quantize_weights
    from .testing.tiny_models import save_checkpoint

    cfg = dict(config)
    cfg.pop("quantization_config", None)
    if quantization_config is None:
        return save_checkpoint(directory, dict(bf16_state), cfg)
    cfg["quantization_config"] = dict(quantization_config)
    layout = detect_layout(cfg)
    return save_checkpoint(directory, dict(quantize_weights(bf16_state.items(), layout)), cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_fp8_overlay demo",
        description="Push N weight updates from a BF16 trainer into a running vLLM serving an FP8 "
                    "(or BF16) copy, and prove after each that vLLM's parameters equal a cold start.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=3, help="number of weight updates")
    p.add_argument("--format", choices=["fp8", "bf16"], default="fp8",
                   help="serving format: fp8 = compressed-tensors channel FP8-dynamic, bf16 = no quantization")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Llama")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--intermediate", type=int, default=512, help="MLP size")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="transport: auto = NCCL when CUDA is available, else gloo")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="size of each of the two send buckets (MiB)")
    p.add_argument("--stream", action="store_true",
                   help="workers load buckets as they arrive (receive_weights(stream=True)) instead of "
                        "receiving and validating the whole step first")
    p.add_argument("--cold", choices=["reload", "fresh", "none"], default="reload",
                   help="warm==cold reference: 'reload' = one reference engine cold-loads each offline "
                        "checkpoint with vLLM's load_model(); 'fresh' = a new engine per step; 'none' = skip")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--port", type=int, default=0, help="sync-group port (0 = pick a free one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the per-step results to this JSON file")
    return p


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _llm(model_dir: Path, dtype: str = "bfloat16"):
    from vllm import LLM

    return LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, enforce_eager=True,
               max_model_len=128, max_num_seqs=4, seed=0, worker_extension_cls=EXTENSION)


def _greedy(llm: Any, n: int = 8) -> list[list[int]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _cold_digest(args, llm, ckpt: Path) -> tuple[str, float]:
    t = time.perf_counter()
    if args.cold == "fresh":
        ref = _llm(ckpt)
        try:
            d = ref.collective_rpc("weight_sync_digest")[0]["digest"]
        finally:
            with contextlib.suppress(Exception):
                ref.llm_engine.engine_core.shutdown()
            del ref
    else:
        d = llm.collective_rpc("weight_sync_cold_digest", kwargs={"model_dir": str(ckpt)})[0]["digest"]
    return d, time.perf_counter() - t


def run_demo(args: argparse.Namespace) -> list[dict]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from .sync.client import attach_llm
    from .testing import tiny_models as tm

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vllm_fp8_overlay_demo_"))
    qcfg = CT_FP8_CHANNEL_DYNAMIC if args.format == "fp8" else None
    _say(f"workdir {work}; building a tiny Llama ({args.layers} layers, hidden {args.hidden}) "
         f"and its {'FP8 (compressed-tensors channel)' if qcfg else 'BF16'} serving checkpoint")
    bf16_dir = tm.make_llama(work / "trainer_w0", layers=args.layers, hidden=args.hidden,
                             intermediate=args.intermediate, vocab=args.vocab, seed=args.seed)
    config = tm.load_config(bf16_dir)
    w = tm.load_checkpoint(bf16_dir)
    serve_dir = write_serving_checkpoint(work / "serving_w0", w, config, qcfg)

    _say("starting the served vLLM engine (real vLLM, worker extension WeightSyncExtension) ...")
    t = time.perf_counter()
    llm = _llm(serve_dir)
    _say(f"served engine up in {time.perf_counter() - t:.1f}s")
    rows: list[dict] = []
    try:
        if args.cold == "reload":
            served0 = llm.collective_rpc("weight_sync_digest")[0]["digest"]
            ref0, _ = _cold_digest(args, llm, serve_dir)
            ok = served0 == ref0
            _say(f"check: cold load via vLLM's get_model() == this fresh engine start on W0: {'yes' if ok else 'NO'}")
            if not ok:
                raise SystemExit("the in-worker cold load does not reproduce a fresh engine; use --cold fresh")
        port = args.port or free_port()
        _say(f"trainer: joining the sync group on 127.0.0.1:{port} (backend {args.backend}) ...")
        client = attach_llm(llm, host="127.0.0.1", port=port, backend=args.backend,
                            bucket_bytes=int(args.bucket_mb * (1 << 20)), stream=args.stream)
        _say(f"trainer: layout {'FP8 ' + client.layout.method + '/' + client.layout.strategy if client.layout else 'BF16 (none)'}"
             f", world size {client.world_size}, backend {client.sender.transport.backend}")
        try:
            for step in range(1, args.steps + 1):
                w = tm.perturb_state_dict(w, seed=args.seed * 1000 + step, scale=0.05)  # "optimizer step"
                _say(f"step {step}: sending {len(w)} BF16 tensors ...")
                rep = client.push(w, step)
                row = push_row(rep)
                _say(f"step {step}: {row['bytes'] / 2**20:.2f} MiB in {row['buckets']} bucket(s); quantize "
                     f"{row['quantize_s'] * 1e3:.1f} ms, transfer {row['transfer_s'] * 1e3:.1f} ms, vLLM validate "
                     f"{row['validate_s'] * 1e3:.1f} ms, load ({row['mode']}{', stream' if row['stream'] else ''}) "
                     f"{row['load_s'] * 1e3:.1f} ms, peak extra memory {_mib(row['peak_extra_bytes'])} MiB")
                row["tokens"] = _greedy(llm)
                if args.cold != "none":
                    ckpt = write_serving_checkpoint(work / f"serving_w{step}", w, config, qcfg)
                    cold, cold_s = _cold_digest(args, llm, ckpt)
                    warm = llm.collective_rpc("weight_sync_digest")[0]
                    row["warm_eq_cold"] = warm["digest"] == cold
                    row["params"] = warm["num_tensors"]
                    _say(f"step {step}: warm == cold over {warm['num_tensors']} vLLM tensors: "
                         f"{'YES (bitwise)' if row['warm_eq_cold'] else 'NO'} (cold reference {cold_s:.1f}s)")
                rows.append(row)
        finally:
            client.close()
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
    return rows


def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def push_row(rep: Any) -> dict:
    """One step's numbers from a ``StepReport``: the trainer's stage times
    (slowest worker per stage) and worker 0's memory figures."""
    st = rep.stage_times()
    w0 = rep.workers[0]
    return {"step": rep.step, "bytes": rep.send.num_bytes, "tensors": rep.send.num_tensors,
            "buckets": rep.send.num_buckets, "quantize_s": st["quantize_s"],
            "transfer_s": st["transfer_s"], "receive_s": st["receive_s"],
            "validate_s": st["validate_s"], "load_s": st["load_s"], "wall_s": st["wall_s"],
            "mode": w0["mode"], "stream": bool(w0.get("stream")),
            "peak_extra_bytes": w0.get("peak_extra_bytes"), "peak_extra_source": w0.get("peak_extra_source"),
            "model_bytes": w0.get("model_bytes"), "largest_layer_bytes": w0.get("largest_layer_bytes"),
            "max_bucket_bytes": w0.get("max_bucket_bytes")}


def _table(rows: list[dict]) -> str:
    head = ["step", "MiB", "quantize ms", "transfer ms", "validate ms", "load ms", "total ms", "mode",
            "peak extra MiB", "warm==cold"]
    lines = [head]
    for r in rows:
        lines.append([str(r["step"]), f"{r['bytes'] / 2**20:.2f}", f"{r['quantize_s'] * 1e3:.1f}",
                      f"{r['transfer_s'] * 1e3:.1f}", f"{r['validate_s'] * 1e3:.1f}", f"{r['load_s'] * 1e3:.1f}",
                      f"{r['wall_s'] * 1e3:.1f}", r["mode"] + (" stream" if r.get("stream") else ""),
                      _mib(r.get("peak_extra_bytes")),
                      {True: "yes", False: "NO"}.get(r.get("warm_eq_cold"), "-")])
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(wd) for c, wd in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    t0 = time.perf_counter()
    rows = run_demo(args)
    print("\nsummary (total = trainer-side wall time of one push: quantize + transfer + vLLM receive/validate/load)")
    print(_table(rows))
    bad = [r["step"] for r in rows if r.get("warm_eq_cold") is False]
    print(f"\n{len(rows)} update(s) in {time.perf_counter() - t0:.1f}s; "
          + ("warm == cold at every step" if not bad and args.cold != "none" else
             f"MISMATCH at steps {bad}" if bad else "warm == cold not checked"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
