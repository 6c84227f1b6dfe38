"""What a worker pays to put row shards back together (rank parts), on one GPU.

One command::

    python benchmarks/rows_assembly.py --out DIR

With rank parts (``sync/rank_parts.py``) each trainer rank sends its rows of
every weight whose layout allows it, and the worker puts each tensor's rows
back together before loading (``apply/streams.py``: ``cat_rows``, one copy
per tensor). This times that for the dense 7B shapes of ``bench_sync.py`` in
the HF 128x128 block layout (FP8 weights and float32 scales; contents do not
matter to a copy), cut as ``Shard(0)`` cuts them over 2 and over 8 trainer
ranks, against one device copy per tensor of the same bytes, side by side in
one run: median of ``--iters`` steps after a warm-up, CUDA events around the
whole step (host work included, as the worker runs it). Writes
``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _step_tensors(device: torch.device) -> list[tuple[str, torch.Tensor]]:
    from bench_sync import model_specs

    out = []
    for name, shape in model_specs("dense", smoke=False, moe_layers=0):
        if len(shape) == 2:
            rows, cols = shape
            out.append((name, torch.randint(0, 255, shape, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)))
            out.append((name + "_scale_inv", torch.rand(-(-rows // 128), -(-cols // 128), device=device)))
        else:
            out.append((name, torch.rand(shape, device=device).to(torch.bfloat16)))
    return out


def _time(fn, iters: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=15)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from vllm_fp8_overlay.sync.apply.streams import cat_rows

    dev = torch.device("cuda", 0)
    full = _step_tensors(dev)
    nbytes = sum(t.numel() * t.element_size() for _, t in full)
    rows = {}
    for ranks in (2, 8):
        shards = [[s for s in torch.chunk(t, ranks) if s.shape[0]] for _, t in full]
        rows[ranks] = _time(lambda: [cat_rows(s) for s in shards], args.iters)
        got = [cat_rows(s) for s in shards]
        assert all(torch.equal(g.view(torch.uint8), t.view(torch.uint8)) for g, (_, t) in zip(got, full))
        got = shards = None  # free them before the next split
    copy = _time(lambda: [torch.empty_like(t).copy_(t) for _, t in full], args.iters)
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "tensors": len(full),
           "bytes": nbytes, "iters": args.iters,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "copy_ms": copy, "rows_2_ms": rows[2], "rows_8_ms": rows[8]}
    med = {k: statistics.median(res[k]) for k in ("copy_ms", "rows_2_ms", "rows_8_ms")}
    md = [f"# Putting row shards back together ({res['device']}, torch {res['torch']}, {res['date']})", "",
          f"Dense 7B shapes, HF 128x128 block layout: {len(full)} tensors, {nbytes / 1e9:.2f} GB per step; "
          f"medians of {args.iters} steps.", "",
          "| what | ms per step | GB/s (read + write) |", "|---|---|---|"]
    for k, label in (("copy_ms", "one device copy per tensor"), ("rows_2_ms", "rows of 2 ranks put together"),
                     ("rows_8_ms", "rows of 8 ranks put together")):
        md.append(f"| {label} | {med[k]:.2f} | {2 * nbytes / med[k] / 1e6:.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
