"""Fixed-size records of the weight-sync protocol: message header, payload
seal and the group handshake.

Why fixed sizes: gloo aborts the *receiving process* (SIGABRT, no Python
exception) when a peer sends more bytes than the receive posted for them, and
with fewer bytes the receive completes with the rest of the buffer unchanged.
So the size of every transfer must be known to both sides before it is sent:

* the handshake records (:class:`Hello`, :class:`Ack`, GO) travel through the
  group's TCP key-value store, not through a collective, and have a layout
  that never changes (a new layout gets a new magic): a peer of another
  protocol version, header size or limits is refused before the process
  group carries a single byte;
* a message's control block (:data:`CONTROL_SIZE` bytes: the 64-byte header,
  then the manifest, zero padded) is the only transfer whose size is a
  protocol constant; its header announces the size of the payload transfer
  that belongs to it;
* every payload transfer ends with a 32-byte seal naming the message, so a
  transfer that delivered fewer bytes than announced (the rest of the buffer
  holding old bytes) is detected without reading the payload.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import BadMagicError, ChecksumError, HeaderError, LimitExceededError, ManifestError, VersionMismatchError

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "HEADER_SIZE",
    "SEAL_SIZE",
    "CONTROL_SIZE",
    "MAX_INLINE_MANIFEST",
    "ALIGNMENT",
    "MessageKind",
    "ChecksumAlgo",
    "FLAG_LAST",
    "Header",
    "encode_header",
    "decode_header",
    "check_manifest_crc",
    "encode_control",
    "decode_control",
    "encode_seal",
    "encode_void_seal",
    "check_seal",
    "HELLO_SIZE",
    "ACK_SIZE",
    "GO_SIZE",
    "Hello",
    "Ack",
    "encode_hello",
    "decode_hello",
    "encode_ack",
    "decode_ack",
    "encode_go",
    "decode_go",
    "BACKEND_CODES",
]

#: First bytes of every header. The leading non-ASCII byte makes a text or
#: JSON peer fail the magic check immediately.
MAGIC = b"\x89VF8"
#: Bumped on any incompatible change; receivers accept exactly this version.
#: 2: every BUCKET payload transfer ends with a seal; layouts have a schema;
#: ``payload_len`` equals the end of the last tensor.
#: 3: header and manifest travel as one fixed-size control block, and a
#: bucket's control goes out one message ahead of its payload (see
#: :mod:`vllm_fp8_overlay.sync.wire`).
PROTOCOL_VERSION = 3
#: Fixed size of the binary header in bytes.
HEADER_SIZE = 64
#: Bytes appended to every BUCKET payload transfer (see :func:`encode_seal`).
SEAL_SIZE = 32
#: Fixed size of every control transfer: header, manifest, zero padding. A
#: manifest must fit in ``CONTROL_SIZE - HEADER_SIZE`` bytes (the sender
#: closes a bucket before its manifest would not); 1 MiB holds the manifest
#: of a 1 GiB bucket of MoE expert weights (about 1,400 entries) several
#: times over and costs a few microseconds on NVLink.
CONTROL_SIZE = 1 << 20
#: The largest manifest a control block carries.
MAX_INLINE_MANIFEST = CONTROL_SIZE - HEADER_SIZE
#: Sender-side alignment of tensor offsets inside a bucket payload. The
#: decoder only requires ``offset % itemsize == 0`` (needed for ``.view``).
ALIGNMENT = 64


class MessageKind:
    BUCKET = 1
    END = 2
    ABORT = 3
    ALL = (BUCKET, END, ABORT)


class ChecksumAlgo:
    NONE = 0
    CRC32 = 1
    #: the payload's little-endian int64 words summed mod 2**64, folded to
    #: 32 bits; computed where the payload lives (one reduction on a GPU)
    SUM64 = 2
    ALL = (NONE, CRC32, SUM64)
    NAMES = {"none": NONE, "crc32": CRC32, "sum64": SUM64}


#: Header flag: this bucket is the last one of the step.
FLAG_LAST = 0x1
_KNOWN_FLAGS = FLAG_LAST

# <  little endian, no implicit padding
#   4s magic | H version | H kind | I flags | q step | I index
#   H checksum_algo | H reserved | I manifest_len | Q payload_len
#   I payload_checksum | I manifest_crc32 | 12x reserved | I header_crc32
_HEADER_STRUCT = struct.Struct("<4sHHIqIHHIQII12xI")
assert _HEADER_STRUCT.size == HEADER_SIZE


@dataclass(frozen=True)
class Header:
    kind: int
    step: int
    index: int = 0
    flags: int = 0
    manifest_len: int = 0
    payload_len: int = 0
    checksum_algo: int = ChecksumAlgo.NONE
    payload_checksum: int = 0
    manifest_crc32: int = 0
    version: int = PROTOCOL_VERSION

    @property
    def last(self) -> bool:
        return bool(self.flags & FLAG_LAST)


def encode_header(h: Header) -> bytes:
    body = _HEADER_STRUCT.pack(
        MAGIC, h.version, h.kind, h.flags, h.step, h.index, h.checksum_algo, 0,
        h.manifest_len, h.payload_len, h.payload_checksum, h.manifest_crc32, 0,
    )
    return body[: HEADER_SIZE - 4] + struct.pack("<I", zlib.crc32(body[: HEADER_SIZE - 4]))


def decode_header(data: bytes | bytearray | memoryview, limits=None) -> Header:
    """Parse and validate a fixed-size header. Never allocates claimed sizes.

    Order of checks: length, magic (a peer that does not speak this protocol
    at all), header crc (corruption: a flipped bit in the version field is
    reported as corruption, not as another version), version, then the
    fields against ``limits`` (a :class:`~.manifest.WireLimits`)."""
    from .manifest import DEFAULT_LIMITS

    limits = DEFAULT_LIMITS if limits is None else limits
    data = bytes(data)
    if len(data) != HEADER_SIZE:
        raise HeaderError(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
    if data[:4] != MAGIC:
        raise BadMagicError(f"bad magic {data[:4]!r}, expected {MAGIC!r}")
    (_magic, version, kind, flags, step, index, algo, reserved, manifest_len, payload_len,
     payload_checksum, manifest_crc, header_crc) = _HEADER_STRUCT.unpack(data)
    if zlib.crc32(data[: HEADER_SIZE - 4]) != header_crc:
        raise HeaderError("header crc32 mismatch (corrupted header)")
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(f"peer speaks protocol version {version}, this receiver speaks {PROTOCOL_VERSION}")
    if kind not in MessageKind.ALL:
        raise HeaderError(f"unknown message kind {kind}")
    if flags & ~_KNOWN_FLAGS:
        raise HeaderError(f"unknown header flags 0x{flags:x}")
    if reserved != 0 or data[48:60] != b"\0" * 12:
        raise HeaderError("reserved header bytes must be zero")
    if algo not in ChecksumAlgo.ALL:
        raise HeaderError(f"unknown checksum algorithm {algo}")
    if step < 0:
        raise HeaderError(f"negative step {step}")
    if index >= limits.max_buckets_per_step:
        raise LimitExceededError(f"bucket index {index} >= max_buckets_per_step={limits.max_buckets_per_step}")
    if manifest_len < 2:
        raise HeaderError(f"manifest_len {manifest_len} too small")
    if manifest_len > limits.max_manifest_bytes:
        raise LimitExceededError(f"manifest_len {manifest_len} exceeds max_manifest_bytes={limits.max_manifest_bytes}")
    if payload_len > max(limits.max_bucket_bytes, limits.max_tensor_bytes):
        raise LimitExceededError(
            f"payload_len {payload_len} exceeds the receiver's limits (max_bucket_bytes={limits.max_bucket_bytes}, "
            f"max_tensor_bytes={limits.max_tensor_bytes})")
    if kind != MessageKind.BUCKET:
        if payload_len or payload_checksum or flags or algo or index:
            raise HeaderError(f"message kind {kind} must not carry payload, flags, checksum or index")
    elif algo == ChecksumAlgo.NONE and payload_checksum != 0:
        raise HeaderError("payload_checksum set without a checksum algorithm")
    return Header(kind=kind, step=step, index=index, flags=flags, manifest_len=manifest_len,
                  payload_len=payload_len, checksum_algo=algo, payload_checksum=payload_checksum,
                  manifest_crc32=manifest_crc, version=version)


def check_manifest_crc(header: Header, manifest: bytes | bytearray | memoryview) -> None:
    if len(manifest) != header.manifest_len:
        raise ManifestError(f"manifest is {len(manifest)} bytes, header says {header.manifest_len}")
    if zlib.crc32(manifest) != header.manifest_crc32:
        raise ChecksumError("manifest crc32 mismatch")


def encode_control(header: bytes, manifest: bytes) -> bytes:
    """The control transfer of a message: ``header || manifest``, zero padded
    to :data:`CONTROL_SIZE`."""
    n = len(header) + len(manifest)
    if len(header) != HEADER_SIZE or n > CONTROL_SIZE:
        raise LimitExceededError(f"manifest of {len(manifest)} bytes does not fit a control block "
                                 f"(at most {MAX_INLINE_MANIFEST})")
    return header + manifest + bytes(CONTROL_SIZE - n)


def decode_control(data: bytes | bytearray | memoryview, limits=None) -> tuple[Header, bytes]:
    """``(header, manifest bytes)`` of a control transfer; the manifest's crc
    is checked here, its content by the decoder of its kind."""
    if len(data) != CONTROL_SIZE:
        raise HeaderError(f"control block must be {CONTROL_SIZE} bytes, got {len(data)}")
    h = decode_header(data[:HEADER_SIZE], limits)
    if h.manifest_len > MAX_INLINE_MANIFEST:
        raise LimitExceededError(f"manifest_len {h.manifest_len} exceeds the control block "
                                 f"({MAX_INLINE_MANIFEST} bytes)")
    manifest = bytes(data[HEADER_SIZE: HEADER_SIZE + h.manifest_len])
    check_manifest_crc(h, manifest)
    return h, manifest


# --------------------------------------------------------------------------
# Payload seal
# --------------------------------------------------------------------------

_SEAL_MAGIC = b"VF8S"
#: A payload the sender gave up on (its step is aborted; the ABORT control
#: follows): the transfer still has the announced size, its bytes mean nothing.
_VOID_MAGIC = b"VF8V"
# 4s magic | I index | q step | Q payload_len | I manifest_crc32 | I seal crc32
_SEAL_STRUCT = struct.Struct("<4sIqQII")
assert _SEAL_STRUCT.size == SEAL_SIZE


def encode_seal(h: Header) -> bytes:
    """The 32 bytes that follow the payload in the same transfer.

    They name the message (step, bucket index, payload length, manifest crc),
    so a receiver that zeroed the seal's place before the receive knows that
    the sender's transfer reached its last byte: a short transfer leaves the
    zeros (or, for a reused buffer, never the seal of *this* message). This
    is the byte-count check of every payload, on every device; it costs one
    32-byte read, not a pass over the payload."""
    body = _SEAL_STRUCT.pack(_SEAL_MAGIC, h.index, h.step, h.payload_len, h.manifest_crc32, 0)
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def encode_void_seal(h: Header) -> bytes:
    """The seal of a payload the sender voided (see :data:`_VOID_MAGIC`)."""
    return _VOID_MAGIC + encode_seal(h)[4:]


def check_seal(data: bytes | bytearray | memoryview, h: Header) -> None:
    data = bytes(data)
    if data[:4] == _VOID_MAGIC and data == encode_void_seal(h):
        from .errors import StepAbortedError

        raise StepAbortedError(f"trainer voided bucket {h.index} of step {h.step} (the step is aborted)")
    if data != encode_seal(h):
        raise ChecksumError(
            f"payload seal of bucket {h.index} of step {h.step} missing or wrong: the transfer did not deliver "
            f"the {h.payload_len} announced bytes (a short or stale transfer)")


# --------------------------------------------------------------------------
# Handshake records (through the TCP store, before any collective)
# --------------------------------------------------------------------------

#: Layout version of the handshake records themselves. It never changes: a
#: different layout would use different magics, so a peer of any version can
#: read enough of a record to refuse it with a reason.
_HELLO_FORMAT = 1
HELLO_SIZE = 128
ACK_SIZE = 256
GO_SIZE = 16
BACKEND_CODES = {"gloo": 1, "nccl": 2}
_BACKEND_NAMES = {v: k for k, v in BACKEND_CODES.items()}
_REASON_LEN = 192

# 4s magic | H format | H wire version | H header size | H seal size | B backend | B flags | H reserved
# I world size | 16s group id | Q bucket bytes | Q max manifest | Q max tensor bytes | I max tensors/bucket
# H max dims | H reserved | 56x | I crc
_HELLO_STRUCT = struct.Struct("<4sHHHHBBHI16sQQQIHH56xI")
# 4s magic | H format | H wire version | I rank | B status | 3x | Q max bucket | Q max tensor | Q max manifest
# I max tensors/bucket | H max dims | H reserved | 192s reason | 12x | I crc
_ACK_STRUCT = struct.Struct("<4sHHIB3xQQQIHH192s12xI")
_GO_STRUCT = struct.Struct("<4sII4x")
assert _HELLO_STRUCT.size == HELLO_SIZE and _ACK_STRUCT.size == ACK_SIZE and _GO_STRUCT.size == GO_SIZE


@dataclass(frozen=True)
class Hello:
    """What rank 0 announces: its protocol, framing and the largest bucket it sends."""

    world_size: int
    group_id: bytes
    backend: str
    bucket_bytes: int
    max_manifest_bytes: int
    max_tensor_bytes: int
    max_tensors_per_bucket: int
    max_dims: int
    wire_version: int = PROTOCOL_VERSION
    header_size: int = HEADER_SIZE
    seal_size: int = SEAL_SIZE


@dataclass(frozen=True)
class Ack:
    """A receiver's answer: accepted (with its limits) or refused (with a reason)."""

    rank: int
    accepted: bool
    max_bucket_bytes: int = 0
    max_tensor_bytes: int = 0
    max_manifest_bytes: int = 0
    max_tensors_per_bucket: int = 0
    max_dims: int = 0
    reason: str = ""
    wire_version: int = PROTOCOL_VERSION


def _with_crc(body: bytes) -> bytes:
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def _check_record(data: bytes, size: int, magic: bytes, what: str) -> bytes:
    data = bytes(data)
    if len(data) != size:
        raise HeaderError(f"{what} must be {size} bytes, got {len(data)}")
    if data[:4] != magic:
        raise BadMagicError(f"{what}: bad magic {data[:4]!r}")
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise HeaderError(f"{what}: crc32 mismatch")
    if struct.unpack_from("<H", data, 4)[0] != _HELLO_FORMAT:
        raise VersionMismatchError(f"{what}: unknown handshake format {struct.unpack_from('<H', data, 4)[0]}")
    return data


def encode_hello(h: Hello) -> bytes:
    if len(h.group_id) != 16:
        raise ValueError("group_id must be 16 bytes")
    return _with_crc(_HELLO_STRUCT.pack(
        b"VF8H", _HELLO_FORMAT, h.wire_version, h.header_size, h.seal_size, BACKEND_CODES[h.backend], 0, 0,
        h.world_size, h.group_id, h.bucket_bytes, h.max_manifest_bytes, h.max_tensor_bytes,
        h.max_tensors_per_bucket, h.max_dims, 0, 0))


def decode_hello(data: bytes) -> Hello:
    data = _check_record(data, HELLO_SIZE, b"VF8H", "hello")
    (_, _, wire_version, header_size, seal_size, backend, _flags, _r, world_size, group_id, bucket_bytes,
     max_manifest, max_tensor, max_tensors, max_dims, _r2, _crc) = _HELLO_STRUCT.unpack(data)
    if backend not in _BACKEND_NAMES:
        raise HeaderError(f"hello: unknown backend code {backend}")
    return Hello(world_size=world_size, group_id=group_id, backend=_BACKEND_NAMES[backend], bucket_bytes=bucket_bytes,
                 max_manifest_bytes=max_manifest, max_tensor_bytes=max_tensor, max_tensors_per_bucket=max_tensors,
                 max_dims=max_dims, wire_version=wire_version, header_size=header_size, seal_size=seal_size)


def encode_ack(a: Ack) -> bytes:
    reason = a.reason.encode("utf-8", "replace")[:_REASON_LEN]
    return _with_crc(_ACK_STRUCT.pack(
        b"VF8A", _HELLO_FORMAT, a.wire_version, a.rank, 0 if a.accepted else 1, a.max_bucket_bytes,
        a.max_tensor_bytes, a.max_manifest_bytes, a.max_tensors_per_bucket, a.max_dims, 0, reason, 0))


def decode_ack(data: bytes) -> Ack:
    data = _check_record(data, ACK_SIZE, b"VF8A", "ack")
    (_, _, wire_version, rank, status, max_bucket, max_tensor, max_manifest, max_tensors, max_dims, _r, reason,
     _crc) = _ACK_STRUCT.unpack(data)
    if status not in (0, 1):
        raise HeaderError(f"ack: unknown status {status}")
    return Ack(rank=rank, accepted=status == 0, max_bucket_bytes=max_bucket, max_tensor_bytes=max_tensor,
               max_manifest_bytes=max_manifest, max_tensors_per_bucket=max_tensors, max_dims=max_dims,
               reason=reason.rstrip(b"\0").decode("utf-8", "replace"), wire_version=wire_version)


def encode_go(go: bool) -> bytes:
    return _with_crc(_GO_STRUCT.pack(b"VF8G", _HELLO_FORMAT, 0 if go else 1))


def decode_go(data: bytes) -> bool:
    data = bytes(data)
    if len(data) != GO_SIZE or data[:4] != b"VF8G" or zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise HeaderError("go record malformed")
    _, fmt, status = struct.unpack_from("<4sII", data)
    if fmt != _HELLO_FORMAT or status not in (0, 1):
        raise HeaderError("go record malformed")
    return status == 0
