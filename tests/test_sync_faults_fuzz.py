"""Decoder fuzz of the weight-sync wire format (hypothesis, fixed budget).

Property: whatever bytes or JSON a peer sends, every decoder either returns a
value that is safe to use (views build, layouts judge without raising) or
raises a ``WireError``; a receiver fed corrupted transfers of the announced
sizes raises only ``WireError``/``TransportError`` and never posts a receive
smaller than what arrives (gloo would abort the process there).

Derandomized with a fixed number of examples per property, so the run is
the same every time and its cost is bounded (a few seconds).
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vllm_fp8_overlay.sync import WeightReceiver, wire  # noqa: E402
from vllm_fp8_overlay.sync.apply.validate import layout_key  # noqa: E402
from vllm_fp8_overlay.sync.transport import ReplayTransport, TransportError  # noqa: E402
from vllm_fp8_overlay.testing import harness  # noqa: E402

BUDGET = settings(derandomize=True, max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL = settings(BUDGET, max_examples=120)
LIMITS = wire.WireLimits(max_bucket_bytes=1 << 20, max_tensor_bytes=1 << 20, max_manifest_bytes=1 << 16)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
dims = st.integers(min_value=-3, max_value=2**41) | st.sampled_from([0, 1, 2, 4, 2**40]) | json_values
entry = st.fixed_dictionaries({
    "name": st.sampled_from(["a.weight", "b", "x y", "", "c.weight_scale"]) | json_values,
    "dtype": st.sampled_from(sorted(wire.DTYPES) + ["float128", "torch.float32"]) | json_values,
    "shape": st.lists(dims, max_size=4) | json_values,
    "offset": st.integers(min_value=-64, max_value=4096) | json_values,
    "nbytes": st.integers(min_value=-1, max_value=4096) | json_values,
})
LAYOUT = {"method": "compressed-tensors", "strategy": "channel", "block_size": None, "scale_name": "weight_scale",
          "ignore": ["lm_head"], "targets": ["Linear"], "activation_dynamic": True, "ct_format": "float-quantized",
          "hidden_size": 256, "kv_cache_scheme": None}
layouts = st.none() | json_values | st.builds(
    lambda k, v, drop: {**{kk: vv for kk, vv in LAYOUT.items() if kk != drop}, **({k: v} if k else {})},
    st.sampled_from([None, *LAYOUT, "extra"]), json_values, st.sampled_from([None, *LAYOUT]))


def _header(man: bytes, payload_len: int) -> wire.Header:
    return wire.Header(kind=wire.MessageKind.BUCKET, step=1, flags=wire.FLAG_LAST, manifest_len=len(man),
                       payload_len=payload_len, manifest_crc32=zlib.crc32(man))


@BUDGET
@given(st.binary(min_size=0, max_size=80))
def test_header_bytes(data):
    try:
        wire.decode_header(data, LIMITS)
    except wire.WireError:
        pass


@BUDGET
@given(st.integers(0, 63), st.integers(0, 255), st.booleans())
def test_header_mutations(pos, value, fix_crc):
    raw = bytearray(harness.sync_bucket_transfers([("w", torch.ones(3))], step=5)[0][:wire.HEADER_SIZE])
    raw[pos] = value
    if fix_crc:
        raw[60:64] = zlib.crc32(bytes(raw[:60])).to_bytes(4, "little")
    try:
        h = wire.decode_header(bytes(raw), LIMITS)
    except wire.WireError:
        return
    assert wire.encode_header(h) == bytes(raw)


@BUDGET
@given(st.lists(entry, max_size=4) | json_values, layouts, st.integers(0, 8192))
def test_bucket_manifest_json(tensors, layout, payload_len):
    man = json.dumps({"layout": layout, "tensors": tensors}).encode()
    try:
        m = wire.decode_bucket_manifest(_header(man, payload_len), man, LIMITS)
    except wire.WireError:
        return
    views = wire.tensors_from_buffer(torch.zeros(payload_len, dtype=torch.uint8), m)  # must not raise
    assert [n for n, _ in views] == m.names
    layout_key(m.layout)  # judged, never raised


@st.composite
def near_valid_manifest(draw):
    """Well-formed manifests with awkward shapes (zero dims next to huge ones),
    and an occasional off-by-something field."""
    tensors, off = [], 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(wire.DTYPES)))
        shape = draw(st.lists(st.sampled_from([0, 1, 3, 64, 2**20, 2**40]), max_size=4))
        nbytes = math.prod(shape) * wire.DTYPES[dtype].itemsize + draw(st.sampled_from([0, 0, 0, 1, -1]))
        off = -(-off // 64) * 64
        tensors.append({"name": f"t{i}.weight", "dtype": dtype, "shape": shape, "offset": off, "nbytes": nbytes})
        off += max(nbytes, 0)
    layout = draw(st.sampled_from([None, LAYOUT, dict(LAYOUT, strategy="x"), dict(LAYOUT, block_size=[0, 1])]))
    payload_len = off + draw(st.sampled_from([0, 0, 0, 64]))
    return json.dumps({"layout": layout, "tensors": tensors}).encode(), payload_len


@BUDGET
@given(near_valid_manifest())
def test_bucket_manifest_near_valid(case):
    man, payload_len = case
    try:
        m = wire.decode_bucket_manifest(_header(man, payload_len), man, LIMITS)
    except wire.WireError:
        return
    views = wire.tensors_from_buffer(torch.zeros(payload_len, dtype=torch.uint8), m)  # must not raise
    assert [tuple(v.shape) for _, v in views] == [e.shape for e in m.tensors]
    layout_key(m.layout)


@BUDGET
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()), st.integers(0, 1 << 21))
def test_bucket_manifest_bytes(man, payload_len):
    try:
        wire.decode_bucket_manifest(_header(man, payload_len), man, LIMITS)
    except wire.WireError:
        pass


@BUDGET
@given(json_values, st.sampled_from([wire.MessageKind.END, wire.MessageKind.ABORT]))
def test_end_and_abort(obj, kind):
    man = json.dumps(obj).encode()
    h = wire.Header(kind=kind, step=0, manifest_len=len(man), manifest_crc32=zlib.crc32(man))
    try:
        (wire.decode_end if kind == wire.MessageKind.END else wire.decode_abort)(h, man, LIMITS)
    except wire.WireError:
        pass


@BUDGET
@given(st.sampled_from(["hello", "ack", "go"]), st.integers(0, 255), st.integers(0, 255), st.booleans())
def test_handshake_records(kind, pos, value, fix_crc):
    if kind == "hello":
        raw = bytearray(wire.encode_hello(wire.Hello(world_size=3, group_id=b"g" * 16, backend="gloo",
                                                     bucket_bytes=1 << 20, max_manifest_bytes=1 << 16,
                                                     max_tensor_bytes=1 << 20, max_tensors_per_bucket=8,
                                                     max_dims=8)))
        decode = wire.decode_hello
    elif kind == "ack":
        raw, decode = bytearray(wire.encode_ack(wire.Ack(rank=1, accepted=True, reason="ok"))), wire.decode_ack
    else:
        raw, decode = bytearray(wire.encode_go(True)), wire.decode_go
    raw[pos % len(raw)] = value
    if fix_crc:
        raw[-4:] = zlib.crc32(bytes(raw[:-4])).to_bytes(4, "little")
    try:
        decode(bytes(raw))
    except wire.WireError:
        pass


@BUDGET
@given(layouts)
def test_layouts(layout):
    try:
        wire.validate_layout(layout, LIMITS)
    except wire.ManifestError:
        return
    key, err = layout_key(layout)
    assert (key is None) == (err is not None) or layout is None


def _step_transfers() -> list[bytes]:
    a = harness.sync_bucket_transfers([("a.weight", torch.arange(12.0).reshape(3, 4))], step=1, last=False)
    b = harness.sync_bucket_transfers([("b.weight", torch.ones(5, dtype=torch.bfloat16))], step=1, index=1)
    return harness.sync_step_transfers(a, b, harness.sync_end_transfers(1, 2, 2, 58))


@SMALL
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=3))
def test_receiver_on_corrupted_transfers(edits):
    """Same-length corruption anywhere in a step: the receiver raises only
    protocol or transport errors, never posts less than what arrives, and a
    step it returns holds exactly the sent tensors."""
    transfers = [bytearray(t) for t in _step_transfers()]
    for i, pos, value in edits:
        # a control block is read up to the end of its manifest (the rest is padding)
        transfers[i][pos % min(len(transfers[i]), 1024)] = value
    t = ReplayTransport([bytes(x) for x in transfers])
    rx = WeightReceiver("", 0, 0, 0, transport=t, limits=LIMITS)
    try:
        out = rx.receive_all()
    except (wire.WireError, TransportError):
        assert not t.aborted
        return
    assert not t.aborted
    assert [n for n, _ in out.tensors] == ["a.weight", "b.weight"]
