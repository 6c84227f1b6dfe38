"""Trainer side of the weight sync: quantize, pack into buckets, broadcast.

The non-grouped path (CPU, or CUDA without Triton) lives here; the grouped,
pipelined CUDA path is :class:`~.grouped.GroupedSendPath`. Both refuse
tensors a receiver would reject for their values (:mod:`.values`) before
anything goes on the wire, so a bad step costs the trainer an exception, not
a transfer.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any, Iterable, Mapping

import torch

from . import wire
from .grouped import _END, GroupedSendPath
from .outbox import Outbox
from .replay import BucketPlan
from .sendstate import SendStats, _Peekable, _Slot, _wants_cuda
from .transport import DEFAULT_TIMEOUT_S, BroadcastGroup, OwnershipLost, Transport, TransportError
from .values import value_problems
from .wire import (
    ALIGNMENT,
    FLAG_LAST,
    SEAL_SIZE,
    ChecksumAlgo,
    EndOfStep,
    Header,
    MessageKind,
    TensorEntry,
    WireLimits,
)

__all__ = ["WeightSender", "SendStats", "DEFAULT_BUCKET_BYTES", "DEFAULT_CUDA_BUCKET_BYTES"]


logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20
#: on GPUs larger buckets keep NCCL near its peak bandwidth (measured on
#: 2x H200: 1 GiB buckets cut the 7B end-to-end send from 42.9 to 24.3 ms);
#: the trainer holds two of them.
DEFAULT_CUDA_BUCKET_BYTES = 1 << 30


_CACHE_MAX = 1 << 20  # entries per host cache before it is cleared (a guard, not a tuning knob)

#: a non-grouped bucket buffer's first capacity; it doubles, up to
#: ``bucket_bytes``, as a step needs more (see ``WeightSender._room``)
FIRST_SLOT_BYTES = 1 << 20


class WeightSender(GroupedSendPath, Outbox):
    """Rank 0 of the weight-sync group.

    Args:
        layout: the serving checkpoint's ``FP8Layout`` (from
            ``vllm_fp8_overlay.formats.detect_layout``) or ``None`` to send
            tensors as given (BF16 target). A plain dict (``layout.to_dict()``)
            is accepted too.
        host, port: address the TCPStore listens on (this process is the store
            master). Receivers connect to the same address.
        world_size: 1 + total number of receiving workers.
        backend: ``"auto"`` (NCCL for a CUDA device, gloo for CPU), ``"gloo"``
            or ``"nccl"``.
        bucket_bytes: capacity of each bucket buffer. On the non-grouped path
            (CPU) a buffer starts at 1 MiB and grows as steps need, so a
            sender of a few MB holds a few MB whatever its bucket size.
        device: device of the bucket buffers (``None``: current CUDA device if
            available, else CPU).
        timeout: seconds for group creation and each collective.
        checksum: ``"auto"`` (crc32 for CPU buffers; for CUDA buffers the seal
            alone, see :mod:`.wire.integrity`), ``"crc32"``, ``"sum64"`` (on
            the device) or ``"none"`` (the seal is always sent).
        limits: this side's caps; after the handshake the sender packs within
            the element-wise minimum of every receiver's (``self.limits``).
        group_id: 32 hex digits naming the group (default: random); receivers
            told another id refuse the group.
        transport: inject a ready transport (tests / custom transports);
            ``host``/``port``/``world_size``/``backend`` are then ignored.

    Construction blocks until every receiver has joined and accepted the
    handshake (:class:`~.transport.GroupRefused` names any that refused).
    """

    def __init__(
        self,
        layout: Any,
        host: str,
        port: int,
        world_size: int,
        backend: str = "auto",
        bucket_bytes: int | None = None,
        device: torch.device | str | int | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        checksum: str = "auto",
        group_name: str = "weights",
        limits: WireLimits = wire.DEFAULT_LIMITS,
        transport: Transport | None = None,
        group_id: str | None = None,
    ) -> None:
        if bucket_bytes is None:
            on_cuda = transport.device.type == "cuda" if transport is not None else _wants_cuda(backend, device)
            bucket_bytes = DEFAULT_CUDA_BUCKET_BYTES if on_cuda else DEFAULT_BUCKET_BYTES
        if not isinstance(bucket_bytes, int) or bucket_bytes < ALIGNMENT:
            raise ValueError(f"bucket_bytes must be an int >= {ALIGNMENT}, got {bucket_bytes!r}")
        if bucket_bytes > limits.max_bucket_bytes:
            raise ValueError(f"bucket_bytes {bucket_bytes} > limits.max_bucket_bytes {limits.max_bucket_bytes}")
        if checksum not in ("auto", "crc32", "sum64", "none"):
            raise ValueError(f"checksum must be 'auto', 'crc32', 'sum64' or 'none', got {checksum!r}")
        if isinstance(layout, Mapping):
            from ..formats import FP8Layout

            layout = FP8Layout.from_dict(layout)
        self.layout = layout
        self._layout_dict = None if layout is None else layout.to_dict()
        # Fail early if the layout cannot travel.
        wire.validate_layout(self._layout_dict, limits)
        wire.dumps(self._layout_dict)
        self.bucket_bytes = bucket_bytes
        if transport is None:
            transport = BroadcastGroup(host, port, world_size, 0, backend=backend, device=device, timeout=timeout,
                                       group_name=group_name, limits=limits, bucket_bytes=bucket_bytes,
                                       group_id=group_id)
        if transport.rank != 0:
            raise ValueError("the sender must be rank 0")
        self.transport = transport
        #: what every receiver accepts (the handshake's minimum); own limits without one
        self.limits = getattr(transport, "send_limits", None) or limits
        # a bucket is closed before its manifest (layout included) would not
        # fit a control block or the receivers' limit
        self._manifest_budget = (min(self.limits.max_manifest_bytes, wire.MAX_INLINE_MANIFEST)
                                 - len(wire.dumps(self._layout_dict)))
        if self._manifest_budget < 4096:
            raise wire.LimitExceededError(f"the layout's JSON ({len(wire.dumps(self._layout_dict))} bytes) leaves "
                                          "no room for tensor entries in a manifest")
        self.group_id = getattr(transport, "group_id", None)
        self.device = torch.device(transport.device)
        if checksum == "auto":
            checksum = "crc32" if self.device.type == "cpu" else "none"
        self._algo = ChecksumAlgo.NAMES[checksum]
        # bucket buffers: the non-grouped path rotates through three (one on
        # the wire, one announced and owed, one being packed: see .outbox);
        # the grouped path uses the first two (its device-side ordering
        # lets a bucket's quantization wait for the wire without the host)
        self._slots = [_Slot(), _Slot(), _Slot()]
        self._cur = 0
        self._init_outbox()
        self._oversize = _Slot()
        self._broken: str | None = None
        self._closed = False
        self._last_step: int | None = None
        self._scale_name = None if layout is None else layout.scale_name
        self._side: Any = None  # CUDA stream that quantizes bucket k+1 while bucket k is on the wire
        self._flags: list = [None, None]  # pinned finiteness flag per bucket slot
        self._grouped: bool | None = None
        self._value_kernel: bool | None = None  # copies checked in the bucket by one launch per dtype (Triton)
        # Host-side caches. A model sends the same names and shapes every
        # step, so everything derived from them is computed on the first step
        # and reused: per-name quantization decisions and sizes, wire entries
        # (per name and bucket offset), encoded manifests (per bucket content)
        # and the kernels' device tables (per bucket sources and offsets).
        self._item_memo: dict = {}  # name -> (shape, dtype, quantize?) of _plan_item
        self._qmemo: dict = {}  # name -> per-item sizes of the grouped loop
        self._ent_cache: dict = {}  # (name, offset) -> TensorEntry
        self._man_cache: dict = {}  # tuple(id(entry)) -> (entries, manifest bytes, crc32)
        self._man_by_list: dict = {}  # id(entries list) -> (the list, its length, manifest bytes, crc32)
        self._launch_cache: dict = {}  # bucket job key -> prepared grouped launch
        self._dst_cache: dict = {}  # (id(bucket buffer), layout token) -> destination views of its copies
        self._launch_graphs: dict = {}  # a bucket's launch work as a CUDA graph (bucketlaunch.LAUNCH_GRAPHS)
        self._graph_pool: Any = None
        self._graphs_off = False  # a capture failed: plain launches from then on
        # the buckets of the last completed step (grouped path): a step whose
        # items arrive with the same names, shapes, dtypes and devices reuses
        # their layout bucket by bucket without per-item bookkeeping
        self._bucket_plans: list[BucketPlan] | None = None
        self._step_plans: list[BucketPlan] | None = None

    # ------------------------------------------------------------------ API

    def send(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], step: int) -> SendStats:
        """Quantize (if a layout is set), pack and broadcast one step.

        ``weights`` is a state dict or an iterable of ``(hf_name, tensor)``;
        it is consumed lazily, layer by layer. Receivers must be inside
        ``receive_step`` / ``receive_all`` for the same step concurrently.
        On any error the receivers get an ABORT message (when the group still
        works) and the error is re-raised.
        """
        if self._closed:
            raise TransportError("sender is closed")
        if self._broken:
            raise TransportError(f"sender is unusable after an earlier transport failure: {self._broken}")
        if type(step) is not int or not 0 <= step < 2**63:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        evicted = getattr(self.transport, "evicted", None)
        note = evicted() if callable(evicted) else None
        if note:
            self._broken = f"taken over: {note}"
            raise OwnershipLost(f"a receiver of this group was taken over by another trainer ({note}); "
                                "this sender can no longer send")
        stats = SendStats(step=step)
        t_start = time.perf_counter()
        items = weights.items() if isinstance(weights, Mapping) else weights
        grouped = self._grouped_ok()
        if self.layout is not None and not grouped:
            from ..formats import quantize_weights

            items = quantize_weights(iter(items), self.layout)
        try:
            if grouped:
                self._send_step_grouped(_Peekable(iter(items), stats), stats)
            else:
                self._send_step(_Peekable(iter(items), stats), stats)
        except TransportError as e:
            self._broken = str(e)
            raise
        except BaseException as e:
            self._abort(step, f"{type(e).__name__}: {e}")
            raise
        finally:
            stats.buffers_allocated = sum(s.buf is not None for s in self._slots)
            stats.total_s = time.perf_counter() - t_start
        self._last_step = step
        return stats

    def close(self) -> None:
        """Wait for in-flight transfers and tear the group down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._broken:
                for s in (*self._slots, self._oversize):
                    s.wait()
                if self._launch_graphs:
                    self._side.synchronize()  # a graph is destroyed only once it has run
                    self._launch_graphs.clear()
        finally:
            for s in self._slots:
                s.buf = None
            self._dst_cache.clear()  # its views hold the bucket buffers
            self.transport.close()

    def __enter__(self) -> "WeightSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _send_step(self, it: _Peekable, stats: SendStats) -> None:
        entries: list[TensorEntry] = []
        end = 0
        manifest_est = 64
        seen: set[str] = set()
        slot = self._acquire(self._cur, stats)
        while True:
            item = it.next()
            if item is _END:
                break
            name, t = self._check_item(item, seen)
            n = t.numel() * t.element_size()
            stats.num_tensors += 1
            stats.num_bytes += n
            if n > self.bucket_bytes:
                if entries:
                    self._flush(slot, entries, end, False, stats)
                    slot = self._next_slot(stats)
                    entries, end, manifest_est = [], 0, 64
                last = it.peek() is _END
                self._send_oversize(name, t, last, stats)
                continue
            off = (end + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT if entries else 0
            entry_est = len(name) + 96 + 12 * t.dim()
            if entries and (
                off + n > self.bucket_bytes
                or len(entries) >= self.limits.max_tensors_per_bucket
                or manifest_est + entry_est > self._manifest_budget
            ):
                self._flush(slot, entries, end, False, stats)
                slot = self._next_slot(stats)
                entries, end, manifest_est, off = [], 0, 64, 0
            entry = self._entry(name, t.dtype, t.shape, off, n)
            t0 = time.perf_counter()
            self._room(slot, off + n, end)
            self._pack(slot.buf, entry, t)
            stats.pack_s += time.perf_counter() - t0
            entries.append(entry)
            end = off + n
            manifest_est += entry_est
        if entries:
            self._flush(slot, entries, end, True, stats)
        self._send_end_of_step(stats)

    def _entry(self, name: str, dtype: torch.dtype, shape, off: int, nbytes: int) -> TensorEntry:
        """The wire entry, reused from an earlier step when it is identical
        (same object, so the manifest of an unchanged bucket is reused too)."""
        key = (name, off)
        e = self._ent_cache.get(key)
        if e is not None and e.dtype is dtype and e.nbytes == nbytes and e.shape == shape:
            return e
        e = TensorEntry(name=name, dtype=dtype, shape=tuple(shape), offset=off, nbytes=nbytes)
        if len(self._ent_cache) > _CACHE_MAX:
            self._ent_cache.clear()
            self._man_cache.clear()
        self._ent_cache[key] = e
        return e

    def _manifest(self, entries: list[TensorEntry]) -> tuple[bytes, int]:
        """The encoded manifest of ``entries`` and its crc32, reused while the
        same entry objects come again: first by the list itself (a replayed
        bucket hands over its plan's list, so a MoE bucket of a thousand
        entries costs no per-entry work), then by the entries' ids."""
        hit = self._man_by_list.get(id(entries))
        if hit is not None and hit[0] is entries and hit[1] == len(entries):
            return hit[2], hit[3]
        key = tuple(map(id, entries))
        hit = self._man_cache.get(key)
        if hit is None:
            manifest = wire.encode_manifest(entries, self._layout_dict)
            if len(self._man_cache) > 4096:
                self._man_cache.clear()
            # the value keeps the entries alive, so their ids in the key stay theirs
            hit = self._man_cache[key] = (tuple(entries), manifest, zlib.crc32(manifest))
        if len(self._man_by_list) > 1024:
            self._man_by_list.clear()
        # the value keeps the list alive (its id stays its own); lists are not changed once sent
        self._man_by_list[id(entries)] = (entries, len(entries), hit[1], hit[2])
        return hit[1], hit[2]

    def _check_item(self, item: Any, seen: set[str]) -> tuple[str, torch.Tensor]:
        try:
            name, t = item
        except (TypeError, ValueError):
            raise TypeError(f"weights must yield (name, tensor) pairs, got {type(item).__name__}") from None
        wire.validate_name(name, self.limits)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        wire.dtype_to_str(t.dtype)
        if t.dim() > self.limits.max_dims or any(d > self.limits.max_dim_size for d in t.shape):
            raise wire.LimitExceededError(f"{name}: shape {tuple(t.shape)} exceeds the wire limits")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in one step")
        n = t.numel() * t.element_size()
        if n > self.bucket_bytes and n > self.limits.max_tensor_bytes:
            raise wire.LimitExceededError(f"{name}: {n} bytes exceed the receivers' max_tensor_bytes "
                                          f"{self.limits.max_tensor_bytes}")
        bad = value_problems([(name, t)], scale_name=self._scale_name)
        if bad:
            raise ValueError(f"refusing to send step: {bad[0]}")
        seen.add(name)
        return name, t.detach()

    def _acquire(self, idx: int, stats: SendStats) -> _Slot:
        slot = self._slots[idx]
        if slot.handles:
            t0 = time.perf_counter()
            slot.wait()
            stats.transfer_s += time.perf_counter() - t0
        if slot.buf is None:
            first = min(self.bucket_bytes, FIRST_SLOT_BYTES)
            slot.buf = torch.zeros(first + SEAL_SIZE, dtype=torch.uint8, device=self.device)
        return slot

    def _room(self, slot: _Slot, need: int, used: int) -> None:
        """Make ``slot.buf`` (payload || seal) hold ``need`` payload bytes,
        keeping its first ``used``. Why: buffers are zero-filled once (the
        alignment gaps never carry stale memory), and a full ``bucket_bytes``
        for every slot cost each small sender (rank parts: two per trainer
        rank) 3 x 256 MiB of touched memory on CPU. Doubling keeps the copies
        of a growing bucket under one bucket per slot, all in the first steps."""
        have = slot.buf.numel() - SEAL_SIZE
        if need <= have:
            return
        grown = torch.zeros(min(self.bucket_bytes, max(need, 2 * have)) + SEAL_SIZE, dtype=torch.uint8,
                            device=self.device)
        if used:
            grown[:used].copy_(slot.buf[:used])
        slot.buf = grown

    def _next_slot(self, stats: SendStats) -> _Slot:
        # Seam for overlap: bucket k is in flight in slot `cur` while bucket
        # k+1 is quantized and packed into the other slot. With gloo the
        # broadcast runs on gloo's worker threads; with NCCL on its stream.
        # A later CUDA-stream pipeline only needs to change _pack / _flush.
        self._cur = (self._cur + 1) % len(self._slots)
        return self._acquire(self._cur, stats)

    def _pack(self, buf: torch.Tensor, entry: TensorEntry, t: torch.Tensor) -> None:
        # Async H2D / D2D copies are safe (same stream as the broadcast);
        # D2H copies into a CPU buffer must be synchronous.
        wire.pack_into(buf, entry, t, non_blocking=self.device.type == "cuda")

    def _header(self, index: int, last: bool, manifest: bytes, payload: torch.Tensor, step: int,
                manifest_crc: int) -> Header:
        return Header(kind=MessageKind.BUCKET, step=step, index=index, flags=FLAG_LAST if last else 0,
                      manifest_len=len(manifest), payload_len=payload.numel(), checksum_algo=self._algo,
                      payload_checksum=wire.payload_checksum(payload, self._algo), manifest_crc32=manifest_crc)

    def _send_end_of_step(self, stats: SendStats) -> None:
        """The END message (totals, so receivers detect truncation), then the
        last owed payload; waits for every in-flight transfer."""
        summary = EndOfStep(
            step=stats.step, num_buckets=stats.num_buckets, num_tensors=stats.num_tensors, num_bytes=stats.num_bytes
        )
        hdr, man = wire.encode_end(summary)
        t0 = time.perf_counter()
        self._send_terminal(hdr, man, self._oversize, stats)
        for s in (*self._slots, self._oversize):
            s.wait()
        stats.transfer_s += time.perf_counter() - t0

    def _dispatch(self, slot: _Slot, entries: list[TensorEntry], buf: torch.Tensor, end: int, last: bool,
                  stats: SendStats, ready=None, staged: bool = False) -> None:
        """Announce one bucket (its control goes on the wire, followed by the
        previous bucket's payload); ``buf[:end]`` and its seal, written into
        ``buf[end:end + SEAL_SIZE]``, go out after the next control.
        ``ready`` is called before the payload is sent (and before its
        checksum is computed) and raises if it must not go out. ``staged``:
        ``slot`` was waited for just before, so the control and the seal go
        through its kept staging memory (:class:`~.outbox._ControlStage`)."""
        if stats.num_buckets >= self.limits.max_buckets_per_step:
            raise wire.LimitExceededError(f"more than {self.limits.max_buckets_per_step} buckets in one step")
        manifest, manifest_crc = self._manifest(entries)
        if len(manifest) > min(self.limits.max_manifest_bytes, wire.MAX_INLINE_MANIFEST):
            raise wire.LimitExceededError(f"manifest of {len(manifest)} bytes exceeds the limit")
        payload = buf[:end]
        t0 = time.perf_counter()
        if ready is not None and self._algo != ChecksumAlgo.NONE:
            ready()  # the checksum reads the payload (this stalls the pipeline: checksums are opt-in on GPUs)
        header = self._header(stats.num_buckets, last, manifest, payload, stats.step, manifest_crc)
        t1 = time.perf_counter()
        stats.checksum_s += t1 - t0
        self._write_seal(slot, buf[end: end + SEAL_SIZE], header, staged)
        self._announce(header, manifest, slot, buf[: end + SEAL_SIZE], stats, ready)
        stats.transfer_s += time.perf_counter() - t1
        stats.max_payload_bytes = max(stats.max_payload_bytes, end)
        stats.num_buckets += 1

    def _flush(self, slot: _Slot, entries: list[TensorEntry], end: int, last: bool, stats: SendStats) -> None:
        self._dispatch(slot, entries, slot.buf, end, last, stats)

    def _send_oversize(self, name: str, t: torch.Tensor, last: bool, stats: SendStats) -> None:
        """A tensor larger than a bucket travels alone, through one temporary
        buffer with room for the seal behind it."""
        t0 = time.perf_counter()
        self._oversize.wait()
        stats.transfer_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        n = t.numel() * t.element_size()
        buf = torch.empty(n + SEAL_SIZE, dtype=torch.uint8, device=self.device)
        buf[:n].copy_(wire.tensor_bytes(t), non_blocking=self.device.type == "cuda")
        stats.pack_s += time.perf_counter() - t0
        entry = TensorEntry(name=name, dtype=t.dtype, shape=tuple(t.shape), offset=0, nbytes=n)
        stats.oversize_tensors += 1
        self._dispatch(self._oversize, [entry], buf, n, last, stats)
