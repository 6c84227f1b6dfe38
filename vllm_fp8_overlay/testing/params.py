"""Bitwise snapshots and comparisons of a model's parameters (what
"updated engine == cold engine" checks first, before the outputs)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["assert_params_equal", "diff_params", "param_snapshot"]


def param_snapshot(model: torch.nn.Module, *, buffers: bool = False) -> dict[str, torch.Tensor]:
    """``{name: CPU copy}`` of every parameter (and persistent-or-not buffer if asked).

    Copies never alias the live tensors, so a snapshot taken before a reload
    stays as it was.
    """
    items: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    if buffers:
        items += list(model.named_buffers(remove_duplicate=False))
    snap: dict[str, torch.Tensor] = {}
    for name, t in items:
        t = t.detach()
        snap[name] = t.clone() if t.device.type == "cpu" else t.to("cpu")
    return snap


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1).contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(torch.uint8)


def diff_params(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    names: Iterable[str] | None = None,
) -> list[str]:
    """Human-readable lines, one per tensor that is not bitwise identical."""
    problems: list[str] = []
    if names is None:
        only_a = sorted(set(a) - set(b))
        only_b = sorted(set(b) - set(a))
        problems += [f"{n}: only in first" for n in only_a]
        problems += [f"{n}: only in second" for n in only_b]
        keys = sorted(set(a) & set(b))
    else:
        keys = list(names)
        for n in keys:
            if n not in a or n not in b:
                problems.append(f"{n}: missing from {'first' if n not in a else 'second'}")
        keys = [n for n in keys if n in a and n in b]
    for n in keys:
        x, y = a[n], b[n]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{n}: {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}")
            continue
        x, y = x.detach().cpu(), y.detach().cpu()
        if torch.equal(_bits(x), _bits(y)):
            continue
        neq = (_bits(x) != _bits(y)).sum().item()
        detail = f"{neq} differing bytes of {x.numel() * x.element_size()}"
        if x.is_floating_point():
            d = (x.float() - y.float()).abs()
            d = d[torch.isfinite(d)]
            if d.numel():
                detail += f", max |diff| {d.max().item():.3g}"
            detail += f"; first: {x.reshape(-1)[:4].tolist()} vs {y.reshape(-1)[:4].tolist()}"
        problems.append(f"{n}: {detail}")
    return problems


def assert_params_equal(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    names: Iterable[str] | None = None,
    max_report: int = 20,
) -> None:
    """Bitwise equality of two snapshots; the error lists every mismatching name."""
    problems = diff_params(a, b, names=names)
    if problems:
        shown = "\n  ".join(problems[:max_report])
        more = f"\n  ... and {len(problems) - max_report} more" if len(problems) > max_report else ""
        raise AssertionError(f"{len(problems)} tensor(s) differ:\n  {shown}{more}")
