"""Loading a validated update into the served model.

Three modes (see :mod:`..worker_extension`): ``layerwise`` (vLLM's layerwise
reload, from 0.16: each layer is re-processed as at a cold start),
``load_weights`` (plain ``load_weights`` + ``process_weights_after_loading``,
unquantized models on older vLLM) and ``kernel`` (``param.copy_`` of
tensors already in vLLM's kernel format). A load that stops half-way winds
the reload down so the next step starts clean. In ``layerwise`` mode the
experts of qualifying fused-MoE layers are written straight into their
parameters instead of going through vLLM's per-tensor loader
(:mod:`.experts`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any, Callable

import torch

from .derived import refresh_derived_state
from .ep_experts import other_ranks_experts
from .experts import leave_out_of_reload, plan_direct_expert_writes

logger = logging.getLogger("vllm.fp8_overlay.sync")

__all__ = ["load_update", "has_layerwise_reload", "vllm_version", "reset_derived_caches"]


def vllm_version() -> str:
    from ...vllm_version import installed_vllm_version

    v = installed_vllm_version()
    return str(v) if v is not None else "unknown"


def has_layerwise_reload() -> bool:
    try:
        return importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None
    except ModuleNotFoundError:
        return False


def reset_derived_caches(model_runner: Any) -> None:
    """Drop the worker-side caches computed with earlier weights (multi-modal
    and encoder outputs). The prefix cache lives in the scheduler, out of a
    worker's reach: the client resets it after every update attempt."""
    if model_runner is None:
        return
    for hook in ("reset_mm_cache", "reset_encoder_cache"):
        fn = getattr(model_runner, hook, None)
        if callable(fn):
            with contextlib.suppress(Exception):
                fn()


def load_update(model: torch.nn.Module, model_config: Any, vllm_config: Any, mode: str, tensors: Any,
                before_finalize: Callable[[], None] | None = None,
                after_load: Callable[[], None] | None = None, served_specs: dict | None = None) -> dict:
    """Load ``tensors`` (a list, or an iterator the loader pulls lazily) in
    ``mode`` into ``model``. ``before_finalize()`` runs after the last tensor
    was loaded and before the layerwise reload is finalized / weights are
    processed; if it or the loader raises during a layerwise reload, the
    reload is wound down (see :func:`_abandon_layerwise_reload`) and the
    error re-raised. ``after_load()`` runs last, whatever happened (the
    worker extension drops its runner's derived caches there).
    ``served_specs`` (the served checkpoint's ``name -> spec``) lets the
    layerwise mode plan direct expert writes (:mod:`.experts`); an
    expert-parallel worker leaves other ranks' experts out of vLLM's loader
    (:mod:`.ep_experts`). Returns ``{"direct_expert_tensors": n,
    "other_ranks_expert_tensors": m}`` (0, 0: every tensor went through vLLM's loader)."""
    info = {"direct_expert_tensors": 0, "other_ranks_expert_tensors": 0}
    ctx: Any = contextlib.nullcontext()
    if vllm_config is not None:
        from vllm.config import set_current_vllm_config

        ctx = set_current_vllm_config(vllm_config)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    try:
        # both loader modes: vLLM's loader never sees other ranks' experts (kernel mode copies by name)
        remote = other_ranks_experts(model) if mode != "kernel" else None
        if remote is not None:
            tensors = remote.only_mine(tensors)
        with ctx, torch.no_grad():
            if mode == "kernel":
                params = dict(model.named_parameters())
                for name, t in tensors:
                    params[name].data.copy_(t)
                if before_finalize is not None:
                    before_finalize()
            elif mode == "layerwise":
                from vllm.model_executor.model_loader.reload import (
                    finalize_layerwise_reload,
                    initialize_layerwise_reload,
                )

                experts = plan_direct_expert_writes(model, vllm_config, served_specs)
                with torch.device(device):
                    initialize_layerwise_reload(model)
                    try:
                        model.load_weights(experts.others(tensors) if experts else iter(tensors))
                        if before_finalize is not None:
                            before_finalize()
                        if experts:
                            experts.check_complete()
                            leave_out_of_reload(experts)
                            info["direct_expert_tensors"] = len(experts.targets)
                    except BaseException:
                        _abandon_layerwise_reload(model, model_config)
                        raise
                    finalize_layerwise_reload(model, model_config)
            elif mode == "load_weights":
                from vllm.model_executor.model_loader.utils import process_weights_after_loading

                with torch.device(device):
                    model.load_weights(iter(tensors))
                    if before_finalize is not None:
                        before_finalize()
                    process_weights_after_loading(model, model_config, device)
            else:  # pragma: no cover - validated before
                raise ValueError(mode)
            if remote is not None:
                info["other_ranks_expert_tensors"] = remote.dropped
            refresh_derived_state(model, vllm_config, reprocessed=mode != "kernel")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return info
    finally:
        if after_load is not None:
            after_load()


def _abandon_layerwise_reload(model: torch.nn.Module, model_config: Any) -> None:
    """Wind down a layerwise reload that stopped half-way.

    Layers whose every weight arrived were already processed and hold the new
    values. A layer that got only some of its weights would be processed by
    ``finalize_layerwise_reload`` with uninitialized memory for the rest, so
    its buffered weights are dropped first; finalize then puts the layer's
    previous tensors back (as for every layer that got nothing) and resets
    the reload state, so the next step starts clean. Best effort: errors are
    logged, the caller raises the original one."""
    try:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.reload import layerwise as lw

        infos = getattr(lw, "LAYERWISE_INFO", {})
        for m in model.modules():
            info = infos.get(m)
            if info is None or not info.can_load():
                continue
            if 0 < info.load_numel < (info.load_numel_total or 0):
                info.loaded_weights.clear()
                info.load_numel = 0
        finalize_layerwise_reload(model, model_config)
    except Exception:
        logger.exception("weight sync: could not wind down the interrupted layerwise reload")
