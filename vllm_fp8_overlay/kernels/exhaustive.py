"""Exhaustive exactness check of the block kernel: every ``(amax, x)`` pair
of a 16-bit weight dtype through the production kernel and through the torch
reference (about 2.7e9 elements per dtype; a GPU test and part of
``benchmarks/kernel_micro.py``)."""

from __future__ import annotations

import torch

from ..formats import quantize as _ref
from .triton_fp8 import _fits, blockwise


def exhaustive_pairs(dtype: torch.dtype, first: int = 0, count: int | None = None) -> torch.Tensor:
    """A ``(rows, 128)`` CUDA weight whose 128x128 blocks hold every ``(amax, x)``
    pair of a 16-bit dtype for the finite positive amax patterns
    ``first .. first+count``: per amax, 5 blocks with amax as first element and
    every x pattern with ``|x| <= amax`` after it (the rest 0). Blocks of it
    are exactly the inputs whose fp8 bytes depend on ``x / scale(amax)``."""
    pats = torch.arange(1, 1 << 15, dtype=torch.int32, device="cuda")
    vals = pats.to(torch.int16).view(dtype)
    amax = vals[torch.isfinite(vals)][first: None if count is None else first + count]
    per = 128 * 128 - 1
    nblk = -(-65536 // per)
    xs = torch.arange(0, 65536, dtype=torch.int32, device="cuda").to(torch.int16).view(dtype)
    xs = torch.where(torch.isfinite(xs), xs, torch.zeros_like(xs))
    xs = torch.cat([xs, torch.zeros(nblk * per - 65536, dtype=dtype, device="cuda")]).view(nblk, per)
    out = torch.empty(amax.numel(), nblk, 128 * 128, dtype=dtype, device="cuda")
    out[:, :, 0] = amax[:, None]
    zero = torch.zeros((), dtype=dtype, device="cuda")
    out[:, :, 1:] = torch.where(xs.float().abs()[None] > amax.float()[:, None, None], zero, xs[None])
    return out.view(-1, 128)


def exhaustive_check(dtype: torch.dtype, recipe: str, chunk: int = 4096) -> tuple[int, int, int]:
    """Every ``(amax, x)`` pair of a 16-bit dtype through the production block
    kernel and through the torch reference. Returns ``(differing fp8 bytes,
    differing scales, elements checked)``."""
    nq = ns = n = 0
    total = int(torch.isfinite(torch.arange(1, 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)).sum())
    for first in range(0, total, chunk):
        w = exhaustive_pairs(dtype, first, chunk)
        assert _fits(w, recipe, "block", (128, 128))
        q1, s1, _ = _ref._torch_blockwise(w, recipe, (128, 128))
        q2, s2, _ = blockwise(w, recipe, (128, 128))
        nq += int((q1.view(torch.uint8) != q2.view(torch.uint8)).sum())
        ns += int((s1 != s2).sum())
        n += w.numel()
        del w, q1, q2, s1, s2
    return nq, ns, n
