"""The trainer side of the ``fp8`` backend of vLLM's weight-transfer API.

From vLLM 0.28 a trainer builds its sender with
``WeightTransferTrainerFactory.trainer_init(init_info, client=..., source=...)``
and calls ``send_weights()`` every step; the factory picks the engine from
``init_info.backend``. With the overlay active the factory knows ``fp8``, so
a trainer written for ``nccl`` switches by using :class:`Fp8TrainerInitInfo`
(same fields) instead of ``NCCLTrainerInitInfo``::

    info = Fp8TrainerInitInfo(master_address=addr, master_port=port,
                              world_size=1 + num_workers, rank=0)
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client,
                                                       source=ModuleSource(model))
    engine.send_weights()          # every step

The sender quantizes each tensor into the served checkpoint's FP8 layout
(found from the served model: ``layout="auto"``) and streams it to the
workers, which validate the whole update before loading it.

vLLM 0.22-0.24 have no trainer-side factory (nor this module's base
classes); :func:`.sending.open_sender` gives the sender to put in the
``trainer_args`` of ``Fp8WeightTransferEngine.trainer_send_weights``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

from ..sender import WeightSender
from .info import BACKEND, Fp8InitInfo, Fp8UpdateInfo
from .sending import materialized, open_sender, served_layout

__all__ = ["Fp8TrainerInitInfo", "Fp8TrainerWeightTransferEngine", "open_sender", "served_layout"]  # re-exported

#: how long a failed send waits for the workers' own reason (they got an ABORT)
_ANSWER_S = 120.0


@dataclass
class Fp8TrainerInitInfo(TrainerInitInfo):
    """``NCCLTrainerInitInfo``'s fields plus what FP8 needs.

    ``layout``: ``"auto"`` (the served checkpoint's FP8 layout, read from
    ``served_model`` or, if that is ``None``, from the client: an
    :class:`~.clients.LLMWeightSyncClient`'s model, or ``/v1/models`` of an
    HTTP client), an ``FP8Layout`` or its dict, or ``None`` (send as given).
    ``transport``: ``"auto"`` (NCCL when the trainer's tensors are on CUDA,
    else gloo), ``"nccl"``, ``"gloo"``.
    """

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    layout: Any = "auto"
    served_model: str | None = None
    transport: str = "auto"
    bucket_bytes: int | None = None
    timeout: float = 300.0
    takeover: bool = False
    keep_receive_buffers: bool = False


class Fp8TrainerWeightTransferEngine(TrainerWeightTransferEngine):
    """Quantize to the served layout, send, let the workers validate and load."""

    init_info_cls = Fp8TrainerInitInfo

    def __init__(self, *, client: Any, source: Any = None, is_sender: bool = True) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.sender: WeightSender | None = None
        self.group_id = os.urandom(16).hex()
        self.step = 0

    @classmethod
    def trainer_init(cls, init_info: Fp8TrainerInitInfo, *, client: Any, source: Any = None):
        if source is None:
            raise ValueError("fp8 weight transfer needs a WeightSource (e.g. ModuleSource(model))")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine.rank = init_info.rank  # vLLM >= 0.33's base keeps it (a source's owned_names(rank) reads it)
        if not engine.is_sender:
            return engine  # other ranks only take part in the source's gathers
        layout = served_layout(init_info.layout, init_info.served_model, client)
        worker_info = Fp8InitInfo(master_address=init_info.master_address, master_port=init_info.master_port,
                                  world_size=init_info.world_size, rank_offset=1, transport=init_info.transport,
                                  timeout=init_info.timeout, group_id=engine.group_id,
                                  takeover=init_info.takeover, keep_receive_buffers=init_info.keep_receive_buffers)
        # the workers block in init until the group forms: ask them from a thread
        with cf.ThreadPoolExecutor(max_workers=1) as pool:
            fut = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            try:
                engine.sender = open_sender(layout, init_info.master_address, init_info.master_port,
                                            init_info.world_size, transport=init_info.transport,
                                            bucket_bytes=init_info.bucket_bytes, timeout=init_info.timeout,
                                            group_id=engine.group_id)
            except BaseException:
                if fut.done() and fut.exception() is not None:
                    raise fut.exception() from None  # the workers' reason says more
                raise
            fut.result()
        return engine

    def send_weights(self, step: int | None = None) -> None:
        """One update: start, send (while the workers receive), finish.
        ``step``: the trainer's step number (default: one more than the last)."""
        items = materialized(self.source)
        if not self.is_sender:
            for _ in items:  # keep the other ranks' gathers in step with the sender's
                pass
            return
        assert self.sender is not None
        self.step = int(step) if step is not None else self.step + 1
        info = Fp8UpdateInfo(step=self.step, group_id=self.group_id)
        self.client.start_weight_update()
        with cf.ThreadPoolExecutor(max_workers=1) as pool:
            fut = pool.submit(self.client.update_weights, asdict(info))
            try:
                self.sender.send(items, self.step)
            except BaseException:
                # the workers got an ABORT and answer with their own reason
                with contextlib.suppress(cf.TimeoutError):
                    if fut.exception(timeout=_ANSWER_S) is not None:
                        raise fut.exception() from None
                raise
            fut.result()
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
