"""The device work of one bucket on the grouped send path: its grouped
quantization launches, the copies of its unquantized tensors, their value
checks and the finiteness flag the host reads before the payload goes out,
run on the sender's side stream; and, once the same work on the same
addresses was prepared in an earlier step, the same work replayed as one CUDA
graph. Split from :mod:`.grouped`, which plans the buckets.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from . import replay, wire
from .replay import Bucket
from .values import device_values_grouped, value_groups, value_problems

if TYPE_CHECKING:  # pragma: no cover
    from .sendstate import SendStats

__all__: list[str] = []

logger = logging.getLogger(__name__)

_CONTIGUOUS, _DATA_PTR = torch.Tensor.is_contiguous, torch.Tensor.data_ptr

#: replay a bucket's launch work (its grouped quantization launches, copies,
#: value checks and flag copy: some 10-20 launches) as one CUDA graph once
#: the same work, on the same addresses, was prepared in an earlier step: one
#: graph launch instead of their host time, which bounds the first buckets of
#: a step (2x H200: BENCHMARKS.md, "Round five"). ``FP8_OVERLAY_LAUNCH_GRAPHS=0``
#: turns it off (plain launches, the same bytes).
LAUNCH_GRAPHS = os.environ.get("FP8_OVERLAY_LAUNCH_GRAPHS", "1") != "0"
#: graphs kept per sender (each holds a few launches' worth of host memory;
#: their device temporaries share one pool)
MAX_LAUNCH_GRAPHS = 1024


class BucketLaunch:
    """Mixed into :class:`~.sender.WeightSender` through
    :class:`~.grouped.GroupedSendPath`."""

    def _launch_bucket(self, b: Bucket, stats: SendStats) -> None:
        """Queue bucket ``b``'s device work on the side stream, after the
        wire's last read of its buffer, and record the event the host waits
        on before its payload goes out (:meth:`_bucket_ready`)."""
        t0 = time.perf_counter()
        slot = self._slots[b.slot_idx]
        if slot.buf is None:
            slot.buf = torch.zeros(self.bucket_bytes + wire.SEAL_SIZE, dtype=torch.uint8, device=self.device)
        if self._flags[b.slot_idx] is None:
            self._flags[b.slot_idx] = torch.zeros(1, dtype=torch.bool, pin_memory=True)
        side = self._side
        main = torch.cuda.current_stream(self.device)
        recipe = None if self.layout is None else ("hf" if self.layout.method == "fp8" else "ct")
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
            gkey = self._graph_key(b, slot) if LAUNCH_GRAPHS and not self._graphs_off else None
            graph = self._launch_graphs.get(gkey) if gkey is not None else None
            if graph is None and gkey is not None and len(self._launch_graphs) < MAX_LAUNCH_GRAPHS:
                graph = self._capture_launch(b, slot, recipe, stats)
                if graph is not None:
                    # kept until close(): a graph must not be destroyed while it may still run
                    self._launch_graphs[gkey] = graph
            if graph is not None:
                graph.replay()
                stats.graph_buckets += 1
            else:
                self._launch_work(b, slot, recipe, stats)
            b.event = torch.cuda.Event()
            b.event.record(side)
        b.flag = self._flags[b.slot_idx]
        stats.quantize_s += time.perf_counter() - t0

    def _launch_key(self, b: Bucket, key: Any, srcs: list) -> tuple:
        """The launch cache's key of one job: sources at the same addresses,
        shapes and bucket offsets as in an earlier step reuse the prepared
        launch (no per-tensor host work, no table upload)."""
        if b.token is not None and all(map(_CONTIGUOUS, srcs)):
            # shapes, strides and offsets follow from the layout
            return (key, b.token, tuple(map(_DATA_PTR, srcs)))
        jobs = b.qjobs[key]
        return (key, tuple([(x.data_ptr(), x.shape, x.stride(), qo, so)
                            for x, qo, so in zip(srcs, jobs.q_offsets, jobs.s_offsets)]))

    def _graph_key(self, b: Bucket, slot) -> tuple | None:
        """The key of bucket ``b``'s launch graph, or ``None`` when its launch
        work must run as plain launches. A graph is captured only for work
        whose every part was already prepared with the same sources at the
        same addresses in an earlier step (so a trainer whose tensors move
        every step never pays for captures), and replayed while they stay."""
        if b.token is None or not (b.qjobs or b.csrcs):
            return None
        parts: list = [b.slot_idx, id(slot.buf), b.token]
        lc = self._launch_cache
        for key, jobs in b.qjobs.items():
            if isinstance(key, tuple):
                return None  # host copies
            lkey = self._launch_key(b, key, jobs.srcs)
            if len(lkey) != 3:
                return None  # strides the key does not fix (a contiguous replay's key is (key, token, addresses))
            if lc.get(lkey) is None:
                return None  # not prepared yet, or a tensor the kernels do not take
            parts.append(lkey)
        if b.csrcs:
            hit = self._dst_cache.get((id(slot.buf), b.token))
            if (hit is None or hit[0] is not b.token or hit[1] is not slot.buf or hit[3]
                    or isinstance(hit[4], list) or not all(map(_CONTIGUOUS, b.csrcs))):
                return None  # copies not laid out yet, from another device, or checked by torch ops
            parts.append(tuple(map(_DATA_PTR, b.csrcs)))
        return tuple(parts)

    def _capture_launch(self, b: Bucket, slot, recipe: str | None, stats: SendStats) -> Any:
        """Capture bucket ``b``'s launch work as one CUDA graph (its kernels do
        not run during the capture: the caller replays it). On any failure
        the sender stops capturing and returns ``None``: the plain launches
        are always correct, the graph only saves their host time."""
        if self._graph_pool is None:
            # one memory pool for every graph of this sender: a graph's
            # allocations are its own temporaries, dead when it ends, and
            # graphs run one after another on the side stream
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
            try:
                self._launch_work(b, slot, recipe, stats)
            finally:
                graph.capture_end()
        except Exception as e:  # noqa: BLE001 - fall back to plain launches for good
            logger.warning("weight sync: CUDA graph capture of a bucket's launches failed (%s); "
                           "launching its kernels one by one from now on", e)
            self._graphs_off = True
            return None
        return graph

    def _launch_work(self, b: Bucket, slot, recipe: str | None, stats: SendStats) -> None:
        """Bucket ``b``'s device work on the current (side) stream: its
        grouped quantization launches, its copies, their value checks and the
        finiteness flag's copy to the host."""
        from ..kernels.triton_fp8 import prepare_grouped, quantize_grouped

        checks = []
        for key, jobs in b.qjobs.items():
            srcs = jobs.srcs
            am = None
            if isinstance(key, tuple):
                srcs = [t.to(self.device, non_blocking=True) for t in srcs]
            else:
                lkey = self._launch_key(b, key, srcs)
                lc = self._launch_cache
                prep = lc.get(lkey, False)
                if prep is False:
                    prep = prepare_grouped(srcs, recipe, self.layout.strategy, self.layout.block_size,
                                           jobs.q_offsets, jobs.s_offsets)
                    if len(lc) >= 1024:
                        lc.clear()
                    lc[lkey] = prep
                if prep is not None:
                    am = prep(srcs, slot.buf)
            if am is None:
                _, _, am = quantize_grouped(
                    srcs, recipe, self.layout.strategy, self.layout.block_size, out=slot.buf,
                    q_offsets=jobs.q_offsets, s_offsets=jobs.s_offsets, amax="any", views=False,
                )
            checks.append(torch.isfinite(am).all().reshape(1))
        t2 = time.perf_counter()
        if b.csrcs:
            self._pack_copies(slot.buf, b, checks)
        stats.pack_s += time.perf_counter() - t2
        flag = self._flags[b.slot_idx]
        if checks:
            ok = checks[0] if len(checks) == 1 else torch.cat(checks).all().reshape(1)
            flag.copy_(ok, non_blocking=True)
        else:
            flag.fill_(True)

    def _pack_copies(self, buf: torch.Tensor, b: Bucket, checks: list) -> None:
        """Copy bucket ``b``'s unquantized tensors into ``buf`` and queue their
        value checks: one multi-tensor copy per dtype for those on this device
        (a list of mixed dtypes leaves torch's fused path: measured on an H200,
        480 FP8 weights plus 480 float32 scales took 5.2 ms in one call, 2.2 ms
        in two), and batched checks. A bucket laid out as in the previous step
        (same layout token: same entries, and sources with the same names,
        dtypes, shapes and devices) reuses its destination views and checks,
        cached per buffer and token (a BF16 step of a large MoE is 18k+
        tensors: Python per tensor would cost more host time than the wire)."""
        entries, srcs = b.centries, b.csrcs
        cache = self._dst_cache
        key = (id(buf), b.token)
        hit = cache.get(key) if b.token is not None else None
        if hit is not None and hit[0] is b.token and hit[1] is buf:
            _, _, copies, rest, groups = hit
        else:
            by_dtype: dict = {}
            rest = []
            for i, (entry, x) in enumerate(zip(entries, srcs)):
                if entry.nbytes == 0:
                    continue
                if x.device != buf.device:
                    rest.append(i)
                    continue
                dsts, idx = by_dtype.setdefault(x.dtype, ([], []))
                dsts.append(buf[entry.offset: entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape))
                idx.append(i)
            copies = [(dsts, None if len(idx) == len(srcs) else tuple(idx)) for dsts, idx in by_dtype.values()]
            groups = self._copy_checks(entries, srcs)
            if b.token is not None:
                if len(cache) > 4096:
                    cache.clear()
                cache[key] = (b.token, buf, copies, rest, groups)
        for dsts, idx in copies:
            torch._foreach_copy_(dsts, srcs if idx is None else replay.pick(srcs, idx))
        for i in rest:
            wire.pack_into(buf, entries[i], srcs[i], non_blocking=True)
        if isinstance(groups, list):
            for ok in device_values_grouped(groups, srcs):
                checks.append(ok.to(self.device, non_blocking=True))
        else:  # one launch per dtype over the copies as they lie in the bucket
            checks.append((groups.count_bad(buf) == 0).reshape(1))

    def _copy_checks(self, entries: list, srcs: list) -> Any:
        """How a bucket's copies are value-checked: with Triton, one launch per
        dtype over the bytes as they lie in the bucket once copied
        (``kernels.value_check``: multi-tensor reductions return one tensor per
        input, which for the 12k pre-quantized weights and scales of a sharded
        MoE step cost more host time than the wire takes); otherwise the
        batched reductions of :func:`values.device_values_grouped`."""
        if self._value_kernel is None:
            from ..kernels import triton_available

            self._value_kernel = triton_available()
        if self._value_kernel:
            from ..kernels.value_check import build_payload_check
            from .values import kind_of

            plan = build_payload_check(entries, self._scale_name, self.device, kind_of)
            if plan is not None:
                return plan
        return value_groups([(e.name, x) for e, x in zip(entries, srcs)], self._scale_name)

    def _bucket_ready(self, b: Bucket, stats: SendStats) -> None:
        """Wait for bucket ``b``'s quantization; raise if a source was not finite."""
        if b.qjobs is None and b.csrcs is None:
            return  # already checked
        t0 = time.perf_counter()
        b.event.synchronize()
        stats.quantize_s += time.perf_counter() - t0
        if not bool(b.flag[0]):
            self._raise_nonfinite(b)
        b.qjobs, b.csrcs = None, None  # sources were read: quantization is complete

    def _raise_nonfinite(self, b: Bucket) -> None:
        for jobs in b.qjobs.values():
            for x, name in zip(jobs.srcs, jobs.names):
                if not bool(torch.isfinite(x).all()):
                    bad = "NaN" if bool(torch.isnan(x).any()) else "inf"
                    raise ValueError(f"{name}: weight contains {bad} values; refusing to quantize")
        bad = value_problems(list(zip([e.name for e in b.centries], b.csrcs)), scale_name=self._scale_name)
        if bad:
            raise ValueError("refusing to send step: " + "; ".join(bad))
        # else the batched check's false alarm (a huge finite tensor whose
        # squares overflow): the exact checks passed, the bucket goes out

