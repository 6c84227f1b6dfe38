"""The order in which a :class:`~.sender.WeightSender` puts messages on the
wire (protocol 3, :mod:`.wire`).

A message's control block (header and manifest, fixed size) goes out first;
the payload a control announces goes out right after the *next* control::

    C1  C2 P1  C3 P2  ...  C_END Pn

so every receiver knows the size of the next payload while the current one
is still on the wire, and posts its receive without a host round trip in
between. The price is on this side: a bucket's payload waits in
:attr:`Outbox._owed` until the next message is announced.

Obligation: once a control announced a payload, that payload is sent, with
exactly the announced size. A sender that gives up (:meth:`Outbox._abort`)
still sends every payload it owes, with a void seal, and an ABORT control in
the place of the next control, so that no receiver waits for a transfer that
never comes and none loads a payload of an aborted step. Posting a transfer
and recording it happen with interrupts held back (:func:`_interrupts_deferred`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import threading
from typing import Callable, Iterator, NamedTuple

import torch

from . import wire
from .sendstate import SendStats, _Slot
from .wire import CONTROL_SIZE, SEAL_SIZE, Header

__all__: list[str] = []

logger = logging.getLogger(__name__)


class _Owed(NamedTuple):
    """A payload announced by a control that is not on the wire yet."""

    slot: _Slot
    transfer: torch.Tensor  # payload || seal
    header: Header
    ready: Callable[[], None] | None  # raises if the payload must not go out (its bucket failed)


class _ControlStage:
    """Memory kept for one bucket slot on CUDA: a pinned host block and a
    device control block, through which each announce stages its control
    (``header || manifest``, zero padded) and its payload's seal.

    Allocating them per bucket cost more host time than anything else in
    an announce (a pinned block for the control, another for the 32-byte
    seal, a device block and its zeroing: 0.1-0.3 ms per bucket on an H200
    host), and the first buckets of a step, whose payloads are small, are
    limited by exactly that host time. Reuse is safe because a slot
    announces again only after :meth:`~.sendstate._Slot.wait`, which orders
    the current stream after the slot's last broadcasts (the device block
    is no longer read), and the host block is rewritten only after the
    copies out of it have run (:attr:`copied`)."""

    def __init__(self, device: torch.device) -> None:
        self.host = torch.empty(CONTROL_SIZE + SEAL_SIZE, dtype=torch.uint8, pin_memory=True)
        self.dev = torch.zeros(CONTROL_SIZE, dtype=torch.uint8, device=device)
        self.used = 0  # bytes of the last control in ``dev``; the rest is zero
        self.copied = torch.cuda.Event()  # recorded after each copy out of ``host``
        self._pending = False
        self._sealed = False  # the seal of the announce under way is staged; its control comes next

    def _host_free(self) -> None:
        """Wait for the copies out of ``host`` of this slot's previous announce.
        Never for the current one's: its copies queue behind the wire's last
        read of the slot (:meth:`~.sendstate._Slot.wait`), and waiting for
        them would keep the host from posting until that payload is through."""
        if self._pending:
            self.copied.synchronize()
            self._pending = False

    def write_seal(self, region: torch.Tensor, seal: bytes) -> None:
        self._host_free()
        ctypes.memmove(self.host.data_ptr() + CONTROL_SIZE, seal, SEAL_SIZE)
        region.copy_(self.host[CONTROL_SIZE:], non_blocking=True)
        self.copied.record()
        self._pending = self._sealed = True

    def control(self, data: bytes) -> torch.Tensor:
        """The device control block holding ``data``, zero padded (after this
        announce's seal, whose bytes lie apart in ``host``)."""
        if not self._sealed:
            self._host_free()
        self._sealed = False
        n = len(data)
        ctypes.memmove(self.host.data_ptr(), data, n)
        if n < self.used:
            self.dev[n:self.used].zero_()
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        self.used = n
        self.copied.record()
        self._pending = True
        return self.dev


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Run the block with SIGINT / SIGTERM held back; their Python handlers
    (``KeyboardInterrupt``) run right after it.

    Posting a transfer and recording it (a control and the payload it now
    owes; a payload and its removal from the owed list) must happen
    together: an interrupt between the two left a transfer on the wire that
    :meth:`Outbox._abort` then sent again, or a payload announced and never
    voided, and the receivers read the rest of the stream out of frame
    (gloo aborts on the size mismatch). Python raises signal exceptions
    only in the main thread, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):  # a Python handler, which could raise in the block
            saved[sig] = signal.signal(sig, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for signum, frame in caught:
            saved[signum](signum, frame)


class Outbox:
    """Mixed into :class:`~.sender.WeightSender`."""

    def _init_outbox(self) -> None:
        self._owed: list[_Owed] = []

    def _send_control(self, header: bytes, manifest: bytes, slot: _Slot, stats: SendStats) -> None:
        """One control transfer: ``header || manifest``, zero padded to
        :data:`~.wire.CONTROL_SIZE` (through the slot's :class:`_ControlStage`
        where it has one)."""
        n = len(header) + len(manifest)
        if n > CONTROL_SIZE:
            raise wire.LimitExceededError(f"manifest of {len(manifest)} bytes does not fit a control block "
                                          f"(at most {wire.MAX_INLINE_MANIFEST})")
        if slot.stage is not None:
            dev = slot.stage.control(header + manifest)
        elif self.device.type == "cuda":
            # one pinned staging block and one non-blocking copy of the used
            # bytes; the padding is zeroed on the device. A pageable copy
            # would block the host until the current stream drains (leaving
            # the wire idle between buckets); the pinned block returns to
            # torch's host allocator only once the copy that reads it has run.
            # (a plain memmove: torch's CPU copy_ of a few hundred KB goes
            # through its intra-op thread pool, measured at 0.3-3.7 ms per
            # call on an H200 host)
            h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            ctypes.memmove(h.data_ptr(), header + manifest, n)
            dev = torch.empty(CONTROL_SIZE, dtype=torch.uint8, device=self.device)
            dev[n:].zero_()
            dev[:n].copy_(h, non_blocking=True)
        else:
            dev = torch.frombuffer(bytearray(wire.encode_control(header, manifest)), dtype=torch.uint8)
            if self.device.type != "cpu":
                dev = dev.to(self.device)
        slot.keepalive.append(dev)
        slot.handles.append(self.transport.broadcast(dev, async_op=True))
        stats.wire_bytes += CONTROL_SIZE

    def _write_seal(self, slot: _Slot, region: torch.Tensor, header: Header, staged: bool) -> None:
        """The payload's seal into ``region``. ``staged``: the caller waited
        for ``slot`` (:meth:`~.sendstate._Slot.wait`) before this announce,
        so its :class:`_ControlStage` may be reused (CUDA)."""
        if staged and self.device.type == "cuda":
            if slot.stage is None:
                slot.stage = _ControlStage(self.device)
            slot.stage.write_seal(region, wire.encode_seal(header))
        else:
            slot.stage = None
            slot.keepalive.append(wire.write_seal(region, header))

    def _announce(self, header: Header, manifest: bytes, slot: _Slot, transfer: torch.Tensor,
                  stats: SendStats, ready: Callable[[], None] | None = None) -> None:
        """Send a bucket's control, then the payload the previous control
        announced; this bucket's payload is owed until the next message."""
        with _interrupts_deferred():
            self._send_control(wire.encode_header(header), manifest, slot, stats)
            self._owed.append(_Owed(slot, transfer, header, ready))
            self._send_owed(1, stats)

    def _send_owed(self, keep: int, stats: SendStats) -> None:
        """Send the owed payloads but the last ``keep``, oldest first."""
        while len(self._owed) > keep:
            o = self._owed[0]
            if o.ready is not None:
                o.ready()  # may raise: the payload stays owed and is voided by _abort
            del self._owed[0]
            o.slot.keepalive.append(o.transfer)
            o.slot.handles.append(self.transport.broadcast(o.transfer, async_op=True))
            stats.wire_bytes += o.transfer.numel()

    def _send_terminal(self, header: bytes, manifest: bytes, slot: _Slot, stats: SendStats) -> None:
        """END: its control, then the last owed payload. The payload is
        checked first: once END is out no ABORT may follow, so a bucket that
        fails its check must fail before."""
        for o in self._owed:
            if o.ready is not None:
                o.ready()  # may raise: _abort then puts its ABORT where END would have gone
        with _interrupts_deferred():
            self._send_control(header, manifest, slot, stats)
            self._send_owed(0, stats)

    def _void_owed(self, owed: list[_Owed], tmp: _Slot) -> None:
        for o in owed:
            tmp.keepalive.append(wire.write_seal(o.transfer[-SEAL_SIZE:], o.header, void=True))
            tmp.keepalive.append(o.transfer)
            tmp.handles.append(self.transport.broadcast(o.transfer, async_op=True))

    def _abort(self, step: int, reason: str) -> None:
        """Tell receivers the step is void so they do not hang: every owed
        payload is sent with a void seal, the ABORT control in the place of
        the next control (after all owed payloads but the newest, whose
        control was the last one sent). Interrupts are held back while the
        transfers are posted, not while they are waited for (a dead peer
        would hold them back for good)."""
        try:
            tmp = _Slot()
            with _interrupts_deferred():
                owed, self._owed = self._owed, []
                self._void_owed(owed[:-1], tmp)
                hdr, man = wire.encode_abort(step, reason, self.limits)
                self._send_control(hdr, man, tmp, SendStats(step=step))
                self._void_owed(owed[-1:], tmp)
            for s in (*self._slots, self._oversize, tmp):
                s.wait()
        except Exception as e:  # the group is gone; nothing more we can do
            self._broken = f"abort of step {step} failed: {e}"
            logger.error("weight sync: could not notify receivers of the aborted step %d: %s", step, e)
