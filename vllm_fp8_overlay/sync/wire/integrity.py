"""Integrity of payload transfers: the seal (always) and checksums (optional).

Every BUCKET payload transfer is ``payload || seal``. The receiver zeroes the
seal's place before posting the receive and compares it afterwards with the
seal it expects for the header it accepted (:func:`check_payload_seal`), so a
transfer that delivered fewer bytes than announced (gloo completes such a
receive and leaves the rest of the buffer as it was) never reaches a loader.
That check reads 32 bytes, on every device, and is never switched off.

A checksum over the whole payload additionally catches corrupted or stale
bytes anywhere in a complete transfer. On CPU buffers the sender computes
crc32 by default. On CUDA buffers crc32 would need a device-to-host copy of
every byte. ``checksum="sum64"`` is the device-side alternative: the
payload's int64 words summed modulo 2**64 and folded to 32 bits, one
reduction that reads each byte once where the payload already is (its cost
against a device copy is in BENCHMARKS.md). It detects any change confined
to one word and any stale/short region whose old and new contents differ in
sum; it does not detect words swapped in place, which neither a short
transfer nor a stale buffer produces. The CUDA default stays the seal alone
(NCCL's links carry their own link-level CRC with retransmission): the
header carries the checksum, so computing it before the header is sent
stalls the quantize/broadcast pipeline (measured in BENCHMARKS.md).
"""

from __future__ import annotations

import zlib

import torch

from .errors import HeaderError
from .framing import SEAL_SIZE, ChecksumAlgo, Header, check_seal, encode_seal, encode_void_seal

__all__ = ["payload_checksum", "sum64", "write_seal", "clear_seal", "check_payload_seal"]


def payload_checksum(buf: torch.Tensor, algo: int) -> int:
    """Checksum of a 1-D uint8 tensor (crc32: CUDA tensors are copied to
    host first; sum64: computed on the tensor's own device)."""
    if algo == ChecksumAlgo.NONE:
        return 0
    if algo == ChecksumAlgo.SUM64:
        return sum64(buf)
    if algo != ChecksumAlgo.CRC32:
        raise HeaderError(f"unknown checksum algorithm {algo}")
    if buf.numel() == 0:
        return zlib.crc32(b"")
    host = buf if buf.device.type == "cpu" else buf.cpu()
    return zlib.crc32(host.contiguous().numpy())


def sum64(buf: torch.Tensor) -> int:
    """``buf``'s little-endian int64 words summed mod 2**64 (a trailing
    partial word zero-padded), folded to 32 bits (``lo ^ hi``) for the
    header. Reduced on ``buf``'s device in its native 64-bit integer
    arithmetic, one read of every byte."""
    n = buf.numel()
    whole = n - n % 8
    total = 0
    if whole:
        body = buf[:whole]
        try:
            words = body.view(torch.int64)
        except RuntimeError:  # storage offset not 8-byte aligned
            words = body.clone().view(torch.int64)
        total = int(words.sum().item())
    if n % 8:
        tail = buf[whole:].cpu().numpy().tobytes() + bytes(8 - n % 8)
        total += int.from_bytes(tail, "little", signed=True)
    total &= 0xFFFFFFFFFFFFFFFF
    return (total ^ (total >> 32)) & 0xFFFFFFFF


def write_seal(region: torch.Tensor, header: Header, void: bool = False) -> torch.Tensor:
    """Write the seal of ``header`` into ``region`` (``SEAL_SIZE`` uint8 bytes
    right after the payload); with ``void`` the seal of a payload the sender
    gave up on. Returns the host tensor the bytes came from, which must stay
    alive until an asynchronous copy to a device has run."""
    seal = encode_void_seal(header) if void else encode_seal(header)
    host = torch.frombuffer(bytearray(seal), dtype=torch.uint8)
    if region.device.type == "cuda":
        host = host.pin_memory()
        region.copy_(host, non_blocking=True)
    else:
        region.copy_(host)
    return host


def clear_seal(region: torch.Tensor) -> None:
    """Zero the seal's place before a receive is posted."""
    region.zero_()


def check_payload_seal(region: torch.Tensor, header: Header) -> None:
    """Raise :class:`ChecksumError` unless ``region`` holds ``header``'s seal."""
    if region.numel() != SEAL_SIZE:
        raise HeaderError(f"seal region must be {SEAL_SIZE} bytes")
    check_seal(region.cpu().numpy().tobytes(), header)
