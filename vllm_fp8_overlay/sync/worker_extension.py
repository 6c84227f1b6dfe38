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
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .apply.errors import WeightLoadFailed, WeightSyncError, WeightSyncOwnershipError, WeightUpdateRejected
from .apply.load import has_layerwise_reload, load_update, vllm_version
from .apply.report import PeakMemory, digest, model_sizes
from .apply.steps import MODES, Served, StepJob, receive_stream, rejected
from .apply.validate import TensorSpec, dtype_name, layout_key, read_checkpoint_specs, resolve_model_dir, validate_update

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
            return self._ws_init(host, int(port), int(world_size), int(rank_offset), str(backend), float(timeout),
                                 checkpoint_dir, _as_bool(keep_step_buffers), group_id, _as_bool(takeover))
        except Exception as e:
            logger.error("weight sync: init_weight_receiver failed: %s: %s", type(e).__name__, e)
            if on_error == "return":
                return {"ok": False, "error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__}
            raise

    def weight_sync_describe(self, checkpoint_dir: str | None = None) -> dict:
        """What this worker serves (read once, cached): checkpoint directory,
        FP8 layout (``FP8Layout.to_dict()`` or ``None``), tensor count, local
        rank, current owner. The client uses it to pick the sender's layout
        and rank offsets."""
        served = self._ws_served(checkpoint_dir)
        rx = self._ws_state().get("receiver")
        return {
            "checkpoint_dir": served.dir, "layout": served.layout_full, "layout_error": served.layout_error,
            "num_tensors": len(served.specs), "local_rank": self._ws_local_rank(), "vllm_version": vllm_version(),
            "owner": None if rx is None or rx.closed else rx.group_id,
        }

    def close_weight_receiver(self) -> bool:
        """Leave the broadcast group (idempotent). Returns whether one was open."""
        return self._ws_drop_receiver("the receiver was closed")

    # ---- one step -------------------------------------------------------

    def receive_weights(self, step: int, mode: str = "auto", on_error: str = "raise", stream: bool = False,
                        max_wait_s: float | None = None, allow_non_increasing: bool = False,
                        group_id: str | None = None) -> dict:
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
        over). The result carries stage times, bytes and peak extra memory;
        ``on_error="return"`` returns ``{"ok": False, "error", "error_type",
        "cause", "model_touched"}`` instead of raising.
        """
        try:
            step = int(step)
            return self._ws_receive(step, str(mode), _as_bool(stream), _opt_float(max_wait_s),
                                    _as_bool(allow_non_increasing), group_id)
        except Exception as e:
            return self._ws_failed(step, e, on_error)

    def weight_sync_wait(self, step: int, max_wait_s: float | None = None, on_error: str = "raise",
                         group_id: str | None = None) -> dict:
        """Keep waiting (at most ``max_wait_s``) for step ``step`` started by
        :meth:`receive_weights`; the same result shapes. Idempotent once the
        step finished (every worker of a server answers each poll)."""
        try:
            step = int(step)
            self._ws_rx(step, group_id)
            job = self._ws_state().get("job")
            if job is None or job.step != step:
                raise WeightUpdateRejected(f"step {step} rejected, model unchanged: no update of step {step} "
                                           "is in progress on this worker")
            return self._ws_collect(job, _opt_float(max_wait_s))
        except Exception as e:
            return self._ws_failed(step, e, on_error)

    def weight_sync_status(self) -> dict:
        """Last step, per-stage timings, bytes, mode, owner, vLLM version, overlay status."""
        import vllm_fp8_overlay as overlay

        st = self._ws_state()
        served = st.get("served")
        rx = st.get("receiver")
        job = st.get("job")
        return {
            "vllm_version": vllm_version(),
            "layerwise_reload_available": has_layerwise_reload(),
            "overlay_active": overlay.is_active(),
            "overlay": [s.as_dict() for s in overlay.status()],
            "overlay_plugin_loaded": "vllm_fp8_overlay.plugin" in sys.modules,
            "receiver": dict(st.get("info") or {}) if rx is not None else None,
            "receiver_broken": None if rx is None else rx.broken,
            "owner": None if rx is None else rx.group_id,
            "pending_step": job.step if job is not None and job.pending else None,
            "served_checkpoint": None if served is None else served.dir,
            "served_layout": None if served is None else served.layout,
            "served_tensors": 0 if served is None else len(served.specs),
            "steps_loaded": st.get("steps_loaded", 0),
            "last_step": st.get("last_step"),
            "last": dict(st.get("last") or {}) or None,
            "last_error": st.get("last_error"),
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

    def _ws_state(self) -> dict:
        st = self.__dict__.get("_weight_sync_state")
        if st is None:
            st = {"lock": threading.RLock()}
            self.__dict__["_weight_sync_state"] = st
        return st

    def _ws_local_rank(self) -> int:
        with contextlib.suppress(Exception):
            from vllm.distributed import parallel_state as ps

            tp = ps.get_tensor_model_parallel_world_size()
            return ps.get_pp_group().rank_in_group * tp + ps.get_tensor_model_parallel_rank()
        return int(getattr(self, "rank", 0) or 0)

    def _ws_served(self, checkpoint_dir: str | None = None) -> Served:
        st = self._ws_state()
        if st.get("served") is not None and not checkpoint_dir:
            return st["served"]
        from ..formats import detect_layout

        d = Path(checkpoint_dir) if checkpoint_dir else resolve_model_dir(self.model_config)
        if d is None or not d.is_dir():
            raise WeightSyncError(
                f"cannot find the served checkpoint of {getattr(self.model_config, 'model', '?')!r} "
                "locally; pass checkpoint_dir= to init_weight_receiver so updates can be validated")
        specs = read_checkpoint_specs(d)
        layout_err = None
        try:
            layout = detect_layout(str(d))
        except Exception as e:  # a quantization the sync cannot write
            layout, layout_err = None, f"{type(e).__name__}: {e}"
        params = {n: (dtype_name(p.dtype), tuple(p.shape)) for n, p in self.model_runner.model.named_parameters()}
        st["served"] = Served(dir=str(d), specs=specs, layout=layout_key(layout)[0],
                              layout_full=None if layout is None else layout.to_dict(), layout_error=layout_err,
                              param_specs=params)
        return st["served"]

    def _ws_init(self, host: str, port: int, world_size: int, rank_offset: int, backend: str, timeout: float,
                 checkpoint_dir: str | None, keep: bool, group_id: str | None, takeover: bool) -> dict:
        from .receiver import WeightReceiver
        from .transport import refuse_group
        from .wire import WireLimits

        st = self._ws_state()
        served = self._ws_served(checkpoint_dir)
        local = self._ws_local_rank()
        rank = rank_offset + local
        with st["lock"]:
            old = st.get("receiver")
            if old is not None and not old.closed and old.broken is None:
                alive = getattr(old.transport, "peer_alive", lambda: True)()
                owner = f"trainer {st.get('info', {}).get('address', '?')} (group {str(old.group_id)[:8]})"
                if alive and not takeover:
                    reason = f"rank {rank} is owned by {owner}; pass takeover=True to replace it"
                    with contextlib.suppress(Exception):
                        refuse_group(host, port, world_size, rank, reason, timeout=min(timeout, 30.0))
                    raise WeightSyncOwnershipError(reason)
                notify = getattr(old.transport, "notify_evicted", None)
                if alive and notify is not None:
                    notify(f"taken over by the trainer at {host}:{port}")
                    logger.warning("weight sync: rank %d taken over from %s by %s:%s", rank, owner, host, port)
            self._ws_drop_receiver(f"taken over by the trainer at {host}:{port}")
        largest = max([1] + [_nbytes(s) for s in served.specs.values()] + [_nbytes(s) for s in served.param_specs.values()])
        dev = getattr(self, "device", None)
        device = dev if isinstance(dev, torch.device) and dev.type == "cuda" else torch.device("cpu")
        if backend == "gloo":
            device = torch.device("cpu")
        t0 = time.perf_counter()
        rx = WeightReceiver(host, port, world_size, rank, backend=backend, device=device, timeout=timeout,
                            keep_step_buffers=keep, group_id=group_id, limits=WireLimits(max_tensor_bytes=largest))
        with st["lock"]:
            st["receiver"] = rx
            st["info"] = {
                "host": host, "port": port, "address": f"{host}:{port}", "world_size": world_size, "rank": rank,
                "local_rank": local, "backend": getattr(rx.transport, "backend", backend), "device": str(rx.device),
                "join_s": time.perf_counter() - t0, "keep_step_buffers": rx.keep_step_buffers,
                "group_id": rx.group_id, "bucket_bytes": rx.bucket_bytes, "max_tensor_bytes": largest,
            }
        logger.info("weight sync: joined group %s:%s as rank %d/%d", host, port, rank, world_size)
        return dict(st["info"])

    def _ws_drop_receiver(self, reason: str) -> bool:
        st = self._ws_state()
        with st["lock"]:
            job = st.pop("job", None)
            if job is not None and job.pending:
                job.cancelled = reason  # its thread ends when the old trainer's side does
            rx = st.pop("receiver", None)
            if rx is None:
                return False
            with contextlib.suppress(Exception):
                rx.close()
            return True

    def _ws_rx(self, step: int, group_id: str | None) -> Any:
        rx = self._ws_state().get("receiver")
        if rx is None:
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged: no weight receiver "
                                       "(call init_weight_receiver first, or this trainer was taken over)")
        if group_id and rx.group_id and str(group_id) != rx.group_id:
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged: this worker now belongs to group "
                                       f"{rx.group_id[:12]}.., not {str(group_id)[:12]}.. (taken over by another trainer)")
        return rx

    def _ws_receive(self, step: int, mode: str, stream: bool, max_wait_s: float | None,
                    allow_non_increasing: bool, group_id: str | None) -> dict:
        st = self._ws_state()
        rx = self._ws_rx(step, group_id)
        served = self._ws_served()
        job = st.get("job")
        if job is not None and job.pending:
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged: step {job.step} is still being "
                                       "received (collect it with weight_sync_wait first)")
        last = st.get("last_step")
        discard = None
        if last is not None and step <= last and not allow_non_increasing:
            discard = (f"step {step} does not come after the last loaded step {last} "
                       "(pass allow_non_increasing=True to load it anyway)")
        peak = PeakMemory(self._ws_device())
        if stream and discard is None:
            with st["lock"]:
                st.pop("job", None)
                result = receive_stream(rx, step, mode, served, self._ws_load)
            return self._ws_record(result, peak)
        job = StepJob(rx, step, mode, served, self, discard=discard)
        job.peak = peak
        st["job"] = job
        return self._ws_collect(job, max_wait_s)

    def _ws_collect(self, job: StepJob, max_wait_s: float | None) -> dict:
        t0 = time.perf_counter()
        result = job.collect(max_wait_s)
        if result is None:
            return {"ok": False, "pending": True, "step": job.step, "waited_s": time.perf_counter() - t0}
        if "peak_extra_source" not in result:
            self._ws_record(result, job.peak)
        return dict(result)

    def _ws_record(self, result: dict, peak: PeakMemory) -> dict:
        st = self._ws_state()
        result.update(peak.finish())
        result.update(self._ws_sizes())
        st["last"] = dict(result)
        st["last_step"] = result["step"]
        st["steps_loaded"] = st.get("steps_loaded", 0) + 1
        st["last_error"] = None
        return dict(result)

    def _ws_failed(self, step: Any, e: BaseException, on_error: str) -> dict:
        err = e if isinstance(e, (WeightUpdateRejected, WeightLoadFailed)) else rejected(step, e)
        st = self._ws_state()
        st["last_error"] = f"{type(err).__name__}: {err}"
        logger.error("weight sync: step %s failed: %s", step, st["last_error"])
        if on_error == "return":
            return {"ok": False, "step": step, "error": st["last_error"], "error_type": type(err).__name__,
                    "cause": getattr(err, "cause", None), "model_touched": isinstance(err, WeightLoadFailed)}
        raise err

    def _ws_load(self, mode: str, tensors: Any, before_finalize: Any = None) -> None:
        load_update(self.model_runner, self.model_config, getattr(self, "vllm_config", None), mode, tensors,
                    before_finalize)

    def _ws_device(self) -> torch.device:
        try:
            return next(self.model_runner.model.parameters()).device
        except Exception:
            return torch.device("cpu")

    def _ws_sizes(self) -> dict:
        st = self._ws_state()
        if st.get("sizes") is None:  # parameter storage does not change across updates
            st["sizes"] = model_sizes(self.model_runner.model)
        return dict(st["sizes"])


def _nbytes(spec: TensorSpec) -> int:
    from .wire import DTYPES

    n = 1
    for d in spec[1]:
        n *= int(d)
    dt = DTYPES.get(spec[0])
    return n * (dt.itemsize if dt is not None else 8)
