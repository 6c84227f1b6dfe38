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
from .recvpost import PostedReceives
from .received import (Bucket, DeferredProblems, ManifestCheck, OnBucket, PayloadCheck, ReceivedStep,
                       StepRejectedError, _Fatal, _StepState)
from .transport import DEFAULT_TIMEOUT_S, BroadcastGroup, Transport, TransportError
from .wire import (
    HEADER_SIZE,
    SEAL_SIZE,
    BucketManifest,
    ChecksumAlgo,
    ChecksumError,
    EndOfStep,
    Header,
    LimitExceededError,
    MessageKind,
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
        self._hdr = torch.zeros(HEADER_SIZE, dtype=torch.uint8, device=self.device)
        self._man: torch.Tensor | None = None
        self._init_buffers()
        self.manifest_cache = wire.ManifestCache()
        # CUDA: the next header's receive is posted right behind each payload
        # (see _post_next_header); host copies of seal and header land here
        self._prefetch = self.device.type == "cuda"
        self._host = torch.empty(HEADER_SIZE + SEAL_SIZE, dtype=torch.uint8,
                                 pin_memory=self._prefetch)
        self._hdr_ready = None  # event of the posted header receive, or None
        self._early = self._prefetch  # manifest read while the payload arrives (_recv_early)
        self._man_host: torch.Tensor | None = None  # pinned manifest copy (_recv_early)
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
        self._man = None
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
        self._hdr_ready = None
        self._after_failure()
        try:
            self.transport.close()
        except Exception:  # pragma: no cover - closing a broken group is best effort
            pass

    def _after_failure(self) -> None:
        """Nothing of a failed step stays cached or allocated."""
        self.release_buffers()
        self.manifest_cache.clear()

    def _recv_header(self) -> Header:
        try:
            if self._hdr_ready is not None:  # posted behind the previous payload
                ready, self._hdr_ready = self._hdr_ready, None
                ready.synchronize()
                raw = self._host[:HEADER_SIZE].numpy().tobytes()
            else:
                self._hdr.zero_()  # a short transfer must not leave an old valid header behind
                self.transport.broadcast(self._hdr)
                raw = self._hdr.cpu().numpy().tobytes()
            h = wire.decode_header(raw, self.limits)
            cap = max(self.bucket_bytes, self.limits.max_tensor_bytes)
            if h.payload_len > cap:  # more than any payload this receiver agreed to take
                raise LimitExceededError(f"bucket {h.index} of step {h.step} announces {h.payload_len} payload bytes; "
                                         f"this receiver takes at most {cap} (agreed bucket size "
                                         f"{self.bucket_bytes}, max_tensor_bytes {self.limits.max_tensor_bytes})")
            return h
        except BaseException as e:
            raise _Fatal(e) from None

    def _recv_manifest(self, h: Header) -> bytes:
        try:
            self._man = self._grow(self._man, max(h.manifest_len, 4096))
            man = self._man[: h.manifest_len]
            man.zero_()
            self.transport.broadcast(man)
            return man.cpu().numpy().tobytes()
        except BaseException as e:
            raise _Fatal(e) from None

    def _recv_payload(self, h: Header, dest: torch.Tensor, check: bool) -> None:
        """Receive ``payload || seal`` into ``dest`` (``payload_len + SEAL_SIZE``
        bytes); with ``check`` verify the seal."""
        ready = self._post_payload(h, dest)
        if check:
            self._check_seal(h, dest, ready)

    def _check_usable(self) -> None:
        if self._closed and self._broken is None:
            raise TransportError("receiver is closed")
        if self._broken is not None:
            raise ReceiverBrokenError(f"weight-sync stream is out of sync ({self._broken}); recreate the group")
        if self._busy:
            raise RuntimeError("a step is already being received on this receiver")

    def _iter(self, expected_step: int | None, fresh: bool, check_manifest: ManifestCheck | None = None,
              check_payload: PayloadCheck | None = None, reject_early: bool = False) -> Iterator[Bucket]:
        self._check_usable()
        self._busy = True
        st = _StepState(expected_step)
        ok = False
        try:
            if fresh and self.keep_step_buffers is None and self._auto:
                if self._prefetch:  # the first header's receive goes out before the check
                    try:
                        self._post_header()
                    except BaseException as e:
                        raise _Fatal(e) from None
                self._check_kept()
            while True:
                h = self._recv_header()
                pre = None
                if (self._early and h.kind == MessageKind.BUCKET and not st.problems
                        and h.payload_len <= self.bucket_bytes
                        and (check_manifest is None or self._reuses(h, fresh))):
                    raw, pre = self._recv_early(h, fresh)
                else:
                    raw = self._recv_manifest(h)
                st.check_step(h) if st.step is not None else None
                if h.kind == MessageKind.BUCKET:
                    bucket = self._bucket(st, h, raw, fresh, check_manifest, check_payload, pre)
                    if bucket is not None:
                        yield bucket
                    elif reject_early:
                        raise StepRejectedError(st.step, st.problems)
                    continue
                st.ended = True  # END or ABORT: the step is over on the wire
                st.check_step(h)
                if h.kind == MessageKind.ABORT:
                    raise StepAbortedError(f"trainer aborted step {h.step}: {wire.decode_abort(h, raw, self.limits)}")
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
        except _Fatal as f:
            self._break(f.args[0])
            raise f.args[0] from None
        finally:
            self._busy = False
            if not ok:
                if not st.ended and self._broken is None:
                    self._drain(st)
                self._after_failure()

    def _bucket(self, st: _StepState, h: Header, raw: bytes, fresh: bool, check_manifest: ManifestCheck | None,
                check_payload: PayloadCheck | None, pre: tuple | None = None) -> Bucket | None:
        """Validate a BUCKET message and receive its payload. A manifest that
        fails validation is fatal (the payload's size is then a bare claim:
        no buffer is allocated for it and no receive posted). Otherwise the
        payload is always received: ``None`` when a check rejected the bucket
        (the payload went to scratch), a :class:`WireError` after it was
        consumed for order, seal and checksum errors."""
        try:  # the payload size is trusted only once the manifest accounts for it
            manifest = wire.decode_bucket_manifest(h, raw, self.limits, self.manifest_cache)
            if h.payload_len > self.bucket_bytes and len(manifest.tensors) != 1:
                raise LimitExceededError(f"bucket {h.index}: payload of {h.payload_len} bytes is larger than the "
                                         f"agreed bucket size {self.bucket_bytes} but holds {len(manifest.tensors)} "
                                         "tensors (only a single tensor may travel alone)")
        except BaseException as e:  # no receive is posted for a payload nobody vouches for
            raise _Fatal(e) from None
        error: BaseException | None = None
        problems: list[str] = []
        try:
            if st.step is None:
                st.check_step(h)
            st.check_order(h)
            if check_manifest is not None:
                problems = list(check_manifest(manifest))
        except Exception as e:  # whatever happens, the payload transfer must be consumed
            error = e
        to_scratch = error is not None or bool(problems) or bool(st.problems)
        if pre is not None:  # already received (_recv_early): not handed out if anything is wrong
            dest, kept, ready = pre
            if not to_scratch:
                self._check_seal(h, dest, ready)
        else:
            try:
                dest, kept = (self._scratch_for(h), None) if to_scratch else self._payload_buffer(h, fresh)
            except BaseException as e:  # no buffer: the payload cannot be consumed
                raise _Fatal(e) from None
            self._recv_payload(h, dest, check=not to_scratch)
        if error is not None:
            raise error
        if problems or st.problems:
            st.problems += problems
            names, nbytes = self._summary(manifest)
            st.account(names, nbytes, len(manifest.tensors), manifest.last)
            return None
        payload = dest[: h.payload_len]
        if h.checksum_algo == ChecksumAlgo.NONE:
            if self.require_checksum:
                raise ChecksumError(f"bucket {h.index} carries no payload checksum")
        elif self.verify_checksum:
            got = wire.payload_checksum(payload, h.checksum_algo)
            if got != h.payload_checksum:
                raise ChecksumError(f"payload checksum mismatch in bucket {h.index} of step {h.step}: "
                                    f"got 0x{got:08x}, header says 0x{h.payload_checksum:08x}")
        names, nbytes = self._summary(manifest)
        st.account(names, nbytes, len(manifest.tensors), manifest.last)
        bucket = Bucket(manifest=manifest, tensors=self._tensor_views(payload, kept, manifest, h.index),
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

    def _finish(self, st: _StepState, header: Header, manifest: bytes) -> EndOfStep:
        summary = wire.decode_end(header, manifest, self.limits)
        got = (st.next_index, st.num_tensors, st.num_bytes)
        want = (summary.num_buckets, summary.num_tensors, summary.num_bytes)
        if got != want or (summary.num_buckets > 0 and not st.saw_last):
            raise TruncatedStepError(
                f"step {summary.step}: received (buckets, tensors, bytes)={got}, "
                f"trainer sent {want}{'' if st.saw_last or not summary.num_buckets else ', last bucket missing'}")
        return summary

    def _drain(self, st: _StepState) -> None:
        """Consume the rest of the current step (until END or ABORT) without
        looking at payloads, so the group stays aligned with the trainer. A
        message of another step means this step's end is missing: the
        receiver breaks instead of swallowing the next step."""
        try:
            while True:
                h = self._recv_header()
                self._recv_manifest(h)
                st.check_step(h)
                if h.kind == MessageKind.BUCKET:
                    self._recv_payload(h, self._scratch_for(h), check=False)
                else:
                    return
        except _Fatal as f:
            self._break(f.args[0])
        except Exception as e:  # pragma: no cover - defensive
            self._break(f"drain failed: {e}")
        finally:
            self._scratch = None
