"""The grouped, pipelined FP8 send path (CUDA + a layout + Triton).

Whole buckets are quantized by grouped Triton launches straight into the
bucket buffer, on a side stream, while the previous bucket is on the wire.
From the second step on, a bucket whose items arrive with the same names,
shapes, dtypes and devices as in the previous step reuses that step's layout,
wire entries, manifest and prepared kernel launch (:mod:`.bucketlaunch`,
which from then on replays a bucket's launch work as one CUDA graph). Kept
apart from :mod:`.sender` because nothing of it runs without a GPU.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from . import wire
from . import replay
from .bucketlaunch import BucketLaunch
from .replay import Bucket
from .wire import ALIGNMENT

if TYPE_CHECKING:  # pragma: no cover
    from .sendstate import SendStats, _Peekable

_FP8 = torch.float8_e4m3fn
#: end-of-iteration marker of the sender's look-ahead iterator
_END = object()


#: capacity of a step's first bucket; each next one doubles up to bucket_bytes
RAMP_FIRST_BYTES = 64 << 20


class GroupedSendPath(BucketLaunch):
    """Mixed into :class:`~.sender.WeightSender`: the grouped CUDA path.

    Bucket sizes ramp up (64 MiB, 128, 256, ... up to ``bucket_bytes``): the
    wire starts once the first bucket is quantized, and its host loop and
    kernels take 1/16 of a full bucket's; the large buckets that keep NCCL
    near its peak bandwidth follow while the wire is already busy."""

    def _grouped_ok(self) -> bool:
        """Quantize whole buckets with the grouped Triton kernels, straight into
        the bucket buffer, on a side stream (CUDA + a layout + Triton)."""
        if self._grouped is None:
            ok = self.device.type == "cuda"
            if ok and self.layout is not None:
                from ..kernels import triton_available

                ok = triton_available()
            self._grouped = ok
        return self._grouped

    def _plan_item(self, item: Any) -> list[tuple[str, torch.Tensor, bool, bool]]:
        """``[(checkpoint name, tensor, quantize?, simple?)]`` for one caller
        item, with the checks of ``formats.quantize_weights`` (fused experts
        split, block-shape rules); ``simple``: the caller's own plain tensor,
        one sent weight for one item (see :mod:`.replay`)."""
        from ..formats.quantize import FP8_DTYPE, _CT_DTYPES, _check_block_shape, expand_fused_experts

        try:
            name, t = item
        except (TypeError, ValueError):
            raise TypeError(f"weights must yield (name, tensor) pairs, got {type(item).__name__}") from None
        layout = self.layout
        if layout is not None and isinstance(t, tuple) and hasattr(t, "weight") and hasattr(t, "scale"):
            # sources.Prequantized: quantized on the trainer's shards already
            return [(name, t.weight, False, False), (layout.scale_key(name), t.scale, False, False)]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        simple = not t.requires_grad
        x = t if simple else t.detach()
        if layout is None:  # sent as given (BF16 target): copied into the buckets
            return [(name, x, False, simple)]
        memo = self._item_memo
        m = memo.get(name)
        if m is not None and m[0] == t.shape and m[1] == t.dtype:
            # same name, shape and dtype as an earlier step: same decision
            return [(name, x, m[2], simple)]
        expanded = expand_fused_experts(name, t, layout.hidden_size)
        out = []
        for n, y in expanded if expanded is not None else ((name, t),):
            if not layout.quantizes(n, y.shape):
                if expanded is None:
                    memo[name] = (t.shape, t.dtype, False)
                out.append((n, y if not y.requires_grad else y.detach(), False, simple and expanded is None))
                continue
            if y.dtype == FP8_DTYPE or not y.is_floating_point():
                raise ValueError(f"{n}: expected an unquantized floating weight, got {y.dtype} (already quantized?)")
            if y.ndim != 2:
                raise ValueError(f"{n}: quantized linear weight must be 2-D, got shape {tuple(y.shape)}")
            if y.dtype not in _CT_DTYPES:
                raise ValueError(f"{n}: expected a bf16/fp16/fp32 weight to quantize, got {y.dtype}")
            if layout.strategy == "block":
                _check_block_shape(n, y.shape, layout)
            if expanded is None:
                if len(memo) > 1 << 20:
                    memo.clear()
                memo[name] = (t.shape, t.dtype, True)
            out.append((n, y.detach(), True, simple and expanded is None))
        return out

    def _qmeta(self, x: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], int]:
        """Scale dtype, wire shape and bytes of the scale of weight ``x``."""
        from ..formats.quantize import _recipe, scale_dtype

        recipe = _recipe(self.layout)
        hf = recipe == "hf"
        cd = scale_dtype(recipe, x.dtype)
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
        self._ramp = 0
        cur = self._new_bucket()
        prev = self._bucket_plans
        self._bucket_plans = None
        self._step_plans = []
        replaying = prev is not None
        ready: deque = deque()  # planned items of a caller item not yet placed

        def next_planned() -> Any:
            while not ready:
                raw = it.next()
                if raw is _END:
                    return _END
                ready.extend(self._plan_item(raw))
            return ready.popleft()

        def at_end() -> bool:
            return not ready and it.peek() is _END

        while True:
            if replaying and not cur.entries:
                k = len(self._step_plans)
                if k < len(prev) and self._replay_next(it, ready, next_planned, prev[k], cur):
                    stats.num_tensors += cur.num_tensors
                    stats.num_bytes += cur.num_bytes
                    stats.reused_buckets += 1
                    self._close_bucket(cur, at_end(), stats)
                    cur = self._new_bucket()
                    continue
                replaying = False
                if not at_end():  # more items: check them against the names sent so far
                    for plan in self._step_plans:
                        seen.update(e.name for e in plan.entries)
            item = next_planned()
            if item is _END:
                break
            name, x, quant, simple = item
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
                    self._close_bucket(cur, False, stats)
                    cur = self._new_bucket()
                last = at_end()
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
                fits = so + sn <= cur.cap
            else:
                fits = off + qn <= cur.cap
            if cur.entries and (
                not fits
                or len(cur.entries) + nent > self.limits.max_tensors_per_bucket
                or cur.manifest_est + est > self._manifest_budget
            ):
                self._close_bucket(cur, False, stats)
                cur = self._new_bucket()
                off = 0
                if quant:
                    so = (qn + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
            xdev = x.get_device()
            pos = len(cur.plan)
            cur.simple = cur.simple and simple
            if quant:
                cur.entries.append(self._entry(name, _FP8, x.shape, off, qn))
                cur.entries.append(self._entry(skey, cd, sshape, so, sn))
                jk = x.dtype if xdev == dev_idx else (x.dtype, "h2d")
                replay.jobs_for(cur, jk).add(x, off, so, name, pos)
                cur.end = so + sn
                stats.num_bytes += qn + sn
                cur.num_bytes += qn + sn
                cur.plan.append((name, x.shape, x.dtype, True, xdev, jk, off, so, None))
            else:
                entry = self._entry(name, x.dtype, x.shape, off, qn)
                cur.entries.append(entry)
                cur.centries.append(entry)
                cur.csrcs.append(x)
                cur.cidx.append(pos)
                cur.end = off + qn
                stats.num_bytes += qn
                cur.num_bytes += qn
                cur.plan.append((name, x.shape, x.dtype, False, xdev, None, off, None, entry))
            cur.num_tensors += nent
            cur.manifest_est += est
        if cur.entries:
            self._close_bucket(cur, True, stats)
        self._send_end_of_step(stats)
        self._bucket_plans, self._step_plans = self._step_plans, None

    def _replay_next(self, it: _Peekable, ready: deque, next_planned, plan: replay.BucketPlan,
                     cur: Bucket) -> bool:
        """Fill ``cur`` with the layout of an earlier step's bucket if the next
        items are that bucket's (:mod:`.replay`); otherwise leave them to be
        placed one by one and return ``False``."""
        if plan.fast is not None and not ready:  # at a caller item's boundary: compare lists
            got = it.take(len(plan.fast.names))
            xs = replay.match_fast(got, plan.fast)
            if xs is not None:
                replay.fill_fast(cur, plan, xs)
                return True
            it.push_back(got)
        got = []
        for _ in range(len(plan.items)):
            item = next_planned()
            if item is _END:
                break
            got.append(item)
        if replay.replay_items(got, plan, cur):
            return True
        ready.extendleft(reversed(got))
        return False

    def _new_bucket(self) -> Bucket:
        b = Bucket()
        b.slot_idx = self._cur
        self._cur ^= 1
        k = getattr(self, "_ramp", 0)
        self._ramp = k + 1
        b.cap = self.bucket_bytes if k >= 16 else min(self.bucket_bytes, max(RAMP_FIRST_BYTES << k, ALIGNMENT))
        return b

    def _close_bucket(self, b: Bucket, last: bool, stats: SendStats) -> None:
        """Announce bucket ``b`` (its control goes out, then the previous
        bucket's payload: see :mod:`.outbox`) and launch its quantization.
        Announcing first puts the previous payload on the wire before this
        bucket's launch work on the host; with a payload checksum the header
        needs the quantized bytes, so the launch comes first."""
        if self._step_plans is not None:
            self._step_plans.append(replay.plan_of(b))
        slot = self._slots[b.slot_idx]

        def announce() -> None:
            # the slot was waited for (here, or in _launch_bucket): its staging memory is free
            self._dispatch(slot, b.entries, slot.buf, b.end, last, stats, ready=lambda: self._bucket_ready(b, stats),
                           staged=True)

        if self._algo != wire.ChecksumAlgo.NONE:
            self._launch_bucket(b, stats)
            announce()
            return
        if slot.buf is None:
            slot.buf = torch.zeros(self.bucket_bytes + wire.SEAL_SIZE, dtype=torch.uint8, device=self.device)
        # the seal is written on the current stream: it follows the wire's
        # last read of this buffer (NCCL's wait() orders the stream, the host
        # does not block)
        t0 = time.perf_counter()
        slot.wait()
        stats.transfer_s += time.perf_counter() - t0
        announce()
        self._launch_bucket(b, stats)
