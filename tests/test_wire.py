"""Wire format: round trips and malformed input from an untrusted peer."""

import json
import struct
import zlib

import pytest
import torch

from vllm_fp8_overlay.formats import FP8Layout

from vllm_fp8_overlay.sync import wire
from vllm_fp8_overlay.sync.wire import (
    FLAG_LAST,
    HEADER_SIZE,
    MAGIC,
    BadMagicError,
    ChecksumAlgo,
    ChecksumError,
    Header,
    HeaderError,
    LimitExceededError,
    ManifestError,
    MessageKind,
    VersionMismatchError,
    WireError,
    WireLimits,
)


def _rand(dtype, shape):
    g = torch.Generator().manual_seed(hash((str(dtype), shape)) & 0xFFFF)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g, dtype=torch.float32) * 3
        return x.to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def _bytes(t):
    return wire.tensor_bytes(t).numpy().tobytes()


def _decode_all(hdr, man, payload, limits=wire.DEFAULT_LIMITS):
    h = wire.decode_header(hdr, limits)
    m = wire.decode_bucket_manifest(h, man, limits)
    assert wire.payload_checksum(payload, h.checksum_algo) == h.payload_checksum
    return h, m, wire.tensors_from_buffer(payload, m)


def _bucket_header(man: bytes, payload_len: int = 0, **kw) -> bytes:
    fields = dict(
        kind=MessageKind.BUCKET,
        step=1,
        index=0,
        flags=FLAG_LAST,
        manifest_len=len(man),
        payload_len=payload_len,
        manifest_crc32=zlib.crc32(man),
    )
    fields.update(kw)
    return wire.encode_header(Header(**fields))


def _entry(name="a.weight", dtype="float32", shape=(2, 2), offset=0, nbytes=16):
    return {"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


def _manifest(*entries, layout=None) -> bytes:
    return json.dumps({"layout": layout, "tensors": list(entries)}).encode()


# ----------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype_name", sorted(wire.DTYPES))
def test_round_trip_every_dtype(dtype_name):
    dtype = wire.DTYPES[dtype_name]
    tensors = [
        ("m.w2d", _rand(dtype, (7, 5))),
        ("m.scalar", _rand(dtype, ())),
        ("m.empty", _rand(dtype, (0, 3))),
        ("m.w3d", _rand(dtype, (2, 3, 4))),
    ]
    hdr, man, payload = wire.encode_bucket(tensors, step=5, index=0, last=True)
    h, m, out = _decode_all(hdr, man, payload)
    assert h.step == 5 and h.last and h.index == 0
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (n, src), (_, dst) in zip(tensors, out):
        assert dst.dtype == dtype and dst.shape == src.shape
        assert _bytes(dst) == _bytes(src), n
        # zero copy: every view aliases the payload buffer
        if dst.numel():
            assert dst.untyped_storage().data_ptr() == payload.untyped_storage().data_ptr()


def test_round_trip_mixed_dtypes_alignment_and_layout():
    layout = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv").to_dict()
    tensors = [
        ("a.weight", _rand(torch.float8_e4m3fn, (3, 5))),  # 15 bytes -> next offset aligned
        ("a.weight_scale_inv", _rand(torch.float32, (1, 1))),
        ("b.bias", _rand(torch.bfloat16, (3,))),
        ("c.idx", _rand(torch.int64, (4,))),
        ("d.mask", _rand(torch.bool, (9,))),
    ]
    hdr, man, payload = wire.encode_bucket(tensors, step=0, layout=layout)
    _, m, out = _decode_all(hdr, man, payload)
    assert m.layout == layout
    assert all(e.offset % wire.ALIGNMENT == 0 for e in m.tensors)
    for (_, src), (_, dst) in zip(tensors, out):
        assert _bytes(src) == _bytes(dst)


def test_non_contiguous_input_is_packed_correctly():
    base = _rand(torch.bfloat16, (6, 8))
    t = base.t()  # non-contiguous
    hdr, man, payload = wire.encode_bucket([("x.w", t)], step=0)
    _, _, out = _decode_all(hdr, man, payload)
    assert torch.equal(out[0][1], t)


def test_header_round_trip_and_size():
    h = Header(kind=MessageKind.BUCKET, step=2**40, index=7, flags=FLAG_LAST, manifest_len=10,
               payload_len=123, checksum_algo=ChecksumAlgo.CRC32, payload_checksum=99, manifest_crc32=5)
    raw = wire.encode_header(h)
    assert len(raw) == HEADER_SIZE and raw[:4] == MAGIC
    assert wire.decode_header(raw) == h


def test_end_and_abort_round_trip():
    end = wire.EndOfStep(step=4, num_buckets=3, num_tensors=10, num_bytes=1000)
    hdr, man = wire.encode_end(end)
    assert wire.decode_end(wire.decode_header(hdr), man) == end
    hdr, man = wire.encode_abort(4, "boom")
    assert wire.decode_abort(wire.decode_header(hdr), man) == "boom"


def test_disallowed_dtype_and_bad_name_rejected_on_encode():
    with pytest.raises(ManifestError):
        wire.encode_bucket([("x", torch.zeros(2, dtype=torch.complex64))], step=0)
    with pytest.raises(ManifestError):
        wire.encode_bucket([("x y", torch.zeros(2))], step=0)


# ------------------------------------------------------------------ headers


def test_bad_magic():
    raw = bytearray(_bucket_header(b"{}", 0))
    raw[:4] = b"GET "
    with pytest.raises(BadMagicError):
        wire.decode_header(bytes(raw))


def test_version_mismatch():
    raw = bytearray(_bucket_header(b"{}", 0))
    struct.pack_into("<H", raw, 4, wire.PROTOCOL_VERSION + 1)
    raw[60:64] = struct.pack("<I", zlib.crc32(bytes(raw[:60])))
    with pytest.raises(VersionMismatchError):
        wire.decode_header(bytes(raw))


@pytest.mark.parametrize("n", [0, 1, 63, 65])
def test_truncated_or_long_header(n):
    raw = _bucket_header(b"{}", 0) + b"\0"
    with pytest.raises(WireError):
        wire.decode_header(raw[:n]) if n < HEADER_SIZE else wire.decode_header(raw[:n][:n - 2])


def test_header_corruption_detected_by_crc():
    raw = bytearray(_bucket_header(b"{}", 0))
    raw[33] ^= 0x10  # payload_len
    with pytest.raises(HeaderError, match="crc32"):
        wire.decode_header(bytes(raw))


@pytest.mark.parametrize(
    "kw, exc",
    [
        (dict(kind=9), HeaderError),
        (dict(flags=0x80), HeaderError),
        (dict(checksum_algo=7), HeaderError),
        (dict(step=-1), HeaderError),
        (dict(manifest_len=1), HeaderError),
        (dict(manifest_len=(8 << 20) + 1), LimitExceededError),
        (dict(payload_len=2**62), LimitExceededError),  # never allocated: rejected here
        (dict(index=2**31), LimitExceededError),
        (dict(kind=MessageKind.END, payload_len=8), HeaderError),
        (dict(payload_checksum=5), HeaderError),  # checksum without algorithm
    ],
)
def test_header_field_validation(kw, exc):
    with pytest.raises(exc):
        wire.decode_header(_bucket_header(b"{}", **kw))


def test_limits_are_configurable():
    limits = WireLimits(max_bucket_bytes=1024, max_tensor_bytes=1024, max_manifest_bytes=100)
    with pytest.raises(LimitExceededError):
        wire.decode_header(_bucket_header(b"{}", 1025), limits)
    with pytest.raises(LimitExceededError):
        wire.decode_header(_bucket_header(b"x" * 101, 0), limits)
    with pytest.raises(ValueError):
        WireLimits(max_dims=0)


# ---------------------------------------------------------------- manifests


def _decode_manifest(man: bytes, payload_len: int, limits=wire.DEFAULT_LIMITS):
    h = wire.decode_header(_bucket_header(man, payload_len), limits)
    return wire.decode_bucket_manifest(h, man, limits)


def test_manifest_valid_baseline():
    m = _decode_manifest(_manifest(_entry(), _entry("b", offset=16)), 32)
    assert m.names == ["a.weight", "b"]


@pytest.mark.parametrize(
    "man, payload_len, exc",
    [
        (b"not json", 16, ManifestError),
        (b"[1,2]", 16, ManifestError),
        (b"\xff\xfe{}", 16, ManifestError),  # not utf-8
        (b"[" * 100000 + b"]" * 100000, 16, ManifestError),  # deep nesting
        (b'{"layout":null,"tensors":[],"tensors":[]}', 16, ManifestError),  # duplicate key
        (b'{"layout":null,"tensors":[],"extra":1}', 16, ManifestError),
        (b'{"layout":[],"tensors":[]}', 16, ManifestError),
        (b'{"layout":null,"tensors":{}}', 16, ManifestError),
        (_manifest(_entry(dtype="float128")), 16, ManifestError),
        (_manifest(_entry(dtype="torch.float32")), 16, ManifestError),
        (_manifest(_entry(dtype=5)), 16, ManifestError),
        (_manifest(_entry(shape=(-2, -8))), 16, ManifestError),  # negative shape
        (_manifest(_entry(shape=(2, 2.0))), 16, ManifestError),  # float dim
        (_manifest(_entry(shape=(True, 4))), 16, ManifestError),  # bool dim
        (_manifest(_entry(shape=(2**41, 1), nbytes=2**43)), 16, ManifestError),  # huge dim
        (_manifest(_entry(shape=(2**40, 2**40, 2**40), nbytes=4 * 2**120)), 16, ManifestError),
        (_manifest(_entry(shape=[1] * 9, nbytes=4)), 16, LimitExceededError),  # too many dims
        (_manifest(_entry(nbytes=15)), 16, ManifestError),  # nbytes != numel*itemsize
        (_manifest(_entry(offset=4)), 16, ManifestError),  # beyond payload
        (_manifest(_entry(offset=-16)), 16, ManifestError),
        (_manifest(_entry(offset=2)), 32, ManifestError),  # misaligned for float32
        (_manifest(_entry(), _entry("b", offset=8)), 32, ManifestError),  # overlap
        (_manifest(_entry(), _entry("a.weight", offset=16)), 32, ManifestError),  # duplicate name
        (_manifest(_entry(name="")), 16, ManifestError),
        (_manifest(_entry(name="x" * 513)), 16, ManifestError),
        (_manifest(_entry(name="../../etc/passwd\n")), 16, ManifestError),
        (_manifest(_entry(name="naïve")), 16, ManifestError),
        (_manifest(_entry(name=["a"])), 16, ManifestError),
        (_manifest({"name": "a", "dtype": "float32", "shape": [4]}), 16, ManifestError),  # missing keys
        (_manifest(_entry()).replace(b'"offset": 0', b'"offset": ' + b"9" * 5000), 16, ManifestError),
        (b'{"layout":NaN,"tensors":[]}', 16, ManifestError),
    ],
)
def test_malformed_manifest(man, payload_len, exc):
    with pytest.raises(exc):
        _decode_manifest(man, payload_len)


def test_too_many_tensors():
    limits = WireLimits(max_tensors_per_bucket=3)
    man = _manifest(*[_entry(f"t{i}", offset=16 * i) for i in range(4)])
    with pytest.raises(LimitExceededError):
        _decode_manifest(man, 64, limits)


def test_oversized_manifest_rejected_before_parsing():
    limits = WireLimits(max_manifest_bytes=64)
    big = _manifest(*[_entry(f"t{i}", offset=16 * i) for i in range(10)])
    h = Header(kind=MessageKind.BUCKET, step=0, manifest_len=len(big), payload_len=160,
               manifest_crc32=zlib.crc32(big))
    with pytest.raises(LimitExceededError):
        wire.decode_header(wire.encode_header(h), limits)
    with pytest.raises(LimitExceededError):
        wire.decode_bucket_manifest(h, big, limits)


def test_manifest_checksum_and_length_mismatch():
    man = _manifest(_entry())
    h = wire.decode_header(_bucket_header(man, 16))
    bad = man.replace(b"a.weight", b"b.weight")
    with pytest.raises(ChecksumError):
        wire.decode_bucket_manifest(h, bad)
    with pytest.raises(ManifestError):
        wire.decode_bucket_manifest(h, man + b" ")


def test_payload_checksum_detects_flip():
    hdr, man, payload = wire.encode_bucket([("w", _rand(torch.bfloat16, (16, 16)))], step=0)
    h = wire.decode_header(hdr)
    payload[100] ^= 1
    assert wire.payload_checksum(payload, h.checksum_algo) != h.payload_checksum


def test_zero_size_tensors_may_share_offsets():
    m = _decode_manifest(_manifest(_entry("a", shape=(0,), nbytes=0), _entry("b", shape=(0, 4), nbytes=0),
                                   _entry("c")), 16)
    assert [e.nbytes for e in m.tensors] == [0, 0, 16]


def test_end_manifest_validation():
    h = Header(kind=MessageKind.END, step=1, manifest_len=2, manifest_crc32=zlib.crc32(b"{}"))
    with pytest.raises(ManifestError):
        wire.decode_end(h, b"{}")
    body = b'{"num_buckets":-1,"num_tensors":0,"num_bytes":0}'
    h = Header(kind=MessageKind.END, step=1, manifest_len=len(body), manifest_crc32=zlib.crc32(body))
    with pytest.raises(ManifestError):
        wire.decode_end(h, body)


def test_tensors_from_buffer_requires_enough_bytes():
    hdr, man, payload = wire.encode_bucket([("w", torch.ones(8))], step=0)
    h = wire.decode_header(hdr)
    m = wire.decode_bucket_manifest(h, man)
    with pytest.raises(ManifestError):
        wire.tensors_from_buffer(payload[:16], m)


def test_sum64_matches_a_reference_and_detects_changes():
    """sum64 = little-endian int64 words summed mod 2**64, tail zero-padded,
    folded lo ^ hi; checked against a pure-Python reference, on aligned and
    unaligned views."""
    import struct

    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=g)

    def reference(b: bytes) -> int:
        b = b + bytes(-len(b) % 8)
        s = sum(struct.unpack(f"<{len(b) // 8}q", b)) % (1 << 64)
        return (s ^ (s >> 32)) & 0xFFFFFFFF

    for view in (data, data[:4096], data[1:4001], data[:3], data[:12]):
        assert wire.sum64(view) == reference(view.numpy().tobytes())
    base = wire.sum64(data)
    for i in (0, 1, 2048, 4098):
        flipped = data.clone()
        flipped[i] ^= 0x10
        assert wire.sum64(flipped) != base
    stale = data.clone()
    stale[1024:2048] = 0  # a region left as it was before the transfer
    assert wire.sum64(stale) != base
    h, m, payload = wire.encode_bucket([("w", torch.ones(7, dtype=torch.bfloat16))], step=1,
                                       checksum="sum64")
    assert wire.decode_header(h).checksum_algo == wire.ChecksumAlgo.SUM64
    assert wire.payload_checksum(payload, wire.ChecksumAlgo.SUM64) == wire.decode_header(h).payload_checksum
