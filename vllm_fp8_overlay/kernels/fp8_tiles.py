"""The device code of the FP8 quantization kernels: Triton ``jit`` helpers
(rounding, conversion to e4m3, scale from amax, the exact quotient) and the
two kernels, ``_tile_kernel`` (tensor and block strategies) and
``_row_kernel`` (channel). Every choice is a ``constexpr`` argument set by the
launchers of :mod:`.triton_fp8`, whose docstring says how each one matches
the torch reference bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
def _quant(xf, s, HF: tl.constexpr, CT_BF16: tl.constexpr, MANUAL: tl.constexpr, DIV: tl.constexpr):
    """float32 weights -> fp8 for scale ``s`` (a scalar or a broadcastable column)."""
    if DIV == 1:
        # x/s without a division: both scaled by 2**64 when s is tiny (exact;
        # keeps every residual and x itself out of the subnormal range), then
        # q0 = x*r and two residual corrections (the residual x - q*s is exact
        # in an FMA); the second one rounds the quotient correctly
        k = tl.where(s < 7.888609052210118e-31, 1.8446744073709552e19, 1.0)  # 2**-100, 2**64
        sk = s * k
        xk = xf * k
        r = tl.math.div_rn(tl.full(sk.shape, 1.0, tl.float32), sk)
        q0 = xk * r
        q1 = tl.fma(tl.fma(-q0, sk, xk), r, q0)
        y = tl.fma(tl.fma(-q1, sk, xk), r, q1)
        if HF:
            y = tl.where(q0 == 0.0, q0, y)  # keeps the sign of a zero quotient
    elif DIV == 2:
        y = xf * tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    else:
        y = tl.math.div_rn(xf, s)
    if not HF:
        y = _round_cd(y, CT_BF16, MANUAL)
        y = tl.where(y == 0.0, 0.0, y)  # the reference's "+ 0.0": -0 -> +0
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return _to_e4m3(y, MANUAL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_to_inf(m):
    return tl.where(m != m, float("inf"), m)


@triton.jit
def _absmax(xf, axis: tl.constexpr, MANUAL: tl.constexpr):
    """max |x| along ``axis``; NaN propagates (the caller maps it to inf).
    On the GPU one ``max.NaN`` per element; the interpreter runs custom
    combine functions element by element in Python, so there NaN is mapped
    first and the built-in max is used."""
    if MANUAL:
        return tl.max(_nan_to_inf(tl.abs(xf)), axis=axis)
    else:
        return tl.reduce(tl.abs(xf), axis, _max_nan)


@triton.jit
def _quant_store(ptrs, xf, s, mask, HF: tl.constexpr, CT_BF16: tl.constexpr, MANUAL: tl.constexpr,
                 DIV: tl.constexpr, EVEN: tl.constexpr):
    """Quantize and store."""
    q = _quant(xf, s, HF, CT_BF16, MANUAL, DIV)
    if EVEN:
        tl.store(ptrs, q)
    else:
        tl.store(ptrs, q, mask=mask)


# -------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["tab_base", "tmax_base"])
def _tile_kernel(
    src, tab, q_out, s_out, tmax, amax_in, rows, cols, stride, tab_base, tmax_base,
    MODE: tl.constexpr,  # 0: block scales; 1: tensor amax pass; 2: tensor quantize pass
    HF: tl.constexpr, CT_BF16: tl.constexpr, EPS: tl.constexpr,
    RECIP: tl.constexpr, INV: tl.constexpr, MANUAL: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, ALIGNED: tl.constexpr, EVEN: tl.constexpr,
    DIV: tl.constexpr, ATOMIC: tl.constexpr = False, IDX64: tl.constexpr = False,
):
    """One program per (BR, BC) tile of tensor ``program_id(1)`` of a shape group.

    ``tab[tab_base + 3 t + (0, 1, 2)]``: element offset of the tensor from
    ``src``, of its fp8 output in ``q_out`` and of its scales in ``s_out``.
    The tile's amax goes to ``tmax[tmax_base + t * ntiles + pid]`` (with
    ``ATOMIC``, a diagnostic variant: ``atomic_max`` into ``tmax[tmax_base + t]``).
    """
    pid = tl.program_id(0)
    t = tl.program_id(1)
    d = tab + tab_base + t * 3
    src_off = tl.load(d)
    q_off = tl.load(d + 1)
    s_off = tl.load(d + 2)
    if ALIGNED:
        src_off = tl.multiple_of(src_off, 16)
        q_off = tl.multiple_of(q_off, 16)
    ncb = tl.cdiv(cols, BC)
    ntiles = tl.cdiv(rows, BR) * ncb
    br = pid // ncb
    bc = pid % ncb
    r0 = br * BR
    c0 = bc * BC
    rr = tl.arange(0, BR)
    cc = tl.arange(0, BC)
    if IDX64:
        offs = rr.to(tl.int64)[:, None] * stride + cc[None, :]
        qoffs = rr.to(tl.int64)[:, None] * cols + cc[None, :]
    else:
        offs = rr[:, None] * stride + cc[None, :]
        qoffs = rr[:, None] * cols + cc[None, :]
    org = src_off + r0.to(tl.int64) * stride + c0
    qorg = q_off + r0.to(tl.int64) * cols + c0
    if ALIGNED:
        org = tl.multiple_of(org, 16)
        qorg = tl.multiple_of(qorg, 16)
    if EVEN:
        mask = None
        x = tl.load(src + org + offs)
    else:
        mask = (rr < rows - r0)[:, None] & (cc < cols - c0)[None, :]
        x = tl.load(src + org + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if MODE == 2:
        amax = tl.load(amax_in + t)
    else:
        amax = _absmax(_absmax(xf, 1, MANUAL), 0, MANUAL)
        amax = _nan_to_inf(amax)
        if ATOMIC:
            tl.atomic_max(tmax + tmax_base + t, amax)
        else:
            tl.store(tmax + tmax_base + t * ntiles + pid, amax)
    if MODE != 1:
        s = _scale_from_amax(amax, HF, CT_BF16, EPS, RECIP, INV, MANUAL)
        if MODE == 0:
            tl.store(s_out + s_off + pid, s.to(s_out.dtype.element_ty))
        else:
            if pid == 0:
                tl.store(s_out + s_off, s.to(s_out.dtype.element_ty))
        _quant_store(q_out + qorg + qoffs, xf, s, mask, HF, CT_BF16, MANUAL, DIV, EVEN)


@triton.jit
def _row_amax_step(row_src, rmask, c0, cols, acc, BC: tl.constexpr, MANUAL: tl.constexpr):
    c = c0 + tl.arange(0, BC)
    m = rmask[:, None] & (c < cols)[None, :]
    x = tl.load(row_src + c[None, :], mask=m, other=0.0)
    return _max_nan(acc, _absmax(x.to(tl.float32), 1, MANUAL))


@triton.jit
def _row_quant_step(row_src, row_q, rmask, c0, cols, s, BC: tl.constexpr,
                    HF: tl.constexpr, CT_BF16: tl.constexpr, MANUAL: tl.constexpr, DIV: tl.constexpr):
    c = c0 + tl.arange(0, BC)
    m = rmask[:, None] & (c < cols)[None, :]
    x = tl.load(row_src + c[None, :], mask=m, other=0.0)
    q = _quant(x.to(tl.float32), s[:, None], HF, CT_BF16, MANUAL, DIV)
    tl.store(row_q + c[None, :], q, mask=m)


@triton.jit(do_not_specialize=["tab_base", "tmax_base"])
def _row_kernel(
    src, tab, q_out, s_out, tmax, rows, cols, stride, tab_base, tmax_base,
    HF: tl.constexpr, CT_BF16: tl.constexpr, EPS: tl.constexpr,
    RECIP: tl.constexpr, INV: tl.constexpr, MANUAL: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, ALIGNED: tl.constexpr, DIV: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)
    d = tab + tab_base + t * 3
    src_off = tl.load(d)
    q_off = tl.load(d + 1)
    s_off = tl.load(d + 2)
    if ALIGNED:
        src_off = tl.multiple_of(src_off, 16)
        q_off = tl.multiple_of(q_off, 16)
    nprog = tl.cdiv(rows, BR)
    r0 = pid * BR
    rr = tl.arange(0, BR)
    rmask = rr < rows - r0
    org = src_off + r0.to(tl.int64) * stride
    qorg = q_off + r0.to(tl.int64) * cols
    if ALIGNED:
        org = tl.multiple_of(org, 16)
        qorg = tl.multiple_of(qorg, 16)
    row_src = src + org + rr[:, None] * stride
    row_q = q_out + qorg + rr[:, None] * cols
    acc = tl.zeros((BR,), tl.float32)
    if MANUAL:  # interpreter: range() over a run-time scalar is not supported there
        c0 = tl.zeros((), tl.int32)
        while c0 < cols:
            acc = _row_amax_step(row_src, rmask, c0, cols, acc, BC, MANUAL)
            c0 += BC
    else:
        for c0 in range(0, cols, BC):
            acc = _row_amax_step(row_src, rmask, c0, cols, acc, BC, MANUAL)
    acc = _nan_to_inf(acc)
    s = _scale_from_amax(acc, HF, CT_BF16, EPS, RECIP, INV, MANUAL)
    tl.store(s_out + s_off + r0 + rr, s.to(s_out.dtype.element_ty), mask=rmask)
    tl.store(tmax + tmax_base + t * nprog + pid, tl.max(tl.where(rmask, acc, 0.0), axis=0))
    if MANUAL:
        c0 = tl.zeros((), tl.int32)
        while c0 < cols:
            _row_quant_step(row_src, row_q, rmask, c0, cols, s, BC, HF, CT_BF16, MANUAL, DIV)
            c0 += BC
    else:
        for c0 in range(0, cols, BC):
            _row_quant_step(row_src, row_q, rmask, c0, cols, s, BC, HF, CT_BF16, MANUAL, DIV)
