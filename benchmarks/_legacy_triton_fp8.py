"""Previous kernel revision, kept only as the "before" baseline of kernel_micro.py.

Fused Triton BF16 -> FP8 (e4m3fn) quantization kernels.

Bit-for-bit the arithmetic of :mod:`vllm_fp8_overlay.formats.quantize` (the
``torch`` backend) on the same device, in one pass over the weight:

* ``block``: one program per ``(bn, bk)`` tile reads the tile once, reduces
  ``amax``, writes the tile's scale and its fp8 bytes (2 bytes read, 1 written
  per element: the minimum).
* ``channel``: one program per group of rows; a first sweep over the columns
  finds each row's ``amax``, a second one quantizes (the re-read mostly hits
  L2).
* ``tensor``: an ``amax`` pass (``atomic_max`` per tensor) then a quantize pass.

Every kernel takes a *segment table*: one int64 row per tensor (source
element offset, rows, cols, row stride, fp8 output offset, scale output
offset). Grid axis 1 walks the table, axis 0 the tiles of a tensor, so a list
of many small matrices (MoE experts) costs one launch, not one per tensor.
Outputs can go into one flat byte buffer at given offsets (a wire bucket), so
the quantized bytes are written once, straight where they are sent from.

Exactness (what the torch reference does, and how it is matched here):

* ``amax / 448`` with a Python scalar is computed by PyTorch on CUDA as
  ``amax * float32(1/448)`` (its true-division kernel turns a CPU-scalar
  divisor into a reciprocal multiply); on CPU it is a true division. The kernel
  does the same per device (``division="auto"``).
* ``w / scale`` (two tensors) is an IEEE float32 division in both places
  (``div_rn`` here; Triton's plain ``/`` would be approximate on the GPU).
* compressed-tensors rounds ``amax / 448`` and ``w / scale`` to the weight
  dtype (round to nearest even), turns ``-0`` into ``+0``, clamps to +-448 and
  casts to fp8 with round to nearest even.
* Triton's CPU interpreter (``TRITON_INTERPRET=1``) rounds float32 -> bf16 by
  truncation and float32 -> fp8 with ties away; under the interpreter the
  kernels therefore round with integer bit arithmetic (exact RNE). On the GPU
  they use the hardware conversions, which are RNE.
* ``amax`` maps NaN to +inf so the caller's finiteness check still fires.

Supported: bf16 and float32 weights for both recipes, fp16 for the ``hf``
recipe; power-of-two block sizes. Everything else falls back to the torch
backend (fp16 with compressed-tensors, fp64, non-power-of-two blocks).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from vllm_fp8_overlay.formats import quantize as _ref

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: float32(1) / float32(448), the reciprocal PyTorch's CUDA division uses.
INV_FP8_MAX = float(np.float32(1.0) / np.float32(448.0))

_DESC_W = 6  # int64 words per segment-table row
_MAX_GRID_Y = 65535


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------- jit helpers
@triton.jit
def _round_bf16(y, MANUAL: tl.constexpr):
    """float32 -> nearest-even bfloat16 value, kept in float32."""
    if MANUAL:
        u = y.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return y.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _round_cd(y, CT_BF16: tl.constexpr, MANUAL: tl.constexpr):
    if CT_BF16:
        return _round_bf16(y, MANUAL)
    else:
        return y


@triton.jit
def _to_e4m3(y, MANUAL: tl.constexpr):
    """float32 in [-448, 448] -> float8_e4m3fn, round to nearest even."""
    if MANUAL:
        u = y.to(tl.uint32, bitcast=True)
        sign = (u >> 24) & 0x80
        a = u & 0x7FFFFFFF
        af = a.to(tl.float32, bitcast=True)
        r = a + 0x7FFFF + ((a >> 20) & 1)
        e = (r >> 23) - 120
        normal = (e << 3) | ((r >> 20) & 7)
        # subnormals: multiples of 2**-9; adding 2**14 rounds to them (RNE)
        sub = (((af + 16384.0) - 16384.0) * 512.0).to(tl.uint32)
        byte = tl.where(af < 0.015625, sub, normal) | sign
        return byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return y.to(tl.float8e4nv)


@triton.jit
def _scale_from_amax(amax, HF: tl.constexpr, CT_BF16: tl.constexpr, EPS: tl.constexpr,
                     RECIP: tl.constexpr, INV: tl.constexpr, MANUAL: tl.constexpr):
    """amax (float32) -> dequantization scale (float32 holding a compute-dtype value)."""
    if RECIP:
        s = amax * INV
    else:
        s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if HF:
        s = tl.where(amax == 0.0, 1.0, s)
    else:
        s = _round_cd(s, CT_BF16, MANUAL)
        s = tl.where(s == 0.0, EPS, s)
    return s


@triton.jit
def _quant(xf, s, HF: tl.constexpr, CT_BF16: tl.constexpr, MANUAL: tl.constexpr):
    y = tl.math.div_rn(xf, s)
    if not HF:
        y = _round_cd(y, CT_BF16, MANUAL)
        y = tl.where(y == 0.0, 0.0, y)  # the reference's "+ 0.0": -0 -> +0
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return _to_e4m3(y, MANUAL)


@triton.jit
def _abs_nan_inf(xf):
    a = tl.abs(xf)
    return tl.where(a != a, float("inf"), a)


@triton.jit
def _segment(desc, t, rows1, cols1, stride1, SINGLE: tl.constexpr, ALIGNED: tl.constexpr):
    if SINGLE:
        src_off = tl.zeros((), tl.int64)
        rows = tl.zeros((), tl.int64) + rows1
        cols = tl.zeros((), tl.int64) + cols1
        stride = tl.zeros((), tl.int64) + stride1
        q_off = tl.zeros((), tl.int64)
        s_off = tl.zeros((), tl.int64)
    else:
        d = desc + t * 6
        src_off = tl.load(d)
        rows = tl.load(d + 1)
        cols = tl.load(d + 2)
        stride = tl.load(d + 3)
        q_off = tl.load(d + 4)
        s_off = tl.load(d + 5)
        if ALIGNED:
            src_off = tl.multiple_of(src_off, 16)
            q_off = tl.multiple_of(q_off, 16)
    return src_off, rows, cols, stride, q_off, s_off


# -------------------------------------------------------------------- kernels
@triton.jit
def _tile_kernel(
    src, desc, q_out, s_out, amax_out, rows1, cols1, stride1,
    MODE: tl.constexpr,  # 0: block scales; 1: tensor amax pass; 2: tensor quantize pass
    HF: tl.constexpr, CT_BF16: tl.constexpr, EPS: tl.constexpr,
    RECIP: tl.constexpr, INV: tl.constexpr, MANUAL: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, SINGLE: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    src_off, rows, cols, stride, q_off, s_off = _segment(desc, t, rows1, cols1, stride1, SINGLE, ALIGNED)
    ncb = tl.cdiv(cols, BC)
    ntiles = tl.cdiv(rows, BR) * ncb
    valid = pid < ntiles
    br = pid // ncb
    bc = pid % ncb
    # 64-bit arithmetic only for the tile origin; 32-bit offsets inside it
    r0 = br.to(tl.int64) * BR
    c0 = bc.to(tl.int64) * BC
    rem_r = tl.minimum(rows - r0, BR).to(tl.int32)
    rem_c = tl.minimum(cols - c0, BC).to(tl.int32)
    stride32 = stride.to(tl.int32)
    cols32 = cols.to(tl.int32)
    if ALIGNED:
        stride32 = tl.multiple_of(stride32, 16)
        cols32 = tl.multiple_of(cols32, 16)
        rem_c = tl.multiple_of(rem_c, 16)
    rr = tl.arange(0, BR)
    cc = tl.arange(0, BC)
    mask = (rr < rem_r)[:, None] & (cc < rem_c)[None, :] & valid
    org = src_off + r0 * stride + c0
    qorg = q_off + r0 * cols + c0
    if ALIGNED:
        org = tl.multiple_of(org, 16)
        qorg = tl.multiple_of(qorg, 16)
    tile_src = src + org
    x = tl.load(tile_src + (rr[:, None] * stride32 + cc[None, :]), mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if MODE == 2:
        amax = tl.load(amax_out + t)
    else:
        amax = tl.max(tl.max(_abs_nan_inf(xf), axis=1), axis=0)
        tl.atomic_max(amax_out + t, amax, mask=valid)
    if MODE != 1:
        s = _scale_from_amax(amax, HF, CT_BF16, EPS, RECIP, INV, MANUAL)
        if MODE == 0:
            tl.store(s_out + s_off + pid, s.to(s_out.dtype.element_ty), mask=valid)
        else:
            tl.store(s_out + s_off, s.to(s_out.dtype.element_ty), mask=valid & (pid == 0))
        q = _quant(xf, s, HF, CT_BF16, MANUAL)
        tile_q = q_out + qorg
        tl.store(tile_q + (rr[:, None] * cols32 + cc[None, :]), q, mask=mask)


@triton.jit
def _row_amax_step(row_src, rmask, c0, cols, acc, BC: tl.constexpr):
    c = c0 + tl.arange(0, BC)
    m = rmask[:, None] & (c < cols)[None, :]
    x = tl.load(row_src + c[None, :], mask=m, other=0.0)
    return tl.maximum(acc, tl.max(_abs_nan_inf(x.to(tl.float32)), axis=1))


@triton.jit
def _row_quant_step(row_src, row_q, rmask, c0, cols, s, BC: tl.constexpr,
                    HF: tl.constexpr, CT_BF16: tl.constexpr, MANUAL: tl.constexpr):
    c = c0 + tl.arange(0, BC)
    m = rmask[:, None] & (c < cols)[None, :]
    x = tl.load(row_src + c[None, :], mask=m, other=0.0)
    q = _quant(x.to(tl.float32), s[:, None], HF, CT_BF16, MANUAL)
    tl.store(row_q + c[None, :], q, mask=m)


@triton.jit
def _row_kernel(
    src, desc, q_out, s_out, amax_out, rows1, cols1, stride1,
    HF: tl.constexpr, CT_BF16: tl.constexpr, EPS: tl.constexpr,
    RECIP: tl.constexpr, INV: tl.constexpr, MANUAL: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, SINGLE: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    src_off, rows, cols, stride, q_off, s_off = _segment(desc, t, rows1, cols1, stride1, SINGLE, ALIGNED)
    r0 = pid.to(tl.int64) * BR
    rr = tl.arange(0, BR)
    r = r0 + rr
    rmask = rr < (rows - r0).to(tl.int32)
    stride32 = stride.to(tl.int32)
    cols32 = cols.to(tl.int32)
    if ALIGNED:
        stride32 = tl.multiple_of(stride32, 16)
        cols32 = tl.multiple_of(cols32, 16)
    org = src_off + r0 * stride
    qorg = q_off + r0 * cols
    if ALIGNED:
        org = tl.multiple_of(org, 16)
        qorg = tl.multiple_of(qorg, 16)
    row_src = src + org + rr[:, None] * stride32
    row_q = q_out + qorg + rr[:, None] * cols32
    acc = tl.zeros((BR,), tl.float32)
    if MANUAL:  # interpreter: range() over a run-time scalar is not supported there
        c0 = tl.zeros((), tl.int64)
        while c0 < cols:
            acc = _row_amax_step(row_src, rmask, c0, cols, acc, BC)
            c0 += BC
    else:
        for c0 in range(0, cols, BC):
            acc = _row_amax_step(row_src, rmask, c0, cols, acc, BC)
    s = _scale_from_amax(acc, HF, CT_BF16, EPS, RECIP, INV, MANUAL)
    tl.store(s_out + s_off + r, s.to(s_out.dtype.element_ty), mask=rmask)
    tl.atomic_max(amax_out + t, tl.max(acc, axis=0), mask=pid * BR < rows)
    if MANUAL:
        c0 = tl.zeros((), tl.int64)
        while c0 < cols:
            _row_quant_step(row_src, row_q, rmask, c0, cols, s, BC, HF, CT_BF16, MANUAL)
            c0 += BC
    else:
        for c0 in range(0, cols, BC):
            _row_quant_step(row_src, row_q, rmask, c0, cols, s, BC, HF, CT_BF16, MANUAL)


# ---------------------------------------------------------------- launchers
def _supported(w: torch.Tensor, recipe: str) -> bool:
    if recipe == "hf":
        return w.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return w.dtype in (torch.bfloat16, torch.float32)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _consts(recipe: str, dtype: torch.dtype, device: torch.device, division: str) -> dict:
    hf = recipe == "hf"
    cd = torch.float32 if hf else dtype
    if division == "auto":
        division = "recip" if device.type == "cuda" else "true"
    if division not in ("recip", "true"):
        raise ValueError(f"division must be 'auto', 'recip' or 'true', got {division!r}")
    return dict(
        HF=hf,
        CT_BF16=(not hf and cd == torch.bfloat16),
        EPS=float(torch.finfo(cd).eps),
        RECIP=division == "recip",
        INV=INV_FP8_MAX,
        MANUAL=_interpreting(),
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


def _launch(strategy, recipe, block, srcs, q_base, s_base, q_offs, s_offs, amax, division, single_shape=None):
    """One launch (two for ``tensor``) over ``srcs``; outputs at element offsets
    ``q_offs`` of ``q_base`` (fp8) and ``s_offs`` of ``s_base`` (scale dtype)."""
    w0 = srcs[0]
    dev = w0.device
    k, _ = _consts(recipe, w0.dtype, dev, division)
    n = len(srcs)
    es = w0.element_size()
    base_ptr = w0.data_ptr()
    aligned = True
    rows_max = cols_max = 0
    desc = None
    if single_shape is not None:
        rows1, cols1 = w0.shape
        stride1 = w0.stride(0)
        aligned = base_ptr % 16 == 0 and cols1 % 16 == 0 and stride1 % 16 == 0 and w0.stride(1) == 1
        rows_max, cols_max = rows1, cols1
    else:
        rows1 = cols1 = stride1 = 1
        table = []
        for w, qo, so in zip(srcs, q_offs, s_offs):
            rows, cols = w.shape
            d = w.data_ptr() - base_ptr
            assert d % es == 0 and w.stride(1) == 1
            off = d // es
            st = w.stride(0) if rows > 1 else cols
            aligned = aligned and (off % 16 == 0 and cols % 16 == 0 and st % 16 == 0 and qo % 16 == 0)
            table.append((off, rows, cols, st, qo, so))
            rows_max, cols_max = max(rows_max, rows), max(cols_max, cols)
        aligned = aligned and base_ptr % 16 == 0
        desc = torch.tensor(table, dtype=torch.int64).reshape(-1)
        if dev.type == "cuda":
            desc = desc.pin_memory().to(dev, non_blocking=True)
    desc_arg = desc if desc is not None else amax  # unused when SINGLE
    common = dict(SINGLE=single_shape is not None, ALIGNED=aligned, **k)
    if strategy == "channel":
        BR, BC = (4, 512) if cols_max >= 512 else (16, max(16, triton.next_power_of_2(cols_max)))
        grid = (triton.cdiv(rows_max, BR), n)
        _row_kernel[grid](w0, desc_arg, q_base, s_base, amax, rows1, cols1, stride1,
                          BR=BR, BC=BC, num_warps=4, **common)
        return
    if strategy == "block":
        BR, BC = block
        modes = (0,)
    else:
        BR, BC = (32, 256) if cols_max >= 256 else (128, max(16, triton.next_power_of_2(cols_max)))
        modes = (1, 2)
    nw = 8 if BR * BC >= 16384 else 4
    grid = (triton.cdiv(rows_max, BR) * triton.cdiv(cols_max, BC), n)
    for mode in modes:
        _tile_kernel[grid](w0, desc_arg, q_base, s_base, amax, rows1, cols1, stride1,
                           MODE=mode, BR=BR, BC=BC, num_warps=nw, **common)


def _fits(w, recipe, strategy, block) -> bool:
    if not _supported(w, recipe) or w.ndim != 2 or w.numel() == 0:
        return False
    if w.stride(1) != 1 and w.shape[1] > 1:
        return False
    if strategy == "block" and not (_pow2(block[0]) and _pow2(block[1]) and block[0] * block[1] <= 65536):
        return False
    return True


def _single(w, recipe, strategy, block=None, division="auto"):
    if not _fits(w, recipe, strategy, block):
        ref = {"tensor": _ref._torch_tensorwise, "channel": _ref._torch_channelwise}
        if strategy == "block":
            return _ref._torch_blockwise(w, recipe, block)
        return ref[strategy](w, recipe)
    if w.stride(1) != 1:
        w = w.contiguous()
    _, cd = _consts(recipe, w.dtype, w.device, division)
    rows, cols = w.shape
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(scale_shape((rows, cols), strategy, block), dtype=cd, device=w.device)
    amax = torch.zeros(1, dtype=torch.float32, device=w.device)
    _launch(strategy, recipe, block, [w], q, scale, [0], [0], amax, division)
    return q, scale, amax[0].to(cd)


def tensorwise(w, recipe, division="auto"):
    return _single(w, recipe, "tensor", None, division)


def channelwise(w, recipe, division="auto"):
    return _single(w, recipe, "channel", None, division)


def blockwise(w, recipe, block, division="auto"):
    return _single(w, recipe, "block", tuple(block), division)


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
):
    """Quantize many 2-D weights with as few launches as possible.

    ``tensors`` share one dtype and device. Without ``out``, one flat byte
    buffer is allocated and each result is a view of it. With ``out`` (a flat
    ``uint8`` buffer, e.g. a wire bucket) the fp8 bytes of tensor ``i`` go to
    ``out[q_offsets[i]:]`` (16-byte aligned offsets keep the fast vectorised
    path) and its scale to ``out[s_offsets[i]:]`` (aligned to the scale
    dtype). Returns ``(qs, scales, amax)``: lists of views shaped like the
    per-tensor backend's outputs, and a float32 ``(n,)`` tensor of each
    tensor's max |w| (NaN reported as inf).
    """
    n = len(tensors)
    if n == 0:
        return [], [], torch.zeros(0)
    w0 = tensors[0]
    dev, dtype = w0.device, w0.dtype
    block = tuple(block) if block is not None else None
    _, cd = _consts(recipe, dtype, dev, division)
    s_es = torch.tensor([], dtype=cd).element_size()
    shapes = [tuple(t.shape) for t in tensors]
    sshapes = [scale_shape(s, strategy, block) for s in shapes]
    if out is None:
        q_offsets, s_offsets, end = [], [], 0
        for sh in shapes:
            q_offsets.append(end)
            end = _align(end + sh[0] * sh[1], 64)
        for ss in sshapes:
            s_offsets.append(end)
            end = _align(end + int(np.prod(ss, dtype=np.int64)) * s_es, 64)
        out = torch.empty(max(end, 1), dtype=torch.uint8, device=dev)
    for t in tensors:
        if t.dtype != dtype or t.device != dev:
            raise ValueError("quantize_grouped: tensors must share dtype and device")
    if any(so % s_es for so in s_offsets):
        raise ValueError("scale offsets must be aligned to the scale dtype")
    qs = [out[o : o + r * c].view(FP8_DTYPE).view(r, c) for o, (r, c) in zip(q_offsets, shapes)]
    scales = [
        out[o : o + int(np.prod(ss, dtype=np.int64)) * s_es].view(cd).view(ss)
        for o, ss in zip(s_offsets, sshapes)
    ]
    amax = torch.zeros(n, dtype=torch.float32, device=dev)
    fast = [i for i, t in enumerate(tensors) if _fits(t, recipe, strategy, block) and t.stride(1) == 1]
    fast_set = set(fast)
    for i in range(n):
        if i not in fast_set:  # rare: reference path, copied into place
            q, s, a = _single(tensors[i], recipe, strategy, block, division)
            qs[i].copy_(q)
            scales[i].copy_(s.reshape(sshapes[i]))
            amax[i] = a.float()
    if fast:
        q_base = out.view(FP8_DTYPE)
        nbytes = out.numel() // s_es * s_es
        s_base = out[:nbytes].view(cd)
        # the kernel addresses every source relative to the lowest pointer
        fast.sort(key=lambda i: tensors[i].data_ptr())
        for g0 in range(0, len(fast), _MAX_GRID_Y):
            idx = fast[g0 : g0 + _MAX_GRID_Y]
            srcs = [tensors[i] for i in idx]
            sub_amax = amax if idx == list(range(n)) else torch.zeros(len(idx), dtype=torch.float32, device=dev)
            _launch(strategy, recipe, block, srcs, q_base, s_base,
                    [q_offsets[i] for i in idx], [s_offsets[i] // s_es for i in idx], sub_amax, division)
            if sub_amax is not amax:
                amax[torch.tensor(idx, device=dev)] = sub_amax
    return qs, scales, amax


def quantize_layout_grouped(tensors, layout, **kw):
    """:func:`quantize_grouped` for an ``FP8Layout``: returns ``(qs, scales, amax)``
    with scales shaped as :func:`formats.quantize_tensor` returns them."""
    recipe = "hf" if layout.method == "fp8" else "ct"
    qs, scales, amax = quantize_grouped(tensors, recipe, layout.strategy, layout.block_size, **kw)
    if layout.strategy == "tensor":
        scales = [s.reshape(()) if recipe == "hf" else s.reshape(1) for s in scales]
    return qs, scales, amax


BACKEND = _ref.QuantBackend("triton", tensorwise, channelwise, blockwise)
