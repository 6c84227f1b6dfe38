"""The demo's per-step report: one row of numbers per push (from its
``StepReport``), a table whose printed columns add up to each push's wall
time, and the legend saying what each column measures. Also used by the
CPU update benchmarks, so their tables read like the demo's."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["mib", "push_row", "round_to_sum", "step_table", "legend"]


def round_to_sum(values: list[float], digits: int = 1) -> list[float]:
    """Round ``values`` to ``digits`` decimals so that the rounded values add
    up to their rounded sum (largest remainder): a breakdown whose printed
    parts do not add up to its printed total looks wrong even when it is not."""
    scale = 10**digits
    scaled = [v * scale for v in values]
    out = [math.floor(x) for x in scaled]
    by_remainder = sorted(range(len(values)), key=lambda i: scaled[i] - out[i], reverse=True)
    for i in by_remainder[: round(sum(scaled)) - sum(out)]:
        out[i] += 1
    return [x / scale + 0.0 for x in out]


def mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def push_row(rep: Any) -> dict:
    """One step's numbers from a ``StepReport``: the trainer's stage times
    (slowest worker per stage) and worker 0's memory figures.

    ``push_s`` is the whole ``client.push()`` call (``wall_s`` plus the prefix
    cache reset) and ``other_s`` what of it the four stages do not cover, so
    that quantize + transfer + validate + load + other = push; ``send_other_s``
    is the trainer's share of ``other`` (packing, checksums, first-step buffer
    allocation); the rest is vLLM's RPCs, the wait for the worker's answer and
    the prefix-cache reset.
    """
    st = rep.stage_times()
    w0 = rep.workers[0]
    push_s = rep.wall_s + rep.reset_prefix_cache_s
    stages = st["quantize_s"] + st["transfer_s"] + st["validate_s"] + st["load_s"]
    return {"step": rep.step, "bytes": rep.send.num_bytes, "tensors": rep.send.num_tensors,
            "buckets": rep.send.num_buckets, "quantize_s": st["quantize_s"],
            "transfer_s": st["transfer_s"], "receive_s": st["receive_s"],
            "validate_s": st["validate_s"], "load_s": st["load_s"], "wall_s": st["wall_s"],
            "push_s": push_s, "other_s": push_s - stages, "send_total_s": st["send_total_s"],
            "send_other_s": st["send_total_s"] - st["quantize_s"] - st["transfer_s"],
            "pack_s": rep.send.pack_s, "checksum_s": rep.send.checksum_s,
            "reset_prefix_cache_s": rep.reset_prefix_cache_s,
            "worker_total_s": max(r.get("total_s", 0.0) for r in rep.workers),
            "mode": w0["mode"], "stream": bool(w0.get("stream")),
            "peak_extra_bytes": w0.get("peak_extra_bytes"), "peak_extra_source": w0.get("peak_extra_source"),
            "model_bytes": w0.get("model_bytes"), "largest_layer_bytes": w0.get("largest_layer_bytes"),
            "max_bucket_bytes": w0.get("max_bucket_bytes")}


_STAGES = ("quantize_s", "transfer_s", "validate_s", "load_s")


def step_table(rows: list[dict]) -> str:
    """Per-step table in ms; each printed row adds up exactly to its
    ``= push`` column (see :func:`round_to_sum`)."""
    head = ["step", "MiB", "quantize", "transfer", "validate", "load", "other", "= push",
            "peak extra MiB", "warm==cold"]
    lines = [head]
    for r in rows:
        stages = [r[k] * 1e3 for k in _STAGES]
        shown = round_to_sum([*stages, r["push_s"] * 1e3 - sum(stages)])
        lines.append([str(r["step"]), f"{r['bytes'] / 2**20:.2f}", *(f"{x:.1f}" for x in shown),
                      f"{sum(shown):.1f}", mib(r.get("peak_extra_bytes")),
                      {True: "yes", False: "NO"}.get(r.get("warm_eq_cold"), "-")])
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(wd) for c, wd in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(out)


def legend(rows: list[dict], fmt: str) -> list[str]:
    """What each column of :func:`step_table` measures, and why ``other`` can dip below zero."""
    r0 = rows[0] if rows else {}
    lines = [
        "  quantize  trainer: " + ("BF16 -> FP8 weights + scales, as the served checkpoint holds them" if fmt == "fp8"
                                   else "nothing to quantize for a BF16 target (pulling the tensors)"),
        f"  transfer  trainer: blocked in the broadcast to the vLLM worker ({r0.get('backend', '-')})",
        "  validate  vLLM worker: names, dtypes, shapes and layout checked against the served checkpoint",
        f"  load      vLLM worker: loading the step into the served model ({r0.get('mode', '-')})",
        "  other     the rest: packing and checksumming buckets (on step 1 also allocating the send",
        "            buffers), vLLM's RPCs to the worker and the wait for its answer, the worker's",
        "            bookkeeping, resetting the prefix cache; below zero when validate/load overlap the",
        "            end of the transfer",
    ]
    if any(r.get("stream") for r in rows):
        lines.append("  --stream: the worker validates and loads while buckets still arrive (overlapping transfer)")
    return lines
