"""Wire format of the trainer -> receiver weight sync.

Everything here is pure Python + torch and is safe to run on bytes that came
from an untrusted peer: there is no pickle and no eval, every size is checked
against :class:`WireLimits` *before* anything is parsed or allocated, and every
manifest field is type- and range-checked.

One step is a sequence of messages, each broadcast from rank 0 as up to three
transfers::

    header   (fixed HEADER_SIZE bytes)
    manifest (header.manifest_len bytes of UTF-8 JSON)
    payload  (header.payload_len raw bytes; skipped when 0)

Message kinds: ``BUCKET`` (tensors packed into a uint8 payload), ``END``
(end-of-step summary, no payload) and ``ABORT`` (the sender failed mid-step,
no payload).  See ``docs/sync.md`` for the full specification.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "HEADER_SIZE",
    "ALIGNMENT",
    "MessageKind",
    "ChecksumAlgo",
    "FLAG_LAST",
    "WireLimits",
    "Header",
    "TensorEntry",
    "BucketManifest",
    "EndOfStep",
    "WireError",
    "BadMagicError",
    "VersionMismatchError",
    "HeaderError",
    "ManifestError",
    "LimitExceededError",
    "ChecksumError",
    "TruncatedStepError",
    "ProtocolError",
    "StepAbortedError",
    "ReceiverBrokenError",
    "DTYPES",
    "dtype_to_str",
    "str_to_dtype",
    "validate_name",
    "encode_header",
    "decode_header",
    "encode_manifest",
    "decode_bucket_manifest",
    "ManifestCache",
    "encode_end",
    "decode_end",
    "encode_abort",
    "decode_abort",
    "payload_checksum",
    "tensors_from_buffer",
    "plan_offsets",
    "pack_into",
    "encode_bucket",
]

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: First bytes of every header. The leading non-ASCII byte makes a text or
#: JSON peer fail the magic check immediately.
MAGIC = b"\x89VF8"
#: Bumped on any incompatible change; receivers accept exactly this version.
PROTOCOL_VERSION = 1
#: Fixed size of the binary header in bytes.
HEADER_SIZE = 64
#: Sender-side alignment of tensor offsets inside a bucket payload. The
#: decoder only requires ``offset % itemsize == 0`` (needed for ``.view``).
ALIGNMENT = 64

# <  little endian, no implicit padding
#   4s magic | H version | H kind | I flags | q step | I index
#   H checksum_algo | H reserved | I manifest_len | Q payload_len
#   I payload_checksum | I manifest_crc32 | 12x reserved | I header_crc32
_HEADER_STRUCT = struct.Struct("<4sHHIqIHHIQII12xI")
assert _HEADER_STRUCT.size == HEADER_SIZE


class MessageKind:
    BUCKET = 1
    END = 2
    ABORT = 3
    ALL = (BUCKET, END, ABORT)


class ChecksumAlgo:
    NONE = 0
    CRC32 = 1
    ALL = (NONE, CRC32)
    NAMES = {"none": NONE, "crc32": CRC32}


#: Header flag: this bucket is the last one of the step.
FLAG_LAST = 0x1
_KNOWN_FLAGS = FLAG_LAST

_INT64_MAX = 2**63 - 1

# Allow-list of tensor dtypes. Keys are the wire strings.
_DTYPE_NAMES = [
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "bfloat16",
    "float16",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
]
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
_DTYPE_TO_STR: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_NAME_RE = re.compile(r"[A-Za-z0-9_.:/\-]+")

if sys.byteorder != "little":  # pragma: no cover - all supported hosts are LE
    raise ImportError("vllm_fp8_overlay.sync requires a little-endian host")


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class WireError(ValueError):
    """Base class of every error raised on malformed or unexpected input."""


class BadMagicError(WireError):
    """The header does not start with :data:`MAGIC`."""


class VersionMismatchError(WireError):
    """The peer speaks a different protocol version."""


class HeaderError(WireError):
    """A header field is invalid (kind, flags, checksum algo, header crc...)."""


class ManifestError(WireError):
    """The manifest is not valid JSON or a field is invalid."""


class LimitExceededError(WireError):
    """A size cap of :class:`WireLimits` would be exceeded."""


class ChecksumError(WireError):
    """Manifest or payload bytes do not match their checksum."""


class TruncatedStepError(WireError):
    """The end-of-step summary does not match what was received."""


class ProtocolError(WireError):
    """Messages arrived in an order the protocol does not allow."""


class StepAbortedError(WireError):
    """The sender aborted the step (its reason is in the message)."""


class ReceiverBrokenError(WireError):
    """The stream can no longer be trusted to be in sync; recreate the group."""


# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WireLimits:
    """Caps enforced by the decoder before parsing / allocating."""

    max_manifest_bytes: int = 8 << 20  # 8 MiB of JSON
    max_tensors_per_bucket: int = 32768
    max_bucket_bytes: int = 64 << 30  # largest single payload (one huge tensor)
    max_dims: int = 8
    max_dim_size: int = 1 << 40
    max_name_len: int = 512
    max_buckets_per_step: int = 1 << 20
    max_reason_len: int = 4096

    def __post_init__(self) -> None:
        for k, v in self.__dict__.items():
            if type(v) is not int or v <= 0:
                raise ValueError(f"WireLimits.{k} must be a positive int, got {v!r}")


DEFAULT_LIMITS = WireLimits()


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def dtype_to_str(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_TO_STR[dtype]
    except KeyError:
        raise ManifestError(f"dtype {dtype} is not allowed on the wire") from None


def str_to_dtype(name: Any) -> torch.dtype:
    if type(name) is not str or name not in DTYPES:
        raise ManifestError(f"dtype {str(name)[:64]!r} is not in the allow-list")
    return DTYPES[name]


def validate_name(name: Any, limits: WireLimits = DEFAULT_LIMITS) -> str:
    if type(name) is not str:
        raise ManifestError(f"tensor name must be a string, got {type(name).__name__}")
    if not 0 < len(name) <= limits.max_name_len:
        raise ManifestError(f"tensor name length {len(name)} outside 1..{limits.max_name_len}")
    if not _NAME_RE.fullmatch(name):
        raise ManifestError(f"tensor name {name[:80]!r} has characters outside [A-Za-z0-9_.:/-]")
    return name


def _is_int(x: Any) -> bool:
    return type(x) is int  # rejects bool and float


def _check_int(x: Any, what: str, lo: int, hi: int) -> int:
    if not _is_int(x):
        raise ManifestError(f"{what} must be an integer, got {type(x).__name__}")
    if not lo <= x <= hi:
        raise ManifestError(f"{what}={x} outside [{lo}, {hi}]")
    return x


def _check_keys(obj: dict, required: Iterable[str], what: str) -> None:
    req = set(required)
    have = set(obj)
    if have != req:
        missing = sorted(req - have)
        extra = sorted(str(k)[:40] for k in have - req)
        raise ManifestError(f"{what}: missing keys {missing}, unknown keys {extra}")


def _no_dup_pairs(pairs: list[tuple[str, Any]]) -> dict:
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise ManifestError(f"duplicate JSON key {k[:40]!r}")
        d[k] = v
    return d


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"non-standard JSON constant {name}")


def _loads(data: bytes | bytearray | memoryview, limits: WireLimits) -> Any:
    if len(data) > limits.max_manifest_bytes:
        raise LimitExceededError(
            f"manifest of {len(data)} bytes exceeds max_manifest_bytes={limits.max_manifest_bytes}"
        )
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_dup_pairs, parse_constant=_reject_constant)
    except WireError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError) as e:
        raise ManifestError(f"manifest is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")


# --------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------


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
        MAGIC,
        h.version,
        h.kind,
        h.flags,
        h.step,
        h.index,
        h.checksum_algo,
        0,
        h.manifest_len,
        h.payload_len,
        h.payload_checksum,
        h.manifest_crc32,
        0,
    )
    crc = zlib.crc32(body[: HEADER_SIZE - 4])
    return body[: HEADER_SIZE - 4] + struct.pack("<I", crc)


def decode_header(data: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> Header:
    """Parse and validate a fixed-size header. Never allocates claimed sizes."""
    data = bytes(data[:HEADER_SIZE]) if len(data) >= HEADER_SIZE else bytes(data)
    if len(data) != HEADER_SIZE:
        raise HeaderError(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
    if data[:4] != MAGIC:
        raise BadMagicError(f"bad magic {data[:4]!r}, expected {MAGIC!r}")
    (
        _magic,
        version,
        kind,
        flags,
        step,
        index,
        algo,
        reserved,
        manifest_len,
        payload_len,
        payload_checksum,
        manifest_crc,
        header_crc,
    ) = _HEADER_STRUCT.unpack(data)
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"peer speaks protocol version {version}, this receiver speaks {PROTOCOL_VERSION}"
        )
    if zlib.crc32(data[: HEADER_SIZE - 4]) != header_crc:
        raise HeaderError("header crc32 mismatch (corrupted header)")
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
        raise LimitExceededError(
            f"manifest_len {manifest_len} exceeds max_manifest_bytes={limits.max_manifest_bytes}"
        )
    if payload_len > limits.max_bucket_bytes:
        raise LimitExceededError(f"payload_len {payload_len} exceeds max_bucket_bytes={limits.max_bucket_bytes}")
    if kind != MessageKind.BUCKET:
        if payload_len or payload_checksum or flags or algo or index:
            raise HeaderError(f"message kind {kind} must not carry payload, flags, checksum or index")
    elif algo == ChecksumAlgo.NONE and payload_checksum != 0:
        raise HeaderError("payload_checksum set without a checksum algorithm")
    return Header(
        kind=kind,
        step=step,
        index=index,
        flags=flags,
        manifest_len=manifest_len,
        payload_len=payload_len,
        checksum_algo=algo,
        payload_checksum=payload_checksum,
        manifest_crc32=manifest_crc,
        version=version,
    )


def check_manifest_crc(header: Header, manifest: bytes | bytearray | memoryview) -> None:
    if len(manifest) != header.manifest_len:
        raise ManifestError(f"manifest is {len(manifest)} bytes, header says {header.manifest_len}")
    if zlib.crc32(manifest) != header.manifest_crc32:
        raise ChecksumError("manifest crc32 mismatch")


# --------------------------------------------------------------------------
# Bucket manifest
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "dtype": dtype_to_str(self.dtype),
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class BucketManifest:
    """Decoded, validated description of one bucket."""

    step: int
    index: int
    last: bool
    payload_len: int
    layout: dict | None
    tensors: tuple[TensorEntry, ...] = field(default_factory=tuple)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


def encode_manifest(entries: Sequence[TensorEntry], layout: dict | None) -> bytes:
    return _dumps({"layout": layout, "tensors": [e.to_json() for e in entries]})


def _entry_from_json(obj: Any, i: int, limits: WireLimits) -> TensorEntry:
    if not isinstance(obj, dict):
        raise ManifestError(f"tensors[{i}] must be an object")
    _check_keys(obj, ("name", "dtype", "shape", "offset", "nbytes"), f"tensors[{i}]")
    name = validate_name(obj["name"], limits)
    dtype = str_to_dtype(obj["dtype"])
    shape = obj["shape"]
    if not isinstance(shape, list):
        raise ManifestError(f"{name}: shape must be a list")
    if len(shape) > limits.max_dims:
        raise LimitExceededError(f"{name}: {len(shape)} dims exceeds max_dims={limits.max_dims}")
    for d in shape:
        _check_int(d, f"{name}: dim", 0, limits.max_dim_size)
    offset = _check_int(obj["offset"], f"{name}: offset", 0, _INT64_MAX)
    nbytes = _check_int(obj["nbytes"], f"{name}: nbytes", 0, _INT64_MAX)
    itemsize = dtype.itemsize
    expected = math.prod(shape) * itemsize  # python ints: no overflow
    if nbytes != expected:
        raise ManifestError(f"{name}: nbytes={nbytes} != numel*itemsize={expected}")
    if offset % itemsize:
        raise ManifestError(f"{name}: offset {offset} not aligned to itemsize {itemsize}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), offset=offset, nbytes=nbytes)


def _decode_manifest_body(
    manifest: bytes | bytearray | memoryview, payload_len: int, limits: WireLimits
) -> tuple[dict | None, tuple[TensorEntry, ...]]:
    """Parse and validate the JSON of a bucket manifest (its crc already checked)."""
    obj = _loads(manifest, limits)
    if not isinstance(obj, dict):
        raise ManifestError("bucket manifest must be a JSON object")
    _check_keys(obj, ("layout", "tensors"), "bucket manifest")
    layout = obj["layout"]
    if layout is not None and not isinstance(layout, dict):
        raise ManifestError("layout must be an object or null")
    tensors = obj["tensors"]
    if not isinstance(tensors, list):
        raise ManifestError("tensors must be a list")
    if len(tensors) > limits.max_tensors_per_bucket:
        raise LimitExceededError(
            f"{len(tensors)} tensors exceeds max_tensors_per_bucket={limits.max_tensors_per_bucket}"
        )
    entries = [_entry_from_json(t, i, limits) for i, t in enumerate(tensors)]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise ManifestError(f"duplicate tensor name {e.name!r} in bucket")
        seen.add(e.name)
        if e.offset + e.nbytes > payload_len:
            raise ManifestError(
                f"{e.name}: bytes [{e.offset}, {e.offset + e.nbytes}) outside payload of {payload_len}"
            )
    end = 0
    prev = None
    for e in sorted(entries, key=lambda e: (e.offset, e.nbytes)):
        if e.nbytes == 0:
            continue
        if e.offset < end:
            raise ManifestError(f"{e.name} overlaps {prev}")
        end = e.offset + e.nbytes
        prev = e.name
    return layout, tuple(entries)


class ManifestCache:
    """Decoded manifests by their exact bytes (and payload length), LRU.

    A trainer that sends the same parameters every step sends byte-identical
    manifests; decoding and validating thousands of entries again each step is
    most of a receiver's host time for MoE models. A hit compares the full
    bytes (dictionary lookup), so a cached result is only ever reused for
    exactly the bytes it was validated from. ``max_bytes`` bounds the manifest
    bytes held.
    """

    def __init__(self, max_entries: int = 4096, max_bytes: int = 256 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[bytes, int], tuple[dict | None, tuple[TensorEntry, ...]]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def decode(
        self, manifest: bytes, payload_len: int, limits: WireLimits
    ) -> tuple[dict | None, tuple[TensorEntry, ...]]:
        key = (bytes(manifest), payload_len)
        got = self._items.get(key)
        if got is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return got
        self.misses += 1
        got = _decode_manifest_body(key[0], payload_len, limits)
        if len(key[0]) <= self.max_bytes:
            self._items[key] = got
            self._bytes += len(key[0])
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                (old, _), _ = self._items.popitem(last=False)
                self._bytes -= len(old)
        return got

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


def decode_bucket_manifest(
    header: Header,
    manifest: bytes | bytearray | memoryview,
    limits: WireLimits = DEFAULT_LIMITS,
    cache: ManifestCache | None = None,
) -> BucketManifest:
    """Validate the manifest bytes of a BUCKET message against its header
    (through ``cache`` when given: identical bytes are decoded once)."""
    if header.kind != MessageKind.BUCKET:
        raise ProtocolError(f"expected a BUCKET message, got kind {header.kind}")
    check_manifest_crc(header, manifest)
    if cache is None:
        layout, entries = _decode_manifest_body(manifest, header.payload_len, limits)
    else:
        layout, entries = cache.decode(manifest, header.payload_len, limits)
    return BucketManifest(
        step=header.step,
        index=header.index,
        last=header.last,
        payload_len=header.payload_len,
        layout=layout,
        tensors=entries,
    )


# --------------------------------------------------------------------------
# End of step / abort
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class EndOfStep:
    step: int
    num_buckets: int
    num_tensors: int
    num_bytes: int  # sum of tensor nbytes (padding excluded)


def encode_end(end: EndOfStep) -> tuple[bytes, bytes]:
    m = _dumps({"num_buckets": end.num_buckets, "num_tensors": end.num_tensors, "num_bytes": end.num_bytes})
    h = Header(kind=MessageKind.END, step=end.step, manifest_len=len(m), manifest_crc32=zlib.crc32(m))
    return encode_header(h), m


def decode_end(header: Header, manifest: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> EndOfStep:
    if header.kind != MessageKind.END:
        raise ProtocolError(f"expected an END message, got kind {header.kind}")
    check_manifest_crc(header, manifest)
    obj = _loads(manifest, limits)
    if not isinstance(obj, dict):
        raise ManifestError("end-of-step manifest must be a JSON object")
    _check_keys(obj, ("num_buckets", "num_tensors", "num_bytes"), "end-of-step")
    return EndOfStep(
        step=header.step,
        num_buckets=_check_int(obj["num_buckets"], "num_buckets", 0, limits.max_buckets_per_step),
        num_tensors=_check_int(obj["num_tensors"], "num_tensors", 0, _INT64_MAX),
        num_bytes=_check_int(obj["num_bytes"], "num_bytes", 0, _INT64_MAX),
    )


def encode_abort(step: int, reason: str, limits: WireLimits = DEFAULT_LIMITS) -> tuple[bytes, bytes]:
    m = _dumps({"reason": str(reason)[: limits.max_reason_len]})
    h = Header(kind=MessageKind.ABORT, step=step, manifest_len=len(m), manifest_crc32=zlib.crc32(m))
    return encode_header(h), m


def decode_abort(header: Header, manifest: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> str:
    if header.kind != MessageKind.ABORT:
        raise ProtocolError(f"expected an ABORT message, got kind {header.kind}")
    check_manifest_crc(header, manifest)
    obj = _loads(manifest, limits)
    if not isinstance(obj, dict):
        raise ManifestError("abort manifest must be a JSON object")
    _check_keys(obj, ("reason",), "abort")
    reason = obj["reason"]
    if type(reason) is not str:
        raise ManifestError("abort reason must be a string")
    return reason[: limits.max_reason_len]


# --------------------------------------------------------------------------
# Payload: checksums, packing, zero-copy decoding
# --------------------------------------------------------------------------


def payload_checksum(buf: torch.Tensor, algo: int) -> int:
    """Checksum of a 1-D uint8 tensor. CUDA tensors are copied to host first
    (that is why the sender defaults to no payload checksum on CUDA)."""
    if algo == ChecksumAlgo.NONE:
        return 0
    if algo != ChecksumAlgo.CRC32:
        raise HeaderError(f"unknown checksum algorithm {algo}")
    if buf.numel() == 0:
        return zlib.crc32(b"")
    host = buf if buf.device.type == "cpu" else buf.cpu()
    return zlib.crc32(host.contiguous().numpy())


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
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = []
    for e in manifest.tensors:
        base = typed.get(e.dtype)
        if base is None:
            isz = e.dtype.itemsize
            base = typed[e.dtype] = buf[: buf.numel() // isz * isz].view(e.dtype)
        off = base.storage_offset() + e.offset // e.dtype.itemsize
        out.append((e.name, base.as_strided(e.shape, _contiguous_strides(e.shape), off)))
    return out


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
    off = start
    end = start
    for name, t in tensors:
        off = _align(end)
        n = tensor_nbytes(t)
        entries.append(TensorEntry(name=name, dtype=t.dtype, shape=tuple(t.shape), offset=off, nbytes=n))
        end = off + n
    return entries, end


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of the bytes of ``t`` (copies only if ``t`` is not
    contiguous)."""
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

    Convenience for tests and tools; :class:`~.sender.WeightSender` packs into
    preallocated buffers instead.
    """
    for name, t in tensors:
        validate_name(name, limits)
        dtype_to_str(t.dtype)
    entries, end = plan_offsets(tensors)
    payload = torch.zeros(end, dtype=torch.uint8)
    for e, (_, t) in zip(entries, tensors):
        pack_into(payload, e, t.cpu())
    m = encode_manifest(entries, layout)
    algo = ChecksumAlgo.NAMES[checksum]
    h = Header(
        kind=MessageKind.BUCKET,
        step=step,
        index=index,
        flags=FLAG_LAST if last else 0,
        manifest_len=len(m),
        payload_len=end,
        checksum_algo=algo,
        payload_checksum=payload_checksum(payload, algo),
        manifest_crc32=zlib.crc32(m),
    )
    return encode_header(h), m, payload
