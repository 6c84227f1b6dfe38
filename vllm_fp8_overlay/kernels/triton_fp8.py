"""Fused Triton BF16 -> FP8 (e4m3fn) quantization kernels: their launchers,
shape-group plans and device tables, and the grouped API the sender uses.
The kernels' device code is in :mod:`.fp8_tiles`; the exhaustive exactness
check in :mod:`.exhaustive`.

Bit-for-bit the arithmetic of :mod:`vllm_fp8_overlay.formats.quantize` (the
``torch`` backend) on the same device, in one pass over the weight:

* ``block``: one program per ``(bn, bk)`` tile reads the tile once, reduces
  ``amax``, writes the tile's scale and its fp8 bytes (2 bytes read, 1 written
  per element: the minimum).
* ``channel``: one program per group of rows; a first sweep over the columns
  finds each row's ``amax``, a second one quantizes (the re-read mostly hits
  L2).
* ``tensor``: an ``amax`` pass then a quantize pass.

No kernel uses atomics: every program writes the ``amax`` of its own tile to
a scratch array (4 bytes per tile); per-tensor ``amax`` values (and the
per-tensor scale of the ``tensor`` strategy) are a small reduction of that
array. Finiteness is checked once per call (or once per wire bucket), never per
tensor, and never with a host synchronization inside this module.

Grouping: the tensors of one call are split into *shape groups* (same rows,
cols and row stride). One launch per group, grid ``(tiles of one tensor,
tensors)``, so no program is wasted on padding, the shape is a plain kernel
argument (Triton specializes it on divisibility by 16 only, so new shapes do
not recompile) and only three int64 words per tensor (source, fp8 and scale
offsets) come from a device table. Tables are cached on the device by
content: a weight sync that quantizes the same parameters every step uploads
nothing after its first step.

Exactness (what the torch reference does, and how it is matched here):

* ``amax / 448`` with a Python scalar is computed by PyTorch on CUDA as
  ``amax * float32(1/448)`` (its true-division kernel turns a CPU-scalar
  divisor into a reciprocal multiply); on CPU it is a true division. The kernel
  does the same per device (``division="auto"``).
* ``w / scale`` (two tensors) is an IEEE float32 division in both places
  (``div_rn`` here; Triton's plain ``/`` would be approximate on the GPU).
  The kernels compute the same correctly rounded quotient without a
  division for 16-bit weights (``DIV_FAST``): ``r = div_rn(1, s)`` per
  scale, ``q0 = x*r`` and two residual corrections
  ``q <- fma(fma(-q, s, x), r, q)`` (the residual ``x - q*s`` is exact in an
  FMA; one correction is not always enough), with ``x`` and ``s`` first
  multiplied by ``2**64`` when ``s < 2**-100`` (exact) so that no residual is
  subnormal. 16-bit weights make this checkable exhaustively: every
  ``(amax, x)`` pair of bf16 / fp16 is run through the production kernel and
  the torch reference (:func:`.exhaustive.exhaustive_check`, a GPU test) with zero
  differences required. float32 weights use ``div_rn``.
* compressed-tensors rounds ``amax / 448`` and ``w / scale`` to the weight
  dtype (round to nearest even), turns ``-0`` into ``+0``, clamps to +-448 and
  casts to fp8 with round to nearest even.
* Triton's CPU interpreter (``TRITON_INTERPRET=1``) rounds float32 -> bf16 by
  truncation and float32 -> fp8 with ties away, and has no fused multiply-add;
  under the interpreter the kernels therefore round with integer bit
  arithmetic (exact RNE) and always divide with ``div_rn``. On the GPU they
  use the hardware conversions, which are RNE.
* ``amax`` maps NaN to +inf so the caller's finiteness check still fires.

Supported: bf16 and float32 weights for both recipes, fp16 for the ``hf``
recipe; power-of-two block sizes. Everything else falls back to the torch
backend (fp16 with compressed-tensors, fp64, non-power-of-two blocks).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import triton

from ..formats import quantize as _ref
from .fp8_tiles import _row_kernel, _tile_kernel

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: float32(1) / float32(448), the reciprocal PyTorch's CUDA division uses.
INV_FP8_MAX = float(np.float32(1.0) / np.float32(448.0))

_MAX_GRID_Y = 65535
#: weight dtypes whose ``w / scale`` uses the reciprocal + FMA correction
#: (verified exhaustively, see the module docstring); others use ``div_rn``.
#: ``FP8_OVERLAY_EXACT_DIV=1`` switches it off (``div_rn`` everywhere).
FAST_DIV_DTYPES: tuple = (
    () if os.environ.get("FP8_OVERLAY_EXACT_DIV", "0") not in ("", "0") else (torch.bfloat16, torch.float16)
)
#: division modes of the kernels (``DIV`` constexpr). ``DIV_MUL`` is *not*
#: exact; it exists only to measure what exact division costs.
DIV_RN, DIV_FAST, DIV_MUL = 0, 1, 2
_TAB_CACHE_MAX = 1024
#: warps per program for tiles of >= 16384 elements (128x128 blocks), by
#: division mode. Measured on an H200 for the 7B model (BENCHMARKS.md): the
#: division-free quotient is fastest with 4 (6.2 ms vs 7.4 with 16), ``div_rn``
#: with 16 (7.4 ms vs 8.9 with 4). ``FP8_OVERLAY_TILE_WARPS`` overrides both.
_WARPS_ENV = os.environ.get("FP8_OVERLAY_TILE_WARPS")
BIG_TILE_WARPS = {DIV_RN: 16, DIV_FAST: 4, DIV_MUL: 4} if _WARPS_ENV is None else {
    d: int(_WARPS_ENV) for d in (DIV_RN, DIV_FAST, DIV_MUL)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------- launchers
def _supported(w: torch.Tensor, recipe: str) -> bool:
    if recipe == "hf":
        return w.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return w.dtype in (torch.bfloat16, torch.float32)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _consts(recipe: str, dtype: torch.dtype, device: torch.device, division: str) -> dict:
    hf = recipe == "hf"
    cd = _ref.scale_dtype(recipe, dtype)
    if division == "auto":
        division = "recip" if device.type == "cuda" else "true"
    if division not in ("recip", "true"):
        raise ValueError(f"division must be 'auto', 'recip' or 'true', got {division!r}")
    manual = _interpreting()
    return dict(
        HF=hf,
        CT_BF16=(not hf and cd == torch.bfloat16),
        EPS=float(torch.finfo(cd).eps),
        RECIP=division == "recip",
        INV=INV_FP8_MAX,
        MANUAL=manual,
        DIV=DIV_FAST if (dtype in FAST_DIV_DTYPES and not manual) else DIV_RN,
    ), cd


def scale_shape(shape, strategy: str, block=None) -> tuple[int, ...]:
    """Shape of the scale the backend returns (before quantize_tensor's reshape)."""
    rows, cols = shape
    if strategy == "tensor":
        return ()
    if strategy == "channel":
        return (rows, 1)
    bn, bk = block
    return (-(-rows // bn), -(-cols // bk))


def _tile_shape(strategy, block, cols):
    if strategy == "block":
        return tuple(block)
    if strategy == "channel":
        return (4, 512) if cols >= 512 else (16, max(16, triton.next_power_of_2(cols)))
    return (32, 256) if cols >= 256 else (128, max(16, triton.next_power_of_2(cols)))


class _Group:
    __slots__ = ("base", "idx", "rows", "cols", "stride", "tab_base", "tmax_base", "ntiles", "aligned",
                 "even", "idx_dev", "BR", "BC")


class _Plan:
    """Shape groups and the device table of one call (cached by content)."""

    __slots__ = ("groups", "tab", "ntmax")


_TAB_CACHE: "OrderedDict[tuple, _Plan]" = OrderedDict()
_stats = {"plan_hits": 0, "plan_misses": 0}


def _make_plan(key, tensors, q_offs, s_offs, strategy, block, es, dev, cache=True) -> _Plan:
    if cache:
        p = _TAB_CACHE.get(key)
        if p is not None:
            _TAB_CACHE.move_to_end(key)
            _stats["plan_hits"] += 1
            return p
    _stats["plan_misses"] += 1
    by_shape: dict = {}
    for i, w in enumerate(tensors):
        rows, cols = w.shape
        st = w.stride(0) if rows > 1 else cols
        by_shape.setdefault((rows, cols, st), []).append(i)
    groups, table, ntmax = [], [], 0
    for (rows, cols, st), idx in by_shape.items():
        BR, BC = _tile_shape(strategy, block, cols)
        if strategy == "channel":
            ntiles = triton.cdiv(rows, BR)
        else:
            ntiles = triton.cdiv(rows, BR) * triton.cdiv(cols, BC)
        for c0 in range(0, len(idx), _MAX_GRID_Y):
            sub = idx[c0 : c0 + _MAX_GRID_Y]
            sub.sort(key=lambda i: tensors[i].data_ptr())
            base = sub[0]
            bp = tensors[base].data_ptr()
            g = _Group()
            g.base, g.idx, g.rows, g.cols, g.stride = base, sub, rows, cols, st
            g.tab_base, g.tmax_base, g.ntiles, g.BR, g.BC = len(table), ntmax, ntiles, BR, BC
            aligned = bp % 16 == 0 and cols % 16 == 0 and st % 16 == 0
            for i in sub:
                d = tensors[i].data_ptr() - bp
                assert d % es == 0
                off = d // es
                aligned = aligned and off % 16 == 0 and q_offs[i] % 16 == 0
                table += [off, q_offs[i], s_offs[i]]
            g.aligned = aligned
            g.even = strategy != "channel" and rows % BR == 0 and cols % BC == 0
            g.idx_dev = torch.tensor(sub, dtype=torch.int64, device=dev)
            ntmax += len(sub) * ntiles
            groups.append(g)
    p = _Plan()
    p.groups, p.ntmax = groups, ntmax
    p.tab = torch.tensor(table, dtype=torch.int64, device=dev)
    if cache:
        _TAB_CACHE[key] = p
        while len(_TAB_CACHE) > _TAB_CACHE_MAX:
            _TAB_CACHE.popitem(last=False)
    return p


def _launch_plan(p: _Plan, tensors, strategy, k, q_base, s_base, tmax, num_warps=None, **variant):
    """Launch every group of ``p`` (``variant``: diagnostic constexpr overrides)."""
    dev = q_base.device
    k = {**k, **{n: v for n, v in variant.items() if n in k}}
    variant = {n: v for n, v in variant.items() if n not in k}
    for g in p.groups:
        src = tensors[g.base]
        n = len(g.idx)
        if strategy == "channel":
            _row_kernel[(g.ntiles, n)](
                src, p.tab, q_base, s_base, tmax, g.rows, g.cols, g.stride, g.tab_base, g.tmax_base,
                BR=g.BR, BC=g.BC, ALIGNED=g.aligned, num_warps=num_warps or 4, **k)
            continue
        nw = num_warps or (BIG_TILE_WARPS[k["DIV"]] if g.BR * g.BC >= 16384 else 4)
        args = (src, p.tab, q_base, s_base, tmax)
        if strategy == "block":
            _tile_kernel[(g.ntiles, n)](
                *args, tmax, g.rows, g.cols, g.stride, g.tab_base, g.tmax_base, MODE=0,
                BR=g.BR, BC=g.BC, ALIGNED=g.aligned, EVEN=g.even, num_warps=nw, **k, **variant)
        else:
            _tile_kernel[(g.ntiles, n)](
                *args, tmax, g.rows, g.cols, g.stride, g.tab_base, g.tmax_base, MODE=1,
                BR=g.BR, BC=g.BC, ALIGNED=g.aligned, EVEN=g.even, num_warps=nw, **k, **variant)
            seg = tmax[g.tmax_base : g.tmax_base + n * g.ntiles].view(n, g.ntiles)
            am = seg.amax(dim=1)
            _tile_kernel[(g.ntiles, n)](
                *args, am, g.rows, g.cols, g.stride, g.tab_base, g.tmax_base, MODE=2,
                BR=g.BR, BC=g.BC, ALIGNED=g.aligned, EVEN=g.even, num_warps=nw, **k, **variant)
    return dev


def _fits(w, recipe, strategy, block) -> bool:
    if not _supported(w, recipe) or w.ndim != 2 or w.numel() == 0:
        return False
    if w.stride(1) != 1 and w.shape[1] > 1:
        return False
    if w.shape[0] * max(w.stride(0), w.shape[1]) >= 2**31 - 2**20:
        return False  # intra-tensor offsets are int32 in the kernels
    if strategy == "block" and not (_pow2(block[0]) and _pow2(block[1]) and block[0] * block[1] <= 65536):
        return False
    return True


def _reference(w, recipe, strategy, block):
    if strategy == "block":
        return _ref._torch_blockwise(w, recipe, block)
    return {"tensor": _ref._torch_tensorwise, "channel": _ref._torch_channelwise}[strategy](w, recipe)


def _single(w, recipe, strategy, block=None, division="auto"):
    if not _fits(w, recipe, strategy, block):
        return _reference(w, recipe, strategy, block)
    _, cd = _consts(recipe, w.dtype, w.device, division)
    rows, cols = w.shape
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(scale_shape((rows, cols), strategy, block), dtype=cd, device=w.device)
    tmax = _quantize_into([w], recipe, strategy, block, q.view(torch.uint8).reshape(-1), scale.reshape(-1),
                          [0], [0], division)
    return q, scale, tmax.amax().to(cd)


def tensorwise(w, recipe, division="auto"):
    return _single(w, recipe, "tensor", None, division)


def channelwise(w, recipe, division="auto"):
    return _single(w, recipe, "channel", None, division)


def blockwise(w, recipe, block, division="auto"):
    return _single(w, recipe, "block", tuple(block), division)


def _plan_key(tensors, q_offs, s_offs, strategy, block):
    """Cache key of a plan: relative source offsets (plans are reused for
    tensors at other addresses with the same layout), shapes, strides and
    output offsets."""
    w0 = tensors[0]
    ptrs = [w.data_ptr() for w in tensors]
    m = min(ptrs)
    return (strategy, block, w0.device, w0.dtype, m % 256,
            tuple((p - m, *w.shape, w.stride(0), qo, so) for p, w, qo, so in zip(ptrs, tensors, q_offs, s_offs)))


def _quantize_into(tensors, recipe, strategy, block, q_base, s_base, q_offs, s_offs, division,
                   cache=True, num_warps=None, **variant):
    """Core launcher: every tensor must pass :func:`_fits`. ``q_base`` is a flat
    byte (or fp8) buffer, ``s_base`` a flat buffer of the scale dtype; offsets
    are in elements of each. Returns the per-tile amax scratch (float32)."""
    w0 = tensors[0]
    dev = w0.device
    k, _ = _consts(recipe, w0.dtype, dev, division)
    es = w0.element_size()
    key = _plan_key(tensors, q_offs, s_offs, strategy, block)
    p = _make_plan(key, tensors, q_offs, s_offs, strategy, block, es, dev, cache=cache)
    n_at = 1 if variant.get("ATOMIC") else None
    tmax = (torch.zeros if n_at else torch.empty)(max(p.ntmax, 1), dtype=torch.float32, device=dev)
    _launch_plan(p, tensors, strategy, k, q_base.view(FP8_DTYPE), s_base, tmax, num_warps, **variant)
    return tmax


# ------------------------------------------------------------ grouped API
def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def quantize_grouped(
    tensors: Sequence[torch.Tensor],
    recipe: str,
    strategy: str,
    block=None,
    *,
    out: torch.Tensor | None = None,
    q_offsets: Sequence[int] | None = None,
    s_offsets: Sequence[int] | None = None,
    division: str = "auto",
    amax: str = "tensor",
    views: bool = True,
):
    """Quantize many 2-D weights with as few launches as possible (one per
    distinct shape, two for ``tensor``).

    ``tensors`` share one dtype and device. Without ``out``, one flat byte
    buffer is allocated and each result is a view of it. With ``out`` (a flat
    ``uint8`` buffer, e.g. a wire bucket) the fp8 bytes of tensor ``i`` go to
    ``out[q_offsets[i]:]`` (16-byte aligned offsets keep the fast vectorised
    path) and its scale to ``out[s_offsets[i]:]`` (aligned to the scale
    dtype). Returns ``(qs, scales, amax)``: lists of views shaped like the
    per-tensor backend's outputs (``None`` with ``views=False``), and with
    ``amax="tensor"`` a float32 ``(n,)`` tensor of each tensor's max |w| (NaN
    reported as inf); with ``amax="any"`` a float32 tensor whose entries are
    all finite iff every weight is finite (no per-tensor reduction: the
    cheapest finiteness check). Nothing here synchronizes with the host.
    """
    n = len(tensors)
    if amax not in ("tensor", "any"):
        raise ValueError(f"amax must be 'tensor' or 'any', got {amax!r}")
    if n == 0:
        return ([], [], torch.zeros(0)) if views else (None, None, torch.zeros(0))
    w0 = tensors[0]
    dev, dtype = w0.device, w0.dtype
    block = tuple(block) if block is not None else None
    _, cd = _consts(recipe, dtype, dev, division)
    s_es = torch.tensor([], dtype=cd).element_size()
    shapes = [tuple(t.shape) for t in tensors]
    if out is None:
        q_offsets, s_offsets, end = [], [], 0
        for sh in shapes:
            q_offsets.append(end)
            end = _align(end + sh[0] * sh[1], 64)
        for sh in shapes:
            s_offsets.append(end)
            end = _align(end + int(np.prod(scale_shape(sh, strategy, block), dtype=np.int64)) * s_es, 64)
        out = torch.empty(max(end, 1), dtype=torch.uint8, device=dev)
    for t in tensors:
        if t.dtype != dtype or t.device != dev:
            raise ValueError("quantize_grouped: tensors must share dtype and device")
    if any(so % s_es for so in s_offsets):
        raise ValueError("scale offsets must be aligned to the scale dtype")
    qs = scales = None
    if views:
        sshapes = [scale_shape(s, strategy, block) for s in shapes]
        qs = [out[o : o + r * c].view(FP8_DTYPE).view(r, c) for o, (r, c) in zip(q_offsets, shapes)]
        scales = [
            out[o : o + int(np.prod(ss, dtype=np.int64)) * s_es].view(cd).view(ss)
            for o, ss in zip(s_offsets, sshapes)
        ]
    fast = [i for i, t in enumerate(tensors) if _fits(t, recipe, strategy, block)]
    slow = [i for i in range(n) if i not in set(fast)] if len(fast) != n else []
    slow_amax = []
    for i in slow:  # rare: reference path, copied into place
        q, s, a = _reference(tensors[i], recipe, strategy, block)
        nq, ns = q.numel(), s.numel()
        out[q_offsets[i] : q_offsets[i] + nq].copy_(q.view(torch.uint8).reshape(-1))
        out[s_offsets[i] : s_offsets[i] + ns * s_es].copy_(s.reshape(-1).view(torch.uint8))
        slow_amax.append(a.float().reshape(1))
    tmax = None
    if fast:
        nbytes = out.numel() // s_es * s_es
        s_base = out[:nbytes].view(cd)
        ft = tensors if len(fast) == n else [tensors[i] for i in fast]
        fq = q_offsets if len(fast) == n else [q_offsets[i] for i in fast]
        fs = [so // s_es for so in (s_offsets if len(fast) == n else [s_offsets[i] for i in fast])]
        tmax = _quantize_into(ft, recipe, strategy, block, out, s_base, fq, fs, division)
    if amax == "any":
        parts = ([tmax] if tmax is not None else []) + slow_amax
        return qs, scales, torch.cat(parts) if len(parts) > 1 else parts[0]
    res = torch.zeros(n, dtype=torch.float32, device=dev)
    if fast:
        key = _plan_key(ft, fq, fs, strategy, block)
        p = _TAB_CACHE[key]
        fast_dev = None if len(fast) == n else torch.tensor(fast, dtype=torch.int64, device=dev)
        for g in p.groups:
            seg = tmax[g.tmax_base : g.tmax_base + len(g.idx) * g.ntiles].view(len(g.idx), g.ntiles).amax(1)
            dst = g.idx_dev if fast_dev is None else fast_dev[g.idx_dev]
            res.index_copy_(0, dst, seg)
    for i, a in zip(slow, slow_amax):
        res[i] = a[0]
    return qs, scales, res


class PreparedGroup:
    """A grouped launch whose plan (shape groups + device table) is built once.

    Made by :func:`prepare_grouped` for fixed sources (same addresses, shapes
    and strides) and fixed output offsets, e.g. the weights of one wire bucket
    that are sent again every step. Calling it does no per-tensor host work:
    it launches one kernel per shape group and returns the per-tile amax
    scratch (finite iff every weight is finite)."""

    __slots__ = ("plan", "k", "strategy", "cd", "s_es", "num_warps")

    def __call__(self, tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        p = self.plan
        nbytes = out.numel() // self.s_es * self.s_es
        s_base = out[:nbytes].view(self.cd)
        tmax = torch.empty(max(p.ntmax, 1), dtype=torch.float32, device=out.device)
        _launch_plan(p, tensors, self.strategy, self.k, out.view(FP8_DTYPE), s_base, tmax, self.num_warps)
        return tmax


def prepare_grouped(tensors, recipe, strategy, block, q_offsets, s_offsets, division="auto", num_warps=None):
    """Plan a :func:`quantize_grouped` call (``out`` given, ``amax="any"``)
    once; returns a :class:`PreparedGroup`, or ``None`` when some tensor needs
    the reference path (then call :func:`quantize_grouped`). The caller must
    call it with the very same tensors (addresses, shapes, strides) and an
    ``out`` buffer laid out as ``q_offsets`` / ``s_offsets`` (bytes) say."""
    if not tensors:
        return None
    block = tuple(block) if block is not None else None
    w0 = tensors[0]
    dev, dtype = w0.device, w0.dtype
    for t in tensors:
        if t.dtype != dtype or t.device != dev or not _fits(t, recipe, strategy, block):
            return None
    k, cd = _consts(recipe, dtype, dev, division)
    s_es = cd.itemsize
    if any(so % s_es for so in s_offsets):
        raise ValueError("scale offsets must be aligned to the scale dtype")
    fs = [so // s_es for so in s_offsets]
    key = _plan_key(tensors, q_offsets, fs, strategy, block)
    g = PreparedGroup()
    g.plan = _make_plan(key, tensors, list(q_offsets), fs, strategy, block, w0.element_size(), dev, cache=False)
    g.k, g.strategy, g.cd, g.s_es, g.num_warps = k, strategy, cd, s_es, num_warps
    return g


def quantize_layout_grouped(tensors, layout, **kw):
    """:func:`quantize_grouped` for an ``FP8Layout``: returns ``(qs, scales, amax)``
    with scales shaped as :func:`formats.quantize_tensor` returns them."""
    recipe = "hf" if layout.method == "fp8" else "ct"
    qs, scales, amax = quantize_grouped(tensors, recipe, layout.strategy, layout.block_size, **kw)
    if layout.strategy == "tensor" and scales is not None:
        scales = [s.reshape(()) if recipe == "hf" else s.reshape(1) for s in scales]
    return qs, scales, amax


BACKEND = _ref.QuantBackend("triton", tensorwise, channelwise, blockwise)
