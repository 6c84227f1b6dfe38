"""Where a :class:`~.receiver.WeightReceiver` puts each bucket, and the
tensor views it hands out over it.

Building the views is the receiver's only per-tensor host work (one
``as_strided`` each: 37k tensors for a 30B MoE step, tens of milliseconds),
and allocating a step's buffers afresh means building them again every step.
So by default (``keep_step_buffers=None``) ``receive_all`` keeps each
bucket's buffer and views for the next step, and reuses them only when
nothing outside the receiver still references them: no tensor, pair or
derived view of that bucket is alive (a loader that is done with a step has
dropped it). A bucket that is still referenced gets a new buffer, so a
caller holding an old step never sees it overwritten. The price is memory:
between steps the receiver holds the last step's buffers (the step's size;
:meth:`~.receiver.WeightReceiver.release_buffers` frees them). With
``keep_step_buffers=True`` buffers are reused unconditionally (tensors of
the previous step are overwritten); with ``False`` every step is received
into new buffers.

Whether a buffer is free is decided from counts, both recorded when the
views were built, before any was handed out: the number of tensors sharing
the buffer's storage (catches derived views) and the sum of the Python
reference counts of the handed-out ``(name, tensor)`` pairs and tensors
(catches a caller holding any of them).
"""

from __future__ import annotations

import sys

import torch

from .wire import SEAL_SIZE, BucketManifest, Header, tensors_from_buffer

__all__: list[str] = []


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(t: torch.Tensor) -> int:
    """Tensors (and storage objects) that share ``t``'s storage (-1 where
    this torch cannot tell: then no buffer is ever found free)."""
    if _USE_COUNT is None:
        return -1
    return _USE_COUNT(t.untyped_storage()._cdata)


def _ref_sum(views: list) -> int:
    rc = sys.getrefcount
    s = 0
    for pair in views:
        s += rc(pair) + rc(pair[1])
    return s


class _Kept:
    """A bucket buffer of the last step and the views handed out over it."""

    __slots__ = ("buf", "alone", "key", "views", "added", "refs", "ready")

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf
        self.alone = _use_count(buf)  # nothing but the buffer itself
        self.key = None  # manifest entries the views were built for
        self.views: list | None = None
        self.added = 0  # storage users the views add (views and their dtype bases)
        self.refs = 0  # _ref_sum(views) while only this record holds them
        self.ready = False  # found free at the start of the current step (_check_kept)

    def free(self) -> bool:
        """Nothing outside the receiver references this buffer."""
        n = _use_count(self.buf)
        if n < 0 or n != self.alone + self.added:
            return False
        return self.views is None or _ref_sum(self.views) == self.refs


class ReceiveBuffers:
    """Mixed into :class:`~.receiver.WeightReceiver`: bucket buffers and views."""

    def _init_buffers(self) -> None:
        self._buf: torch.Tensor | None = None  # streaming buffer (iter_buckets / receive_step)
        self._scratch: torch.Tensor | None = None  # payloads nobody will read (drains, rejected buckets)
        self._step_bufs: list[torch.Tensor] = []  # keep_step_buffers=True
        self._auto: list[_Kept | None] = []  # keep_step_buffers=None: reused when free
        # id(buffer) -> {id(manifest entries): (entries, views)}; only for
        # buffers this receiver keeps (a view list is valid while its buffer is)
        self._views: dict[int, dict[int, tuple[tuple, list]]] = {}
        self._summaries: dict[int, tuple[tuple, frozenset[str], int]] = {}

    def _check_kept(self) -> None:
        """Decide, at the start of a step (while the first header is on its
        way), which kept buffers the step may reuse, so that the per-view
        reference counting is not on the wire's path between a header and its
        payload. Nothing can take a new reference meanwhile without holding
        one already (the views are reachable only through counted objects)."""
        for rec in self._auto:
            if rec is not None:
                rec.ready = rec.free()

    def _release(self) -> None:
        self._buf = None
        self._scratch = None
        self._step_bufs = []
        self._auto = []
        self._views.clear()
        self._summaries.clear()

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _grow(self, buf: torch.Tensor | None, n: int) -> torch.Tensor:
        if buf is None or buf.numel() < n:
            buf = None  # drop the old buffer before growing
            buf = self._alloc(n)
        return buf

    def _scratch_for(self, h: Header) -> torch.Tensor:
        self._scratch = self._grow(self._scratch, h.payload_len + SEAL_SIZE)
        return self._scratch[: h.payload_len + SEAL_SIZE]

    def _reuses(self, h: Header, fresh: bool) -> bool:
        """Whether :meth:`_payload_buffer` will put this bucket into a buffer
        the receiver already holds (nothing is allocated for it)."""
        n = h.payload_len + SEAL_SIZE
        if fresh and self.keep_step_buffers is None:
            rec = self._auto[h.index] if h.index < len(self._auto) else None
            return rec is not None and rec.ready and rec.buf.numel() >= n
        if fresh and not self.keep_step_buffers:
            return False
        if fresh:
            return h.index < len(self._step_bufs) and self._step_bufs[h.index].numel() >= n
        return self._buf is not None and self._buf.numel() >= n

    def _payload_buffer(self, h: Header, fresh: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(transfer view, kept buffer it lies in or None)`` for a bucket."""
        n = h.payload_len + SEAL_SIZE
        if fresh and self.keep_step_buffers is None:
            i = h.index
            while len(self._auto) <= i:
                self._auto.append(None)
            rec = self._auto[i]
            if rec is None or rec.buf.numel() < n or not rec.ready:
                rec = None  # a referenced buffer stays with whoever references it
                rec = self._auto[i] = _Kept(self._alloc(n))
            rec.ready = False  # one bucket per index and step
            return rec.buf[:n], rec.buf
        if fresh and not self.keep_step_buffers:
            return self._alloc(n), None
        if fresh:
            i = h.index
            while len(self._step_bufs) <= i:
                self._step_bufs.append(self._alloc(0))
            if self._step_bufs[i].numel() < n:
                self._views.pop(id(self._step_bufs[i]), None)
                self._step_bufs[i] = self._alloc(0)
                self._step_bufs[i] = self._alloc(n)
            kept = self._step_bufs[i]
        else:
            if self._buf is None or self._buf.numel() < n:
                if self._buf is not None:
                    self._views.pop(id(self._buf), None)
                self._buf = self._grow(None if self._buf is None else self._buf, n)
            kept = self._buf
        return kept[:n], kept

    def _tensor_views(self, payload: torch.Tensor, kept: torch.Tensor | None, manifest: BucketManifest,
                      index: int) -> list[tuple[str, torch.Tensor]]:
        if kept is None:
            return tensors_from_buffer(payload, manifest)
        rec = self._auto[index] if index < len(self._auto) else None
        if rec is not None and rec.buf is kept:
            if rec.key is not manifest.tensors:
                rec.views = None  # drop the old views before counting
                before = _use_count(kept)
                views = tensors_from_buffer(kept, manifest)
                rec.added = _use_count(kept) - before
                rec.key, rec.views = manifest.tensors, views
                rec.refs = _ref_sum(views)
            return list(rec.views)
        per_buf = self._views.setdefault(id(kept), {})
        hit = per_buf.get(id(manifest.tensors))
        if hit is not None and hit[0] is manifest.tensors:
            return list(hit[1])
        views = tensors_from_buffer(payload, manifest)
        if len(per_buf) >= 4096:
            per_buf.clear()
        per_buf[id(manifest.tensors)] = (manifest.tensors, views)
        return list(views)

    def _summary(self, manifest: BucketManifest) -> tuple[frozenset[str], int]:
        """Names and byte count of a manifest (memoized for cached manifests)."""
        hit = self._summaries.get(id(manifest.tensors))
        if hit is not None and hit[0] is manifest.tensors:
            return hit[1], hit[2]
        names = frozenset(e.name for e in manifest.tensors)
        nbytes = sum(e.nbytes for e in manifest.tensors)
        if len(self._summaries) >= 4096:
            self._summaries.clear()
        self._summaries[id(manifest.tensors)] = (manifest.tensors, names, nbytes)
        return names, nbytes
