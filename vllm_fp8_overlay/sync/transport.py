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

Before the process group exists, the ranks agree through the store (whose
messages are length-prefixed TCP: no size a peer announces can crash a
process there): rank 0 writes a fixed-size HELLO (protocol version, header
and seal sizes, backend, world size, group id, its bucket size and limits),
every receiver answers with a fixed-size ACK (accept with its own limits, or
refuse with a reason), and rank 0 writes GO only if all accepted. So a peer
of another protocol, framing or limits is refused with a reason on both
sides before any collective could post a receive of the wrong size.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections import deque
from dataclasses import replace
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

from . import wire
from .wire import WireError, WireLimits

__all__ = [
    "TransportError",
    "GroupRefused",
    "OwnershipLost",
    "Transport",
    "BroadcastGroup",
    "RecordingTransport",
    "ReplayTransport",
    "assign_rank_offsets",
    "resolve_backend",
    "refuse_group",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 300.0
_MAX_NOTE = 512


class TransportError(RuntimeError):
    """Group creation failed, a peer refused the handshake, or a collective
    failed / timed out."""


class GroupRefused(TransportError):
    """A peer refused the group at the handshake (its reason is in the message)."""


class OwnershipLost(TransportError):
    """A receiver of this group was taken over by another trainer."""


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it).

    The trainer hosts the group's TCPStore there; another process could take
    the port before the store binds it, in which case the store fails with
    "address already in use" and no peer of another group is ever accepted
    (receivers are told the group id and refuse any other). Pass an explicit
    port where a firewall allows only known ones."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def _timedelta(timeout: float | _dt.timedelta) -> _dt.timedelta:
    return timeout if isinstance(timeout, _dt.timedelta) else _dt.timedelta(seconds=float(timeout))


def _group_store(host: str, port: int, world_size: int, rank: int, timeout: _dt.timedelta, group_name: str):
    raw = dist.TCPStore(host, int(port), world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False)
    return raw, dist.PrefixStore(f"vfo8/{group_name}/", raw)


def refuse_group(host: str, port: int, world_size: int, rank: int, reason: str, *,
                 timeout: float = 30.0, group_name: str = "weights") -> None:
    """Answer a trainer's HELLO with a refusal without joining its group, so
    its handshake fails at once with ``reason`` instead of timing out."""
    _, store = _group_store(host, port, world_size, rank, _timedelta(timeout), group_name)
    store.set(f"ack/{rank}", wire.encode_ack(wire.Ack(rank=rank, accepted=False, reason=reason)))


class BroadcastGroup:
    """A private process group used only to broadcast from rank 0.

    Construction blocks until every rank of ``world_size`` has joined and
    accepted the handshake (or ``timeout`` expires), so the trainer and all
    receivers must construct it concurrently (typically: the trainer triggers
    the receivers' init through an RPC without waiting, then builds its side).

    Rank 0 announces ``bucket_bytes`` (the largest payload of several
    tensors it will send) and its ``limits``; a receiver refuses a bucket size
    above its ``limits.max_bucket_bytes``, and a group id other than
    ``group_id`` when it was given one. After the handshake
    :attr:`send_limits` (rank 0) holds the element-wise minimum of every
    rank's limits, and :attr:`bucket_bytes` the agreed bucket size.
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
        limits: WireLimits = wire.DEFAULT_LIMITS,
        bucket_bytes: int | None = None,
        group_id: str | None = None,
    ) -> None:
        if not (isinstance(world_size, int) and world_size >= 2):
            raise ValueError(f"world_size must be an int >= 2 (trainer + receivers), got {world_size!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank {rank!r} outside [0, {world_size})")
        self.backend, self.device = resolve_backend(backend, device)
        self.rank = rank
        self.world_size = world_size
        self.timeout = _timedelta(timeout)
        self.limits = limits
        self.send_limits = limits
        self.bucket_bytes = int(bucket_bytes) if bucket_bytes is not None else limits.max_bucket_bytes
        self.group_id = group_id
        self.address = f"{host}:{port}"
        self._closed = False
        self._pg = None
        self._store = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            self._raw_store, self._store = _group_store(host, port, world_size, rank, self.timeout, group_name)
            self.port = self._raw_store.port
            self.address = f"{host}:{self.port}"
            if rank == 0:
                self._handshake_root()
            else:
                self._handshake_peer()
            pg_store = dist.PrefixStore("pg/", self._store)
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
            self._store = None
            raise
        except Exception as e:  # DistStoreError, RuntimeError, ...
            self._store = None
            raise TransportError(
                f"rank {rank}/{world_size}: could not join the {backend} weight-sync group at {host}:{port}: {e}"
            ) from e

    # ------------------------------------------------------------ handshake

    def _handshake_root(self) -> None:
        gid = bytes.fromhex(self.group_id) if self.group_id else os.urandom(16)
        if len(gid) != 16:
            raise ValueError("group_id must be 32 hex digits")
        self.group_id = gid.hex()
        lim = self.limits
        self.hello = wire.Hello(world_size=self.world_size, group_id=gid, backend=self.backend,
                                bucket_bytes=self.bucket_bytes, max_manifest_bytes=lim.max_manifest_bytes,
                                max_tensor_bytes=lim.max_tensor_bytes,
                                max_tensors_per_bucket=lim.max_tensors_per_bucket, max_dims=lim.max_dims)
        self._store.set("hello", wire.encode_hello(self.hello))
        keys = [f"ack/{r}" for r in range(1, self.world_size)]
        self._store.wait(keys, self.timeout)
        refusals, acks = [], []
        for r, k in enumerate(keys, start=1):
            try:
                ack = wire.decode_ack(self._store.get(k))
            except WireError as e:
                refusals.append(f"rank {r}: unreadable answer ({e})")
                continue
            if not ack.accepted:
                refusals.append(f"rank {r}: {ack.reason}")
            acks.append(ack)
        self._store.set("go", wire.encode_go(not refusals))
        if refusals:
            raise GroupRefused("the weight-sync group was refused: " + "; ".join(refusals))
        self.send_limits = replace(
            lim,
            max_manifest_bytes=min([lim.max_manifest_bytes] + [a.max_manifest_bytes for a in acks]),
            max_tensors_per_bucket=min([lim.max_tensors_per_bucket] + [a.max_tensors_per_bucket for a in acks]),
            max_tensor_bytes=min([lim.max_tensor_bytes] + [a.max_tensor_bytes for a in acks]),
            max_dims=min([lim.max_dims] + [a.max_dims for a in acks]),
        )

    def _handshake_peer(self) -> None:
        self._store.wait(["hello"], self.timeout)
        lim = self.limits
        reason = ""
        hello = None
        try:
            hello = wire.decode_hello(self._store.get("hello"))
        except WireError as e:
            reason = f"unreadable hello ({e})"
        if hello is not None:
            checks = [
                (hello.wire_version == wire.PROTOCOL_VERSION,
                 f"trainer speaks wire version {hello.wire_version}, this receiver {wire.PROTOCOL_VERSION}"),
                (hello.header_size == wire.HEADER_SIZE and hello.seal_size == wire.SEAL_SIZE,
                 f"framing differs: header {hello.header_size}/seal {hello.seal_size} bytes, "
                 f"expected {wire.HEADER_SIZE}/{wire.SEAL_SIZE}"),
                (hello.backend == self.backend, f"trainer uses {hello.backend}, this receiver {self.backend}"),
                (hello.world_size == self.world_size,
                 f"trainer says world size {hello.world_size}, this receiver {self.world_size}"),
                (hello.bucket_bytes <= lim.max_bucket_bytes,
                 f"bucket of {hello.bucket_bytes} bytes > this receiver's max_bucket_bytes {lim.max_bucket_bytes}"),
                (self.group_id is None or hello.group_id.hex() == self.group_id,
                 f"group id {hello.group_id.hex()[:12]}.. is not the expected {str(self.group_id)[:12]}.."),
            ]
            reason = next((why for ok, why in checks if not ok), "")
        ack = wire.Ack(rank=self.rank, accepted=not reason, max_bucket_bytes=lim.max_bucket_bytes,
                       max_tensor_bytes=lim.max_tensor_bytes, max_manifest_bytes=lim.max_manifest_bytes,
                       max_tensors_per_bucket=lim.max_tensors_per_bucket, max_dims=lim.max_dims, reason=reason)
        self._store.set(f"ack/{self.rank}", wire.encode_ack(ack))
        if reason:
            raise GroupRefused(f"rank {self.rank} refused the weight-sync group at {self.address}: {reason}")
        self.hello = hello
        self.group_id = hello.group_id.hex()
        self.bucket_bytes = hello.bucket_bytes
        self._store.wait(["go"], self.timeout)
        try:
            go = wire.decode_go(self._store.get("go"))
        except WireError as e:
            raise GroupRefused(f"rank {self.rank}: unreadable go record ({e})") from None
        if not go:
            raise GroupRefused(f"rank {self.rank}: the trainer cancelled the group (another rank refused it)")

    # ------------------------------------------------------------ ownership

    def notify_evicted(self, reason: str) -> bool:
        """Tell rank 0 (through the store) that this receiver was taken over.
        Best effort; returns whether the note was written."""
        try:
            self._store.set("evicted", f"rank {self.rank}: {reason}"[:_MAX_NOTE].encode())
            return True
        except Exception:
            return False

    def evicted(self) -> str | None:
        """Rank 0: the note of a receiver that was taken over, else ``None``."""
        if self._store is None:
            return None
        try:
            if self._store.check(["evicted"]):
                return bytes(self._store.get("evicted")[:_MAX_NOTE]).decode("utf-8", "replace")
        except Exception:
            return None
        return None

    def peer_alive(self) -> bool:
        """Receivers: whether rank 0's store still answers (a dead trainer's does not)."""
        if self._store is None or self._closed:
            return False
        try:
            self._store.check(["hello"])
            return True
        except Exception:
            return False

    # ------------------------------------------------------------ transfers

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
        """Tear the group down. Idempotent. A receive pending in another
        thread is not interrupted by this (gloo keeps waiting until the peer
        closes or the timeout); a peer blocked sending to this rank gets an
        error at once."""
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

    Sizes behave as gloo's do: a blob longer than the posted receive raises
    :class:`TransportError` (gloo would abort the process: ``aborted`` is set
    so a test can assert it never happened), a shorter one fills the front
    of the tensor and leaves the rest as it was."""

    def __init__(self, messages: Sequence[bytes], device: torch.device | str = "cpu", rank: int = 1) -> None:
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = rank + 1
        self._queue = deque(messages)
        self.sizes: list[int] = []
        self.aborted = False
        self.closed = False

    @property
    def remaining(self) -> int:
        return len(self._queue)

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        if self.closed:
            raise TransportError("broadcast on a closed group")
        n = tensor.numel() * tensor.element_size()
        if n:
            self.sizes.append(n)
            if not self._queue:
                raise TransportError("replay stream exhausted")
            blob = self._queue.popleft()
            if len(blob) > n:
                self.aborted = True
                raise TransportError(f"size mismatch: receiver posted {n} bytes, sender sent {len(blob)} "
                                     "(gloo aborts the receiving process here)")
            if blob:
                tensor.view(torch.uint8).view(-1)[: len(blob)].copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        return _Done() if async_op else None

    def close(self) -> None:
        self.closed = True
