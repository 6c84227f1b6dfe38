"""Bucket payloads: tensor packing on the sender, zero-copy views on the receiver."""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

from .errors import ManifestError
from .framing import ALIGNMENT, FLAG_LAST, ChecksumAlgo, Header, MessageKind, encode_control, encode_header, encode_seal
from .integrity import payload_checksum
from .manifest import DEFAULT_LIMITS, BucketManifest, TensorEntry, WireLimits, dtype_to_str, encode_manifest, validate_name

__all__ = [
    "tensors_from_buffer",
    "plan_offsets",
    "tensor_bytes",
    "tensor_nbytes",
    "pack_into",
    "encode_bucket",
    "bucket_transfers",
]


def tensors_from_buffer(buf: torch.Tensor, manifest: BucketManifest) -> list[tuple[str, torch.Tensor]]:
    """Zero-copy views of ``buf[off:off+n]`` as ``dtype`` and ``shape`` for every
    tensor of a validated manifest. ``buf`` is a 1-D uint8 tensor holding at
    least ``manifest.payload_len`` bytes; the views alias it (contiguous,
    made with one ``as_strided`` each on a per-dtype view of the buffer)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError("payload buffer must be a 1-D uint8 tensor")
    if buf.numel() < manifest.payload_len:
        raise ManifestError(f"buffer holds {buf.numel()} bytes, payload is {manifest.payload_len}")
    if buf.storage_offset() % ALIGNMENT:
        raise ValueError("payload buffer must start at an aligned storage offset")
    typed: dict[torch.dtype, tuple[torch.Tensor, int]] = {}
    strides = _STRIDES
    out = []
    for e in manifest.tensors:
        dt = e.dtype
        hit = typed.get(dt)
        if hit is None:
            isz = dt.itemsize
            b = buf[: buf.numel() // isz * isz].view(dt)
            hit = typed[dt] = (b, b.storage_offset())
        base, boff = hit
        st = strides.get(e.shape)
        if st is None:
            st = _contiguous_strides(e.shape)
            if len(strides) < 4096:
                strides[e.shape] = st
        out.append((e.name, base.as_strided(e.shape, st, boff + e.offset // dt.itemsize)))
    return out


#: contiguous strides per shape: a model has few distinct shapes, and this
#: loop runs once per received tensor (18k+ for a large MoE)
_STRIDES: dict[tuple[int, ...], tuple[int, ...]] = {}


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)


def _align(n: int, a: int = ALIGNMENT) -> int:
    return (n + a - 1) // a * a


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_offsets(tensors: Sequence[tuple[str, torch.Tensor]], start: int = 0) -> tuple[list[TensorEntry], int]:
    """Aligned offsets for ``tensors`` starting at ``start``; returns entries and
    the payload length (end of the last tensor)."""
    entries = []
    end = start
    for name, t in tensors:
        off = _align(end)
        n = tensor_nbytes(t)
        entries.append(TensorEntry(name=name, dtype=t.dtype, shape=tuple(t.shape), offset=off, nbytes=n))
        end = off + n
    return entries, end


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of the bytes of ``t`` (copies only if ``t`` is not contiguous)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def pack_into(buf: torch.Tensor, entry: TensorEntry, t: torch.Tensor, non_blocking: bool = False) -> None:
    """Copy the bytes of ``t`` to ``buf[entry.offset:entry.offset+entry.nbytes]``."""
    if entry.nbytes == 0:
        return
    buf[entry.offset : entry.offset + entry.nbytes].copy_(tensor_bytes(t), non_blocking=non_blocking)


def encode_bucket(
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    step: int,
    index: int = 0,
    last: bool = True,
    layout: dict | None = None,
    checksum: str = "crc32",
    limits: WireLimits = DEFAULT_LIMITS,
) -> tuple[bytes, bytes, torch.Tensor]:
    """Encode one bucket on CPU: returns ``(header, manifest, payload)``.

    Convenience for tests and tools; :class:`~..sender.WeightSender` packs into
    preallocated buffers instead. What goes on the wire for it is
    :func:`bucket_transfers` (the payload transfer carries the seal)."""
    for name, t in tensors:
        validate_name(name, limits)
        dtype_to_str(t.dtype)
    entries, end = plan_offsets(tensors)
    payload = torch.zeros(end, dtype=torch.uint8)
    for e, (_, t) in zip(entries, tensors):
        pack_into(payload, e, t.cpu())
    m = encode_manifest(entries, layout)
    algo = ChecksumAlgo.NAMES[checksum]
    h = Header(kind=MessageKind.BUCKET, step=step, index=index, flags=FLAG_LAST if last else 0, manifest_len=len(m),
               payload_len=end, checksum_algo=algo, payload_checksum=payload_checksum(payload, algo),
               manifest_crc32=zlib.crc32(m))
    return encode_header(h), m, payload


def bucket_transfers(header: Header, manifest: bytes, payload: bytes | torch.Tensor) -> list[bytes]:
    """The two transfers of a BUCKET message: its control block and its
    payload followed by the seal. A conforming sender puts them on the wire
    in the order :func:`step_transfers` gives."""
    if isinstance(payload, torch.Tensor):
        payload = payload.cpu().numpy().tobytes()
    return [encode_control(encode_header(header), bytes(manifest)), bytes(payload) + encode_seal(header)]


def step_transfers(*messages: Sequence[bytes]) -> list[bytes]:
    """The wire order of ``messages`` (each ``[control]`` or ``[control,
    payload]``): a payload goes out right after the next message's control,
    ``C1 C2 P1 C3 P2 ... C_END Pn`` (a last payload with no message after it
    goes last)."""
    out: list[bytes] = []
    owed: list[bytes] = []
    for m in messages:
        out.append(m[0])
        out += owed
        owed = list(m[1:])
    return out + owed
