"""Trainer side of the weight sync: quantize, pack into buckets, broadcast."""

from __future__ import annotations

import ctypes
import logging
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch

from . import wire
from .transport import DEFAULT_TIMEOUT_S, BroadcastGroup, Transport, TransportError
from .wire import (
    ALIGNMENT,
    FLAG_LAST,
    ChecksumAlgo,
    EndOfStep,
    Header,
    MessageKind,
    TensorEntry,
    WireLimits,
)

__all__ = ["WeightSender", "SendStats", "DEFAULT_BUCKET_BYTES", "DEFAULT_CUDA_BUCKET_BYTES"]


def _wants_cuda(backend: str, device) -> bool:
    if backend == "nccl":
        return True
    if backend == "gloo":
        return False
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}").type == "cuda"
    return torch.cuda.is_available()

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20
#: on GPUs larger buckets keep NCCL near its peak bandwidth (measured on
#: 2x H200: 1 GiB buckets cut the 7B end-to-end send from 42.9 to 24.3 ms);
#: the trainer holds two of them.
DEFAULT_CUDA_BUCKET_BYTES = 1 << 30
_END = object()


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
    buffers_allocated: int = 0  # bucket buffers held by the sender (2 once warm)
    reused_buckets: int = 0  # buckets laid out as in the previous step (grouped path)
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

    def push_back(self, items: list) -> None:
        """Make ``items`` the next ones returned, in order."""
        self._back.extend(reversed(items))


class _Slot:
    """A bucket buffer plus the transfers that still read from it."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.handles: list = []
        self.keepalive: list = []

    def wait(self) -> None:
        handles, self.handles = self.handles, []
        try:
            for h in handles:
                h.wait()
        finally:
            self.keepalive = []


def wire_fp8() -> torch.dtype:
    return torch.float8_e4m3fn


_FP8 = torch.float8_e4m3fn
_CACHE_MAX = 1 << 20  # entries per host cache before it is cleared (a guard, not a tuning knob)


class _Bucket:
    """A bucket of the grouped path: wire entries, quantization and copy jobs."""

    __slots__ = ("slot_idx", "entries", "qjobs", "copies", "end", "manifest_est", "event", "flag", "plan",
                 "num_tensors", "num_bytes")

    def __init__(self) -> None:
        self.slot_idx = 0
        self.entries: list[TensorEntry] = []
        self.qjobs: dict = {}  # source dtype -> [(tensor, fp8 offset, scale offset)]
        self.copies: list = []  # [(entry, tensor)]
        self.end = 0
        self.manifest_est = 64
        self.event = None
        self.flag = None
        # per item, in arrival order: (name, shape, dtype, quant, device, jk, fp8/byte offset, scale offset,
        # copy entry) -- what a later step with the same items reuses (see _replay_bucket)
        self.plan: list[tuple] = []
        self.num_tensors = 0
        self.num_bytes = 0


@dataclass(frozen=True)
class _BucketPlan:
    """Layout of one bucket of an earlier step (no tensor references)."""

    items: list  # _Bucket.plan
    entries: list
    end: int
    manifest_est: int
    num_tensors: int
    num_bytes: int


class WeightSender:
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
        bucket_bytes: capacity of each of the two bucket buffers.
        device: device of the bucket buffers (``None``: current CUDA device if
            available, else CPU).
        timeout: seconds for group creation and each collective.
        checksum: ``"auto"`` (crc32 for CPU buffers, none for CUDA buffers),
            ``"crc32"`` or ``"none"``.
        transport: inject a ready transport (tests / custom transports);
            ``host``/``port``/``world_size``/``backend`` are then ignored.

    Construction blocks until every receiver has joined.
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
    ) -> None:
        if bucket_bytes is None:
            on_cuda = transport.device.type == "cuda" if transport is not None else _wants_cuda(backend, device)
            bucket_bytes = DEFAULT_CUDA_BUCKET_BYTES if on_cuda else DEFAULT_BUCKET_BYTES
        if not isinstance(bucket_bytes, int) or bucket_bytes < ALIGNMENT:
            raise ValueError(f"bucket_bytes must be an int >= {ALIGNMENT}, got {bucket_bytes!r}")
        if bucket_bytes > limits.max_bucket_bytes:
            raise ValueError(f"bucket_bytes {bucket_bytes} > limits.max_bucket_bytes {limits.max_bucket_bytes}")
        if checksum not in ("auto", "crc32", "none"):
            raise ValueError(f"checksum must be 'auto', 'crc32' or 'none', got {checksum!r}")
        if isinstance(layout, Mapping):
            from ..formats import FP8Layout

            layout = FP8Layout.from_dict(layout)
        self.layout = layout
        self._layout_dict = None if layout is None else layout.to_dict()
        # Fail early if the layout cannot travel.
        wire._dumps(self._layout_dict)
        self.bucket_bytes = bucket_bytes
        self.limits = limits
        if transport is None:
            transport = BroadcastGroup(
                host, port, world_size, 0, backend=backend, device=device, timeout=timeout, group_name=group_name
            )
        if transport.rank != 0:
            raise ValueError("the sender must be rank 0")
        self.transport = transport
        self.device = torch.device(transport.device)
        if checksum == "auto":
            checksum = "crc32" if self.device.type == "cpu" else "none"
        self._algo = ChecksumAlgo.NAMES[checksum]
        self._slots = [_Slot(), _Slot()]
        self._cur = 0
        self._oversize = _Slot()
        self._broken: str | None = None
        self._closed = False
        self._last_step: int | None = None
        self._side: Any = None  # CUDA stream that quantizes bucket k+1 while bucket k is on the wire
        self._flags: list = [None, None]  # pinned finiteness flag per bucket slot
        self._grouped: bool | None = None
        # Host-side caches. A model sends the same names and shapes every
        # step, so everything derived from them is computed on the first step
        # and reused: per-name quantization decisions and sizes, wire entries
        # (per name and bucket offset), encoded manifests (per bucket content)
        # and the kernels' device tables (per bucket sources and offsets).
        self._item_memo: dict = {}  # name -> (shape, dtype, quantize?) of _plan_items
        self._qmemo: dict = {}  # name -> per-item sizes of the grouped loop
        self._ent_cache: dict = {}  # (name, offset) -> TensorEntry
        self._man_cache: dict = {}  # tuple(id(entry)) -> (entries, manifest bytes)
        self._launch_cache: dict = {}  # bucket job key -> prepared grouped launch
        # the buckets of the last completed step (grouped path): a step whose
        # items arrive with the same names, shapes, dtypes and devices reuses
        # their layout bucket by bucket without per-item bookkeeping
        self._bucket_plans: list[_BucketPlan] | None = None
        self._step_plans: list[_BucketPlan] | None = None

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
        stats = SendStats(step=step)
        t_start = time.perf_counter()
        items = weights.items() if isinstance(weights, Mapping) else weights
        grouped = self._grouped_ok()
        if self.layout is not None and not grouped:
            from ..formats import quantize_weights

            items = quantize_weights(iter(items), self.layout)
        try:
            if grouped:
                self._send_step_grouped(_Peekable(self._plan_items(iter(items)), stats), stats)
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
        finally:
            for s in self._slots:
                s.buf = None
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
                or manifest_est + entry_est > self.limits.max_manifest_bytes
            ):
                self._flush(slot, entries, end, False, stats)
                slot = self._next_slot(stats)
                entries, end, manifest_est, off = [], 0, 64, 0
            entry = self._entry(name, t.dtype, t.shape, off, n)
            t0 = time.perf_counter()
            self._pack(slot.buf, entry, t)
            stats.pack_s += time.perf_counter() - t0
            entries.append(entry)
            end = off + n
            manifest_est += entry_est
        if entries:
            self._flush(slot, entries, end, True, stats)
        self._send_end_of_step(stats)

    # ------------------------------------------- grouped, pipelined FP8 path

    def _grouped_ok(self) -> bool:
        """Quantize whole buckets with the grouped Triton kernels, straight into
        the bucket buffer, on a side stream (CUDA + a layout + Triton)."""
        if self._grouped is None:
            ok = self.layout is not None and self.device.type == "cuda"
            if ok:
                from ..kernels import triton_available

                ok = triton_available()
            self._grouped = ok
        return self._grouped

    def _plan_items(self, items: Iterator) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """``(checkpoint name, tensor, quantize?)`` with the checks of
        ``formats.quantize_weights`` (fused experts split, block-shape rules)."""
        from ..formats.quantize import FP8_DTYPE, _CT_DTYPES, _check_block_shape, expand_fused_experts

        layout = self.layout
        memo = self._item_memo
        for item in items:
            try:
                name, t = item
            except (TypeError, ValueError):
                raise TypeError(f"weights must yield (name, tensor) pairs, got {type(item).__name__}") from None
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            m = memo.get(name)
            if m is not None and m[0] == t.shape and m[1] == t.dtype:
                # same name, shape and dtype as an earlier step: same decision
                yield name, (t.detach() if t.requires_grad else t), m[2]
                continue
            expanded = expand_fused_experts(name, t, layout.hidden_size)
            for n, x in expanded if expanded is not None else ((name, t),):
                if not layout.is_quantized(n):
                    if expanded is None:
                        memo[name] = (t.shape, t.dtype, False)
                    yield n, x, False
                    continue
                if x.dtype == FP8_DTYPE or not x.is_floating_point():
                    raise ValueError(f"{n}: expected an unquantized floating weight, got {x.dtype} (already quantized?)")
                if x.ndim != 2:
                    raise ValueError(f"{n}: quantized linear weight must be 2-D, got shape {tuple(x.shape)}")
                if x.dtype not in _CT_DTYPES:
                    raise ValueError(f"{n}: expected a bf16/fp16/fp32 weight to quantize, got {x.dtype}")
                if layout.strategy == "block":
                    _check_block_shape(n, x.shape, layout)
                if expanded is None:
                    if len(memo) > 1 << 20:
                        memo.clear()
                    memo[name] = (t.shape, t.dtype, True)
                yield n, x.detach(), True

    def _qmeta(self, x: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], int]:
        """Scale dtype, wire shape and bytes of the scale of weight ``x``."""
        hf = self.layout.method == "fp8"
        cd = torch.float32 if hf else x.dtype
        rows, cols = x.shape
        st = self.layout.strategy
        if st == "tensor":
            shape: tuple[int, ...] = () if hf else (1,)
        elif st == "channel":
            shape = (rows, 1)
        else:
            bn, bk = self.layout.block_size
            shape = (-(-rows // bn), -(-cols // bk))
        n = 1
        for d in shape:
            n *= d
        return cd, shape, n * cd.itemsize

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

    def _manifest(self, entries: list[TensorEntry]) -> bytes:
        key = tuple(map(id, entries))
        hit = self._man_cache.get(key)
        if hit is not None:
            return hit[1]
        manifest = wire.encode_manifest(entries, self._layout_dict)
        if len(self._man_cache) > 4096:
            self._man_cache.clear()
        # the value keeps the entries alive, so their ids in the key stay theirs
        self._man_cache[key] = (tuple(entries), manifest)
        return manifest

    def _check_out(self, name: str, dims: int, seen: set[str]) -> None:
        wire.validate_name(name, self.limits)
        if dims > self.limits.max_dims:
            raise wire.LimitExceededError(f"{name}: {dims} dimensions exceed the wire limits")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in one step")
        seen.add(name)

    def _send_step_grouped(self, it: _Peekable, stats: SendStats) -> None:
        """Bucket k+1 is quantized (one grouped launch per shape, written in
        place into the free bucket buffer, on a side CUDA stream) while bucket k
        is broadcast. The host waits only for a bucket's own quantization (one
        finiteness flag per bucket) before putting it on the wire."""
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        qmemo = self._qmemo
        dev_idx = -1 if self.device.type == "cpu" else (
            self.device.index if self.device.index is not None else torch.cuda.current_device())
        seen: set[str] = set()
        pending: _Bucket | None = None
        cur = self._new_bucket()
        prev = self._bucket_plans
        self._bucket_plans = None
        self._step_plans = []
        replaying = prev is not None
        while True:
            if replaying and not cur.entries:
                k = len(self._step_plans)
                if k < len(prev) and self._replay_bucket(it, prev[k], cur):
                    stats.num_tensors += cur.num_tensors
                    stats.num_bytes += cur.num_bytes
                    stats.reused_buckets += 1
                    pending = self._close_bucket(cur, pending, stats)
                    cur = self._new_bucket()
                    continue
                replaying = False
                if it.peek() is not _END:  # more items: check them against the names sent so far
                    for plan in self._step_plans:
                        seen.update(e.name for e in plan.entries)
            item = it.next()
            if item is _END:
                break
            name, x, quant = item
            m = qmemo.get(name)
            if m is not None and m[0] == x.shape and m[1] is x.dtype and m[2] is quant:
                _, _, _, skey, cd, sshape, sn, qn, need, est, nent = m
                if name in seen or (skey is not None and skey in seen):
                    raise ValueError(f"tensor {name!r} appears twice in one step")
                seen.add(name)
                if skey is not None:
                    seen.add(skey)
            else:
                if quant:
                    if x.dim() > self.limits.max_dims or any(d > self.limits.max_dim_size for d in x.shape):
                        raise wire.LimitExceededError(f"{name}: shape {tuple(x.shape)} exceeds the wire limits")
                    skey = self.layout.scale_key(name)
                    self._check_out(name, x.dim(), seen)
                    self._check_out(skey, 2, seen)
                    cd, sshape, sn = self._qmeta(x)
                    qn = x.numel()
                    need = ALIGNMENT + qn + sn if qn % ALIGNMENT else qn + sn
                    est = len(name) + len(skey) + 192 + 24 * x.dim()
                    nent = 2
                else:
                    wire.dtype_to_str(x.dtype)
                    if x.dim() > self.limits.max_dims or any(d > self.limits.max_dim_size for d in x.shape):
                        raise wire.LimitExceededError(f"{name}: shape {tuple(x.shape)} exceeds the wire limits")
                    self._check_out(name, x.dim(), seen)
                    skey = cd = sshape = sn = None
                    qn = need = x.numel() * x.element_size()
                    est = len(name) + 96 + 12 * x.dim()
                    nent = 1
                if len(qmemo) > 1 << 20:
                    qmemo.clear()
                qmemo[name] = (x.shape, x.dtype, quant, skey, cd, sshape, sn, qn, need, est, nent)
            stats.num_tensors += nent
            if need > self.bucket_bytes:
                self._step_plans = None  # oversize tensors travel alone: no bucket layout to reuse
                if cur.entries:
                    pending = self._close_bucket(cur, pending, stats)
                    cur = self._new_bucket()
                if pending is not None:
                    self._dispatch_bucket(pending, False, stats)
                    pending = None
                last = it.peek() is _END
                if quant:
                    from ..formats.quantize import quantize_tensor

                    q, sc = quantize_tensor(x.to(self.device), self.layout, name=name)
                    stats.num_bytes += q.numel() + sc.numel() * sc.element_size()
                    self._send_oversize(name, q, False, stats)
                    self._send_oversize(skey, sc, last, stats)
                else:
                    stats.num_bytes += qn
                    self._send_oversize(name, x, last, stats)
                continue
            off = (cur.end + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT if cur.entries else 0
            if quant:
                so = off + (qn + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
                fits = so + sn <= self.bucket_bytes
            else:
                fits = off + qn <= self.bucket_bytes
            if cur.entries and (
                not fits
                or len(cur.entries) + nent > self.limits.max_tensors_per_bucket
                or cur.manifest_est + est > self.limits.max_manifest_bytes
            ):
                pending = self._close_bucket(cur, pending, stats)
                cur = self._new_bucket()
                off = 0
                if quant:
                    so = (qn + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
            xdev = x.get_device()
            if quant:
                cur.entries.append(self._entry(name, _FP8, x.shape, off, qn))
                cur.entries.append(self._entry(skey, cd, sshape, so, sn))
                jk = x.dtype if xdev == dev_idx else (x.dtype, "h2d")
                jl = cur.qjobs.get(jk)
                if jl is None:
                    jl = cur.qjobs[jk] = []
                jl.append((x, off, so, name))
                cur.end = so + sn
                stats.num_bytes += qn + sn
                cur.num_bytes += qn + sn
                cur.plan.append((name, x.shape, x.dtype, True, xdev, jk, off, so, None))
            else:
                entry = self._entry(name, x.dtype, x.shape, off, qn)
                cur.entries.append(entry)
                cur.copies.append((entry, x))
                cur.end = off + qn
                stats.num_bytes += qn
                cur.num_bytes += qn
                cur.plan.append((name, x.shape, x.dtype, False, xdev, None, off, None, entry))
            cur.num_tensors += nent
            cur.manifest_est += est
        if cur.entries:
            pending = self._close_bucket(cur, pending, stats)
        if pending is not None:
            self._dispatch_bucket(pending, True, stats)
        self._send_end_of_step(stats)
        self._bucket_plans, self._step_plans = self._step_plans, None

    def _replay_bucket(self, it: _Peekable, plan: _BucketPlan, cur: "_Bucket") -> bool:
        """Fill ``cur`` with the layout of an earlier step's bucket if the next
        items are the same (name, shape, dtype, quantized or not, device) as
        that bucket's, in order; otherwise put the items back and return False."""
        got = []
        for name, shape, dtype, quant, xdev, _, _, _, _ in plan.items:
            item = it.next()
            got.append(item)
            if (item is _END or item[0] != name or item[2] is not quant or item[1].dtype is not dtype
                    or item[1].shape != shape or item[1].get_device() != xdev):
                it.push_back(got)
                return False
        qjobs = cur.qjobs
        for (name, x, _), (_, _, _, quant, _, jk, off, so, entry) in zip(got, plan.items):
            if quant:
                jl = qjobs.get(jk)
                if jl is None:
                    jl = qjobs[jk] = []
                jl.append((x, off, so, name))
            else:
                cur.copies.append((entry, x))
        cur.entries = plan.entries
        cur.end = plan.end
        cur.manifest_est = plan.manifest_est
        cur.plan = plan.items
        cur.num_tensors = plan.num_tensors
        cur.num_bytes = plan.num_bytes
        return True

    def _new_bucket(self) -> "_Bucket":
        b = _Bucket()
        b.slot_idx = self._cur
        self._cur ^= 1
        return b

    def _close_bucket(self, b: "_Bucket", pending: "_Bucket | None", stats: SendStats) -> "_Bucket":
        """Launch bucket ``b``'s quantization, then put the previous bucket on
        the wire; returns ``b`` (now pending)."""
        if self._step_plans is not None:
            self._step_plans.append(_BucketPlan(b.plan, b.entries, b.end, b.manifest_est, b.num_tensors,
                                                b.num_bytes))
        self._launch_bucket(b, stats)
        if pending is not None:
            self._dispatch_bucket(pending, False, stats)
        return b

    def _launch_bucket(self, b: "_Bucket", stats: SendStats) -> None:
        from ..kernels.triton_fp8 import prepare_grouped, quantize_grouped

        t0 = time.perf_counter()
        slot = self._slots[b.slot_idx]
        if slot.buf is None:
            slot.buf = torch.zeros(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        if self._flags[b.slot_idx] is None:
            self._flags[b.slot_idx] = torch.zeros(1, dtype=torch.bool, pin_memory=True)
        side = self._side
        main = torch.cuda.current_stream(self.device)
        recipe = "hf" if self.layout.method == "fp8" else "ct"
        with torch.cuda.stream(side):
            # the buffer is free once its previous broadcast is done: NCCL's
            # wait() orders the current (side) stream after it, the host does
            # not block; the main stream follows so that memory released by
            # the transport is not reused before the wire has read it.
            t1 = time.perf_counter()
            slot.wait()
            stats.transfer_s += time.perf_counter() - t1
            main.wait_stream(side)
            side.wait_stream(main)  # sources written on the main stream
            checks = []
            for key, jobs in b.qjobs.items():
                srcs = [j[0] for j in jobs]
                am = None
                if isinstance(key, tuple):
                    srcs = [t.to(self.device, non_blocking=True) for t in srcs]
                else:
                    # sources at the same addresses, shapes and bucket offsets
                    # as in an earlier step: reuse the prepared launch (no
                    # per-tensor host work, no table upload)
                    lkey = (key, tuple([(j[0].data_ptr(), j[0].shape, j[0].stride(), j[1], j[2]) for j in jobs]))
                    lc = self._launch_cache
                    prep = lc.get(lkey, False)
                    if prep is False:
                        prep = prepare_grouped(srcs, recipe, self.layout.strategy, self.layout.block_size,
                                               [j[1] for j in jobs], [j[2] for j in jobs])
                        if len(lc) >= 1024:
                            lc.clear()
                        lc[lkey] = prep
                    if prep is not None:
                        am = prep(srcs, slot.buf)
                if am is None:
                    _, _, am = quantize_grouped(
                        srcs, recipe, self.layout.strategy, self.layout.block_size, out=slot.buf,
                        q_offsets=[j[1] for j in jobs], s_offsets=[j[2] for j in jobs], amax="any", views=False,
                    )
                checks.append(torch.isfinite(am).all().reshape(1))
            t2 = time.perf_counter()
            for entry, x in b.copies:
                wire.pack_into(slot.buf, entry, x, non_blocking=True)
            stats.pack_s += time.perf_counter() - t2
            flag = self._flags[b.slot_idx]
            if checks:
                ok = checks[0] if len(checks) == 1 else torch.cat(checks).all().reshape(1)
                flag.copy_(ok, non_blocking=True)
            else:
                flag.fill_(True)
            b.event = torch.cuda.Event()
            b.event.record(side)
        b.flag = flag
        stats.quantize_s += time.perf_counter() - t0

    def _dispatch_bucket(self, b: "_Bucket", last: bool, stats: SendStats) -> None:
        t0 = time.perf_counter()
        b.event.synchronize()
        stats.quantize_s += time.perf_counter() - t0
        if not bool(b.flag[0]):
            self._raise_nonfinite(b)
        slot = self._slots[b.slot_idx]
        b.qjobs = b.copies = None  # sources were read: quantization is complete
        self._dispatch(slot, b.entries, slot.buf[: b.end], last, stats)

    def _raise_nonfinite(self, b: "_Bucket") -> None:
        for jobs in b.qjobs.values():
            for x, _, _, name in jobs:
                if not bool(torch.isfinite(x).all()):
                    bad = "NaN" if bool(torch.isnan(x).any()) else "inf"
                    raise ValueError(f"{name}: weight contains {bad} values; refusing to quantize")
        raise ValueError("non-finite weights in a bucket; refusing to quantize")

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
        seen.add(name)
        return name, t.detach()

    def _acquire(self, idx: int, stats: SendStats) -> _Slot:
        slot = self._slots[idx]
        if slot.handles:
            t0 = time.perf_counter()
            slot.wait()
            stats.transfer_s += time.perf_counter() - t0
        if slot.buf is None:
            slot.buf = torch.zeros(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        return slot

    def _next_slot(self, stats: SendStats) -> _Slot:
        # Seam for overlap: bucket k is in flight in slot `cur` while bucket
        # k+1 is quantized and packed into the other slot. With gloo the
        # broadcast runs on gloo's worker threads; with NCCL on its stream.
        # A later CUDA-stream pipeline only needs to change _pack / _flush.
        self._cur ^= 1
        return self._acquire(self._cur, stats)

    def _pack(self, buf: torch.Tensor, entry: TensorEntry, t: torch.Tensor) -> None:
        # Async H2D / D2D copies are safe (same stream as the broadcast);
        # D2H copies into a CPU buffer must be synchronous.
        wire.pack_into(buf, entry, t, non_blocking=self.device.type == "cuda")

    def _header_bytes(self, index: int, last: bool, manifest: bytes, payload: torch.Tensor, step: int) -> bytes:
        return wire.encode_header(
            Header(
                kind=MessageKind.BUCKET,
                step=step,
                index=index,
                flags=FLAG_LAST if last else 0,
                manifest_len=len(manifest),
                payload_len=payload.numel(),
                checksum_algo=self._algo,
                payload_checksum=wire.payload_checksum(payload, self._algo),
                manifest_crc32=zlib.crc32(manifest),
            )
        )

    def _send_end_of_step(self, stats: SendStats) -> None:
        """The END message (totals, so receivers detect truncation); waits for every in-flight bucket."""
        summary = EndOfStep(
            step=stats.step, num_buckets=stats.num_buckets, num_tensors=stats.num_tensors, num_bytes=stats.num_bytes
        )
        hdr, man = wire.encode_end(summary)
        t0 = time.perf_counter()
        self._broadcast_bytes(hdr, man, slot=self._oversize, stats=stats)
        for s in (*self._slots, self._oversize):
            s.wait()
        stats.transfer_s += time.perf_counter() - t0

    def _broadcast_bytes(self, *parts: bytes, slot: _Slot, stats: SendStats) -> None:
        """Broadcast each of ``parts`` as its own message (header, manifest)."""
        n = sum(len(p) for p in parts)
        if self.device.type == "cuda":
            # one pinned staging block and one non-blocking copy for all parts:
            # a pageable copy would block the host until the current stream
            # (which waits for the previous bucket's broadcast) drains, leaving
            # the wire idle between buckets, and each copy call costs host
            # time. The pinned block returns to torch's host allocator only
            # once the copy that reads it has run.
            # (a plain memmove into the pinned block: torch's CPU copy_ of a
            # few hundred KB goes through its intra-op thread pool, measured
            # at 0.3-3.7 ms per call on the H200 host)
            h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            ctypes.memmove(h.data_ptr(), b"".join(parts), n)
            dev = torch.empty(n, dtype=torch.uint8, device=self.device)
            dev.copy_(h, non_blocking=True)
        else:
            dev = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
            if self.device.type != "cpu":
                dev = dev.to(self.device)
        slot.keepalive.append(dev)
        o = 0
        for p in parts:
            slot.handles.append(self.transport.broadcast(dev[o : o + len(p)], async_op=True))
            o += len(p)
        stats.wire_bytes += n

    def _dispatch(self, slot: _Slot, entries: list[TensorEntry], payload: torch.Tensor, last: bool, stats: SendStats) -> None:
        if stats.num_buckets >= self.limits.max_buckets_per_step:
            raise wire.LimitExceededError(f"more than {self.limits.max_buckets_per_step} buckets in one step")
        manifest = self._manifest(entries)
        if len(manifest) > self.limits.max_manifest_bytes:
            raise wire.LimitExceededError(f"manifest of {len(manifest)} bytes exceeds the limit")
        t0 = time.perf_counter()
        hdr = self._header_bytes(stats.num_buckets, last, manifest, payload, stats.step)
        t1 = time.perf_counter()
        stats.checksum_s += t1 - t0
        self._broadcast_bytes(hdr, manifest, slot=slot, stats=stats)
        if payload.numel():
            slot.keepalive.append(payload)
            slot.handles.append(self.transport.broadcast(payload, async_op=True))
        stats.transfer_s += time.perf_counter() - t1
        stats.wire_bytes += payload.numel()
        stats.max_payload_bytes = max(stats.max_payload_bytes, payload.numel())
        stats.num_buckets += 1

    def _flush(self, slot: _Slot, entries: list[TensorEntry], end: int, last: bool, stats: SendStats) -> None:
        self._dispatch(slot, entries, slot.buf[:end], last, stats)

    def _send_oversize(self, name: str, t: torch.Tensor, last: bool, stats: SendStats) -> None:
        """A tensor larger than a bucket travels alone, straight from its own
        memory when it already lives on the transport device."""
        t0 = time.perf_counter()
        self._oversize.wait()
        stats.transfer_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        if t.device == self.device and t.is_contiguous():
            payload = wire.tensor_bytes(t)
        else:
            payload = torch.empty(t.numel() * t.element_size(), dtype=torch.uint8, device=self.device)
            payload.copy_(wire.tensor_bytes(t))
        stats.pack_s += time.perf_counter() - t0
        entry = TensorEntry(name=name, dtype=t.dtype, shape=tuple(t.shape), offset=0, nbytes=payload.numel())
        stats.oversize_tensors += 1
        self._dispatch(self._oversize, [entry], payload, last, stats)

    def _abort(self, step: int, reason: str) -> None:
        """Tell receivers the step is void so they do not hang."""
        try:
            for s in (*self._slots, self._oversize):
                s.wait()
            hdr, man = wire.encode_abort(step, reason, self.limits)
            scratch = SendStats(step=step)
            tmp = _Slot()
            self._broadcast_bytes(hdr, man, slot=tmp, stats=scratch)
            tmp.wait()
        except Exception as e:  # the group is gone; nothing more we can do
            self._broken = f"abort of step {step} failed: {e}"
            logger.error("weight sync: could not notify receivers of the aborted step %d: %s", step, e)
