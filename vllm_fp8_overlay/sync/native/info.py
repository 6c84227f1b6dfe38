"""What the trainer tells the ``fp8`` weight-transfer backend (no vLLM import).

vLLM passes ``init_info`` / ``update_info`` dicts from the trainer to every
worker (``LLM.init_weight_transfer_engine``, ``/init_weight_transfer_engine``
...) and builds these dataclasses from them; unknown keys are refused there.
The trainer side builds the same dicts, so both ends agree on one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKEND", "Fp8InitInfo", "Fp8UpdateInfo"]

#: the name the backend is registered under in vLLM's engine factories
BACKEND = "fp8"


@dataclass
class Fp8InitInfo:
    """Join the trainer's sync group.

    ``master_address`` / ``master_port``: the group's TCPStore, hosted by the
    trainer (the same names vLLM's ``nccl`` backend uses). A worker joins as
    rank ``rank_offset`` + its global rank in the engine (data-parallel index
    x TP*PP + rank), as vLLM's ``nccl`` backend does. ``transport``:
    ``"auto"`` (NCCL on CUDA, gloo on CPU), ``"nccl"`` or ``"gloo"``.
    ``group_id``: the trainer's group (any other is refused). ``takeover``:
    replace a receiver another live trainer still owns (it is told).
    ``checkpoint_dir``: what updates are validated against, if the served
    model's directory is not local to the worker.
    """

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    transport: str = "auto"
    timeout: float = 300.0
    group_id: str | None = None
    takeover: bool = False
    keep_receive_buffers: bool = False
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        self.master_port = int(self.master_port)
        self.world_size = int(self.world_size)
        self.rank_offset = int(self.rank_offset)
        if self.world_size < 2 or not 0 < self.rank_offset < self.world_size:
            raise ValueError(f"fp8 weight transfer: world_size {self.world_size} and rank_offset "
                             f"{self.rank_offset} leave no room for the trainer (rank 0) and a worker")
        if self.transport not in ("auto", "nccl", "gloo"):
            raise ValueError(f"fp8 weight transfer: transport must be auto, nccl or gloo, not {self.transport!r}")


@dataclass
class Fp8UpdateInfo:
    """One update: the trainer's step number (``None``: one more than the
    last step this worker loaded) and how to load it (``mode``: ``auto``,
    ``layerwise``, ``load_weights``, ``kernel``; see the worker extension).
    Steps must increase unless ``allow_non_increasing``. ``update_kind``:
    vLLM 0.24's worker reads it from every update info (``"sparse_flat"`` is
    its sparse-patch format); ``fp8`` updates are always ``"dense"``."""

    step: int | None = None
    mode: str = "auto"
    allow_non_increasing: bool = False
    group_id: str | None = None
    update_kind: str = "dense"

    def __post_init__(self) -> None:
        if self.update_kind != "dense":
            raise ValueError(f"fp8 weight transfer sends whole (dense) updates, not {self.update_kind!r}")
        if self.step is not None:
            self.step = int(self.step)
        if self.mode not in ("auto", "layerwise", "load_weights", "kernel"):
            raise ValueError(f"fp8 weight transfer: unknown mode {self.mode!r}")
