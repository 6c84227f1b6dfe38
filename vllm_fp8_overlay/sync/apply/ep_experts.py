"""Leave other ranks' experts out of an expert-parallel worker's load.

Why: with expert parallelism every worker of an engine receives every
expert tensor (the update is broadcast), but a worker serves only its own
experts. vLLM's fused-MoE weight loader skips another rank's expert, yet
inside a layerwise reload each such call still goes through the reload's
bookkeeping: bound, sized (the loader runs once on fake tensors to count
what it would load), buffered until the layer is complete and replayed
(per call, what costs ~300 us per expert tensor the worker keeps on CPU,
``apply/experts.py``). At EP = N that is N - 1 of every N expert tensors,
for nothing.

How: before vLLM's loader sees the update, a checkpoint tensor
``<experts>.<e>.<proj>.<...>`` of an expert-parallel fused-MoE layer is
dropped when the layer maps global expert ``e`` to no local expert
(``_map_global_expert_id_to_local_expert_id(e) < 0``, vLLM's own mapping;
not with the expert load balancer or redundant experts, whose replicas
vLLM's loader places).
Those calls loaded nothing (vLLM counts 0 elements for them), so the
reload's accounting of a complete layer is unchanged. Everything else goes
to vLLM's loader as before.

Where: declared in :data:`vllm_fp8_overlay.load_shortcuts.DECLARED`
(rendered into COMPAT.md); ``FP8_OVERLAY_SKIP_OTHER_RANKS_EXPERTS=0`` in the
worker's environment turns it off.

When to remove: once vLLM routes expert tensors to their ranks itself.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from typing import Iterable, Iterator

import torch

from ...load_shortcuts import DECLARED
from .experts import _checkpoint_prefixes, _moe_parallel

logger = logging.getLogger("vllm.fp8_overlay.sync")

__all__ = ["DISABLE_ENV", "OtherRanksExperts", "expert_ownership", "other_ranks_experts", "ownership_filter"]

#: set to 0 to give vLLM's loader every expert tensor, this rank's or not
DISABLE_ENV = "FP8_OVERLAY_SKIP_OTHER_RANKS_EXPERTS"

_SHORTCUT = next(d for d in DECLARED if d.id == "skip-other-ranks-experts")
_EXPERT = re.compile(r"^(.*)\.(\d+)\.[^.]+\.[^.]+$")  # <experts>.<e>.<proj>.<weight|weight_scale|...>


class OtherRanksExperts:
    """Checkpoint prefix of each expert-parallel layer -> the global expert
    ids this worker does not serve."""

    def __init__(self, remote: dict[str, frozenset[int]]) -> None:
        self.remote = remote
        self.dropped = 0

    def mine(self, name: str) -> bool:
        m = _EXPERT.match(name)
        if m is None:
            return True
        ids = self.remote.get(m.group(1))
        return ids is None or int(m.group(2)) not in ids

    def only_mine(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """``tensors`` without other ranks' experts (counted in :attr:`dropped`)."""
        for name, t in tensors:
            if self.mine(name):
                yield name, t
            else:
                self.dropped += 1


def _remote_ids(layer: torch.nn.Module) -> frozenset[int] | None:
    """Global expert ids ``layer`` does not serve here; ``None`` where it is
    not an expert-parallel fused-MoE layer this release lets us read, or
    where checkpoint expert ids are not the layer's ids: with the expert
    load balancer or redundant experts a checkpoint (logical) expert can
    have replicas on several ranks, and vLLM's loader places them."""
    to_local = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
    total = getattr(layer, "global_num_experts", None)
    par = _moe_parallel(layer)
    if not callable(to_local) or not isinstance(total, int) or par is None or not getattr(par, "use_ep", False):
        return None
    if getattr(par, "enable_eplb", True) or getattr(layer.moe_config, "num_logical_experts", None) != total:
        return None
    return frozenset(e for e in range(total) if int(to_local(e)) < 0)


def other_ranks_experts(model: torch.nn.Module) -> OtherRanksExperts | None:
    """The filter for ``model`` (``None``: shortcut off here, or no
    expert-parallel layer with experts on other ranks)."""
    from ...vllm_version import installed_vllm_version

    if os.environ.get(DISABLE_ENV, "1") == "0" or not _SHORTCUT.applies_to(installed_vllm_version()):
        return None
    remote = _remote_by_prefix(model)
    return OtherRanksExperts(remote) if remote else None


def ownership_filter(model: torch.nn.Module):
    """``name -> bool``: whether this worker loads checkpoint tensor ``name``
    (``False`` only for other ranks' experts of an expert-parallel layer);
    ``None`` where it loads every expert."""
    remote = _remote_by_prefix(model)
    return OtherRanksExperts(remote).mine if remote else None


#: per served model, its expert-parallel layers' remote ids. Placement is
#: fixed once the model is built (without the load balancer, which turns
#: the shortcut off), and a step fed by rank parts asks twice (the names it
#: expects, then the loader's filter): each walk maps every expert id of
#: every layer, milliseconds per step at 48 layers x 128 experts.
_REMOTE_BY_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, frozenset[int]]]" = weakref.WeakKeyDictionary()


def _remote_by_prefix(model: torch.nn.Module) -> dict[str, frozenset[int]]:
    known = _REMOTE_BY_MODEL.get(model)
    if known is not None:
        return known
    remote: dict[str, frozenset[int]] = {}
    for name, layer in model.named_modules():
        try:
            ids = _remote_ids(layer)
        except Exception as e:  # an unexpected layer: it loads through vLLM's loader, in full
            logger.debug("weight sync: %s: expert ownership unreadable (%s); its experts all load", name, e)
            continue
        if ids:
            for prefix in _checkpoint_prefixes(name):
                remote[prefix] = ids
    _REMOTE_BY_MODEL[model] = remote
    return remote


def expert_ownership(model: torch.nn.Module) -> dict | None:
    """Which routed experts this worker loads, for trainers that send each
    worker only its experts (:mod:`..rank_parts`): ``{"num_experts": E,
    "owned": [ids] or None (every expert), "refused": reason or None}``;
    ``None`` for a model without fused-MoE layers. Every layer must own the
    same ids (vLLM places experts the same way in every layer); the expert
    load balancer and redundant experts are refused (a checkpoint expert
    may then have replicas on several ranks, placed by vLLM's loader)."""
    total: int | None = None
    owned: set[frozenset[int] | None] = set()
    for _, layer in model.named_modules():
        n = getattr(layer, "global_num_experts", None)
        if not isinstance(n, int) or not callable(getattr(layer, "_map_global_expert_id_to_local_expert_id", None)):
            continue
        if total is not None and n != total:
            return {"num_experts": total, "owned": None, "refused": f"layers with {total} and {n} experts"}
        total = n
        par = _moe_parallel(layer)
        if par is None or not getattr(par, "use_ep", False):
            owned.add(None)
            continue
        remote = _remote_ids(layer)
        if remote is None:
            return {"num_experts": n, "owned": None,
                    "refused": "expert load balancer or redundant experts (vLLM places replicas itself)"}
        owned.add(frozenset(range(n)) - remote)
    if total is None:
        return None
    if len(owned) != 1:
        return {"num_experts": total, "owned": None, "refused": "layers place their experts differently"}
    ids = owned.pop()
    return {"num_experts": total, "owned": None if ids is None else sorted(ids), "refused": None}
