"""One vLLM worker's end of the sync: join, receive, validate, load, report.

Both ways into a worker use this one core, so the checks and the load are the
same whichever the trainer drives:

* :class:`~..worker_extension.WeightSyncExtension` (``collective_rpc``
  methods, every vLLM release we support);
* :class:`~..native.engine.Fp8WeightTransferEngine` (vLLM's own
  weight-transfer API, on releases whose config accepts a registered
  backend name).

A :class:`WorkerSync` is told how to reach the served model (``model()``,
its configs, the worker's local rank) and keeps everything else: the served
checkpoint's specs, the receiver, the step in flight, the last result.
Every failure comes out as :class:`WeightUpdateRejected` (model untouched)
or :class:`WeightLoadFailed` (the model may be partially updated).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..aliases import served_aliases
from .errors import WeightLoadFailed, WeightSyncError, WeightSyncOwnershipError, WeightUpdateRejected
from .load import load_update
from .report import PeakMemory, model_sizes
from .steps import Served, StepJob, receive_stream, rejected
from .validate import TensorSpec, dtype_name, layout_key, read_checkpoint_specs, resolve_model_dir

logger = logging.getLogger("vllm.fp8_overlay.sync")

__all__ = ["WorkerSync"]


class WorkerSync:
    """The weight-sync state of one vLLM worker.

    Args:
        model: returns the served ``nn.Module`` (looked up at each use: vLLM
            may swap the target, e.g. for a draft model).
        model_config, vllm_config: the worker's configs (``vllm_config`` may be
            ``None`` where the caller has none; loading then runs without
            ``set_current_vllm_config``).
        local_rank: returns this worker's rank within its server (TP x PP).
        device: where the model lives (receive buffers go there on CUDA).
        after_load: runs after every load attempt (drop caches computed with
            the old weights).
    """

    def __init__(self, *, model: Callable[[], torch.nn.Module], model_config: Any, vllm_config: Any,
                 local_rank: Callable[[], int], device: torch.device | None = None,
                 after_load: Callable[[], None] | None = None) -> None:
        self.model = model
        self.model_config = model_config
        self.vllm_config = vllm_config
        self.local_rank = local_rank
        self.device = device
        self.after_load = after_load
        self.lock = threading.RLock()
        self.served: Served | None = None
        self.receiver: Any = None
        #: receivers of rank parts: one 2-rank group per trainer rank that sends this worker what it holds
        self.parts: list[Any] = []
        self.info: dict = {}
        self.job: StepJob | None = None
        self.last: dict | None = None
        self.last_step: int | None = None
        self.last_error: str | None = None
        self.steps_loaded = 0
        self._sizes: dict | None = None

    # ---- what is served --------------------------------------------------

    def served_model(self, checkpoint_dir: str | None = None) -> Served:
        """What the model was loaded from (read once, cached)."""
        if self.served is not None and not checkpoint_dir:
            return self.served
        from ...formats import detect_layout

        d = Path(checkpoint_dir) if checkpoint_dir else resolve_model_dir(self.model_config)
        if d is None or not d.is_dir():
            raise WeightSyncError(
                f"cannot find the served checkpoint of {getattr(self.model_config, 'model', '?')!r} "
                "locally; pass checkpoint_dir= so updates can be validated")
        specs = read_checkpoint_specs(d)
        layout_err = None
        try:
            layout = detect_layout(str(d))
        except Exception as e:  # a quantization the sync cannot write
            layout, layout_err = None, f"{type(e).__name__}: {e}"
        params = {n: (dtype_name(p.dtype), tuple(p.shape)) for n, p in self.model().named_parameters()}
        self.served = Served(dir=str(d), specs=specs, layout=layout_key(layout)[0],
                             layout_full=None if layout is None else layout.to_dict(), layout_error=layout_err,
                             param_specs=params)
        return self.served

    def describe(self, checkpoint_dir: str | None = None) -> dict:
        from .load import vllm_version

        served = self.served_model(checkpoint_dir)
        rx = self.receiver
        return {
            "checkpoint_dir": served.dir, "layout": served.layout_full, "layout_error": served.layout_error,
            "num_tensors": len(served.specs), "local_rank": self.local_rank(), "vllm_version": vllm_version(),
            "owner": None if rx is None or rx.closed else rx.group_id,
            "tied_aliases": served_aliases(served.specs, _tie_word_embeddings(self.model_config)),
            "experts": _experts(self.model()),
        }

    # ---- group membership --------------------------------------------------

    def join(self, host: str, port: int, world_size: int, rank_offset: int, backend: str = "auto",
             timeout: float = 300.0, checkpoint_dir: str | None = None, keep: bool = False,
             group_id: str | None = None, takeover: bool = False) -> dict:
        """Join the trainer's group as rank ``rank_offset + local rank``
        (blocks until every rank joined). A receiver another live trainer owns
        is refused unless ``takeover`` (that trainer is told)."""
        from ..receiver import WeightReceiver
        from ..transport import refuse_group
        from ..wire import WireLimits

        served = self.served_model(checkpoint_dir)
        local = self.local_rank()
        rank = rank_offset + local
        with self.lock:
            old = self.receiver
            if old is not None and not old.closed and old.broken is None:
                alive = getattr(old.transport, "peer_alive", lambda: True)()
                owner = f"trainer {self.info.get('address', '?')} (group {str(old.group_id)[:8]})"
                if alive and not takeover:
                    reason = f"rank {rank} is owned by {owner}; pass takeover=True to replace it"
                    with contextlib.suppress(Exception):
                        refuse_group(host, port, world_size, rank, reason, timeout=min(timeout, 30.0))
                    raise WeightSyncOwnershipError(reason)
                notify = getattr(old.transport, "notify_evicted", None)
                if alive and notify is not None:
                    notify(f"taken over by the trainer at {host}:{port}")
                    logger.warning("weight sync: rank %d taken over from %s by %s:%s", rank, owner, host, port)
            self.close(f"taken over by the trainer at {host}:{port}")
        largest = max([1] + [_nbytes(s) for s in served.specs.values()]
                      + [_nbytes(s) for s in served.param_specs.values()])
        dev = self.device
        device = dev if isinstance(dev, torch.device) and dev.type == "cuda" else torch.device("cpu")
        if backend == "gloo":
            device = torch.device("cpu")
        t0 = time.perf_counter()
        rx = WeightReceiver(host, port, world_size, rank, backend=backend, device=device, timeout=timeout,
                            keep_step_buffers=keep, group_id=group_id, limits=WireLimits(max_tensor_bytes=largest))
        with self.lock:
            self.receiver = rx
            self.info = {
                "host": host, "port": port, "address": f"{host}:{port}", "world_size": world_size, "rank": rank,
                "local_rank": local, "backend": getattr(rx.transport, "backend", backend), "device": str(rx.device),
                "join_s": time.perf_counter() - t0, "keep_step_buffers": rx.keep_step_buffers,
                "group_id": rx.group_id, "bucket_bytes": rx.bucket_bytes, "max_tensor_bytes": largest,
            }
        logger.info("weight sync: joined group %s:%s as rank %d/%d", host, port, rank, world_size)
        return dict(self.info)

    def join_parts(self, parts: list[dict], backend: str = "auto", timeout: float = 300.0) -> dict:
        """Join one 2-rank group per trainer rank that sends this worker its
        part (:mod:`..rank_parts`), in the order given (the trainer
        ranks build theirs in the same order, so no join waits on another).
        From then on every step is the main group's stream plus one part per
        group, received together and loaded as one update."""
        from ..receiver import WeightReceiver

        rx = self.receiver
        if rx is None or rx.closed:
            raise WeightSyncError("join the trainer's group (init_weight_receiver) before its rank parts")
        self._close_parts()
        joined = []
        try:
            for p in parts:
                joined.append(WeightReceiver(str(p["host"]), int(p["port"]), 2, 1, backend=backend, device=rx.device,
                                             timeout=timeout, keep_step_buffers=rx.keep_step_buffers,
                                             group_id=rx.group_id, limits=rx.limits))
        except BaseException:
            for r in joined:
                with contextlib.suppress(Exception):
                    r.close()
            raise
        with self.lock:
            self.parts = joined
            self.info["rank_parts"] = [f"{p['host']}:{p['port']}" for p in parts]
        logger.info("weight sync: joined %d rank part group(s)", len(joined))
        return {"ok": True, "parts": len(joined), "local_rank": self.local_rank()}

    def close(self, reason: str = "the receiver was closed") -> bool:
        """Leave the group and its part groups (idempotent); a step in flight is cancelled."""
        with self.lock:
            job, self.job = self.job, None
            if job is not None and job.pending:
                job.cancelled = reason  # its thread ends when the old trainer's side does
            self._close_parts()
            rx, self.receiver = self.receiver, None
            if rx is None:
                return False
            with contextlib.suppress(Exception):
                rx.close()
            return True

    def _close_parts(self) -> None:
        parts, self.parts = self.parts, []
        self.info.pop("rank_parts", None)
        for r in parts:
            with contextlib.suppress(Exception):
                r.close()

    # ---- one step ------------------------------------------------------------

    def receive(self, step: int, mode: str = "auto", stream: bool = False, max_wait_s: float | None = None,
                allow_non_increasing: bool = False, group_id: str | None = None, rank_parts: bool = False) -> dict:
        """Receive step ``step``, validate it, load it (see
        ``WeightSyncExtension.receive_weights`` for the arguments).
        ``rank_parts``: the trainer ranks send parts of this step through
        the part groups (:meth:`join_parts`) too; without it the step is the
        main stream alone and the part groups are left untouched."""
        rx = self.checked_receiver(step, group_id)
        served = self.served_model()
        job = self.job
        if job is not None and job.pending:
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged: step {job.step} is still being "
                                       "received (collect it with weight_sync_wait first)")
        discard = None
        if self.last_step is not None and step <= self.last_step and not allow_non_increasing:
            discard = (f"step {step} does not come after the last loaded step {self.last_step} "
                       "(pass allow_non_increasing=True to load it anyway)")
        peak = PeakMemory(self.model_device())
        parts = list(self.parts) if rank_parts else []
        if rank_parts and not parts:
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged: the trainer sends rank parts "
                                       "but this worker joined no part group (weight_sync_join_parts)")
        if stream and parts:
            discard = "stream=True does not take rank parts (they arrive in their own groups): use stream=False"
        if stream and discard is None:
            with self.lock:
                self.job = None
                result = receive_stream(rx, step, mode, served, self.load)
            return self._record(result, peak)
        job = StepJob(rx, step, mode, served, self.load, discard=discard, parts=parts,
                      expected=self._expected_from_parts() if parts else None)
        job.peak = peak
        self.job = job
        return self.collect(job, max_wait_s)

    def wait(self, step: int, max_wait_s: float | None = None, group_id: str | None = None) -> dict:
        """Keep waiting for step ``step`` started by :meth:`receive`."""
        self.checked_receiver(step, group_id)
        job = self.job
        if job is None or job.step != step:
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged: no update of step {step} "
                                       "is in progress on this worker")
        return self.collect(job, max_wait_s)

    def collect(self, job: StepJob, max_wait_s: float | None) -> dict:
        t0 = time.perf_counter()
        result = job.collect(max_wait_s)
        if result is None:
            return {"ok": False, "pending": True, "step": job.step, "waited_s": time.perf_counter() - t0}
        if "peak_extra_source" not in result:
            self._record(result, job.peak)
        return dict(result)

    def failed(self, step: Any, e: BaseException, on_error: str = "raise") -> dict:
        """Map any error onto the two outcomes; raise it or return it as a dict."""
        err = e if isinstance(e, (WeightUpdateRejected, WeightLoadFailed)) else rejected(step, e)
        self.last_error = f"{type(err).__name__}: {err}"
        logger.error("weight sync: step %s failed: %s", step, self.last_error)
        if on_error == "return":
            return {"ok": False, "step": step, "error": self.last_error, "error_type": type(err).__name__,
                    "cause": getattr(err, "cause", None), "model_touched": isinstance(err, WeightLoadFailed)}
        raise err

    def _expected_from_parts(self) -> Callable[[str], bool] | None:
        """With rank parts an expert-parallel worker receives only its own
        experts: the names a step must bring are the served ones minus other
        ranks' experts (``None``: every served name)."""
        from .ep_experts import ownership_filter

        return ownership_filter(self.model())

    def load(self, mode: str, tensors: Any, before_finalize: Any = None) -> dict:
        served = self.served
        return load_update(self.model(), self.model_config, self.vllm_config, mode, tensors, before_finalize,
                    self.after_load, served_specs=served.specs if served is not None else None)

    def checked_receiver(self, step: int, group_id: str | None) -> Any:
        rx = self.receiver
        if rx is None:
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged: no weight receiver "
                                       "(initialize it first, or this trainer was taken over)")
        if group_id and rx.group_id and str(group_id) != rx.group_id:
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged: this worker now belongs to group "
                                       f"{rx.group_id[:12]}.., not {str(group_id)[:12]}.. (taken over by another trainer)")
        return rx

    # ---- reporting -----------------------------------------------------------

    def status(self) -> dict:
        """Receiver, owner, served checkpoint, last step and its report."""
        served, rx, job = self.served, self.receiver, self.job
        return {
            "receiver": dict(self.info) if rx is not None else None,
            "receiver_broken": None if rx is None else rx.broken,
            "owner": None if rx is None else rx.group_id,
            "pending_step": job.step if job is not None and job.pending else None,
            "served_checkpoint": None if served is None else served.dir,
            "served_layout": None if served is None else served.layout,
            "served_tensors": 0 if served is None else len(served.specs),
            "steps_loaded": self.steps_loaded,
            "last_step": self.last_step,
            "last": dict(self.last or {}) or None,
            "last_error": self.last_error,
        }

    def model_device(self) -> torch.device:
        try:
            return next(self.model().parameters()).device
        except Exception:
            return torch.device("cpu")

    def _record(self, result: dict, peak: PeakMemory) -> dict:
        result.update(peak.finish())
        if self._sizes is None:  # parameter storage does not change across updates
            self._sizes = model_sizes(self.model())
        result.update(self._sizes)
        self.last = dict(result)
        self.last_step = result["step"]
        self.steps_loaded += 1
        self.last_error = None
        return dict(result)


def _experts(model: torch.nn.Module) -> dict | None:
    from .ep_experts import expert_ownership

    try:
        return expert_ownership(model)
    except Exception as e:  # describe must answer whatever the model is
        return {"num_experts": None, "owned": None, "refused": f"expert ownership unreadable: {e}"}


def _tie_word_embeddings(model_config: Any) -> bool | None:
    """``tie_word_embeddings`` of the served model's config (or its text part), if it says."""
    cfg = getattr(model_config, "hf_config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        tie = getattr(c, "tie_word_embeddings", None)
        if isinstance(tie, bool):
            return tie
    return None


def _nbytes(spec: TensorSpec) -> int:
    from ..wire import DTYPES

    n = 1
    for d in spec[1]:
        n *= int(d)
    dt = DTYPES.get(spec[0])
    return n * (dt.itemsize if dt is not None else 8)
