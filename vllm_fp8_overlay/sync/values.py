"""Value sentinels: what no weight update may contain.

The wire format proves that the bytes a receiver holds are the bytes the
trainer sent; it says nothing about whether those bytes are usable weights.
One NaN scale or one NaN FP8 byte turns every logit it touches into NaN (vLLM
then samples token 0), and the KV cache computed meanwhile keeps poisoning
later requests. So both sides check values, fail closed and name the tensor:

* FP8 payloads hold no NaN/Inf encodings (``e4m3fn``: bytes 0x7F and 0xFF;
  ``e5m2``: exponent all ones; the ``fnuz`` formats: 0x80; ``e8m0fnu``: 0xFF);
* scales (``*.weight_scale``, ``*.weight_scale_inv``, ``*.input_scale``,
  attention ``k/v/q/prob_scale``, and the layout's ``scale_name``) are finite
  and > 0 (the quantizer never writes a zero scale: an all-zero group gets
  ``eps`` or 1.0);
* every other floating-point tensor is finite.

Integers and booleans are not checked. The trainer refuses such a step
before sending (:func:`raise_on_bad_values`); the receiver rejects it before
anything is loaded (:func:`value_problems`).
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["FP8_NAN_BYTES", "is_scale_name", "kind_of", "value_problems", "payload_values_ok", "payload_bad_count",
           "value_groups",
           "device_values_grouped", "device_values_ok", "device_values_many",
           "raise_on_bad_values"]

#: per FP8 dtype, (mask, value): a byte ``b`` encodes NaN/Inf iff ``b & mask == value``
FP8_NAN_BYTES: dict[torch.dtype, tuple[int, int]] = {}
for _name, _rule in (("float8_e4m3fn", (0x7F, 0x7F)), ("float8_e5m2", (0x7C, 0x7C)),
                     ("float8_e4m3fnuz", (0xFF, 0x80)), ("float8_e5m2fnuz", (0xFF, 0x80)),
                     ("float8_e8m0fnu", (0xFF, 0xFF))):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        FP8_NAN_BYTES[getattr(torch, _name)] = _rule

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale", ".input_scale_inv", ".k_scale",
                   ".v_scale", ".q_scale", ".prob_scale")
_CHUNK = 1 << 24  # elements per check: bounds the temporaries of a large tensor
_SMALL = 1 << 16  # tensors up to this many elements are checked together


def is_scale_name(name: str, scale_name: str | None = None) -> bool:
    """Whether ``name`` is a quantization scale (must be finite and > 0)."""
    if name.endswith(_SCALE_SUFFIXES):
        return True
    return bool(scale_name) and name.endswith("." + scale_name)


def kind_of(name: str, dtype: torch.dtype, scale_name: str | None) -> str | None:
    """The rule a tensor falls under: ``"fp8"``, ``"scale"``, ``"float"`` or ``None`` (not checked)."""
    if dtype in FP8_NAN_BYTES:
        return "fp8"
    if dtype in _FLOATS:
        return "scale" if is_scale_name(name, scale_name) else "float"
    return None


def _kind(name: str, t: torch.Tensor, scale_name: str | None) -> str | None:
    return kind_of(name, t.dtype, scale_name)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def _chunk_ok(kind: str, x: torch.Tensor) -> bool:
    if kind == "fp8":
        mask, value = FP8_NAN_BYTES[x.dtype]
        return not bool(((x.view(torch.uint8) & mask) == value).any())
    if kind == "scale":
        return bool((torch.isfinite(x) & (x > 0)).all())
    return bool(torch.isfinite(x).all())


def _tensor_ok(kind: str, t: torch.Tensor) -> bool:
    x = _flat(t)
    return all(_chunk_ok(kind, x[i: i + _CHUNK]) for i in range(0, x.numel(), _CHUNK))


def _describe(kind: str, name: str, t: torch.Tensor) -> str:
    x = _flat(t)
    if kind == "fp8":
        mask, value = FP8_NAN_BYTES[x.dtype]
        n = int(((x.view(torch.uint8) & mask) == value).sum())
        return f"{name}: {n} NaN/Inf encoding(s) in {str(t.dtype).replace('torch.', '')} data"
    xf = x.float() if x.dtype != torch.float64 else x
    nan, inf = int(torch.isnan(xf).sum()), int(torch.isinf(xf).sum())
    parts = [f"{nan} NaN"] if nan else []
    parts += [f"{inf} Inf"] if inf else []
    if kind == "scale":
        nonpos = int((xf <= 0).sum())
        parts += [f"{nonpos} <= 0"] if nonpos else []
        return f"{name}: scale must be finite and > 0, has " + ", ".join(parts)
    return f"{name}: " + ", ".join(parts) + " value(s)"


def value_problems(
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    scale_name: str | None = None,
    max_report: int = 20,
) -> list[str]:
    """One line per tensor that breaks a rule above (empty: all fine).

    Small tensors of the same dtype and rule are checked together (one
    concatenation, one reduction), so a bucket of thousands of norms and
    scales costs a handful of operations; a group that fails is re-checked
    tensor by tensor to name the offenders."""
    problems: list[str] = []
    groups: dict[tuple[str, torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    large: dict[tuple[str, torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors:
        kind = _kind(name, t, scale_name)
        if kind is None or t.numel() == 0:
            continue
        (groups if t.numel() <= _SMALL else large).setdefault((kind, t.dtype, t.device), []).append((name, t))
    for (kind, _, _), items in groups.items():
        joined = torch.cat([_flat(t) for _, t in items])
        if _tensor_ok(kind, joined):
            continue
        problems += [_describe(kind, n, t) for n, t in items if not _tensor_ok(kind, t)]
    for (kind, _, _), items in large.items():
        ok = _many_ok(kind, [t for _, t in items])
        if ok is None or not bool(ok.all()):
            problems += [_describe(kind, n, t) for n, t in items if not _tensor_ok(kind, t)]
    if len(problems) > max_report:
        problems = problems[:max_report] + [f"... ({len(problems) - max_report} more)"]
    return problems


def _many_ok(kind: str, ts: list[torch.Tensor]) -> torch.Tensor | None:
    """One-element bool tensor, true only if every tensor of ``ts`` (one kind
    and dtype) passes its rule, from multi-tensor reductions (a few launches
    for thousands of tensors, no host sync); ``None`` where no such
    formulation exists (checked tensor by tensor then).

    * floats: the L2 norm of a tensor is finite iff every element is (a sum of
      squares turns any NaN or Inf into NaN or Inf; an overflow to Inf of a
      finite but huge tensor only sends it to the exact check);
    * ``float8_e4m3fn``: its NaN encodings are the bytes 0x7F and 0xFF, the
      largest values of the tensor's bytes read as int8 and as uint8;
    * scales (finite and > 0): every maximum finite and every maximum of the
      negated scales below 0 (a maximum is NaN where any element is)."""
    try:
        if kind == "float":
            norms = torch._foreach_norm(ts, 2)
            return torch.isfinite(torch.stack(norms)).all().reshape(1)
        if kind == "scale":
            hi = torch.stack(torch._foreach_max(ts))
            neg_lo = torch.stack(torch._foreach_max(torch._foreach_neg(ts)))
            return (torch.isfinite(hi).all() & (neg_lo < 0).all()).reshape(1)
        if kind == "fp8" and FP8_NAN_BYTES.get(ts[0].dtype) == (0x7F, 0x7F):
            hi = torch.stack(torch._foreach_max([t.view(torch.uint8) for t in ts]))
            lo = torch.stack(torch._foreach_max([t.view(torch.int8) for t in ts]))
            return ((hi != 0xFF).all() & (lo != 0x7F).all()).reshape(1)
    except (RuntimeError, NotImplementedError, TypeError):  # an op this build lacks for the dtype
        return None
    return None


def value_groups(items: list[tuple[str, torch.Tensor]], scale_name: str | None = None) -> list[tuple[str, list[int]]]:
    """``(kind, indices into items)`` per kind, dtype and device of the tensors
    a rule applies to: what :func:`device_values_grouped` checks together. A
    sender that sends the same names, dtypes and devices every step computes
    this once and reuses it."""
    groups: dict[tuple[str, torch.dtype, torch.device], list[int]] = {}
    for i, (name, t) in enumerate(items):
        kind = _kind(name, t, scale_name)
        if kind is None or t.numel() == 0:
            continue
        groups.setdefault((kind, t.dtype, t.device), []).append(i)
    return [(kind, idx) for (kind, _, _), idx in groups.items()]


def device_values_grouped(groups: list[tuple[str, list[int]]], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`device_values_many` over groups from :func:`value_groups`
    (``tensors`` in the order of the items they were computed from)."""
    out: list[torch.Tensor] = []
    for kind, idx in groups:
        ts = [tensors[i] for i in idx]
        ok = _many_ok(kind, ts) if len(ts) > 1 else None
        if ok is None:
            out += [device_values_ok("", t) if kind != "scale" else _scale_ok(t) for t in ts]
        else:
            out.append(ok)
    return out


def device_values_many(items: list[tuple[str, torch.Tensor]], scale_name: str | None = None) -> list[torch.Tensor]:
    """One-element bool tensors whose conjunction is true iff every tensor of
    ``items`` passes its rule, computed without a host sync (the grouped CUDA
    send path folds them into its per-bucket flag): batched per kind and
    dtype (:func:`_many_ok`), tensor by tensor where no batch applies."""
    return device_values_grouped(value_groups(items, scale_name), [t for _, t in items])


def _scale_ok(t: torch.Tensor) -> torch.Tensor:
    x = _flat(t)
    return (torch.isfinite(x) & (x > 0)).all().reshape(1)


def device_values_ok(name: str, t: torch.Tensor, scale_name: str | None = None) -> torch.Tensor | None:
    """A one-element bool tensor on ``t``'s device, true iff ``t`` passes its
    rule, computed without a host sync (the grouped CUDA send path folds it
    into its per-bucket flag); ``None`` for tensors no rule applies to."""
    kind = _kind(name, t, scale_name)
    if kind is None or t.numel() == 0:
        return None
    x = _flat(t)
    if kind == "fp8":
        mask, value = FP8_NAN_BYTES[x.dtype]
        return ((x.view(torch.uint8) & mask) != value).all().reshape(1)
    if kind == "scale":
        return (torch.isfinite(x) & (x > 0)).all().reshape(1)
    return torch.isfinite(x).all().reshape(1)


def payload_bad_count(payload: torch.Tensor, entries, scale_name: str | None = None) -> torch.Tensor | None:
    """:func:`payload_values_ok` without the host sync: a one-element tensor
    on the payload's device counting the offending elements (``None`` where
    the one-launch check does not apply)."""
    if payload.device.type != "cuda":
        return None
    from ..kernels import triton_available

    if not triton_available():
        return None
    from ..kernels.value_check import plan_payload_check

    plan = plan_payload_check(entries, scale_name, payload.device, kind_of)
    return None if plan is None else plan.count_bad(payload)


def payload_values_ok(payload: torch.Tensor, entries, scale_name: str | None = None) -> bool | None:
    """Whether every tensor of a received bucket passes its rule, checked on
    the payload itself in one launch per dtype (CUDA with Triton,
    :mod:`vllm_fp8_overlay.kernels.value_check`); ``None`` where that check
    does not apply (then check tensor by tensor). ``entries``: the bucket's
    wire entries (``manifest.tensors``); the check's tables are cached per
    entries object, which a receiver's manifest cache keeps the same while
    the trainer sends the same manifest."""
    count = payload_bad_count(payload, entries, scale_name)
    return None if count is None else int(count[0]) == 0


def raise_on_bad_values(items: Iterable[tuple[str, torch.Tensor]], *, scale_name: str | None = None,
                        what: str = "refusing to send") -> None:
    """Raise ``ValueError`` naming every tensor of ``items`` that breaks a rule."""
    bad = value_problems(items, scale_name=scale_name)
    if bad:
        raise ValueError(f"{what}: " + "; ".join(bad))
