"""Stand-alone broadcast group between one trainer (rank 0) and N receivers.

The group is built directly from a ``TCPStore`` + ``PrefixStore`` and a
``ProcessGroupGloo`` (CPU tensors) or ``ProcessGroupNCCL`` (CUDA tensors). It
never calls ``torch.distributed.init_process_group`` and never touches the
default group of either side, so it can live next to the trainer's own
FSDP/DP groups and next to vLLM's TP/PP groups.

Rank layout: rank 0 is the trainer; each receiving server k with ``n_k``
workers owns ranks ``offset_k + 0 .. offset_k + n_k - 1`` where
``offset_0 = 1`` and ``offset_{k+1} = offset_k + n_k`` (see
:func:`assign_rank_offsets`). Every receiver gets every byte.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import deque
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

from .wire import PROTOCOL_VERSION

__all__ = [
    "TransportError",
    "Transport",
    "BroadcastGroup",
    "RecordingTransport",
    "ReplayTransport",
    "assign_rank_offsets",
    "resolve_backend",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 300.0
_HANDSHAKE_KEY = "vfo8/handshake"


class TransportError(RuntimeError):
    """Group creation failed, a peer disagreed at the handshake, or a
    collective failed / timed out."""


class Handle(Protocol):
    def wait(self) -> None: ...


class Transport(Protocol):
    """What the sender and receiver need from a transport."""

    rank: int
    world_size: int
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False) -> Handle | None:
        """In-place broadcast of a contiguous tensor from rank 0."""

    def close(self) -> None: ...


class _Done:
    def wait(self) -> None:
        return None


def assign_rank_offsets(workers_per_server: Sequence[int]) -> tuple[list[int], int]:
    """Rank offsets of receiving servers and the total world size.

    >>> assign_rank_offsets([2, 4])
    ([1, 3], 7)
    """
    offsets = []
    nxt = 1
    for n in workers_per_server:
        if int(n) <= 0:
            raise ValueError(f"a server needs at least one worker, got {n}")
        offsets.append(nxt)
        nxt += int(n)
    return offsets, nxt


def resolve_backend(backend: str, device: torch.device | str | int | None) -> tuple[str, torch.device]:
    """Pick ``(backend, device)``. ``auto``: NCCL for a CUDA device, gloo
    otherwise; with ``device=None`` the current CUDA device if CUDA is
    available, else CPU."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if device is None:
        if backend == "gloo" or not torch.cuda.is_available():
            dev = torch.device("cpu")
        else:
            dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"nccl needs a CUDA device, got {dev}")
    if backend == "gloo" and dev.type != "cpu":
        raise ValueError(f"this transport uses gloo with CPU tensors only, got {dev}")
    return backend, dev


class BroadcastGroup:
    """A private process group used only to broadcast from rank 0.

    Construction blocks until every rank of ``world_size`` has joined (or
    ``timeout`` expires), so the trainer and all receivers must construct it
    concurrently (typically: the trainer triggers the receivers' init through
    an RPC without waiting, then builds its side).
    """

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int,
        rank: int,
        *,
        backend: str = "auto",
        device: torch.device | str | int | None = None,
        timeout: float | _dt.timedelta = DEFAULT_TIMEOUT_S,
        group_name: str = "weights",
    ) -> None:
        if not (isinstance(world_size, int) and world_size >= 2):
            raise ValueError(f"world_size must be an int >= 2 (trainer + receivers), got {world_size!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank {rank!r} outside [0, {world_size})")
        self.backend, self.device = resolve_backend(backend, device)
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout if isinstance(timeout, _dt.timedelta) else _dt.timedelta(seconds=float(timeout))
        self._closed = False
        self._pg = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            self._store = dist.TCPStore(
                host,
                int(port),
                world_size,
                is_master=(rank == 0),
                timeout=self.timeout,
                wait_for_workers=False,
            )
            self.port = self._store.port
            store = dist.PrefixStore(f"vfo8/{group_name}/", self._store)
            self._handshake(store)
            pg_store = dist.PrefixStore("pg/", store)
            if self.backend == "gloo":
                self._pg = dist.ProcessGroupGloo(pg_store, rank, world_size, self.timeout)
            else:
                opts = dist.ProcessGroupNCCL.Options()
                # A dedicated group used between training steps: let its
                # broadcasts overtake other work queued on the GPU.
                opts.is_high_priority_stream = True
                opts._timeout = self.timeout
                self._pg = dist.ProcessGroupNCCL(pg_store, rank, world_size, opts)
        except TransportError:
            raise
        except Exception as e:  # DistStoreError, RuntimeError, ...
            raise TransportError(
                f"rank {rank}/{world_size}: could not join the {backend} weight-sync group at {host}:{port}: {e}"
            ) from e

    def _handshake(self, store: dist.Store) -> None:
        """Rank 0 publishes backend + protocol version; others check it so a
        mismatch fails with a clear message instead of hanging in the PG."""
        mine = {"backend": self.backend, "protocol": PROTOCOL_VERSION, "world_size": self.world_size}
        if self.rank == 0:
            store.set(_HANDSHAKE_KEY, json.dumps(mine))
            return
        raw = store.get(_HANDSHAKE_KEY)
        try:
            theirs = json.loads(bytes(raw[:4096]).decode("utf-8"))
        except Exception as e:
            raise TransportError(f"unreadable handshake from rank 0: {e}") from None
        if theirs != mine:
            raise TransportError(f"rank {self.rank} expects {mine}, rank 0 announced {theirs}")

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        if self._closed or self._pg is None:
            raise TransportError("broadcast on a closed group")
        if not tensor.is_contiguous():
            raise ValueError("broadcast needs a contiguous tensor")
        if tensor.device != self.device:
            raise ValueError(f"tensor on {tensor.device}, group device is {self.device}")
        if tensor.numel() == 0:
            return _Done() if async_op else None
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        opts.timeout = self.timeout
        try:
            work = self._pg.broadcast([tensor], opts)
        except Exception as e:
            raise TransportError(f"broadcast failed on rank {self.rank}: {e}") from e
        handle = _WorkHandle(work, self.rank)
        if async_op:
            return handle
        handle.wait()
        return None

    def close(self) -> None:
        """Tear the group down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                if self.backend == "nccl" and self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                shutdown = getattr(pg, "shutdown", None)
                if shutdown is not None:
                    shutdown()
            except Exception:
                pass
        self._store = None

    def __enter__(self) -> "BroadcastGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _WorkHandle:
    def __init__(self, work, rank: int) -> None:
        self._work = work
        self._rank = rank

    def wait(self) -> None:
        if self._work is None:
            return
        try:
            self._work.wait()
        except Exception as e:
            raise TransportError(f"broadcast failed on rank {self._rank}: {e}") from e
        finally:
            self._work = None


# --------------------------------------------------------------------------
# In-process transports (tests, tools, offline validation)
# --------------------------------------------------------------------------


class RecordingTransport:
    """Rank-0 stand-in that records every broadcast as bytes."""

    rank = 0

    def __init__(self, device: torch.device | str = "cpu", world_size: int = 2) -> None:
        self.device = torch.device(device)
        self.world_size = world_size
        self.messages: list[bytes] = []

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        if tensor.numel():
            self.messages.append(tensor.detach().cpu().numpy().tobytes())
        return _Done() if async_op else None

    def close(self) -> None:
        pass


class ReplayTransport:
    """Receiver stand-in that fills each broadcast from a list of byte blobs.

    A blob whose size differs from the receiving tensor raises
    :class:`TransportError` (what a real collective would do, loudly)."""

    def __init__(self, messages: Sequence[bytes], device: torch.device | str = "cpu", rank: int = 1) -> None:
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = rank + 1
        self._queue = deque(messages)
        self.sizes: list[int] = []

    @property
    def remaining(self) -> int:
        return len(self._queue)

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        n = tensor.numel() * tensor.element_size()
        if n:
            self.sizes.append(n)
            if not self._queue:
                raise TransportError("replay stream exhausted")
            blob = self._queue.popleft()
            if len(blob) != n:
                raise TransportError(f"size mismatch: receiver posted {n} bytes, sender sent {len(blob)}")
            tensor.view(torch.uint8).view(-1).copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        return _Done() if async_op else None

    def close(self) -> None:
        pass
