"""How a :class:`~.receiver.WeightReceiver` posts the transfers of a bucket.

On CUDA the NCCL receives are queued on the device and the host only waits
for what it must read (header, manifest, seal), so the order in which they
are posted decides how long the wire idles between a bucket's messages:

* the next message's header (fixed size, and a BUCKET is always followed by
  another message of its step) is posted right behind each payload, and at
  the start of a step before the receiver's own bookkeeping;
* a bucket's manifest, payload and the next header are posted together,
  and the manifest is read, validated and checked while the payload arrives
  (:meth:`PostedReceives._recv_early`): without a caller's manifest check,
  or with one when the payload goes into a buffer the receiver already
  holds (nothing is allocated before the check, which is its contract; a
  bucket it rejects is not handed out);
* the seal is read from a pinned host copy queued behind the payload.

On CPU (gloo, whose receives block the host) every transfer is posted when
the host needs it, as the protocol describes.
"""

from __future__ import annotations

import torch

from . import wire
from .received import _Fatal
from .wire import HEADER_SIZE, Header

__all__: list[str] = []


class PostedReceives:
    """Mixed into :class:`~.receiver.WeightReceiver` (CUDA transfer posting)."""

    def _post_payload(self, h: Header, dest: torch.Tensor):
        seal = dest[h.payload_len:]
        try:
            wire.clear_seal(seal)
            self.transport.broadcast(dest)
            return self._post_next_header(seal) if self._prefetch else None
        except BaseException as e:
            raise _Fatal(e) from None

    def _check_seal(self, h: Header, dest: torch.Tensor, ready) -> None:
        if ready is None:
            wire.check_payload_seal(dest[h.payload_len:], h)
        else:
            ready.synchronize()
            wire.check_seal(self._host[HEADER_SIZE:].numpy().tobytes(), h)

    def _recv_early(self, h: Header, fresh: bool) -> tuple[bytes, tuple]:
        """CUDA: post manifest, payload and the next header at once, then read
        the manifest while the payload is on the wire (instead of a host round
        trip between them). Only for a payload within the bucket size agreed at
        the handshake (a buffer this receiver accepted to hold) and without a
        caller's manifest check or with one when the payload goes into a
        buffer already held (the check's contract is to run before the payload
        is allocated); the manifest is validated and checked before anything of
        the payload is handed out, and an invalid one breaks the stream as before."""
        try:
            self._man = self._grow(self._man, max(h.manifest_len, 4096))
            man = self._man[: h.manifest_len]
            man.zero_()
            self.transport.broadcast(man)
            if self._man_host is None or self._man_host.numel() < h.manifest_len:
                self._man_host = None
                self._man_host = torch.empty(max(h.manifest_len, 1 << 20), dtype=torch.uint8, pin_memory=True)
            host = self._man_host[: h.manifest_len]
            host.copy_(man, non_blocking=True)
            man_ready = torch.cuda.Event()
            man_ready.record()
            dest, kept = self._payload_buffer(h, fresh)
        except BaseException as e:
            raise _Fatal(e) from None
        ready = self._post_payload(h, dest)
        man_ready.synchronize()
        return host.numpy().tobytes(), (dest, kept, ready)

    def _post_next_header(self, seal: torch.Tensor):
        """Post the receive of the next message's header right behind a
        payload (a BUCKET is always followed by another message of its step:
        a bucket, END or ABORT, and a header has a fixed size), so that the
        wire goes on with it while the host checks the seal and hands the
        bucket out, instead of idling until the host posts it. Returns the
        event after which the seal's host copy can be read."""
        host = self._host
        host[HEADER_SIZE:].copy_(seal, non_blocking=True)
        seal_ready = torch.cuda.Event()
        seal_ready.record()
        self._post_header()
        return seal_ready

    def _post_header(self) -> None:
        self._hdr.zero_()  # a short transfer must not leave an old valid header behind
        self.transport.broadcast(self._hdr)
        self._host[:HEADER_SIZE].copy_(self._hdr, non_blocking=True)
        self._hdr_ready = torch.cuda.Event()
        self._hdr_ready.record()
