"""The value sentinels of a whole received bucket in one launch per dtype.

Why: the receiver checks every tensor of an update before anything is
loaded (:mod:`vllm_fp8_overlay.sync.values`: no FP8 NaN encodings, scales
finite and > 0, other floats finite). Done tensor by tensor, or with
multi-tensor reductions that return one result tensor per input, the
Python work per tensor dominates for MoE models: 333-367 ms per update of
the Qwen3-30B-A3B shape (37k tensors) on an H200 host, four times the wire.

How: every tensor of a bucket is a contiguous span of its payload (the
manifest gives offset and size). Per dtype group the spans are cut into
work items of at most ``BLOCK`` elements (a table built once per manifest
with numpy and cached on the device: a trainer sends the same manifests
every step); one launch checks every item and adds the number of offending
elements to a counter. The counter is exact, not a bound: zero means every
element passes. Where it is not zero the caller checks tensor by tensor to
name the offenders.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["PayloadCheck", "plan_payload_check", "build_payload_check"]

#: elements per work item (per program)
BLOCK = 8192
#: kind codes of the kernel
_FP8, _SCALE, _FLOAT = 0, 1, 2
_PLANS: "OrderedDict[tuple, PayloadCheck]" = OrderedDict()
_PLANS_MAX = 8192


@triton.jit
def _count_bad(base, starts, lens, counter, KIND: tl.constexpr, MASK: tl.constexpr, VALUE: tl.constexpr,
               WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = tl.load(starts + pid)
    n = tl.load(lens + pid)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    if KIND == 0:  # FP8 bytes: NaN/Inf encodings
        x = tl.load(base + start + offs, mask=m, other=0)
        bad = (x & MASK) == VALUE
    else:
        x = tl.load(base + start + offs, mask=m, other=1.0)
        if not WIDE:
            x = x.to(tl.float32)
        finite = (x - x) == 0  # NaN for NaN and +-Inf, and NaN == 0 is false
        if KIND == 1:
            bad = ~(finite & (x > 0))
        else:
            bad = ~finite
    cnt = tl.sum((bad & m).to(tl.int64), axis=0)
    tl.atomic_add(counter, cnt, mask=cnt > 0)


class PayloadCheck:
    """The work tables of one bucket layout: ``(kind, dtype, rule, starts, lens)`` per group."""

    __slots__ = ("groups", "entries")

    def __init__(self, groups: list, entries: Any) -> None:
        self.groups = groups
        self.entries = entries  # keeps the manifest's entries (and so the cache key's id) alive

    def count_bad(self, payload: torch.Tensor) -> torch.Tensor:
        """One-element int64 tensor on the payload's device: elements that
        break their rule (no host sync)."""
        counter = torch.zeros(1, dtype=torch.int64, device=payload.device)
        for kind, dtype, (mask, value), starts, lens in self.groups:
            es = dtype.itemsize
            base = payload[: payload.numel() // es * es].view(torch.uint8 if kind == _FP8 else dtype)
            _count_bad[(starts.numel(),)](base, starts, lens, counter, KIND=kind, MASK=mask, VALUE=value,
                                          WIDE=dtype == torch.float64, BLOCK=BLOCK)
        return counter


def _items(spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Work items of at most BLOCK elements covering every (start, length) span."""
    start = np.array([s for s, _ in spans], dtype=np.int64)
    n = np.array([k for _, k in spans], dtype=np.int64)
    counts = -(-n // BLOCK)
    idx = np.repeat(np.arange(len(spans)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    within = np.arange(int(counts.sum()), dtype=np.int64) - first
    return start[idx] + within * BLOCK, np.minimum(BLOCK, n[idx] - within * BLOCK)


def plan_payload_check(entries: Sequence[Any], scale_name: str | None, device: torch.device,
                       kind_of) -> PayloadCheck | None:
    """The check of a bucket laid out as ``entries`` (wire entries: name,
    dtype, offset, nbytes), cached per entries object, scale name and
    device (``None`` for a layout it cannot check). ``kind_of(name, dtype, scale_name)`` is the rule of
    :mod:`vllm_fp8_overlay.sync.values` (``"fp8"``, ``"scale"``,
    ``"float"`` or ``None``)."""
    key = (id(entries), scale_name, device)
    hit = _PLANS.get(key)
    if hit is not None and hit.entries is entries:
        _PLANS.move_to_end(key)
        return hit
    plan = build_payload_check(entries, scale_name, device, kind_of)
    if plan is None:
        return None
    _PLANS[key] = plan
    while len(_PLANS) > _PLANS_MAX:
        _PLANS.popitem(last=False)
    return plan


def build_payload_check(entries: Sequence[Any], scale_name: str | None, device: torch.device,
                        kind_of) -> PayloadCheck | None:
    """:func:`plan_payload_check` without its cache (for a caller that keeps the plan itself)."""
    from ..sync.values import FP8_NAN_BYTES

    spans: dict[tuple[str, torch.dtype], list[tuple[int, int]]] = {}
    for e in entries:
        kind = kind_of(e.name, e.dtype, scale_name)
        if kind is None or e.nbytes == 0:
            continue
        es = e.dtype.itemsize
        if e.offset % es or e.nbytes % es:
            return None  # not addressable as its dtype within the payload: checked tensor by tensor
        if kind == "fp8":  # checked as bytes
            spans.setdefault((kind, e.dtype), []).append((e.offset, e.nbytes))
        else:
            spans.setdefault((kind, e.dtype), []).append((e.offset // es, e.nbytes // es))
    groups = []
    for (kind, dtype), sp in spans.items():
        starts, lens = _items(sp)
        rule = FP8_NAN_BYTES[dtype] if kind == "fp8" else (0, 0)
        code = {"fp8": _FP8, "scale": _SCALE, "float": _FLOAT}[kind]
        groups.append((code, dtype, rule, torch.from_numpy(starts).to(device), torch.from_numpy(lens).to(device)))
    return PayloadCheck(groups, entries)
