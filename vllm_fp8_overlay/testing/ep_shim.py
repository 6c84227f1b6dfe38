"""Test-side shim, NOT vLLM behaviour: expert parallelism that computes on CPU.

vLLM's CPU fused-MoE kernels index a rank's *local* expert weights with the
router's *global* expert ids and ignore the expert map, so an expert-parallel
engine on CPU crashes (or reads out of bounds) as shipped. This shim does
what the GPU kernels do with an expert map: before the CPU kernel runs, each
routed (token, expert) pair is mapped to the rank's local expert index, and
pairs whose expert lives on another rank get weight 0 (and local index 0,
so the kernel stays in bounds); the ranks' partial sums are then combined by
vLLM's own all-reduce. Only the expert ids and weights the kernel sees are
changed; the weights, the reload and everything the weight sync does are
vLLM's and ours.

Used by the expert-parallel proof of ``tests/test_sync_sharded_vllm.py``:
the updated engine and the freshly started engine it is compared with both
run with it, so the comparison shows what the update did, not what the shim
does. Loaded in every worker through :class:`EPShimSyncExtension` (the
weight-sync worker extension; importing this module installs the shim).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from typing import Callable

import torch

from ..sync.worker_extension import WeightSyncExtension

logger = logging.getLogger("vllm.fp8_overlay.testing")

__all__ = ["EPShimSyncExtension", "install", "EXTENSION"]

EXTENSION = "vllm_fp8_overlay.testing.ep_shim.EPShimSyncExtension"


def _local(weights: torch.Tensor, ids: torch.Tensor, expert_map: torch.Tensor):
    """(weights, ids) with global ids mapped to this rank's experts; other
    ranks' experts weigh 0 and point at local expert 0."""
    local = expert_map[ids.long()]
    mine = local >= 0
    return (torch.where(mine, weights, torch.zeros_like(weights)),
            torch.where(mine, local, torch.zeros_like(local)).to(ids.dtype))


def _wrap_method(module: str, cls_name: str, attr: str, make: Callable) -> bool:
    """Replace ``module.cls_name.attr`` by ``make(original, its signature)``
    once (``False``: this release has no such class)."""
    try:
        cls = getattr(importlib.import_module(module), cls_name, None)
    except ImportError:
        return False
    if cls is None:
        return False
    orig = getattr(cls, attr)
    if not getattr(orig, "_ep_shim", False):
        wrapper = functools.wraps(orig)(make(orig, inspect.signature(orig)))
        wrapper._ep_shim = True
        setattr(cls, attr, wrapper)
    return True


def _mapped_call(orig: Callable, sig: inspect.Signature) -> Callable:
    """vLLM <= 0.19: ``CPUFusedMOE.__call__`` receives ``expert_map`` and drops it."""

    def call(self, *args, **kwargs):
        expert_map = sig.bind(self, *args, **kwargs).arguments.get("expert_map")
        if expert_map is None:
            return orig(self, *args, **kwargs)
        forward = self.forward_method

        def mapped(layer, x, topk_weights, topk_ids, *rest, **kw):
            w, ids = _local(topk_weights, topk_ids, expert_map)
            return forward(layer, x, w, ids, *rest, **kw)

        self.forward_method = mapped
        try:
            return orig(self, *args, **kwargs)
        finally:
            self.forward_method = forward

    return call


def _mapped_apply(orig: Callable, sig: inspect.Signature) -> Callable:
    """vLLM >= 0.28: ``CPUUnquantizedExperts.apply`` receives ``expert_map`` and ignores it."""

    def apply(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        a = bound.arguments
        if a.get("expert_map") is not None:
            a["topk_weights"], a["topk_ids"] = _local(a["topk_weights"], a["topk_ids"], a["expert_map"])
        return orig(*bound.args, **bound.kwargs)

    return apply


def install() -> bool:
    """Install the shim for the installed release; ``True`` if one applied."""
    done = (_wrap_method("vllm.model_executor.layers.fused_moe.cpu_fused_moe", "CPUFusedMOE", "__call__",
                         _mapped_call)
            or _wrap_method("vllm.model_executor.layers.fused_moe.experts.cpu_moe", "CPUUnquantizedExperts",
                            "apply", _mapped_apply))
    if done:
        logger.warning("TEST SHIM: CPU fused-MoE kernels see expert-parallel ids mapped to local experts "
                       "(vllm_fp8_overlay.testing.ep_shim); not vLLM behaviour")
    return done


class EPShimSyncExtension(WeightSyncExtension):
    """The weight-sync worker extension, in a worker whose CPU MoE kernels got the shim."""


install()
