"""Manifests: the JSON that says what a bucket payload holds, and its limits.

Safe to run on bytes from an untrusted peer: no pickle and no eval, the JSON
parser rejects duplicate keys and non-standard constants, every key set is
exact, every number is type- and range-checked, and the layout has a schema
(bounded lists of bounded strings) so that a small manifest cannot decode
into a large object graph.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .errors import LimitExceededError, ManifestError, ProtocolError
from .framing import Header, MessageKind, check_manifest_crc, encode_header

__all__ = [
    "WireLimits",
    "DEFAULT_LIMITS",
    "DTYPES",
    "dtype_to_str",
    "str_to_dtype",
    "validate_name",
    "validate_layout",
    "TensorEntry",
    "BucketManifest",
    "encode_manifest",
    "decode_bucket_manifest",
    "ManifestCache",
    "EndOfStep",
    "encode_end",
    "decode_end",
    "encode_abort",
    "decode_abort",
]

_INT64_MAX = 2**63 - 1

# Allow-list of tensor dtypes. Keys are the wire strings.
_DTYPE_NAMES = [
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "bfloat16", "float16", "float32", "float64",
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool",
]
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
_DTYPE_TO_STR: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_NAME_RE = re.compile(r"[A-Za-z0-9_.:/\-]+")


@dataclass(frozen=True)
class WireLimits:
    """Caps enforced by the decoder before parsing / allocating.

    ``max_bucket_bytes`` bounds a payload of several tensors,
    ``max_tensor_bytes`` a payload that carries one tensor larger than a
    bucket (the sender sends those alone). A receiver that knows what it
    serves sets the latter to its largest tensor, so that no claim of a peer
    can make it allocate more than a real update needs."""

    max_manifest_bytes: int = 8 << 20  # 8 MiB of JSON
    max_tensors_per_bucket: int = 32768
    max_bucket_bytes: int = 64 << 30
    max_tensor_bytes: int = 64 << 30
    max_dims: int = 8
    max_dim_size: int = 1 << 40
    max_name_len: int = 512
    max_buckets_per_step: int = 1 << 20
    max_reason_len: int = 4096
    max_layout_items: int = 65536  # entries of the layout's ignore / targets lists

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


def _check_int(x: Any, what: str, lo: int, hi: int) -> int:
    if type(x) is not int:  # rejects bool and float
        raise ManifestError(f"{what} must be an integer, got {type(x).__name__}")
    if not lo <= x <= hi:
        raise ManifestError(f"{what}={str(x)[:40]} outside [{lo}, {hi}]")
    return x


def _check_keys(obj: dict, required: Iterable[str], what: str) -> None:
    req = set(required)
    have = set(obj)
    if have != req:
        missing = sorted(req - have)
        extra = sorted(str(k)[:40] for k in have - req)[:10]
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
        raise LimitExceededError(f"manifest of {len(data)} bytes exceeds max_manifest_bytes={limits.max_manifest_bytes}")
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_dup_pairs, parse_constant=_reject_constant)
    except ManifestError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, OverflowError) as e:
        raise ManifestError(f"manifest is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None


def dumps(obj: Any) -> bytes:
    """Canonical compact JSON (what every encoder of this package writes)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")


# --------------------------------------------------------------------------
# Layout schema
# --------------------------------------------------------------------------

_LAYOUT_STR_KEYS = {"method": 64, "strategy": 64, "scale_name": 128}
_LAYOUT_KEYS = ("method", "strategy", "block_size", "scale_name", "ignore", "targets", "activation_dynamic",
                "ct_format", "hidden_size", "kv_cache_scheme")
_MAX_LAYOUT_STR = 1024


def _check_str(x: Any, what: str, max_len: int) -> str:
    if type(x) is not str or len(x) > max_len:
        raise ManifestError(f"{what} must be a string of at most {max_len} characters")
    return x


def _check_scalar(x: Any, what: str) -> None:
    if x is None or type(x) in (bool, int):
        if type(x) is int:
            _check_int(x, what, -_INT64_MAX, _INT64_MAX)
        return
    if type(x) is float:
        if not math.isfinite(x):
            raise ManifestError(f"{what} must be finite")
        return
    _check_str(x, what, 256)


def validate_layout(layout: Any, limits: WireLimits = DEFAULT_LIMITS) -> dict | None:
    """Check a manifest's ``layout`` against its schema (``FP8Layout.to_dict()``
    shape: exact keys, bounded lists of bounded strings, a flat
    ``kv_cache_scheme``). Returns it unchanged; raises :class:`ManifestError`."""
    if layout is None:
        return None
    if not isinstance(layout, dict):
        raise ManifestError("layout must be an object or null")
    _check_keys(layout, _LAYOUT_KEYS, "layout")
    for k, n in _LAYOUT_STR_KEYS.items():
        _check_str(layout[k], f"layout.{k}", n)
    bs = layout["block_size"]
    if bs is not None:
        if not isinstance(bs, list) or len(bs) != 2:
            raise ManifestError("layout.block_size must be null or two integers")
        for b in bs:
            _check_int(b, "layout.block_size", 1, 1 << 31)
    for k in ("ignore", "targets"):
        v = layout[k]
        if not isinstance(v, list) or len(v) > limits.max_layout_items:
            raise ManifestError(f"layout.{k} must be a list of at most {limits.max_layout_items} strings")
        for s in v:
            _check_str(s, f"layout.{k}[]", _MAX_LAYOUT_STR)
    if type(layout["activation_dynamic"]) is not bool:
        raise ManifestError("layout.activation_dynamic must be a boolean")
    if layout["ct_format"] is not None:
        _check_str(layout["ct_format"], "layout.ct_format", 64)
    if layout["hidden_size"] is not None:
        _check_int(layout["hidden_size"], "layout.hidden_size", 1, 1 << 31)
    kv = layout["kv_cache_scheme"]
    if kv is not None:
        if not isinstance(kv, dict) or len(kv) > 64:
            raise ManifestError("layout.kv_cache_scheme must be null or an object of at most 64 keys")
        for k, v in kv.items():
            _check_str(k, "layout.kv_cache_scheme key", 64)
            if isinstance(v, list):
                if len(v) > 64:
                    raise ManifestError("layout.kv_cache_scheme lists hold at most 64 items")
                for x in v:
                    _check_scalar(x, f"layout.kv_cache_scheme.{k}[]")
            else:
                _check_scalar(v, f"layout.kv_cache_scheme.{k}")
    return layout


def _layout_cost(layout: dict | None) -> int:
    """Rough bytes the decoded layout holds (for the cache's accounting)."""
    if layout is None:
        return 0
    return 2048 + sum(64 + len(s) for k in ("ignore", "targets") for s in layout[k]) + 96 * len(
        layout["kv_cache_scheme"] or {})


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
        return {"name": self.name, "dtype": dtype_to_str(self.dtype), "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes}


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
    return dumps({"layout": layout, "tensors": [e.to_json() for e in entries]})


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
    # A zero-element tensor still gets strides from its other dims: bound them
    # as if the tensor were full, or torch overflows building the view later.
    span = math.prod(max(d, 1) for d in shape) * itemsize
    if span > max(limits.max_bucket_bytes, limits.max_tensor_bytes):
        raise LimitExceededError(f"{name}: shape {shape} spans {span} bytes (limits: max_bucket_bytes="
                                 f"{limits.max_bucket_bytes}, max_tensor_bytes={limits.max_tensor_bytes})")
    expected = math.prod(shape) * itemsize  # python ints: no overflow
    if nbytes != expected:
        raise ManifestError(f"{name}: nbytes={nbytes} != numel*itemsize={expected}")
    if offset % itemsize:
        raise ManifestError(f"{name}: offset {offset} not aligned to itemsize {itemsize}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), offset=offset, nbytes=nbytes)


def _decode_manifest_body(
    manifest: bytes | bytearray | memoryview, payload_len: int, limits: WireLimits
) -> tuple[dict | None, tuple[TensorEntry, ...]]:
    """Parse and validate the JSON of a bucket manifest (its crc already checked).

    ``payload_len`` must equal the end of the last tensor: a peer cannot make
    the receiver allocate (and checksum) bytes no tensor occupies."""
    obj = _loads(manifest, limits)
    if not isinstance(obj, dict):
        raise ManifestError("bucket manifest must be a JSON object")
    _check_keys(obj, ("layout", "tensors"), "bucket manifest")
    layout = validate_layout(obj["layout"], limits)
    tensors = obj["tensors"]
    if not isinstance(tensors, list):
        raise ManifestError("tensors must be a list")
    if len(tensors) > limits.max_tensors_per_bucket:
        raise LimitExceededError(f"{len(tensors)} tensors exceeds max_tensors_per_bucket={limits.max_tensors_per_bucket}")
    entries = [_entry_from_json(t, i, limits) for i, t in enumerate(tensors)]
    seen: set[str] = set()
    extent = 0
    for e in entries:
        if e.name in seen:
            raise ManifestError(f"duplicate tensor name {e.name!r} in bucket")
        seen.add(e.name)
        if e.offset + e.nbytes > payload_len:
            raise ManifestError(f"{e.name}: bytes [{e.offset}, {e.offset + e.nbytes}) outside payload of {payload_len}")
        extent = max(extent, e.offset + e.nbytes)
    if extent != payload_len:
        raise ManifestError(f"payload_len {payload_len} != end of the last tensor {extent}")
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


def _manifest_cost(raw: bytes, layout: dict | None, entries: tuple[TensorEntry, ...]) -> int:
    """Bytes a cached manifest holds: its raw bytes (the key) plus an upper
    estimate of the decoded objects (measured at about 350 bytes of Python
    objects per entry plus its name and shape)."""
    return len(raw) + _layout_cost(layout) + sum(400 + len(e.name) + 8 * len(e.shape) for e in entries)


class ManifestCache:
    """Decoded manifests by their exact bytes (and payload length), LRU.

    A trainer that sends the same parameters every step sends byte-identical
    manifests; decoding and validating thousands of entries again each step
    is most of a receiver's host time for MoE models. A hit compares the full
    bytes (dictionary lookup), so a cached result is only reused for exactly
    the bytes it was validated from. ``max_bytes`` bounds the *decoded* size
    (raw bytes plus an estimate of the Python objects), not only the raw
    bytes: a receiver clears the cache when a step fails and on close."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 64 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[dict | None, tuple[TensorEntry, ...], int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def decode(self, manifest: bytes, payload_len: int, limits: WireLimits) -> tuple[dict | None, tuple[TensorEntry, ...]]:
        raw = bytes(manifest)
        key = (raw, payload_len, limits)
        got = self._items.get(key)
        if got is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return got[0], got[1]
        self.misses += 1
        layout, entries = _decode_manifest_body(raw, payload_len, limits)
        cost = _manifest_cost(raw, layout, entries)
        if cost <= self.max_bytes:
            self._items[key] = (layout, entries, cost)
            self.bytes += cost
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, _, c) = self._items.popitem(last=False)
                self.bytes -= c
        return layout, entries

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


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
    return BucketManifest(step=header.step, index=header.index, last=header.last, payload_len=header.payload_len,
                          layout=layout, tensors=entries)


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
    m = dumps({"num_buckets": end.num_buckets, "num_tensors": end.num_tensors, "num_bytes": end.num_bytes})
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
    m = dumps({"reason": str(reason)[: limits.max_reason_len]})
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
