"""Small pieces of the sender: step statistics, the look-ahead iterator the
send loops pull weights through, and a bucket buffer slot with its pending
transfers."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, Iterator

import torch

from .grouped import _END

__all__ = ["SendStats"]


def _wants_cuda(backend: str, device) -> bool:
    if backend == "nccl":
        return True
    if backend == "gloo":
        return False
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}").type == "cuda"
    return torch.cuda.is_available()


@dataclass
class SendStats:
    """Per-step statistics returned by :meth:`WeightSender.send`.

    Times are host wall-clock seconds. ``quantize_s`` is the time spent
    pulling the next tensor out of the (quantizing) weight iterator, which
    includes whatever the caller's own iterator does (e.g. gathering shards).
    ``pack_s`` is the time to copy tensors into bucket buffers (for CUDA
    buffers this is launch time only), ``checksum_s`` the payload checksum,
    ``transfer_s`` the time blocked in the transport (enqueue + waiting for a
    buffer to be free again + the final drain).
    """

    step: int
    num_tensors: int = 0
    num_buckets: int = 0
    num_bytes: int = 0  # sum of tensor bytes
    wire_bytes: int = 0  # everything broadcast: headers, manifests, payloads (incl. padding)
    max_payload_bytes: int = 0
    oversize_tensors: int = 0  # tensors larger than bucket_bytes, sent as their own bucket
    buffers_allocated: int = 0  # bucket buffers held by the sender (once warm: 2 on the grouped CUDA path, else 3)
    reused_buckets: int = 0  # buckets laid out as in the previous step (grouped path)
    graph_buckets: int = 0  # buckets whose launch work ran as one CUDA graph (grouped path)
    quantize_s: float = 0.0
    pack_s: float = 0.0
    checksum_s: float = 0.0
    transfer_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Peekable:
    """Iterator with one-item look-ahead that accounts the time spent in it."""

    def __init__(self, it: Iterator, stats: SendStats) -> None:
        self._it = it
        self._stats = stats
        self._head: Any = None
        self._has_head = False
        self._back: list = []

    def _pull(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self._it)
        except StopIteration:
            return _END
        finally:
            self._stats.quantize_s += time.perf_counter() - t0

    def peek(self) -> Any:
        if self._back:
            return self._back[-1]
        if not self._has_head:
            self._head = self._pull()
            self._has_head = True
        return self._head

    def next(self) -> Any:
        if self._back:
            return self._back.pop()
        if self._has_head:
            self._has_head = False
            head, self._head = self._head, None
            return head
        return self._pull()

    def take(self, n: int) -> list:
        """The next ``n`` items (fewer at the end, never the end marker), one
        timing for all: the replay of a bucket layout pulls a bucket at once."""
        out: list = []
        back = self._back
        while back and len(out) < n:
            if back[-1] is _END:
                return out
            out.append(back.pop())
        if len(out) < n and self._has_head:
            if self._head is _END:
                return out
            out.append(self._head)
            self._has_head = False
            self._head = None
        if len(out) < n:
            t0 = time.perf_counter()
            want = n - len(out)
            got = list(islice(self._it, want))
            self._stats.quantize_s += time.perf_counter() - t0
            out += got
            if len(got) < want:  # the iterator is exhausted: remember the end
                self._head, self._has_head = _END, True
        return out

    def push_back(self, items: list) -> None:
        """Make ``items`` the next ones returned, in order."""
        self._back.extend(reversed(items))


class _Slot:
    """A bucket buffer plus the transfers that still read from it."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.handles: list = []
        self.keepalive: list = []
        self.stage: Any = None  # the slot's control staging on CUDA (outbox._ControlStage)

    def wait(self) -> None:
        handles, self.handles = self.handles, []
        try:
            for h in handles:
                h.wait()
        finally:
            self.keepalive = []
