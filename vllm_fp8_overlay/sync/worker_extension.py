"""vLLM side of the weight sync: a worker extension.

Pass the class to vLLM and drive it through ``collective_rpc``::

    LLM(model=..., worker_extension_cls="vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension")
    vllm serve MODEL --worker-extension-cls vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension

vLLM appends the class to its worker's bases, so every method below runs in
each worker process with ``self.model_runner``, ``self.vllm_config`` etc.
The trainer-side helpers in :mod:`vllm_fp8_overlay.sync.client` call them.
This module is the RPC surface only; receiving, checking and loading live in
:mod:`.apply`.

Per step a worker receives the *complete* step (in a background thread),
validates it against what the served model was loaded from -- tensor names,
dtypes and shapes from the served checkpoint's safetensors headers, the FP8
layout of its ``quantization_config``, and the values (no NaN/Inf, scales
> 0) -- and only then loads it. Every failure is one of two errors:
:class:`WeightUpdateRejected` (model untouched) or :class:`WeightLoadFailed`
(the model may be partially updated). ``receive_weights(step, stream=True)``
trades the "untouched" guarantee for memory (see ``docs/sync.md``).

Ownership: one trainer at a time. ``init_weight_receiver`` from a second
trainer is refused (with a reason its handshake reports) unless it passes
``takeover=True``, which tells the first trainer (its next ``send`` raises
``OwnershipLost``). Step numbers must increase unless the caller passes
``allow_non_increasing=True``.

Load modes (``receive_weights(step, mode=...)``): ``"layerwise"`` (vLLM's
layerwise reload, 0.16+), ``"load_weights"`` (unquantized models on older
vLLM), ``"kernel"`` (``param.copy_`` of kernel-format tensors keyed by vLLM
parameter name), ``"auto"`` (``kernel`` when the update's names are the
parameters', else ``layerwise`` where available, else ``load_weights``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any


from .apply.endpoint import WorkerSync
from .apply.errors import WeightLoadFailed, WeightSyncError, WeightSyncOwnershipError, WeightUpdateRejected
from .apply.load import has_layerwise_reload, reset_derived_caches, vllm_version
from .apply.report import digest
from .apply.steps import MODES
from .apply.validate import TensorSpec, read_checkpoint_specs, validate_update

logger = logging.getLogger("vllm.fp8_overlay.sync")

__all__ = [
    "WeightSyncExtension",
    "WeightSyncError",
    "WeightUpdateRejected",
    "WeightLoadFailed",
    "WeightSyncOwnershipError",
    "TensorSpec",
    "read_checkpoint_specs",
    "validate_update",
    "MODES",
]


def _as_bool(x: Any) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("1", "true", "yes", "on")
    return bool(x)


def _opt_float(x: Any) -> float | None:
    return None if x is None or (isinstance(x, str) and x.strip().lower() in ("", "none", "null")) else float(x)


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); call through
    ``collective_rpc``. Arguments may arrive as strings (vLLM's HTTP
    ``/collective_rpc`` route) and are coerced."""

    # ---- life cycle -----------------------------------------------------

    def init_weight_receiver(
        self,
        host: str,
        port: int,
        world_size: int,
        rank_offset: int,
        backend: str = "auto",
        timeout: float = 300.0,
        checkpoint_dir: str | None = None,
        keep_step_buffers: bool = False,
        group_id: str | None = None,
        takeover: bool = False,
        on_error: str = "raise",
    ) -> dict:
        """Join the trainer's broadcast group as rank ``rank_offset + local rank``.

        Blocks until every rank joined: trigger it without waiting, then build
        the ``WeightSender``. Reads what the served model was loaded from
        (safetensors headers and quantization config of ``checkpoint_dir``,
        default: the served model's directory); the receiver's
        ``max_tensor_bytes`` is set to the largest tensor served, so no claim
        of a peer makes it allocate more than a real update needs.
        ``keep_step_buffers``: keep the receive buffers from one step to the
        next (faster for many tensors; a step's memory stays allocated).
        ``group_id``: the id of the trainer's group (refuse any other).
        ``takeover``: replace a receiver that another, still running trainer
        owns (that trainer is told; without it such a call is refused with
        :class:`WeightSyncOwnershipError`, and so is the new trainer's
        handshake). Returns this worker's info.
        """
        try:
            return self._ws().join(host, int(port), int(world_size), int(rank_offset), str(backend), float(timeout),
                                   checkpoint_dir, _as_bool(keep_step_buffers), group_id, _as_bool(takeover))
        except Exception as e:
            logger.error("weight sync: init_weight_receiver failed: %s: %s", type(e).__name__, e)
            if on_error == "return":
                return {"ok": False, "error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__}
            raise

    def weight_sync_join_parts(self, parts: dict, backend: str = "auto", timeout: float = 300.0,
                               on_error: str = "raise") -> dict:
        """Join the 2-rank groups of the trainer ranks that send this worker
        its routed experts themselves (:mod:`vllm_fp8_overlay.sync.rank_parts`).
        ``parts``: local rank (as a string) -> ``[{"host", "port"}, ...]`` in
        trainer-rank order; every worker of a server gets the same dict and
        takes its own entry. Blocks until each of those ranks joined."""
        try:
            mine = (parts or {}).get(str(self._ws_local_rank()), [])
            return self._ws().join_parts(list(mine), str(backend), float(timeout))
        except Exception as e:
            logger.error("weight sync: weight_sync_join_parts failed: %s: %s", type(e).__name__, e)
            if on_error == "return":
                return {"ok": False, "error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__}
            raise

    def weight_sync_describe(self, checkpoint_dir: str | None = None) -> dict:
        """What this worker serves (read once, cached): checkpoint directory,
        FP8 layout (``FP8Layout.to_dict()`` or ``None``), tensor count, local
        rank, current owner. The client uses it to pick the sender's layout
        and rank offsets."""
        return self._ws().describe(checkpoint_dir)

    def close_weight_receiver(self) -> bool:
        """Leave the broadcast group (idempotent). Returns whether one was open."""
        return self._ws().close("the receiver was closed")

    # ---- one step -------------------------------------------------------

    def receive_weights(self, step: int, mode: str = "auto", on_error: str = "raise", stream: bool = False,
                        max_wait_s: float | None = None, allow_non_increasing: bool = False,
                        group_id: str | None = None, rank_parts: bool = False) -> dict:
        """Receive step ``step``, validate it, load it.

        ``stream=False`` (the default, and the safe choice): the whole step is
        received and validated in a background thread before the model is
        touched; a bad update is rejected with the model unchanged. With
        ``max_wait_s`` this call returns after at most that many seconds
        (plus the load itself, once the step is complete) with
        ``{"ok": False, "pending": True}`` while the step is still arriving;
        collect it with :meth:`weight_sync_wait`. Between calls the engine
        serves requests. ``max_wait_s=None`` waits until the step is done.

        ``stream=True``: buckets are validated one by one and handed to vLLM's
        loader as they arrive (less memory); the worker is busy until the end
        of the step whatever ``max_wait_s`` says, and a problem found after
        the first tensor was handed over raises :class:`WeightLoadFailed`.

        ``step`` must be larger than the last loaded step unless
        ``allow_non_increasing``; otherwise the step is received (to keep the
        group in sync) and rejected. ``group_id``: reject at once if this
        worker's receiver belongs to another group (a trainer that was taken
        over). ``rank_parts``: the step's experts also arrive through the
        groups of :meth:`weight_sync_join_parts`, one part per trainer rank
        that holds some (all received, checked and loaded as one update). The result carries stage times, bytes and peak extra memory;
        ``on_error="return"`` returns ``{"ok": False, "error", "error_type",
        "cause", "model_touched"}`` instead of raising.
        """
        try:
            step = int(step)
            return self._ws().receive(step, str(mode), _as_bool(stream), _opt_float(max_wait_s),
                                      _as_bool(allow_non_increasing), group_id, _as_bool(rank_parts))
        except Exception as e:
            return self._ws().failed(step, e, on_error)

    def weight_sync_wait(self, step: int, max_wait_s: float | None = None, on_error: str = "raise",
                         group_id: str | None = None) -> dict:
        """Keep waiting (at most ``max_wait_s``) for step ``step`` started by
        :meth:`receive_weights`; the same result shapes. Idempotent once the
        step finished (every worker of a server answers each poll)."""
        try:
            step = int(step)
            return self._ws().wait(step, _opt_float(max_wait_s), group_id)
        except Exception as e:
            return self._ws().failed(step, e, on_error)

    def weight_sync_status(self) -> dict:
        """Last step, per-stage timings, bytes, mode, owner, vLLM version, overlay status."""
        import vllm_fp8_overlay as overlay

        return {
            "vllm_version": vllm_version(),
            "layerwise_reload_available": has_layerwise_reload(),
            "overlay_active": overlay.is_active(),
            "overlay": [s.as_dict() for s in overlay.status()],
            "overlay_plugin_loaded": "vllm_fp8_overlay.plugin" in sys.modules,
            **self._ws().status(),
        }

    def weight_sync_digest(self, per_tensor: bool = False) -> dict:
        """sha256 over every parameter and buffer of this worker's model, for
        bitwise comparisons (``{"digest": hex, "num_tensors": n, "tensors": {name: hex}}``)."""
        return digest(self.model_runner.model, _as_bool(per_tensor))

    def weight_sync_cold_digest(self, model_dir: str, per_tensor: bool = False) -> dict:
        """Digest of the model a *cold start* on ``model_dir`` would serve.

        Builds a second model object with vLLM's own ``get_model`` (what the
        worker's ``load_model`` runs at start-up) from ``model_dir`` -- a
        checkpoint of the same architecture and format -- hashes it like
        :meth:`weight_sync_digest` and drops it. The served model is not
        touched; memory for a second copy of this worker's weights is needed
        while it runs. Used to prove warm == cold.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader import get_model

        cfg = self.vllm_config
        mc = cfg.model_config
        cc = cfg.compilation_config
        saved = {a: getattr(mc, a) for a in ("model", "model_weights", "revision") if hasattr(mc, a)}
        ctx = getattr(cc, "static_forward_context", None)
        saved_ctx = dict(ctx) if ctx is not None else None
        moe = getattr(cc, "static_all_moe_layers", None)
        saved_moe = list(moe) if isinstance(moe, list) else None
        try:
            mc.model = str(model_dir)
            if "model_weights" in saved:
                mc.model_weights = ""
            if "revision" in saved:
                mc.revision = None
            if ctx is not None:
                ctx.clear()  # the new model's layers register under the same names
            if saved_moe is not None:
                moe.clear()
            with set_current_vllm_config(cfg):
                model = get_model(vllm_config=cfg)
            out = digest(model, _as_bool(per_tensor))
            del model
            return out
        finally:
            for a, v in saved.items():
                setattr(mc, a, v)
            if ctx is not None:
                ctx.clear()
                ctx.update(saved_ctx)
            if saved_moe is not None:
                moe.clear()
                moe.extend(saved_moe)

    # ---- internals ------------------------------------------------------

    def _ws(self) -> WorkerSync:
        """This worker's sync state (created on first use: vLLM builds the
        worker before it has a model)."""
        ws = self.__dict__.get("_weight_sync")
        if ws is None:
            runner = self.model_runner
            ws = WorkerSync(model=lambda: runner.model, model_config=self.model_config,
                            vllm_config=getattr(self, "vllm_config", None), local_rank=self._ws_local_rank,
                            device=getattr(self, "device", None),
                            after_load=lambda: reset_derived_caches(runner))
            self.__dict__["_weight_sync"] = ws
        return ws

    def _ws_local_rank(self) -> int:
        with contextlib.suppress(Exception):
            from vllm.distributed import parallel_state as ps

            tp = ps.get_tensor_model_parallel_world_size()
            return ps.get_pp_group().rank_in_group * tp + ps.get_tensor_model_parallel_rank()
        return int(getattr(self, "rank", 0) or 0)
