"""How a :class:`~.receiver.WeightReceiver` posts and consumes the transfers
of a step (protocol 3, see :mod:`.wire`): ``C1 C2 P1 C3 P2 ... C_END Pn``.

Reading control ``C_j`` tells the receiver everything the wire owes next:
bucket ``j-1``'s payload (already posted), then ``C_(j+1)`` (fixed size),
then bucket ``j``'s payload (its size is in ``C_j``). Both are posted at
once, before the receiver waits for payload ``j-1``, so on CUDA the wire goes
from one payload to the next without waiting for the host. Every posted or
owed transfer is kept, in wire order, in ``_pend``; whatever happens, the
rest of a step is consumed in that order (:meth:`PostedReceives._drain`), so
the receiver never posts a receive of a size the trainer did not announce.

On CUDA the host reads only what it must (controls and seals), from pinned
copies queued behind the receives (a control's on a copy stream of its own:
on the receiving stream its 1 MiB copy would sit between the control and
the payload posted behind it). On CPU (gloo, whose receives block) every
post is the receive itself, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch

from . import wire
from .received import _Fatal
from .wire import CONTROL_SIZE, HEADER_SIZE, SEAL_SIZE, Header, MessageKind

__all__: list[str] = []

#: markers of a control transfer in ``_pend``: posted, or owed and not posted yet
CONTROL = "control"
OWED_CONTROL = "owed control"


class Announced:
    """A bucket whose control was read: where its payload goes, and what the
    receiver already knows about it."""

    __slots__ = ("header", "manifest", "dest", "kept", "to_scratch", "error", "problems", "ready", "posted")

    def __init__(self, header: Header, manifest: Any) -> None:
        self.header = header
        self.manifest = manifest
        self.dest: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        self.to_scratch = False
        self.error: BaseException | None = None
        self.problems: list[str] = []
        self.ready: Any = None  # CUDA: event after which the seal's pinned copy can be read
        self.posted = False


class PostedReceives:
    """Mixed into :class:`~.receiver.WeightReceiver` (posting and draining)."""

    def _init_posting(self) -> None:
        self._cuda = self.device.type == "cuda"
        self._ctl = torch.zeros(CONTROL_SIZE, dtype=torch.uint8, device=self.device)
        self._ctl_host = torch.empty(CONTROL_SIZE, dtype=torch.uint8, pin_memory=self._cuda)
        self._ctl_ready: Any = None
        # CUDA: the control's host copy runs on its own stream, so that the
        # payload posted right behind the control does not wait for it
        self._copy_stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        # two payloads may be posted at once (bucket j-1 and bucket j)
        self._seal_host = [torch.empty(SEAL_SIZE, dtype=torch.uint8, pin_memory=self._cuda) for _ in range(2)]
        self._pend: list = []  # posted or owed transfers, in wire order: CONTROL or Announced

    # ------------------------------------------------------------- controls

    def _post_control(self) -> None:
        """Post the next control's receive (the caller records it in ``_pend``)."""
        try:
            self._ctl[:HEADER_SIZE].zero_()  # a short transfer must not leave an old valid header behind
            self.transport.broadcast(self._ctl)
            if self._cuda:
                arrived = torch.cuda.Event()
                arrived.record()  # the current stream follows the receive
                cs = self._copy_stream
                cs.wait_event(arrived)
                with torch.cuda.stream(cs):
                    self._ctl_host.copy_(self._ctl, non_blocking=True)
                    self._ctl_ready = torch.cuda.Event()
                    self._ctl_ready.record(cs)
        except BaseException as e:
            raise _Fatal(e) from None

    def _read_control(self) -> tuple[Header, bytes]:
        """The next control (posted earlier): header and manifest bytes."""
        assert self._pend and self._pend[0] is CONTROL
        del self._pend[0]
        try:
            if self._cuda:
                ready, self._ctl_ready = self._ctl_ready, None
                ready.synchronize()
                raw = self._ctl_host.numpy()
            else:
                raw = self._ctl.numpy()
            h, man = wire.decode_control(raw, self.limits)
            cap = max(self.bucket_bytes, self.limits.max_tensor_bytes)
            if h.payload_len > cap:  # more than any payload this receiver agreed to take
                raise wire.LimitExceededError(
                    f"bucket {h.index} of step {h.step} announces {h.payload_len} payload bytes; this receiver "
                    f"takes at most {cap} (agreed bucket size {self.bucket_bytes}, max_tensor_bytes "
                    f"{self.limits.max_tensor_bytes})")
            return h, man
        except BaseException as e:
            raise _Fatal(e) from None

    # ------------------------------------------------------------- payloads

    def _post_payload(self, a: Announced, fresh: bool) -> None:
        """Post bucket ``a``'s payload: into scratch when nobody will read it,
        else into the buffer it is handed out in."""
        h = a.header
        try:
            if a.to_scratch:
                a.dest, a.kept = self._scratch_for(h), None
            else:
                a.dest, a.kept = self._payload_buffer(h, fresh)
            seal = a.dest[h.payload_len:]
            wire.clear_seal(seal)
            self.transport.broadcast(a.dest)
            if self._cuda and not a.to_scratch:
                host = self._seal_host[h.index % 2]
                host.copy_(seal, non_blocking=True)
                a.ready = torch.cuda.Event()
                a.ready.record()
        except BaseException as e:
            raise _Fatal(e) from None
        a.posted = True

    def _consume_payload(self, a: Announced) -> None:
        """Bucket ``a``'s payload arrived; checks its seal unless it went to scratch."""
        assert self._pend and self._pend[0] is a
        del self._pend[0]
        if a.to_scratch:
            return
        h = a.header
        if self._cuda:
            try:
                a.ready.synchronize()
            except BaseException as e:
                raise _Fatal(e) from None
            wire.check_seal(self._seal_host[h.index % 2].numpy().tobytes(), h)
        else:
            wire.check_payload_seal(a.dest[h.payload_len:], h)

    # ---------------------------------------------------------------- drain

    def _drain(self, st) -> None:
        """Consume the rest of the current step in wire order (until every
        owed transfer of it arrived and a terminal control was read) without
        looking at payloads, so the group stays aligned with the trainer. A
        message of another step means this step's end is missing: the
        receiver breaks instead of swallowing the next step."""
        try:
            while self._pend:
                item = self._pend[0]
                if item is OWED_CONTROL:  # posted only now: on gloo a post is the receive itself
                    self._post_control()
                    self._pend[0] = CONTROL
                    continue
                if item is CONTROL:
                    h, _ = self._read_control()
                    st.check_step(h)
                    if h.kind == MessageKind.BUCKET:
                        a = Announced(h, None)
                        a.to_scratch = True
                        self._pend += [OWED_CONTROL, a]
                    continue
                if not item.posted:
                    item.to_scratch = True
                    self._post_payload(item, fresh=False)
                del self._pend[0]
                if self._cuda and item.ready is not None:
                    item.ready.synchronize()
        except _Fatal as f:
            self._break(f.args[0])
        except Exception as e:  # pragma: no cover - defensive
            self._break(f"drain failed: {e}")
        except BaseException as e:  # an interrupt: where the drain stood is unknown
            self._break(e)
            raise
        finally:
            self._pend = []
            self._scratch = None
