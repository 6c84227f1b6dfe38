"""Receiver side of the weight sync (no vLLM dependency).

A vLLM worker extension creates one :class:`WeightReceiver` per worker and,
whenever the trainer announces a step, calls either

* :meth:`WeightReceiver.receive_step` / :meth:`WeightReceiver.iter_buckets`:
  streaming, one reused bucket buffer, tensors are views valid only until the
  next bucket arrives; or
* :meth:`WeightReceiver.receive_all`: the whole step, each bucket received into
  its own buffer, so every tensor stays valid (memory = size of the step) and
  all names/shapes can be validated before the model is touched.

Host work per step is kept small for models with thousands of tensors:
manifests are decoded and validated once and reused while the trainer sends
byte-identical ones (:class:`~vllm_fp8_overlay.sync.wire.ManifestCache`), and
the tensor views of a bucket are built once per reused buffer and manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import wire
from .transport import DEFAULT_TIMEOUT_S, BroadcastGroup, Transport, TransportError
from .wire import (
    HEADER_SIZE,
    BucketManifest,
    ChecksumAlgo,
    ChecksumError,
    EndOfStep,
    Header,
    MessageKind,
    ProtocolError,
    ReceiverBrokenError,
    StepAbortedError,
    TruncatedStepError,
    WireError,
    WireLimits,
)

__all__ = ["WeightReceiver", "Bucket", "ReceivedStep", "OnBucket"]

logger = logging.getLogger(__name__)


@dataclass
class Bucket:
    """One received bucket: validated manifest plus zero-copy tensor views."""

    manifest: BucketManifest
    tensors: list[tuple[str, torch.Tensor]]
    payload: torch.Tensor  # the uint8 buffer the views alias

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def index(self) -> int:
        return self.manifest.index

    @property
    def last(self) -> bool:
        return self.manifest.last


@dataclass
class ReceivedStep:
    """Everything of one step, as returned by :meth:`WeightReceiver.receive_all`."""

    step: int
    layout: dict | None
    tensors: list[tuple[str, torch.Tensor]]
    summary: EndOfStep
    manifests: list[BucketManifest] = field(default_factory=list)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)


OnBucket = Callable[[list[tuple[str, torch.Tensor]], BucketManifest], None]


class _StepState:
    def __init__(self, expected_step: int | None) -> None:
        self.expected_step = expected_step
        self.step: int | None = None
        self.next_index = 0
        self.saw_last = False
        self.num_tensors = 0
        self.num_bytes = 0
        self.names: set[str] = set()
        self.layout: dict | None = None

    def check_step(self, header: Header) -> None:
        if self.step is None:
            if self.expected_step is not None and header.step != self.expected_step:
                raise ProtocolError(f"expected step {self.expected_step}, sender sent step {header.step}")
            self.step = header.step
        elif header.step != self.step:
            raise ProtocolError(f"message of step {header.step} inside step {self.step}")


class WeightReceiver:
    """One receiving rank of the weight-sync group.

    Args:
        host, port: the trainer's TCPStore address.
        world_size: 1 + total number of receiving workers (same on all ranks).
        rank: this worker's rank in the sync group, ``rank_offset + local_rank``.
        backend, device: as for the sender; must resolve to the same backend
            as the trainer (checked at the handshake).
        timeout: seconds for group creation and each collective.
        limits: caps applied to everything the trainer sends.
        verify_checksum: verify payload checksums the sender provides.
        require_checksum: reject buckets that carry no payload checksum.
        transport: inject a ready transport (tests / tools).
        keep_step_buffers: ``receive_all`` keeps its per-bucket buffers (and the
            tensor views over them) for the next step instead of allocating
            new ones: no allocation and no view building after the first
            step, but the step's memory stays resident between steps and the
            tensors a ``receive_all`` returned are overwritten by the next one.

    Construction blocks until every rank has joined.
    """

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int,
        rank: int,
        backend: str = "auto",
        device: torch.device | str | int | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        limits: WireLimits = wire.DEFAULT_LIMITS,
        verify_checksum: bool = True,
        require_checksum: bool = False,
        group_name: str = "weights",
        transport: Transport | None = None,
        keep_step_buffers: bool = False,
    ) -> None:
        if transport is None:
            if rank == 0:
                raise ValueError("rank 0 is the trainer; receivers use ranks >= 1")
            transport = BroadcastGroup(
                host, port, world_size, rank, backend=backend, device=device, timeout=timeout, group_name=group_name
            )
        self.transport = transport
        self.device = torch.device(transport.device)
        self.limits = limits
        self.verify_checksum = verify_checksum
        self.require_checksum = require_checksum
        self._hdr = torch.zeros(HEADER_SIZE, dtype=torch.uint8, device=self.device)
        self._man: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None
        self.keep_step_buffers = bool(keep_step_buffers)
        self._step_bufs: list[torch.Tensor] = []
        self.manifest_cache = wire.ManifestCache()
        # id(buffer) -> {id(manifest entries): (entries, views)}; only for
        # buffers this receiver keeps (a view list is valid while its buffer is)
        self._views: dict[int, dict[int, tuple[tuple, list]]] = {}
        self._summaries: dict[int, tuple[tuple, frozenset[str], int]] = {}
        self._broken: str | None = None
        self._busy = False
        self._closed = False
        self.last_step: int | None = None

    # ------------------------------------------------------------------ API

    @property
    def broken(self) -> str | None:
        """Why the stream can no longer be trusted (``None`` while healthy)."""
        return self._broken

    def iter_buckets(self, expected_step: int | None = None) -> Iterator[Bucket]:
        """Yield the buckets of one step, in order, until end-of-step.

        The tensor views of a bucket alias a buffer that is reused for the next
        bucket: use (or copy) them before advancing the iterator. If the
        iterator is closed early or raises, the rest of the step is drained so
        the group stays in sync with the trainer.
        """
        return self._iter(expected_step, fresh=False)

    def receive_step(self, on_bucket: OnBucket, expected_step: int | None = None) -> EndOfStep:
        """Receive one step, calling ``on_bucket(tensors, manifest)`` per bucket.

        ``tensors`` is a list of ``(name, view)``; the views are valid only
        during the call. If ``on_bucket`` raises, the rest of the step is
        drained and the exception propagates. Returns the end-of-step summary.
        """
        gen = self._iter(expected_step, fresh=False)
        try:
            while True:
                try:
                    bucket = next(gen)
                except StopIteration as stop:
                    return stop.value
                on_bucket(bucket.tensors, bucket.manifest)
        finally:
            gen.close()

    def receive_all(self, expected_step: int | None = None) -> ReceivedStep:
        """Receive a whole step and return every tensor.

        Each bucket is received straight into a freshly allocated buffer of its
        exact payload size, so nothing is copied and the returned views stay
        valid for as long as they are referenced. The price is memory: the
        whole step (all buckets, incl. alignment padding) is resident at once,
        on ``device``. The reused streaming buffer is not touched.
        """
        tensors: list[tuple[str, torch.Tensor]] = []
        manifests: list[BucketManifest] = []
        layout = None
        gen = self._iter(expected_step, fresh=True)
        try:
            while True:
                try:
                    bucket = next(gen)
                except StopIteration as stop:
                    summary = stop.value
                    break
                tensors.extend(bucket.tensors)
                manifests.append(bucket.manifest)
                layout = bucket.manifest.layout
        finally:
            gen.close()
        return ReceivedStep(step=summary.step, layout=layout, tensors=tensors, summary=summary, manifests=manifests)

    def release_buffers(self) -> None:
        """Free the reused buffers (they are reallocated on demand)."""
        self._buf = None
        self._man = None
        self._step_bufs = []
        self._views.clear()

    def close(self) -> None:
        """Tear the group down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.release_buffers()
        self.transport.close()

    def __enter__(self) -> "WeightReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _payload_buffer(self, header: Header, fresh: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(payload view, kept buffer it lies in or None)`` for a message."""
        p = header.payload_len
        if fresh and not (self.keep_step_buffers and header.kind == MessageKind.BUCKET and p):
            return self._alloc(p), None
        if fresh:
            i = header.index
            while len(self._step_bufs) <= i:
                self._step_bufs.append(self._alloc(0))
            if self._step_bufs[i].numel() < p:
                self._views.pop(id(self._step_bufs[i]), None)
                self._step_bufs[i] = self._alloc(0)  # drop the old buffer before growing
                self._step_bufs[i] = self._alloc(p)
            kept = self._step_bufs[i]
        else:
            if self._buf is None or self._buf.numel() < p:
                if self._buf is not None:
                    self._views.pop(id(self._buf), None)
                self._buf = None  # drop the old buffer before growing
                self._buf = self._alloc(p)
            kept = self._buf
        return kept[:p], kept

    def _tensor_views(self, payload: torch.Tensor, kept: torch.Tensor | None,
                      manifest: BucketManifest) -> list[tuple[str, torch.Tensor]]:
        if kept is None:
            return wire.tensors_from_buffer(payload, manifest)
        per_buf = self._views.setdefault(id(kept), {})
        hit = per_buf.get(id(manifest.tensors))
        if hit is not None and hit[0] is manifest.tensors:
            return list(hit[1])
        views = wire.tensors_from_buffer(payload, manifest)
        if len(per_buf) >= 4096:
            per_buf.clear()
        per_buf[id(manifest.tensors)] = (manifest.tensors, views)
        return list(views)

    def _to_bytes(self, t: torch.Tensor) -> bytes:
        return t.cpu().numpy().tobytes()

    def _recv_header(self) -> Header:
        try:
            self.transport.broadcast(self._hdr)
            return wire.decode_header(self._to_bytes(self._hdr), self.limits)
        except BaseException as e:
            # The sizes of what follows are unknown or untrusted (or the
            # collective was interrupted): we cannot resynchronise.
            self._broken = f"{type(e).__name__}: {e}"
            raise

    def _recv_rest(self, header: Header, fresh: bool) -> tuple[bytes, torch.Tensor, torch.Tensor | None]:
        """Receive manifest and payload whose (capped) sizes the header gave."""
        try:
            n = header.manifest_len
            if self._man is None or self._man.numel() < n:
                self._man = None
                self._man = self._alloc(max(n, 4096))
            man = self._man[:n]
            self.transport.broadcast(man)
            manifest = self._to_bytes(man)
            payload, kept = self._payload_buffer(header, fresh)
            if header.payload_len:
                self.transport.broadcast(payload)
            return manifest, payload, kept
        except BaseException as e:
            self._broken = f"{type(e).__name__}: {e}"
            raise

    def _recv_message(self, fresh: bool) -> tuple[Header, bytes, torch.Tensor, torch.Tensor | None]:
        header = self._recv_header()
        return (header, *self._recv_rest(header, fresh))

    def _check_usable(self) -> None:
        if self._closed:
            raise TransportError("receiver is closed")
        if self._broken is not None:
            raise ReceiverBrokenError(f"weight-sync stream is out of sync ({self._broken}); recreate the group")
        if self._busy:
            raise RuntimeError("a step is already being received on this receiver")

    def _iter(self, expected_step: int | None, fresh: bool) -> Iterator[Bucket]:
        self._check_usable()
        self._busy = True
        done = False
        st = _StepState(expected_step)
        try:
            while True:
                header, manifest, payload, kept = self._recv_message(fresh)
                if header.kind == MessageKind.ABORT:
                    done = True
                    reason = wire.decode_abort(header, manifest, self.limits)
                    raise StepAbortedError(f"trainer aborted step {header.step}: {reason}")
                if header.kind == MessageKind.END:
                    done = True
                    summary = self._finish(st, header, manifest)
                    self.last_step = summary.step
                    return summary
                bucket = self._bucket(st, header, manifest, payload, kept)
                yield bucket
        finally:
            self._busy = False
            if not done and self._broken is None:
                self._drain()

    def _bucket(self, st: _StepState, header: Header, manifest_bytes: bytes, payload: torch.Tensor,
                kept: torch.Tensor | None) -> Bucket:
        st.check_step(header)
        if st.saw_last:
            raise ProtocolError(f"bucket {header.index} after the last bucket of step {st.step}")
        if header.index != st.next_index:
            raise ProtocolError(f"expected bucket {st.next_index}, got {header.index}")
        manifest = wire.decode_bucket_manifest(header, manifest_bytes, self.limits, self.manifest_cache)
        if header.checksum_algo == ChecksumAlgo.NONE:
            if self.require_checksum:
                raise ChecksumError(f"bucket {header.index} carries no payload checksum")
        elif self.verify_checksum:
            got = wire.payload_checksum(payload, header.checksum_algo)
            if got != header.payload_checksum:
                raise ChecksumError(
                    f"payload checksum mismatch in bucket {header.index} of step {header.step}: "
                    f"got 0x{got:08x}, header says 0x{header.payload_checksum:08x}"
                )
        names, nbytes = self._summary(manifest)
        if not st.names.isdisjoint(names):
            dup = sorted(st.names & names)[0]
            raise wire.ManifestError(f"tensor {dup!r} sent twice in step {st.step}")
        st.names |= names
        st.num_bytes += nbytes
        st.num_tensors += len(manifest.tensors)
        st.next_index += 1
        st.saw_last = manifest.last
        st.layout = manifest.layout
        return Bucket(manifest=manifest, tensors=self._tensor_views(payload, kept, manifest), payload=payload)

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

    def _finish(self, st: _StepState, header: Header, manifest: bytes) -> EndOfStep:
        summary = wire.decode_end(header, manifest, self.limits)
        st.check_step(header)
        got = (st.next_index, st.num_tensors, st.num_bytes)
        want = (summary.num_buckets, summary.num_tensors, summary.num_bytes)
        if got != want or (summary.num_buckets > 0 and not st.saw_last):
            raise TruncatedStepError(
                f"step {summary.step}: received (buckets, tensors, bytes)={got}, "
                f"trainer sent {want}{'' if st.saw_last or not summary.num_buckets else ', last bucket missing'}"
            )
        return summary

    def _drain(self) -> None:
        """Consume the rest of the current step (until END or ABORT) without
        looking at payloads, so the group stays aligned with the trainer."""
        try:
            while True:
                header, _, _, _ = self._recv_message(fresh=False)
                if header.kind in (MessageKind.END, MessageKind.ABORT):
                    return
        except Exception as e:  # already marked broken by _recv_*
            if self._broken is None:
                self._broken = f"drain failed: {e}"
            logger.error("weight sync: could not drain the rest of the step: %s", e)
