"""Receiver side of the weight sync (no vLLM dependency).

A vLLM worker extension creates one :class:`WeightReceiver` per worker and,
whenever the trainer announces a step, calls either

* :meth:`WeightReceiver.receive_step` / :meth:`WeightReceiver.iter_buckets`:
  streaming, one reused bucket buffer, tensors are views valid only until the
  next bucket arrives; or
* :meth:`WeightReceiver.receive_all`: the whole step, each bucket received into
  its own buffer, so every tensor stays valid (memory = size of the step) and
  all names/shapes can be validated before the model is touched. Caller
  checks run per bucket: on the manifest before its payload is allocated,
  and on the tensors once they arrived.

Every receive is posted with a size the trainer announced in a header this
receiver accepted (within the limits agreed at the group's handshake), so no
claim of a peer can make gloo abort this process. When the receiver cannot
know the size of the next transfer (a header it cannot trust, a message of
another step), it never posts another receive on the group: it marks itself
broken and closes the group, which also fails the trainer's pending
broadcast at once instead of at its timeout.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from . import wire
from .recvbuffers import ReceiveBuffers
from .recvpost import CONTROL, Announced, PostedReceives
from .received import (Bucket, DeferredProblems, ManifestCheck, OnBucket, PayloadCheck, ReceivedStep,
                       StepRejectedError, _Fatal, _StepState)
from .transport import DEFAULT_TIMEOUT_S, BroadcastGroup, Transport, TransportError
from .wire import (
    BucketManifest,
    ChecksumAlgo,
    ChecksumError,
    EndOfStep,
    Header,
    LimitExceededError,
    MessageKind,
    ProtocolError,
    ReceiverBrokenError,
    StepAbortedError,
    TruncatedStepError,
    WireLimits,
)

__all__ = ["WeightReceiver", "Bucket", "ReceivedStep", "OnBucket", "StepRejectedError"]

logger = logging.getLogger(__name__)


class WeightReceiver(ReceiveBuffers, PostedReceives):
    """One receiving rank of the weight-sync group.

    Args:
        host, port: the trainer's TCPStore address.
        world_size: 1 + total number of receiving workers (same on all ranks).
        rank: this worker's rank in the sync group, ``rank_offset + local_rank``.
        backend, device: as for the sender; must resolve to the same backend
            as the trainer (checked at the handshake).
        timeout: seconds for group creation and each collective.
        limits: caps applied to everything the trainer sends; also announced
            at the handshake (the trainer packs within them).
        verify_checksum: verify payload checksums the sender provides (the
            seal is always verified).
        require_checksum: reject buckets that carry no payload checksum.
        transport: inject a ready transport (tests / tools).
        keep_step_buffers: what ``receive_all`` does with its per-bucket
            buffers and the tensor views over them (:mod:`.recvbuffers`).
            ``None`` (default): keeps them for the next step and reuses each
            one that nothing outside the receiver references any more (no
            allocation and no view building once a loader has dropped the
            previous step; a step still referenced is never overwritten);
            the last step's memory stays resident between steps
            (:meth:`release_buffers` frees it). ``True``: reuses them
            unconditionally (the tensors a ``receive_all`` returned are
            overwritten by the next one). ``False``: new buffers every step.
        group_id: refuse a group whose id is not this one (the id the trainer
            passed to this worker when it asked it to join).

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
        keep_step_buffers: bool | None = None,
        group_id: str | None = None,
    ) -> None:
        if transport is None:
            if rank == 0:
                raise ValueError("rank 0 is the trainer; receivers use ranks >= 1")
            transport = BroadcastGroup(host, port, world_size, rank, backend=backend, device=device,
                                       timeout=timeout, group_name=group_name, limits=limits, group_id=group_id)
        self.transport = transport
        self.device = torch.device(transport.device)
        self.limits = limits
        #: largest payload of several tensors (agreed at the handshake)
        self.bucket_bytes = int(getattr(transport, "bucket_bytes", None) or limits.max_bucket_bytes)
        self.group_id = getattr(transport, "group_id", None)
        self.verify_checksum = verify_checksum
        self.require_checksum = require_checksum
        self.keep_step_buffers = None if keep_step_buffers is None else bool(keep_step_buffers)
        self._init_buffers()
        self.manifest_cache = wire.ManifestCache()
        self._init_posting()
        self._broken: str | None = None
        self._busy = False
        self._closed = False
        self.last_step: int | None = None

    # ------------------------------------------------------------------ API

    @property
    def broken(self) -> str | None:
        """Why the stream can no longer be trusted (``None`` while healthy)."""
        return self._broken

    @property
    def closed(self) -> bool:
        return self._closed

    def iter_buckets(self, expected_step: int | None = None) -> Iterator[Bucket]:
        """Yield the buckets of one step, in order, until end-of-step.

        The tensor views of a bucket alias a buffer that is reused for the next
        bucket: use (or copy) them before advancing the iterator. If the
        iterator is closed early or raises, the rest of the step is drained so
        the group stays in sync with the trainer.
        """
        return self._iter(expected_step, fresh=False)

    def iter_fresh_buckets(self, expected_step: int | None = None,
                           check_manifest: ManifestCheck | None = None) -> Iterator[Bucket]:
        """Like :meth:`iter_buckets`, but every bucket is received into its own
        buffer (freed when the last view into it is dropped), and
        ``check_manifest`` vets each manifest before its payload is allocated
        (problems: :class:`StepRejectedError` once the step was drained)."""
        return self._iter(expected_step, fresh=True, check_manifest=check_manifest, reject_early=True)

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

    def receive_all(self, expected_step: int | None = None, *, check_manifest: ManifestCheck | None = None,
                    check_payload: PayloadCheck | None = None) -> ReceivedStep:
        """Receive a whole step and return every tensor.

        Each bucket is received straight into a buffer of its exact payload
        size, so nothing is copied and the returned views stay valid for as
        long as they are referenced. The price is memory: the whole step is
        resident at once, on ``device``.

        ``check_manifest(manifest) -> problems`` runs on each bucket's manifest
        before its payload is allocated; ``check_payload(bucket) -> problems``
        on its tensors once they arrived (e.g. value sentinels); it may return
        a :class:`~.received.DeferredProblems` instead, resolved after the
        step's END (nothing is handed out before that). After the
        first problem the rest of the step is still received (into one scratch
        buffer, not kept) and its manifests still checked, then
        :class:`StepRejectedError` lists every problem.
        """
        tensors: list[tuple[str, torch.Tensor]] = []
        manifests: list[BucketManifest] = []
        gen = self._iter(expected_step, fresh=True, check_manifest=check_manifest, check_payload=check_payload)
        try:
            while True:
                try:
                    bucket = next(gen)
                except StopIteration as stop:
                    summary = stop.value
                    break
                tensors.extend(bucket.tensors)
                manifests.append(bucket.manifest)
        finally:
            gen.close()
        layout = manifests[-1].layout if manifests else None
        return ReceivedStep(step=summary.step, layout=layout, tensors=tensors, summary=summary, manifests=manifests)

    def release_buffers(self) -> None:
        """Free the reused buffers (they are reallocated on demand)."""
        self._release()

    def close(self) -> None:
        """Tear the group down and drop every buffer and cache. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.release_buffers()
        self.manifest_cache.clear()
        self.transport.close()

    def __enter__(self) -> "WeightReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _break(self, why: BaseException | str) -> None:
        """The position in the stream is unknown: never post another receive
        on this group. Closing it makes a trainer blocked on this rank fail at
        once; recreate the group on both sides."""
        if self._broken is None:
            self._broken = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
            logger.error("weight sync: receiver rank %s is out of sync and leaves the group: %s",
                         getattr(self.transport, "rank", "?"), self._broken)
        self._ctl_ready = None
        self._pend = []
        self._after_failure()
        try:
            self.transport.close()
        except Exception:  # pragma: no cover - closing a broken group is best effort
            pass

    def _after_failure(self) -> None:
        """Nothing of a failed step stays cached or allocated."""
        self.release_buffers()
        self.manifest_cache.clear()

    def _check_usable(self) -> None:
        if self._closed and self._broken is None:
            raise TransportError("receiver is closed")
        if self._broken is not None:
            raise ReceiverBrokenError(f"weight-sync stream is out of sync ({self._broken}); recreate the group")
        if self._busy:
            raise RuntimeError("a step is already being received on this receiver")

    def _iter(self, expected_step: int | None, fresh: bool, check_manifest: ManifestCheck | None = None,
              check_payload: PayloadCheck | None = None, reject_early: bool = False) -> Iterator[Bucket]:
        """The step's buckets in order (see :mod:`.recvpost` for the posting
        order). On CUDA with ``fresh`` (every bucket its own buffer) bucket
        ``j``'s payload is posted before bucket ``j-1`` is handed out, so the
        wire never waits for the consumer. Otherwise it is posted once the
        consumer is done with bucket ``j-1``: the one streaming buffer is
        free again then, and on CPU a post is the blocking receive itself,
        which gains nothing by coming earlier but would keep one more bucket
        in memory while the consumer works."""
        self._check_usable()
        self._busy = True
        st = _StepState(expected_step)
        ok = False
        lazy = not (fresh and self._cuda)
        prev: Announced | None = None
        try:
            self._pend = []
            self._post_control()  # the first control's receive goes out before the bookkeeping
            self._pend.append(CONTROL)
            if fresh and self.keep_step_buffers is None and self._auto:
                self._check_kept()
            while True:
                h, raw = self._read_control()
                if st.voided and h.kind != MessageKind.ABORT:
                    raise _Fatal(ProtocolError(f"bucket {st.voided - 1} of step {st.step} was voided, "
                                               "but the next control is not an ABORT"))
                cur = None
                if h.kind == MessageKind.BUCKET:
                    cur = self._announce(st, h, raw, check_manifest)
                    self._post_control()
                    self._pend.append(CONTROL)
                    self._pend.append(cur)
                    if not lazy:
                        self._post_payload(cur, fresh)
                elif st.step is not None:
                    st.check_step(h)
                if prev is not None:
                    p, prev = prev, None
                    bucket = self._take(st, p, check_payload)
                    if bucket is not None and h.kind != MessageKind.ABORT:  # none is handed out after ABORT
                        yield bucket
                    elif reject_early and st.problems:
                        raise StepRejectedError(st.step, st.problems)
                if st.voided and h.kind == MessageKind.END:  # a voided payload after END: never valid
                    raise _Fatal(ProtocolError(f"bucket {st.voided - 1} of step {st.step} was voided after "
                                               "the step's END"))
                if cur is None:  # END or ABORT, and every payload of the step arrived
                    st.ended = True
                    st.check_step(h)
                    if h.kind == MessageKind.ABORT:
                        raise StepAbortedError(f"trainer aborted step {h.step}: "
                                               f"{wire.decode_abort(h, raw, self.limits)}")
                    summary = self._finish(st, h, raw)
                    for d in st.deferred:
                        st.problems += d.resolve()
                    st.deferred = []
                    if st.problems:
                        raise StepRejectedError(summary.step, st.problems)
                    self.last_step = summary.step
                    if fresh and len(self._auto) > st.next_index:
                        del self._auto[st.next_index:]  # buffers of a longer earlier step: not this step's
                    ok = True
                    return summary
                if lazy:
                    self._post_payload(cur, fresh)
                prev = cur
        except _Fatal as f:
            self._break(f.args[0])
            raise f.args[0] from None
        except BaseException as e:
            if not isinstance(e, (Exception, GeneratorExit)):
                # an interrupt (KeyboardInterrupt, SystemExit, a cancellation) may land between
                # reading a control and recording what it announced: where the stream stands is unknown
                self._break(e)
            raise
        finally:
            self._busy = False
            if not ok:
                if not st.ended and self._broken is None:
                    self._drain(st)
                self._after_failure()

    def _announce(self, st: _StepState, h: Header, raw: bytes, check_manifest: ManifestCheck | None) -> Announced:
        """Validate a BUCKET control before its payload is posted. A manifest
        that fails validation is fatal (the payload's size is then a bare
        claim: no buffer is allocated for it and no receive posted). Other
        errors and the caller's manifest problems send the payload to
        scratch; they are raised or reported when it was consumed."""
        try:  # the payload size is trusted only once the manifest accounts for it
            manifest = wire.decode_bucket_manifest(h, raw, self.limits, self.manifest_cache)
            if h.payload_len > self.bucket_bytes and len(manifest.tensors) != 1:
                raise LimitExceededError(f"bucket {h.index}: payload of {h.payload_len} bytes is larger than the "
                                         f"agreed bucket size {self.bucket_bytes} but holds {len(manifest.tensors)} "
                                         "tensors (only a single tensor may travel alone)")
        except BaseException as e:  # no receive is posted for a payload nobody vouches for
            raise _Fatal(e) from None
        a = Announced(h, manifest)
        try:
            st.check_step(h)  # the first sets the step; another step later is fatal
            st.check_order(h)
            if check_manifest is not None:
                a.problems = list(check_manifest(manifest))
        except _Fatal:
            raise
        except Exception as e:  # whatever happens, the payload transfer must be consumed
            a.error = e
        a.to_scratch = a.error is not None or bool(a.problems) or bool(st.problems)
        return a

    def _take(self, st: _StepState, a: Announced, check_payload: PayloadCheck | None) -> Bucket | None:
        """Bucket ``a``'s payload arrived: check it and hand it out; ``None``
        when a check rejected it (or an earlier bucket of the step)."""
        self._consume_payload_or_void(st, a)
        h, manifest = a.header, a.manifest
        if a.error is not None:
            raise a.error
        if st.voided:
            return None
        if a.problems or st.problems or a.to_scratch:
            st.problems += a.problems
            names, nbytes = self._summary(manifest)
            st.account(names, nbytes, len(manifest.tensors))
            return None
        payload = a.dest[: h.payload_len]
        if h.checksum_algo == ChecksumAlgo.NONE:
            if self.require_checksum:
                raise ChecksumError(f"bucket {h.index} carries no payload checksum")
        elif self.verify_checksum:
            got = wire.payload_checksum(payload, h.checksum_algo)
            if got != h.payload_checksum:
                raise ChecksumError(f"payload checksum mismatch in bucket {h.index} of step {h.step}: "
                                    f"got 0x{got:08x}, header says 0x{h.payload_checksum:08x}")
        names, nbytes = self._summary(manifest)
        st.account(names, nbytes, len(manifest.tensors))
        bucket = Bucket(manifest=manifest, tensors=self._tensor_views(payload, a.kept, manifest, h.index),
                        payload=payload)
        if check_payload is not None:
            bad = check_payload(bucket)
            if isinstance(bad, DeferredProblems):  # receive_all only: read once the step ended
                st.deferred.append(bad)
                bad = []
            bad = list(bad)
            if bad:
                st.problems += bad
                return None
        return bucket

    def _consume_payload_or_void(self, st: _StepState, a: Announced) -> None:
        """Consume the payload; a void seal (the trainer gave the step up)
        is remembered: the next control must be its ABORT."""
        try:
            self._consume_payload(a)
        except StepAbortedError:
            st.voided = a.header.index + 1

    def _finish(self, st: _StepState, header: Header, manifest: bytes) -> EndOfStep:
        summary = wire.decode_end(header, manifest, self.limits)
        got = (st.next_index, st.num_tensors, st.num_bytes)
        want = (summary.num_buckets, summary.num_tensors, summary.num_bytes)
        if got != want or st.announced != st.next_index or (summary.num_buckets > 0 and not st.saw_last):
            raise TruncatedStepError(
                f"step {summary.step}: received (buckets, tensors, bytes)={got}, "
                f"trainer sent {want}{'' if st.saw_last or not summary.num_buckets else ', last bucket missing'}")
        return summary
