"""The worker side of the ``fp8`` backend of vLLM's weight-transfer API.

vLLM creates it in each worker from ``WeightTransferConfig(backend="fp8")``
(the overlay's adapters register it in ``WeightTransferEngineFactory``) and
calls it from ``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update``. Everything it does goes
through :class:`~..apply.endpoint.WorkerSync`, the core the worker
extension uses too: one update is received whole, validated against the
served checkpoint (names, dtypes, shapes, FP8 layout, values) and only then
loaded with vLLM's layerwise reload, so a rejected update leaves the model
as it was.

Two shapes of vLLM's engine API are served (the adapters gate them):

* 0.22-0.24: ``__init__(config, parallel_config, model)``, the worker owns
  the layerwise reload around ``receive_weights(info, load_weights)``; the
  ``native-worker-owns-reload`` adapter hands that to this engine instead,
  so validation can happen before the model is touched, and gives it the
  worker's configs (:meth:`bind_worker`).
* 0.28+: ``__init__(config, vllm_config, device, model)``; the engine owns
  ``start_weight_update`` / ``finish_weight_update``.

What the native API lacks is covered here: validation happens inside
``update_weights`` before any load; a rejected or failed update raises
(vLLM passes the message to the caller: ``WeightUpdateRejected`` means the
model is unchanged, ``WeightLoadFailed`` that it may be partial), and the
step's report (times, bytes, memory) is kept in :attr:`last_report` and
logged, because vLLM's ``update_weights`` returns nothing.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from ..apply.endpoint import WorkerSync
from ..apply.load import reset_derived_caches
from .info import Fp8InitInfo, Fp8UpdateInfo

logger = logging.getLogger("vllm.fp8_overlay.sync")

__all__ = ["Fp8WeightTransferEngine"]


class Fp8WeightTransferEngine(WeightTransferEngine):
    """FP8 (or BF16) checkpoint-format updates from our sender, validated
    before load. Register name: ``fp8``."""

    init_info_cls = Fp8InitInfo
    update_info_cls = Fp8UpdateInfo
    #: one served model per engine: its checkpoint is what updates are checked against
    supports_draft_weight_update = False

    def __init__(self, config: Any, *args: Any) -> None:
        super().__init__(config, *args)
        if len(args) == 3:  # 0.28+: (vllm_config, device, model)
            vllm_config, device, _ = args
            model_config = vllm_config.model_config
        else:  # 0.22-0.24: (parallel_config, model); configs come with bind_worker
            vllm_config, device, model_config = None, None, None
        self.checkpoint_format = True
        self.sync = WorkerSync(model=lambda: self.model, model_config=model_config, vllm_config=vllm_config,
                               local_rank=self._global_rank, device=device)
        self.last_report: dict | None = None

    # ---- 0.22-0.24: what the worker knows and the old base class lacks ------

    def bind_worker(self, worker: Any, checkpoint_format: bool = True) -> None:
        """Called by the ``native-worker-owns-reload`` adapter at
        ``init_weight_transfer_engine`` and each ``start_weight_update`` of
        vLLM 0.22-0.24."""
        self.sync.model_config = worker.model_config
        self.sync.vllm_config = worker.vllm_config
        self.sync.device = getattr(worker, "device", None)
        runner = getattr(worker, "model_runner", None)
        self.sync.after_load = (lambda: reset_derived_caches(runner)) if runner is not None else None
        self.checkpoint_format = bool(checkpoint_format)

    # ---- vLLM's engine API ----------------------------------------------------

    def init_transfer_engine(self, init_info: Fp8InitInfo) -> None:
        """Join the trainer's group (blocks until every rank joined)."""
        if self.sync.model_config is None:
            from ..apply.errors import WeightSyncError

            raise WeightSyncError("the fp8 engine did not get the worker's configs: on vLLM 0.22-0.24 the overlay's "
                                  "'native-worker-owns-reload' adapter gives them; see `python -m vllm_fp8_overlay "
                                  "status` for why it is not applied")
        self.sync.join(init_info.master_address, init_info.master_port, init_info.world_size,
                       init_info.rank_offset, init_info.transport, init_info.timeout, init_info.checkpoint_dir,
                       init_info.keep_receive_buffers, init_info.group_id, init_info.takeover)

    def start_weight_update(self) -> None:
        """Nothing to prepare: the model is touched only once the whole
        update arrived and passed validation."""

    def finish_weight_update(self) -> None:
        """Nothing left: each update was loaded and finalized when it passed."""

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: Fp8UpdateInfo,
                        load_weights: Callable[..., None] | None = None) -> None:
        """Receive one step whole, validate it, load it; raise on failure.
        ``load_weights`` (what 0.22-0.24 pass) is not used: the load goes
        through the same core as the worker extension's."""
        step = update_info.step
        if step is None:
            step = 1 if self.sync.last_step is None else self.sync.last_step + 1
        mode = update_info.mode
        if not self.checkpoint_format and mode == "auto":
            mode = "kernel"
        try:
            report = self.sync.receive(step, mode, stream=False, max_wait_s=None,
                                       allow_non_increasing=update_info.allow_non_increasing,
                                       group_id=update_info.group_id)
        except Exception as e:
            self.sync.failed(step, e, "raise")
            raise  # unreachable: failed() raises
        self.last_report = report
        logger.info("weight sync (fp8 backend): step %d loaded: %d tensors, %.1f MB, receive %.3fs, "
                    "validate %.3fs, load %.3fs", step, report.get("num_tensors", 0),
                    report.get("num_bytes", 0) / 1e6, report.get("receive_s", 0.0),
                    report.get("validate_s", 0.0), report.get("load_s", 0.0))
        if self.sync.model_device().type == "cuda":
            torch.cuda.synchronize()

    def shutdown(self) -> None:
        self.sync.close("the weight-transfer engine was shut down")

    @staticmethod
    def trainer_send_weights(iterator: Any, trainer_args: Any) -> None:
        """vLLM 0.22-0.24's trainer-side call: ``trainer_args`` is
        ``{"sender": WeightSender, "step": int}`` (see
        :func:`vllm_fp8_overlay.sync.native.sending.open_sender`)."""
        sender = trainer_args["sender"]
        sender.send(iterator, int(trainer_args["step"]))

    # ---- internals ------------------------------------------------------------

    def _global_rank(self) -> int:
        """This worker's rank among the engine's workers: data-parallel index
        x (TP*PP) + rank, the numbering vLLM's ``nccl`` backend uses too."""
        pc = self.parallel_config
        dp = 0
        with contextlib.suppress(Exception):
            dp = int(getattr(pc, "data_parallel_index", getattr(pc, "data_parallel_rank", 0)) or 0)
        return dp * int(pc.world_size) + int(getattr(pc, "rank", 0) or 0)
