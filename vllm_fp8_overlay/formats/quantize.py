"""BF16 -> FP8 (e4m3fn) weight quantization in checkpoint format.

Two rounding recipes exist, selected by the layout's ``method``:

``"ct"`` (compressed-tensors, bit-identical to ``compressed_tensors`` 0.17):
    all arithmetic in the weight's own dtype (bf16 for a bf16 trainer)::

        amax  = max(|w|) over the group            (exact, weight dtype)
        scale = amax / 448.0                       (rounded to weight dtype)
        scale = finfo(weight dtype).eps  where scale == 0
        q     = fp8(clamp(w / scale + 0.0, -448, 448))
                  # w / scale rounded to the weight dtype first, as the
                  # library does; "+ 0.0" turns -0.0 into +0.0 like the
                  # library's zero-point add.
    The scale tensor keeps the weight dtype (that is what llm-compressor
    writes; vLLM casts it to float32 on load).

``"hf"`` (quant_method "fp8", DeepSeek-V3 / Qwen3-FP8 convention), float32::

        amax  = max(|w|) over the group            (float32)
        scale = amax / 448.0                       (float32; 1.0 where amax == 0)
        q     = fp8(clamp(float32(w) / scale, -448, 448))
    The scale (``weight_scale`` / ``weight_scale_inv``) is float32 and is the
    dequantization multiplier: ``w ~= q * scale``.

The elementwise work sits behind a small backend table
(:class:`QuantBackend`) so a fused GPU kernel can be registered later with
:func:`register_backend` without changing any caller.  The default ``torch``
backend works on CPU and CUDA, processes big weights in row chunks (it never
materialises a float32 copy of a whole large layer) and has no per-element
Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from .detect import FP8Layout

__all__ = [
    "FP8_E4M3_MAX",
    "QuantBackend",
    "register_backend",
    "get_backend",
    "quantize_tensor",
    "quantize_weights",
    "expand_fused_experts",
    "dequantize_tensor",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0

#: Elements per processing chunk (per-chunk temporaries are a few times this).
DEFAULT_CHUNK_ELEMENTS = 1 << 24

_CT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ----------------------------------------------------------------- recipes
def _recipe(layout: FP8Layout) -> str:
    return "hf" if layout.method == "fp8" else "ct"


def scale_dtype(recipe: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are computed and stored in: float32 for HF ``fp8``
    checkpoints (``weight_scale_inv`` is float32 there whatever the weight's
    dtype), the weight's own dtype for compressed-tensors (as llm-compressor
    writes them). The one statement of this rule: the torch quantizer, the
    Triton kernels, the grouped sender and the sharded sources all ask here."""
    return torch.float32 if recipe == "hf" else weight_dtype


def _scale_from_amax(amax: torch.Tensor, recipe: str) -> torch.Tensor:
    """amax (compute dtype) -> dequantization scale (compute dtype)."""
    scale = amax / FP8_E4M3_MAX
    if recipe == "hf":
        return torch.where(amax == 0, torch.ones_like(scale), scale)
    eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def _quantize_chunk(x: torch.Tensor, scale: torch.Tensor, recipe: str) -> torch.Tensor:
    """x / scale -> fp8 for one chunk; ``scale`` broadcasts against ``x``."""
    if recipe == "hf":
        y = x.to(torch.float32) / scale
    else:
        y = x / scale
        y.add_(0.0)
    y.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(FP8_DTYPE)


def _amax_abs(x: torch.Tensor, dim=None, keepdim=False) -> torch.Tensor:
    a = x.abs()
    return a.amax() if dim is None else a.amax(dim=dim, keepdim=keepdim)


def _row_chunks(rows: int, cols: int, chunk_elements: int, multiple: int = 1):
    step = max(1, chunk_elements // max(cols, 1))
    step = max(multiple, (step // multiple) * multiple)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


# ------------------------------------------------------------ torch backend
def _torch_tensorwise(w, recipe, chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    rows, cols = w.shape
    cd = scale_dtype(recipe, w.dtype)
    amax = None
    for r0, r1 in _row_chunks(rows, cols, chunk_elements):
        a = _amax_abs(w[r0:r1]).to(cd)
        amax = a if amax is None else torch.maximum(amax, a)
    if amax is None:
        amax = torch.zeros((), dtype=cd, device=w.device)
    scale = _scale_from_amax(amax, recipe)
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=w.device)
    for r0, r1 in _row_chunks(rows, cols, chunk_elements):
        q[r0:r1] = _quantize_chunk(w[r0:r1], scale, recipe)
    return q, scale, amax


def _torch_channelwise(w, recipe, chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    rows, cols = w.shape
    cd = scale_dtype(recipe, w.dtype)
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((rows, 1), dtype=cd, device=w.device)
    amax_all = torch.zeros((), dtype=cd, device=w.device)
    for r0, r1 in _row_chunks(rows, cols, chunk_elements):
        x = w[r0:r1]
        amax = _amax_abs(x, dim=1, keepdim=True).to(cd)
        s = _scale_from_amax(amax, recipe)
        scale[r0:r1] = s
        q[r0:r1] = _quantize_chunk(x, s, recipe)
        amax_all = torch.maximum(amax_all, amax.amax() if amax.numel() else amax_all)
    return q, scale, amax_all


def _torch_blockwise(w, recipe, block, chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    rows, cols = w.shape
    bn, bk = block
    cd = scale_dtype(recipe, w.dtype)
    rb, cb = -(-rows // bn), -(-cols // bk)
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((rb, cb), dtype=cd, device=w.device)
    amax_all = torch.zeros((), dtype=cd, device=w.device)
    pad_c = cb * bk - cols
    for r0, r1 in _row_chunks(rows, cb * bk, chunk_elements, multiple=bn):
        x = w[r0:r1]
        n = r1 - r0
        pad_r = -(-n // bn) * bn - n
        if pad_r or pad_c:
            # zero padding never changes a block's amax (|w| >= 0)
            x = F.pad(x, (0, pad_c, 0, pad_r))
        nrb = x.shape[0] // bn
        xb = x.reshape(nrb, bn, cb, bk)
        amax = _amax_abs(xb, dim=(1, 3)).to(cd)
        s = _scale_from_amax(amax, recipe)
        scale[r0 // bn : r0 // bn + nrb] = s
        qb = _quantize_chunk(xb, s[:, None, :, None], recipe)
        q[r0:r1] = qb.reshape(nrb * bn, cb * bk)[:n, :cols]
        amax_all = torch.maximum(amax_all, amax.amax())
    return q, scale, amax_all


@dataclass(frozen=True)
class QuantBackend:
    """Function table for the hot loop.

    Each function takes a 2-D floating tensor ``w`` (any strides, any device)
    and the recipe string (``"ct"`` or ``"hf"``, see module docstring) and
    returns ``(q_fp8, scale, amax)``; ``blockwise`` also takes
    ``block=(bn, bk)``.  ``scale`` has the compute dtype of the recipe and the
    shape ``()`` (tensor), ``(rows, 1)`` (channel) or
    ``(ceil(rows/bn), ceil(cols/bk))`` (block); ``amax`` is a 0-d tensor
    (the largest |w| seen, used to report NaN/inf without an extra pass).
    """

    name: str
    tensorwise: Callable[..., tuple]
    channelwise: Callable[..., tuple]
    blockwise: Callable[..., tuple]


TORCH_BACKEND = QuantBackend(
    "torch", _torch_tensorwise, _torch_channelwise, _torch_blockwise
)
_BACKENDS: dict[str, QuantBackend] = {"torch": TORCH_BACKEND}
_DEFAULT_BACKEND = ["torch"]


def register_backend(backend: QuantBackend, *, make_default: bool = False) -> None:
    """Register an alternative implementation (e.g. a fused Triton kernel)."""
    _BACKENDS[backend.name] = backend
    if make_default:
        _DEFAULT_BACKEND[0] = backend.name


def get_backend(name: str | QuantBackend | None = None) -> QuantBackend:
    if isinstance(name, QuantBackend):
        return name
    key = name or _DEFAULT_BACKEND[0]
    try:
        return _BACKENDS[key]
    except KeyError:
        raise ValueError(
            f"unknown quantization backend {key!r}; registered: {sorted(_BACKENDS)}"
        ) from None


_GPU_BACKEND_TRIED = [False]


def _auto_backend(w: torch.Tensor) -> str | None:
    """The backend for ``w`` when the caller names none: the fused Triton
    kernels for CUDA tensors where they are available, else the default."""
    if _DEFAULT_BACKEND[0] != "torch" or not w.is_cuda:
        return None
    if not _GPU_BACKEND_TRIED[0]:
        _GPU_BACKEND_TRIED[0] = True
        try:
            from ..kernels import register

            register(make_default=False)
        except Exception:  # no Triton: the torch reference serves CUDA too
            pass
    return "triton" if "triton" in _BACKENDS else None


# ---------------------------------------------------------- per-tensor API
def quantize_tensor(
    w: torch.Tensor,
    layout: FP8Layout,
    *,
    name: str | None = None,
    backend: str | QuantBackend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one 2-D weight for ``layout``.

    Returns ``(qweight, scale)``: ``qweight`` is ``float8_e4m3fn`` with the
    shape of ``w``; ``scale`` is shaped exactly as vLLM's parameter /
    the checkpoint expects it (HF tensor: ``()``, CT tensor: ``(1,)``,
    channel: ``(rows, 1)``, block: ``(ceil(rows/bn), ceil(cols/bk))``).
    Raises ``ValueError`` naming the tensor for wrong rank/dtype and
    non-finite values.
    """
    label = name or "<tensor>"
    if w.ndim != 2:
        raise ValueError(
            f"{label}: FP8 weight quantization needs a 2-D weight, got shape "
            f"{tuple(w.shape)}"
        )
    if not w.is_floating_point() or w.dtype not in _CT_DTYPES:
        raise ValueError(
            f"{label}: expected a bf16/fp16/fp32 weight to quantize, got {w.dtype}"
        )
    recipe = _recipe(layout)
    be = get_backend(backend if backend is not None else _auto_backend(w))
    if layout.strategy == "tensor":
        q, scale, amax = be.tensorwise(w, recipe)
        scale = scale.reshape(()) if recipe == "hf" else scale.reshape(1)
    elif layout.strategy == "channel":
        q, scale, amax = be.channelwise(w, recipe)
    else:
        q, scale, amax = be.blockwise(w, recipe, layout.block_size)
    if not bool(torch.isfinite(amax)):
        bad = "NaN" if bool(torch.isnan(w).any()) else "inf"
        raise ValueError(f"{label}: weight contains {bad} values; refusing to quantize")
    return q, scale


def dequantize_tensor(
    q: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_tensor` (for checks and tests)."""
    x = q.to(torch.float32)
    s = scale.to(torch.float32)
    if layout.strategy == "block":
        bn, bk = layout.block_size
        s = s.repeat_interleave(bn, 0)[: q.shape[0]]
        s = s.repeat_interleave(bk, 1)[:, : q.shape[1]]
    elif layout.strategy == "tensor":
        s = s.reshape(())
    return (x * s).to(dtype)


# ------------------------------------------------------ MoE fused experts
_FUSED_EXPERTS_RE = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def expand_fused_experts(
    name: str, t: torch.Tensor, hidden_size: int | None = None, first: int = 0
) -> Iterator[tuple[str, torch.Tensor]] | None:
    """Split transformers-5 fused expert tensors into per-expert 2-D weights.

    ``...experts.gate_up_proj`` of shape ``(E, 2*I, H)`` (transformers 5
    default; gate is the first half of dim 1) or ``(E, H, 2*I)`` (transposed)
    becomes ``...experts.{e}.gate_proj.weight`` / ``up_proj.weight`` of shape
    ``(I, H)``; ``...experts.down_proj`` ``(E, H, I)`` (or ``(E, I, H)``)
    becomes ``...experts.{e}.down_proj.weight`` ``(H, I)``.  Returns ``None``
    when ``name`` is not a fused expert tensor.  The transposed orientation is
    only used when ``hidden_size`` proves it. ``first``: the global id of
    ``t``'s first expert (``t`` a rank's shard of the experts).
    """
    m = _FUSED_EXPERTS_RE.match(name)
    if m is None or t.ndim != 3:
        if m is not None:
            raise ValueError(
                f"{name}: fused expert tensor must be 3-D (E, out, in), got "
                f"shape {tuple(t.shape)}"
            )
        return None
    prefix, kind = m.group("prefix"), m.group("kind")
    E, a, b = t.shape

    def gen():
        if kind == "gate_up_proj":
            transposed = hidden_size is not None and a == hidden_size and b != hidden_size
            two_i = b if transposed else a
            if two_i % 2:
                raise ValueError(
                    f"{name}: gate_up_proj dimension {two_i} is not even "
                    f"(shape {tuple(t.shape)})"
                )
            i = two_i // 2
            for e in range(E):
                te = t[e].t() if transposed else t[e]
                yield f"{prefix}.{first + e}.gate_proj.weight", te[:i].contiguous()
                yield f"{prefix}.{first + e}.up_proj.weight", te[i:].contiguous()
        else:
            transposed = hidden_size is not None and b == hidden_size and a != hidden_size
            for e in range(E):
                te = t[e].t() if transposed else t[e]
                yield f"{prefix}.{first + e}.down_proj.weight", te.contiguous()

    return gen()


# vLLM fuses these as the non-last shard of a merged column-parallel layer,
# so their output size must be a multiple of block_n (see vLLM's
# validate_fp8_block_shape / validate_fp8_block_shape_moe).
_BLOCK_ALIGNED_ROWS = ("q_proj", "k_proj", "gate_proj", "q_a_proj")
_EXPERT_PROJ_RE = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj)$")


def _check_block_shape(name: str, shape, layout: FP8Layout) -> None:
    bn, _ = layout.block_size
    module = name[: -len(".weight")]
    last = module.rpartition(".")[2]
    if (last in _BLOCK_ALIGNED_ROWS or _EXPERT_PROJ_RE.search(module)) and shape[0] % bn:
        raise ValueError(
            f"{name}: shape {tuple(shape)} contradicts the block layout "
            f"{list(layout.block_size)}: vLLM fuses this projection and requires "
            f"its output size ({shape[0]}) to be a multiple of block_n={bn}"
        )


# ---------------------------------------------------------- streaming API
def quantize_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    layout: FP8Layout | None,
    device: torch.device | str | None = None,
    *,
    backend: str | QuantBackend | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF-named tensors into checkpoint-format tensors for ``layout``.

    Quantized weights come out as ``float8_e4m3fn`` followed by their scale
    (``<module>.weight_scale`` or ``.weight_scale_inv``); every other tensor
    is yielded unchanged.  Fused transformers-5 MoE expert tensors are split
    into per-expert checkpoint names first.  Quantization runs on ``device``
    (default: where the tensor lives).  ``layout=None`` (BF16 target) passes
    everything through.  One tensor is processed at a time.

    Nothing the layout targets is passed through unquantized: a tensor it
    targets that cannot be quantized (wrong rank, a dtype other than
    bf16/fp16/fp32/fp64, non-finite values) or whose treatment the names
    cannot decide (see :mod:`.names`) raises ``ValueError`` naming it.
    """
    if layout is not None and not isinstance(layout, FP8Layout):
        if not isinstance(layout, Mapping):
            raise TypeError(f"layout must be an FP8Layout, its dict or None, got {type(layout).__name__}")
        layout = FP8Layout.from_dict(layout)
    dev = torch.device(device) if device is not None else None
    for name, t in named_tensors:
        if isinstance(t, tuple) and hasattr(t, "weight") and hasattr(t, "scale"):  # sync.sources.Prequantized
            if layout is None:
                raise ValueError(f"{name}: a prequantized weight, but the target is not FP8")
            yield name, t.weight
            yield layout.scale_key(name), t.scale
            continue
        if layout is None:
            yield name, t
            continue
        expanded = expand_fused_experts(name, t, layout.hidden_size)
        items = expanded if expanded is not None else ((name, t),)
        for n, x in items:
            if not layout.quantizes(n, x.shape):
                yield n, x
                continue
            if x.dtype == FP8_DTYPE or not x.is_floating_point():
                raise ValueError(
                    f"{n}: expected an unquantized floating weight, got {x.dtype} "
                    "(already quantized?)"
                )
            if x.ndim != 2:
                raise ValueError(
                    f"{n}: quantized linear weight must be 2-D, got shape "
                    f"{tuple(x.shape)}"
                )
            if layout.strategy == "block":
                _check_block_shape(n, x.shape, layout)
            if dev is not None and x.device != dev:
                x = x.to(dev, non_blocking=True)
            q, s = quantize_tensor(x, layout, name=n, backend=backend)
            del x
            yield n, q
            yield layout.scale_key(n), s
