"""Fault suite of the weight sync, transport and wire level (no vLLM).

Each test is one finding of issue 11 (its number in the name). Where the
transport is involved the peer is real: a rank 0 over real gloo that passed
the real handshake and then misbehaves, with the receiver in its own process
so that "it survives" means its exit code, not the absence of an exception.
The vLLM side of the same findings is in ``test_sync_faults_vllm.py``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import zlib

import pytest
import torch
import torch.multiprocessing as mp

from vllm_fp8_overlay.formats import FP8Layout
from vllm_fp8_overlay.sync import (
    ChecksumError,
    GroupRefused,
    LimitExceededError,
    ManifestError,
    OwnershipLost,
    ProtocolError,
    ReceiverBrokenError,
    StepRejectedError,
    WeightReceiver,
    WeightSender,
    WireLimits,
    wire,
)
from vllm_fp8_overlay.sync.apply.validate import BucketChecks, layout_key
from vllm_fp8_overlay.sync.transport import BroadcastGroup, RecordingTransport, ReplayTransport
from vllm_fp8_overlay.sync.values import value_problems
from vllm_fp8_overlay.testing import harness

TIMEOUT = 60
LAYOUT = FP8Layout(method="compressed-tensors", strategy="channel", scale_name="weight_scale",
                   ct_format="float-quantized").to_dict()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record(sd, step, layout=None, **kw):
    rec = RecordingTransport()
    WeightSender(layout, "", 0, 0, bucket_bytes=kw.pop("bucket_bytes", 1 << 16), transport=rec, **kw).send(sd, step=step)
    return rec.messages


def _replay(messages, **kw):
    t = ReplayTransport(messages)
    return WeightReceiver("", 0, 0, 0, transport=t, **kw), t


def _sd(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return {f"m.l{i}.weight": torch.randn(32, 16, generator=g) for i in range(n)}


# ----------------------------------------------------------- real gloo peers


def _victim(port, port2, limits_kw, q):
    """Receiver process: take one (faulty) step, report, then join a fresh
    group and take a good step, proving the process and the receiver code
    survived."""
    try:
        rx = WeightReceiver("127.0.0.1", port, 2, 1, backend="gloo", timeout=TIMEOUT,
                            limits=WireLimits(**limits_kw))
        try:
            rx.receive_all(expected_step=1)
            q.put(("step1", "ok", None))
        except Exception as e:
            q.put(("step1", type(e).__name__, rx.broken))
        if rx.broken is None:  # still in sync: the same group carries the next step
            out = rx.receive_all(expected_step=2)
            q.put(("step2", "ok", sorted(n for n, _ in out.tensors)))
        rx.close()
        with WeightReceiver("127.0.0.1", port2, 2, 1, backend="gloo", timeout=TIMEOUT) as rx2:
            out = rx2.receive_all(expected_step=3)
            q.put(("fresh", "ok", sorted(n for n, _ in out.tensors)))
    except BaseException as e:  # pragma: no cover - reported to the parent
        q.put(("error", repr(e), None))


def _run_victim(send_faulty, limits_kw=None):
    """Start the victim, let ``send_faulty(group)`` play rank 0, then send a
    good step 3 on a fresh group. Returns (victim reports, exit code, what
    send_faulty returned)."""
    port, port2 = _free_port(), _free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_victim, args=(port, port2, limits_kw or {}, q), daemon=True)
    p.start()
    try:
        g = harness.sync_rogue_group(port, 2, timeout=TIMEOUT)
        out = send_faulty(g)
        g.close()
        with WeightSender(None, "127.0.0.1", port2, 2, backend="gloo", bucket_bytes=1 << 16, timeout=TIMEOUT) as s:
            s.send(_sd(3), step=3)
        p.join(TIMEOUT)
    finally:
        if p.is_alive():
            p.kill()
    reports = {}
    while not q.empty():
        k, v, extra = q.get()
        reports[k] = (v, extra)
    return reports, p.exitcode, out


def test_f1_oversized_claim_from_peer_receiver_survives():
    """A peer announces a payload larger than anything agreed: the receiver
    refuses the header, posts no receive of that size, leaves the group (the
    peer's next broadcast fails at once instead of at its timeout) and its
    process lives on to join a new group."""
    def faulty(g):
        man = wire.encode_manifest([wire.TensorEntry("x", torch.uint8, (1 << 21,), 0, 1 << 21)], None)
        h = wire.Header(kind=wire.MessageKind.BUCKET, step=1, flags=wire.FLAG_LAST, manifest_len=len(man),
                        payload_len=1 << 21, manifest_crc32=zlib.crc32(man))
        harness.sync_send_raw(g, [wire.encode_control(wire.encode_header(h), man)])
        t0 = time.monotonic()
        with pytest.raises(Exception, match="closed|Connection|failed"):
            harness.sync_send_raw(g, [bytes(wire.CONTROL_SIZE), b"\0" * ((1 << 21) + wire.SEAL_SIZE)])
        return time.monotonic() - t0

    reports, code, waited = _run_victim(faulty, {"max_tensor_bytes": 1 << 20})
    assert code == 0, f"receiver process died (exit {code}): {reports}"
    assert reports["step1"][0] == "LimitExceededError" and reports["step1"][1], reports
    assert reports["fresh"] == ("ok", sorted(_sd(3))), reports
    assert waited < TIMEOUT / 2, f"the peer waited {waited:.1f}s for a receiver that had left"


def test_f1_f2_undersized_payload_detected_receiver_in_sync():
    """The peer's payload transfer is shorter than announced and carries no
    checksum (the old CUDA default): gloo completes the receive with old
    bytes in the rest; the seal catches it, nothing is handed out, the rest
    of the step is drained and the next step arrives on the same group."""
    def faulty(g):
        tensors = [("w.a", torch.randn(64, 16)), ("w.b", torch.randn(64, 16))]
        ctl, payload = harness.sync_bucket_transfers(tensors, step=1, checksum="none")
        harness.sync_send_raw(g, harness.sync_step_transfers(
            [ctl, payload[:1000]], harness.sync_end_transfers(1, 1, 2, 2 * 64 * 16 * 4)))  # short
        harness.sync_send_raw(g, harness.sync_step_transfers(
            harness.sync_bucket_transfers([("w.c", torch.ones(3))], step=2), harness.sync_end_transfers(2, 1, 1, 12)))

    reports, code, _ = _run_victim(faulty)
    assert code == 0, reports
    assert reports["step1"] == ("ChecksumError", None), reports
    assert reports["step2"] == ("ok", ["w.c"]), reports
    assert reports["fresh"][0] == "ok"


def test_f1_handshake_refuses_other_framing_before_any_transfer():
    """A peer whose frames differ (a 65-byte header, another wire version) is
    refused in the store handshake, before the process group could post a
    receive of the wrong size: both sides get the reason."""
    for fields, why in (({"header_size": 65}, "framing"), ({"wire_version": wire.PROTOCOL_VERSION + 1}, "version"),
                        ({"bucket_bytes": 1 << 40}, "bucket")):
        port = _free_port()
        err = {}

        def victim():
            try:
                WeightReceiver("127.0.0.1", port, 2, 1, backend="gloo", timeout=20)
            except GroupRefused as e:
                err["e"] = e

        t = threading.Thread(target=victim, daemon=True)
        t.start()
        acks = harness.sync_rogue_hello(port, 2, timeout=20, **fields)
        t.join(30)
        assert not acks[0].accepted and why in acks[0].reason, (fields, acks)
        assert why in str(err.get("e")), (fields, err)


def test_f7_evicted_sender_is_told():
    """A receiver taken over writes a note into its old group's store; the old
    trainer's next send raises OwnershipLost instead of failing obscurely."""
    port = _free_port()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("g", BroadcastGroup("127.0.0.1", port, 2, 1, backend="gloo",
                                                                           timeout=TIMEOUT)), daemon=True)
    t.start()
    s = WeightSender(None, "127.0.0.1", port, 2, backend="gloo", bucket_bytes=1 << 16, timeout=TIMEOUT)
    t.join(TIMEOUT)
    assert box["g"].notify_evicted("taken over by the trainer at 10.0.0.9:1234")
    with pytest.raises(OwnershipLost, match="10.0.0.9"):
        s.send(_sd(), step=1)
    box["g"].close()
    s.close()


# ---------------------------------------------------------- in-process checks


def test_f1_receiver_never_posts_less_than_a_conforming_sender_sends():
    """Over a whole step with faults in it (rejections, drains), every posted
    receive is at least as large as the transfer that fills it: the replay
    transport flags the case in which gloo would have aborted."""
    msgs = _record(_sd(1, n=6), step=1, bucket_bytes=4096) + _record(_sd(2), step=2)
    rx, t = _replay(msgs)
    checks = BucketChecks([({}, "nothing", None)])  # rejects every bucket: all payloads are drained
    with pytest.raises(StepRejectedError):
        rx.receive_all(check_manifest=checks.check_manifest)
    assert rx.receive_all(expected_step=2).step == 2
    assert not t.aborted and t.remaining == 0


def test_f2_short_payload_without_checksum_detected():
    tensors = [("w.a", torch.randn(64, 16))]
    ctl, payload = harness.sync_bucket_transfers(tensors, step=1, checksum="none")
    end = harness.sync_end_transfers(1, 1, 1, 64 * 16 * 4)
    for cut in (0, 10, len(payload) - 1):
        rx, _ = _replay(harness.sync_step_transfers([ctl, payload[:cut]], end))
        with pytest.raises(ChecksumError, match="seal"):
            rx.receive_all()
        assert rx.broken is None


def test_f3_manifest_cache_bounded_by_decoded_size_and_cleared():
    """The cache charges decoded objects, not raw bytes; a layout blown up
    with empty objects is refused by the layout schema before it is decoded
    into anything cached; a failed step and close() clear the cache."""
    blown = b'{"layout":{"x":[' + b",".join([b"{}"] * 200_000) + b']},"tensors":[]}'
    h = wire.Header(kind=wire.MessageKind.BUCKET, step=0, manifest_len=len(blown), manifest_crc32=zlib.crc32(blown))
    cache = wire.ManifestCache()
    with pytest.raises(ManifestError, match="layout"):
        wire.decode_bucket_manifest(h, blown, cache=cache)
    assert len(cache) == 0 and cache.bytes == 0
    small = wire.ManifestCache(max_bytes=1 << 20)
    for i in range(200):  # distinct manifests of 100 entries each
        entries = [wire.TensorEntry(f"t{i}.{j}", torch.float32, (4,), 16 * j, 16) for j in range(100)]
        m = wire.encode_manifest(entries, None)
        small.decode(m, 1600, wire.DEFAULT_LIMITS)
    assert small.bytes <= 1 << 20 and len(small) < 200
    rx, _ = _replay(_record(_sd(), step=1) + [b"garbage"])
    rx.receive_all()
    assert len(rx.manifest_cache) > 0
    with pytest.raises(wire.WireError):
        rx.receive_all()  # a bad header: the receiver breaks and forgets everything
    assert len(rx.manifest_cache) == 0
    rx2, _ = _replay(_record(_sd(), step=1))
    rx2.receive_all()
    rx2.close()
    assert len(rx2.manifest_cache) == 0


def test_f4_every_bucket_layout_is_checked():
    """Whole-step receives check each bucket's layout, not only the last one."""
    want = layout_key(LAYOUT)[0]
    other = dict(LAYOUT, strategy="tensor")
    msgs = harness.sync_step_transfers(
        harness.sync_bucket_transfers([("a.weight", torch.ones(4))], step=1, last=False, layout=other),
        harness.sync_bucket_transfers([("b.weight", torch.ones(4))], step=1, index=1, layout=LAYOUT),
        harness.sync_end_transfers(1, 2, 2, 32))
    specs = {"a.weight": ("float32", (4,)), "b.weight": ("float32", (4,))}
    rx, _ = _replay(msgs)
    checks = BucketChecks([(specs, "ckpt", want)])
    with pytest.raises(StepRejectedError, match="bucket 0: scheme mismatch"):
        rx.receive_all(check_manifest=checks.check_manifest)


@pytest.mark.parametrize("layout", [
    {"x": 1},
    dict(LAYOUT, strategy="diagonal"),
    dict(LAYOUT, method=7),
    dict(LAYOUT, block_size=[0, 2**70]),
    dict(LAYOUT, ignore=[{}]),
    dict({k: v for k, v in LAYOUT.items() if k != "method"}),
])
def test_f5_malformed_layouts_are_problems_not_exceptions(layout):
    """A layout the wire schema refuses is a ManifestError; one it admits but
    no FP8Layout can be is a problem line. Nothing raises KeyError,
    ValueError, OverflowError or UnsupportedQuantization to the caller."""
    try:
        wire.validate_layout(layout)
    except ManifestError:
        return
    key, err = layout_key(layout)
    assert key is None and err and "invalid layout" in err


def test_f6_zero_element_tensor_with_huge_dims_rejected():
    entry = {"name": "z", "dtype": "float32", "shape": [0, 2**40, 2**40], "offset": 0, "nbytes": 0}
    man = json.dumps({"layout": None, "tensors": [entry]}).encode()
    h = wire.Header(kind=wire.MessageKind.BUCKET, step=0, manifest_len=len(man), manifest_crc32=zlib.crc32(man))
    with pytest.raises(LimitExceededError, match="spans"):
        wire.decode_bucket_manifest(h, man)
    ok = json.dumps({"layout": None, "tensors": [dict(entry, shape=[0, 4, 4])]}).encode()
    h = wire.Header(kind=wire.MessageKind.BUCKET, step=0, manifest_len=len(ok), manifest_crc32=zlib.crc32(ok))
    m = wire.decode_bucket_manifest(h, ok)
    assert wire.tensors_from_buffer(torch.zeros(0, dtype=torch.uint8), m)[0][1].shape == (0, 4, 4)


def test_value_sentinels_batched_over_large_tensors():
    """Tensors above the small-tensor size are checked together by
    multi-tensor reductions (float: L2 norm; e4m3fn: byte maxima); every
    offender is still named, and clean groups pass."""
    from vllm_fp8_overlay.sync.values import device_values_many

    n = 70_000  # above the small-tensor size
    clean = [(f"l.{i}.weight", torch.randn(n).bfloat16()) for i in range(5)]
    fp8 = [(f"q.{i}.weight", torch.randn(n).clamp(-400, 400).to(torch.float8_e4m3fn)) for i in range(4)]
    assert value_problems(clean + fp8) == []
    assert all(bool(ok.all()) for ok in device_values_many(clean + fp8))
    bad = [clean[0], (clean[1][0], clean[1][1].clone()), (clean[2][0], clean[2][1].clone()), fp8[0],
           (fp8[1][0], fp8[1][1].clone()), (fp8[2][0], fp8[2][1].clone()),
           ("huge.weight", torch.full((n,), 3e38, dtype=torch.float32))]  # finite, but its squares overflow
    bad[1][1][123] = float("nan")
    bad[2][1][-1] = float("-inf")
    bad[4][1].view(torch.uint8)[7] = 0x7F
    bad[5][1].view(torch.uint8)[n - 3] = 0xFF
    got = value_problems(bad)
    assert [p.split(":")[0] for p in got] == [bad[1][0], bad[2][0], bad[4][0], bad[5][0]], got
    assert not all(bool(ok.all()) for ok in device_values_many(bad[1:2]  + bad[3:4] + [bad[0]]))
    assert not all(bool(ok.all()) for ok in device_values_many(bad[4:5] + bad[3:4]))
    huge = [bad[-1], ("huge2.weight", bad[-1][1].clone())]
    assert value_problems(huge) == []  # the batch overflows; the exact check clears them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_sentinels_batched(dtype):
    """Scales (finite and > 0) are checked together too, small and large,
    and each of 0, a negative, NaN and inf is caught in a batch and named."""
    from vllm_fp8_overlay.sync.values import device_values_many

    for n in (64, 70_000):  # a small and a large scale tensor
        clean = [(f"l.{i}.weight_scale", (torch.rand(n, 1) + 0.01).to(dtype)) for i in range(4)]
        assert value_problems(clean) == []
        assert all(bool(ok.all()) for ok in device_values_many(clean))
        for bad_value in (0.0, -1.0, float("nan"), float("inf")):
            items = [(k, v.clone()) for k, v in clean]
            items[2][1][n // 2, 0] = bad_value
            got = value_problems(items)
            assert [p.split(":")[0] for p in got] == [items[2][0]], (bad_value, got)
            assert not all(bool(ok.all()) for ok in device_values_many(items)), bad_value


def test_f8_value_sentinels_both_sides():
    """NaN/Inf/<=0 scales, FP8 NaN bytes (0x7F, 0xFF), non-finite unquantized
    tensors: the sender refuses them; the receiver rejects them naming the
    tensor (its per-bucket payload check) before anything is handed out."""
    fp8 = torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    cases = {
        "a.weight_scale": torch.tensor([[1.0], [float("nan")]]),
        "b.weight_scale": torch.tensor([[1.0], [float("inf")]]),
        "c.weight_scale": torch.tensor([[1.0], [-2.0]]),
        "d.weight_scale": torch.tensor([[0.0], [1.0]]),
        "e.weight": fp8.view(torch.uint8).clone().index_fill_(0, torch.tensor([1]), 0x7F).view(torch.float8_e4m3fn),
        "f.weight": fp8.view(torch.uint8).clone().index_fill_(0, torch.tensor([2]), 0xFF).view(torch.float8_e4m3fn),
        "g.norm.weight": torch.tensor([1.0, float("nan")]).bfloat16(),
        "model.embed_tokens.weight": torch.tensor([[1.0, float("inf")]]),
    }
    for name, t in cases.items():
        assert value_problems([(name, t)]) and name in value_problems([(name, t)])[0], name
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            _record({"ok.weight": torch.ones(3), name: t}, step=1)
        msgs = harness.sync_step_transfers(
            harness.sync_bucket_transfers([("ok.weight", torch.ones(3)), (name, t)], step=1),
            harness.sync_end_transfers(1, 1, 2, 12 + t.numel() * t.element_size()))
        rx, _ = _replay(msgs)
        checks = BucketChecks([({"ok.weight": ("float32", (3,)), name: (str(t.dtype)[6:], tuple(t.shape))}, "x", None)])
        with pytest.raises(StepRejectedError, match=name.replace(".", r"\.")):
            rx.receive_all(check_manifest=checks.check_manifest, check_payload=checks.check_payload)
        assert rx.broken is None


def test_f10_payload_claim_must_match_manifest_before_allocation():
    """4 GiB announced, a 64-byte manifest: refused from the manifest, before
    the payload buffer exists (only scratch for the bytes actually sent)."""
    tensors = [("w", torch.ones(16))]
    _, man, _ = wire.encode_bucket(tensors, step=1)
    h = wire.Header(kind=wire.MessageKind.BUCKET, step=1, flags=wire.FLAG_LAST, manifest_len=len(man),
                    payload_len=4 << 30, manifest_crc32=zlib.crc32(man))
    for limits in (WireLimits(max_tensor_bytes=1 << 20), WireLimits()):
        rx, _ = _replay([wire.encode_control(wire.encode_header(h), man), bytes(wire.CONTROL_SIZE), b"\0" * 64],
                        limits=limits)
        allocs = []
        orig = rx._alloc
        rx._alloc = lambda n: allocs.append(n) or orig(n)
        with pytest.raises((LimitExceededError, ManifestError)):
            rx.receive_all()
        assert all(n <= 4096 for n in allocs) and rx.broken, allocs  # the manifest buffer only
    # a claim within the limits but not matching the manifest is refused too
    h2 = wire.Header(kind=wire.MessageKind.BUCKET, step=1, flags=wire.FLAG_LAST, manifest_len=len(man),
                     payload_len=4096, manifest_crc32=zlib.crc32(man))
    rx2, _ = _replay([wire.encode_control(wire.encode_header(h2), man), bytes(wire.CONTROL_SIZE), b"\0" * 64])
    with pytest.raises(ManifestError, match="end of the last tensor"):
        rx2.receive_all()
    assert rx2.broken


def test_f10_crc_checked_before_version():
    raw = bytearray(harness.sync_bucket_transfers([("w", torch.ones(2))], step=1)[0][:wire.HEADER_SIZE])
    raw[4] ^= 0x07  # a flipped bit in the version field
    with pytest.raises(wire.HeaderError, match="crc"):
        wire.decode_header(bytes(raw))


def test_f10_missing_end_breaks_instead_of_swallowing_next_step():
    """Step 1 loses its END and its consumer stops early: the drain meets
    step 2's first message and breaks the receiver (recreate the group)
    instead of consuming step 2 as if it were the rest of step 1."""
    rx, t = _replay(harness.sync_step_transfers(
        harness.sync_bucket_transfers([("a", torch.ones(2))], step=1, last=False),
        harness.sync_bucket_transfers([("b", torch.ones(2))], step=1, index=1),  # no END
        harness.sync_bucket_transfers([("c", torch.ones(2))], step=2), harness.sync_end_transfers(2, 1, 1, 8)))
    gen = rx.iter_buckets(expected_step=1)
    next(gen)
    gen.close()
    assert rx.broken and "end of step 1 is missing" in rx.broken
    with pytest.raises(ReceiverBrokenError):
        rx.receive_all()
    assert not t.aborted


def test_f10_message_of_another_step_inside_a_step_is_fatal():
    rx, _ = _replay(harness.sync_step_transfers(
        harness.sync_bucket_transfers([("a", torch.ones(2))], step=1, last=False),
        harness.sync_bucket_transfers([("c", torch.ones(2))], step=2), harness.sync_end_transfers(2, 1, 1, 8)))
    with pytest.raises(ProtocolError, match="inside step 1"):
        rx.receive_all()
    assert rx.broken


def test_f12_buffers_released_after_a_rejected_step():
    """Drain and streaming buffers, kept step buffers and cached views are
    dropped when a step fails, not kept until close()."""
    msgs = _record(_sd(1, n=8), step=1, bucket_bytes=4096) + _record(_sd(2), step=2)
    rx, _ = _replay(msgs, keep_step_buffers=True)
    gen = rx.iter_buckets()
    next(gen)
    gen.close()  # the consumer gives up: the rest is drained
    assert rx._buf is None and rx._scratch is None and rx._step_bufs == [] and not rx._views
    assert rx.receive_all(expected_step=2).step == 2


def test_sender_refuses_tensor_larger_than_receivers_accept():
    """The handshake's limits bind the sender: a tensor above every
    receiver's max_tensor_bytes is refused before anything is sent."""
    port = _free_port()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", WeightReceiver(
        "127.0.0.1", port, 2, 1, backend="gloo", timeout=TIMEOUT, limits=WireLimits(max_tensor_bytes=1 << 16))),
        daemon=True)
    t.start()
    s = WeightSender(None, "127.0.0.1", port, 2, backend="gloo", bucket_bytes=1 << 12, timeout=TIMEOUT)
    t.join(TIMEOUT)
    assert s.limits.max_tensor_bytes == 1 << 16
    rx = box["r"]
    res = {}
    th = threading.Thread(target=lambda: res.setdefault("e", _catch(rx.receive_all)), daemon=True)
    th.start()
    with pytest.raises(LimitExceededError, match="max_tensor_bytes"):
        s.send({"big": torch.zeros(1 << 15)}, step=1)  # 128 KiB
    th.join(TIMEOUT)
    assert type(res["e"]).__name__ == "StepAbortedError"
    s.close()
    rx.close()


def _catch(fn):
    try:
        return fn()
    except Exception as e:
        return e


def test_fault_table_matches_tests():
    """docs/sync.md's fault table names only tests that exist, and every test
    of the fault files appears in it."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "sync.md").read_text()
    table = doc[doc.index("## Fault cases"):]
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", table))
    defined = set()
    for f in sorted((root / "tests").glob("test_sync_faults*.py")):
        tree = ast.parse(f.read_text())
        defined |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    assert named - defined == set(), f"the table names tests that do not exist: {sorted(named - defined)}"
    missing = defined - named - {"test_fault_table_matches_tests"}
    assert not missing, f"fault tests missing from the table in docs/sync.md: {sorted(missing)}"
