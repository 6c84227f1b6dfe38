"""Sender + receiver: in-process (recorded stream) and over real gloo."""

import hashlib
import signal
import socket
import zlib

import pytest
import torch
import torch.multiprocessing as mp

from vllm_fp8_overlay.sync import (
    ChecksumError,
    LimitExceededError,
    ProtocolError,
    ReceiverBrokenError,
    StepAbortedError,
    TruncatedStepError,
    WeightReceiver,
    WeightSender,
    WireLimits,
)
from vllm_fp8_overlay.sync import wire
from vllm_fp8_overlay.testing import harness
from vllm_fp8_overlay.sync.transport import BroadcastGroup, RecordingTransport, ReplayTransport

TIMEOUT_S = 90

try:
    from vllm_fp8_overlay.formats import detect_layout, quantize_weights

    HAVE_FORMATS = True
except ImportError:  # pragma: no cover - formats module not installed
    HAVE_FORMATS = False


def _fp8_layout():
    if not HAVE_FORMATS:
        pytest.skip("vllm_fp8_overlay.formats not available")
    cfg = {
        "hidden_size": 128,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }
    return detect_layout(cfg)


def _state_dict(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(3):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = torch.randn(128, 128, generator=g).bfloat16()
        sd[p + "mlp.down_proj.weight"] = torch.randn(128, 256, generator=g).bfloat16()
        sd[p + "input_layernorm.weight"] = torch.randn(128, generator=g).bfloat16()
    sd["model.embed_tokens.weight"] = torch.randn(400, 128, generator=g).bfloat16()  # > bucket: own bucket
    sd["model.norm.weight"] = torch.randn(128, generator=g).bfloat16()
    sd["extra.f8"] = torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn)
    sd["extra.i64"] = torch.arange(7, dtype=torch.int64)
    sd["extra.scalar"] = torch.tensor(1.5)
    sd["extra.empty"] = torch.zeros(0, 4)
    return sd


def _digest(t: torch.Tensor) -> tuple:
    return (str(t.dtype), tuple(t.shape), hashlib.sha256(wire.tensor_bytes(t.cpu()).numpy().tobytes()).hexdigest())


def _digests(named) -> dict:
    return {n: _digest(t) for n, t in named}


def _record(sd, step=0, layout=None, bucket_bytes=80 << 10, **kw):
    rec = RecordingTransport()
    sender = WeightSender(layout, "", 0, 0, bucket_bytes=bucket_bytes, transport=rec, **kw)
    stats = sender.send(sd, step=step)
    return rec.messages, stats, sender


def _receiver(messages, **kw):
    return WeightReceiver("", 0, 0, 0, transport=ReplayTransport(messages), **kw)


# ------------------------------------------------------------- in-process


def test_round_trip_streaming_and_receive_all():
    sd = _state_dict(0)
    msgs, stats, _ = _record(sd, step=7)
    assert stats.num_tensors == len(sd) and stats.num_buckets > 3 and stats.oversize_tensors == 1

    got = {}
    manifests = []

    def on_bucket(tensors, manifest):
        manifests.append(manifest)
        for n, t in tensors:
            got[n] = _digest(t)  # views are only valid during the call

    summary = _receiver(msgs).receive_step(on_bucket, expected_step=7)
    assert summary.num_buckets == stats.num_buckets == len(manifests)
    assert manifests[-1].last and not any(m.last for m in manifests[:-1])
    assert got == _digests(sd.items())

    out = _receiver(msgs).receive_all()
    assert out.step == 7 and [n for n, _ in out.tensors] == list(sd)
    assert _digests(out.tensors) == _digests(sd.items())


def test_iter_buckets_and_generator_input():
    sd = _state_dict(1)
    msgs, _, _ = _record(iter(list(sd.items())), step=2)
    r = _receiver(msgs)
    names = [n for b in r.iter_buckets() for n, _ in b.tensors]
    assert names == list(sd)
    assert r.last_step == 2


def test_bounded_memory_bucket_count():
    """Equal-sized tensors: greedy packing gives an exact bucket count, the
    (non-grouped) sender keeps three buffers (one on the wire, one announced
    and owed until the next control, one being packed), and no payload
    exceeds the bucket size."""
    n, each = 40, 4096  # bytes per tensor (multiple of the alignment)
    sd = {f"w.{i}": torch.zeros(each // 4) for i in range(n)}
    for per_bucket in (1, 3, 8):
        _, stats, sender = _record(sd, bucket_bytes=per_bucket * each)
        assert stats.num_buckets == -(-n // per_bucket)
        assert stats.max_payload_bytes <= per_bucket * each
        assert stats.buffers_allocated == (3 if stats.num_buckets >= 3 else stats.num_buckets)
        assert all(s.buf.numel() == per_bucket * each + wire.SEAL_SIZE for s in sender._slots)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bucket_buffers_grow_to_what_a_step_needs(device):
    """Non-grouped bucket buffers (CPU; CUDA without Triton) start at
    FIRST_SLOT_BYTES and double as a bucket fills, keeping what is packed
    already: a small step holds a small buffer whatever bucket_bytes says, a
    large one gets full buckets, and the bytes arrive unchanged across each
    growth (on CUDA the packing copies are asynchronous, so a growth copy
    must follow them on the stream)."""
    from vllm_fp8_overlay.sync.sender import FIRST_SLOT_BYTES

    g = torch.Generator().manual_seed(5)
    small = {f"s.{i}": torch.randn(1000, generator=g).to(device) for i in range(4)}  # 16 KB
    big = {f"b.{i}": torch.randn(300_000, generator=g).to(device) for i in range(12)}  # 1.2 MB each
    rec = RecordingTransport(device=device)
    s = WeightSender(None, "", 0, 0, bucket_bytes=8 << 20, transport=rec)
    s._grouped = False  # the path under test (CUDA takes the grouped one where Triton exists)
    s.send(small, step=1)
    first = len(rec.messages)
    assert [x.buf.numel() for x in s._slots if x.buf is not None] == [FIRST_SLOT_BYTES + wire.SEAL_SIZE]
    stats = s.send(big, step=2)
    assert stats.num_buckets == 2 and stats.oversize_tensors == 0  # 6 tensors (7.2 MB) per 8 MiB bucket
    assert sorted(x.buf.numel() for x in s._slots if x.buf is not None) == [(8 << 20) + wire.SEAL_SIZE] * 2
    assert _digests(_receiver(rec.messages[:first]).receive_all().tensors) == _digests(small.items())
    assert _digests(_receiver(rec.messages[first:]).receive_all().tensors) == _digests(big.items())


def test_receiver_reuses_one_streaming_buffer():
    sd = {f"w.{i}": torch.randn(1024) for i in range(10)}
    msgs, stats, _ = _record(sd, bucket_bytes=8192)
    r = _receiver(msgs)
    allocs = []
    orig = r._alloc
    r._alloc = lambda n: allocs.append(n) or orig(n)
    r.receive_step(lambda ts, m: None)
    assert stats.num_buckets == 5
    assert [a for a in allocs if a > 4096] == [8192 + wire.SEAL_SIZE]  # one payload buffer, reused


def test_fp8_layout_round_trip_in_process():
    layout = _fp8_layout()
    sd = _state_dict(2)
    msgs, stats, _ = _record(sd, layout=layout, step=1)
    out = _receiver(msgs).receive_all()
    expected = list(quantize_weights(iter(sd.items()), layout))
    assert any(t.dtype == torch.float8_e4m3fn for _, t in expected)
    assert _digests(out.tensors) == _digests(expected)
    assert out.layout == layout.to_dict()


def test_multiple_steps_on_one_stream():
    a, b = _state_dict(3), _state_dict(4)
    rec = RecordingTransport()
    s = WeightSender(None, "", 0, 0, bucket_bytes=32 << 10, transport=rec)
    s.send(a, step=1)
    s.send(b, step=2)
    r = _receiver(rec.messages)
    assert _digests(r.receive_all(expected_step=1).tensors) == _digests(a.items())
    assert _digests(r.receive_all(expected_step=2).tensors) == _digests(b.items())


def test_repeated_steps_reuse_manifests_buffers_and_views():
    """Same names every step (the trainer's case): manifests are decoded once,
    ``keep_step_buffers`` receives into the same buffers and hands out the same
    views, and every step still delivers that step's bytes."""
    rec = RecordingTransport()
    s = WeightSender(_fp8_layout(), "", 0, 0, bucket_bytes=32 << 10, transport=rec)
    sds = [_state_dict(10 + i) for i in range(3)]
    for i, sd in enumerate(sds):
        s.send(sd, step=i)
    expected = [_digests(quantize_weights(iter(sd.items()), _fp8_layout())) for sd in sds]
    for keep in (False, True):
        r = _receiver(list(rec.messages), keep_step_buffers=keep)
        ptrs = []
        first_views = None
        for i in range(3):
            out = r.receive_all(expected_step=i)
            assert _digests(out.tensors) == expected[i]
            ptrs.append(sorted(t.data_ptr() for _, t in out.tensors))
            if i == 0:
                first_views = [t for _, t in out.tensors]
        buckets = len(out.manifests)
        assert buckets > 3
        assert r.manifest_cache.misses == buckets and r.manifest_cache.hits == 2 * buckets
        same_views = all(a is b for a, b in zip(first_views, (t for _, t in out.tensors)))
        assert same_views == keep
        if keep:
            assert ptrs[0] == ptrs[1] == ptrs[2]


def _steps_recorded(n):
    rec = RecordingTransport()
    s = WeightSender(_fp8_layout(), "", 0, 0, bucket_bytes=32 << 10, transport=rec)
    sds = [_state_dict(20 + i) for i in range(n)]
    for i, sd in enumerate(sds):
        s.send(sd, step=i)
    expected = [_digests(quantize_weights(iter(sd.items()), _fp8_layout())) for sd in sds]
    return rec.messages, expected


def _ptrs(step):
    return sorted(t.data_ptr() for _, t in step.tensors if t.numel())


def test_default_reuses_step_buffers_only_when_dropped():
    """Default ``receive_all``: a step the caller dropped lends its buffers and
    views to the next one; a step still referenced in any way (the list, one
    pair, one tensor, a view derived from one) is never overwritten."""
    msgs, expected = _steps_recorded(6)
    r = _receiver(list(msgs))
    assert r.keep_step_buffers is None
    out = r.receive_all(expected_step=0)
    assert _digests(out.tensors) == expected[0]
    ptrs0 = _ptrs(out)
    views0 = [t for _, t in out.tensors]
    del out
    out = r.receive_all(expected_step=1)  # views0 still referenced: new buffers
    assert _digests(out.tensors) == expected[1]
    assert not set(ptrs0) & set(_ptrs(out))
    ptrs1 = _ptrs(out)
    views1 = [t for _, t in out.tensors]
    del views0, views1, out
    out = r.receive_all(expected_step=2)  # nothing referenced: step 1's buffers and views again
    assert _digests(out.tensors) == expected[2]
    assert _ptrs(out) == ptrs1
    # hold one pair, one tensor, one derived view: those buckets are left alone
    pair = out.tensors[0]
    held_name, held = pair[0], pair[1].clone()
    derived = out.tensors[-1][1].view(torch.uint8)[:4]
    derived_bytes = derived.clone()
    del out
    out = r.receive_all(expected_step=3)
    assert _digests(out.tensors) == expected[3]
    assert torch.equal(pair[1], held) and pair[0] == held_name
    assert torch.equal(derived, derived_bytes)
    only_tensor = out.tensors[0][1]
    only_bytes = only_tensor.clone()
    del out, pair, derived
    out = r.receive_all(expected_step=4)
    assert _digests(out.tensors) == expected[4]
    assert torch.equal(only_tensor, only_bytes)
    del out, only_tensor
    out = r.receive_all(expected_step=5)
    assert _digests(out.tensors) == expected[5]
    assert len(r._auto) == len(out.manifests)
    r.release_buffers()
    assert _digests(out.tensors) == expected[5]  # release drops the receiver's references only


def test_empty_step():
    msgs, stats, _ = _record({}, step=3)
    assert stats.num_buckets == 0
    out = _receiver(msgs).receive_all()
    assert out.tensors == [] and out.summary.num_buckets == 0


# ------------------------------------------------------- errors / recovery


def _split_messages(msgs):
    """Group the recorded broadcasts (wire order: C1 C2 P1 C3 P2 ... C_END Pn)
    into messages: [control, (payload + seal)] for a bucket, [control] else."""
    out, i, owed = [], 0, None
    while i < len(msgs):
        h, _ = wire.decode_control(msgs[i])
        m = [msgs[i]]
        i += 1
        if owed is not None:
            owed.append(msgs[i])
            i += 1
        out.append(m)
        owed = m if h.kind == wire.MessageKind.BUCKET else None
    return out


def _flat(groups):
    return wire.step_transfers(*groups)


def _two_steps():
    rec = RecordingTransport()
    s = WeightSender(None, "", 0, 0, bucket_bytes=80 << 10, transport=rec)
    s.send(_state_dict(5), step=1)
    n1 = len(rec.messages)
    s.send(_state_dict(6), step=2)
    return _split_messages(rec.messages[:n1]), rec.messages[n1:]


def test_checksum_mismatch_is_detected_and_drained():
    step1, step2 = _two_steps()
    bad = bytearray(step1[1][1])
    bad[10] ^= 0xFF
    step1[1][1] = bytes(bad)
    r = _receiver(_flat(step1) + step2)
    with pytest.raises(ChecksumError):
        r.receive_step(lambda ts, m: None)
    assert r.broken is None
    assert _digests(r.receive_all(expected_step=2).tensors) == _digests(_state_dict(6).items())


def test_truncated_step_missing_last_bucket():
    step1, step2 = _two_steps()
    del step1[-2]  # drop the last bucket, keep END
    r = _receiver(_flat(step1) + step2)
    with pytest.raises(TruncatedStepError):
        r.receive_all()
    assert r.receive_all().step == 2


def test_missing_middle_bucket_is_a_protocol_error():
    step1, step2 = _two_steps()
    del step1[1]
    r = _receiver(_flat(step1) + step2)
    with pytest.raises(ProtocolError):
        r.receive_all()
    assert r.receive_all().step == 2


def test_unexpected_step():
    step1, step2 = _two_steps()
    r = _receiver(_flat(step1) + step2)
    with pytest.raises(ProtocolError, match="expected step 5"):
        r.receive_all(expected_step=5)
    assert r.receive_all(expected_step=2).step == 2


def test_on_bucket_failure_drains_rest_of_step():
    step1, step2 = _two_steps()
    r = _receiver(_flat(step1) + step2)

    def boom(ts, m):
        raise KeyError("unknown parameter")

    with pytest.raises(KeyError):
        r.receive_step(boom)
    assert r.receive_all().step == 2


def _two_then_fail():
    """A caller's weights that fail after one full 16 KiB bucket (announced)
    and one more tensor (packed, never announced)."""
    yield "a.weight", torch.randn(4096)
    yield "b.weight", torch.randn(4096)
    raise RuntimeError("quantization exploded")


def test_sender_abort_reaches_receiver():
    rec = RecordingTransport()
    s = WeightSender(None, "", 0, 0, bucket_bytes=16 << 10, transport=rec)
    with pytest.raises(RuntimeError, match="exploded"):
        s.send(_two_then_fail(), step=1)
    n1 = len(rec.messages)
    s.send({"c": torch.ones(3)}, step=2)
    r = _receiver(rec.messages)
    with pytest.raises(StepAbortedError, match="exploded"):
        r.receive_all()
    assert r.broken is None
    assert [n for n, _ in r.receive_all().tensors] == ["c"]
    assert n1 < len(rec.messages)


def test_sender_voids_every_announced_payload_on_abort():
    """A sender that fails after a control announced a payload still sends
    that payload, with its announced size and a void seal, then its ABORT
    control: the streaming and the whole-step receive hand nothing of it
    out, and the group stays in sync for the next step."""
    rec = RecordingTransport()
    s = WeightSender(None, "", 0, 0, bucket_bytes=16 << 10, transport=rec)
    with pytest.raises(RuntimeError, match="exploded"):
        s.send(_two_then_fail(), step=1)
    msgs = list(rec.messages)
    kinds = [wire.decode_control(m)[0].kind if len(m) == wire.CONTROL_SIZE else "payload" for m in msgs]
    assert kinds == [wire.MessageKind.BUCKET, wire.MessageKind.ABORT, "payload"], kinds
    h = wire.decode_control(msgs[0])[0]
    assert len(msgs[2]) == h.payload_len + wire.SEAL_SIZE and msgs[2][-wire.SEAL_SIZE:] == wire.encode_void_seal(h)
    s.send({"c": torch.ones(3)}, step=2)
    for mode in ("stream", "all"):
        r = _receiver(list(rec.messages))
        got = []
        with pytest.raises(StepAbortedError, match="exploded"):
            if mode == "stream":
                r.receive_step(lambda ts, m: got.extend(n for n, _ in ts))
            else:
                r.receive_all()
        assert got == [] and r.broken is None
        assert [n for n, _ in r.receive_all().tensors] == ["c"]


class _Interrupted(RecordingTransport):
    """Records every transfer; a SIGINT arrives just before or just after
    transfer number ``at`` is posted (its ``KeyboardInterrupt`` is raised
    inside the transport's call: before, nothing went out; after, the
    transfer is on the wire and the sender has not noted it yet)."""

    def __init__(self, at: int, before: bool) -> None:
        super().__init__()
        self.at, self.before, self.fired = at, before, False

    def _interrupt(self, posted: int) -> None:
        if not self.fired and posted == self.at:
            self.fired = True
            signal.raise_signal(signal.SIGINT)

    def broadcast(self, tensor, async_op=False):
        if self.before:
            self._interrupt(len(self.messages))
        done = super().broadcast(tensor, async_op=async_op)
        if not self.before:
            self._interrupt(len(self.messages) - 1)
        return done


@pytest.mark.parametrize("before", [True, False], ids=["before_posting", "after_posting"])
@pytest.mark.parametrize("at, what", [(1, "control"), (2, "payload")])
def test_interrupt_around_a_transfer_keeps_the_stream_in_frame(at, what, before):
    """Ctrl-C landing around the posting of a control (which announces a
    payload) or of a payload (which the sender then stops owing): the
    sender's record of what it owes stays true, so its abort voids each
    announced payload exactly once and the receivers stay in frame for the
    next step. (Before: a control went out whose payload was never sent, or
    a payload was dropped from the owed list and never sent; the receiver
    then read an ABORT control where a payload was due.)"""
    # Python's own SIGINT handler (KeyboardInterrupt), whatever earlier tests in this process installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_and_resume(at, before)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_and_resume(at: int, before: bool) -> None:
    rec = _Interrupted(at, before)
    s = WeightSender(None, "", 0, 0, bucket_bytes=16 << 10, transport=rec)
    sd = {n: torch.randn(4096) for n in ("a.weight", "b.weight", "c.weight")}  # one 16 KiB bucket each
    with pytest.raises(KeyboardInterrupt):
        s.send(sd, step=1)
    s.send({"d": torch.ones(3)}, step=2)
    kinds = [wire.decode_control(m)[0].kind if len(m) == wire.CONTROL_SIZE else "payload" for m in rec.messages]
    step1 = kinds[:kinds.index(wire.MessageKind.ABORT) + 2]
    assert step1.count("payload") == step1.count(wire.MessageKind.BUCKET), (at, before, kinds)
    replay = ReplayTransport(list(rec.messages))
    r = WeightReceiver("", 0, 0, 0, transport=replay)
    with pytest.raises(StepAbortedError, match="KeyboardInterrupt"):
        r.receive_all()
    assert r.broken is None
    assert [n for n, _ in r.receive_all().tensors] == ["d"]
    assert not replay.aborted  # no size mismatch on the way (gloo would have aborted the process)


class _InterruptedGroup:
    """A real gloo group whose ``broadcast`` raises SIGINT in this process
    just before or just after the post number ``at`` since :meth:`arm`."""

    def __init__(self, group: BroadcastGroup) -> None:
        self._group = group
        self._at, self._before, self._posted = -1, False, 0

    def __getattr__(self, name):
        return getattr(self._group, name)

    def arm(self, at: int, before: bool) -> None:
        self._at, self._before, self._posted = at, before, 0

    def broadcast(self, tensor, async_op=False):
        k = self._posted
        self._posted += 1
        if self._before and k == self._at:
            signal.raise_signal(signal.SIGINT)
        done = self._group.broadcast(tensor, async_op=async_op)
        if not self._before and k == self._at:
            signal.raise_signal(signal.SIGINT)
        return done


_INTERRUPT_CASES = [(1, True), (1, False), (2, True), (2, False)]  # (post number, before it?)


def _interrupted_receiver_proc(port, q):
    try:
        with WeightReceiver("127.0.0.1", port, 2, 1, backend="gloo", timeout=60) as r:
            for k in range(len(_INTERRUPT_CASES)):
                try:
                    r.receive_all(expected_step=2 * k + 1)
                    q.put((k, "step was not aborted"))
                except StepAbortedError as e:
                    q.put((k, "aborted" if "KeyboardInterrupt" in str(e) else repr(e)))
                q.put((k, [n for n, _ in r.receive_all(expected_step=2 * k + 2).tensors]))
    except BaseException as e:  # pragma: no cover - reported to the parent
        q.put((-1, repr(e)))


def test_interrupt_around_a_transfer_on_real_gloo():
    """The same Ctrl-C cases as above on a real gloo group, receiver in its
    own process: gloo aborts a process on a transfer of the wrong size, which
    the replay transport only reports. For every case the receiver sees the
    interrupted step aborted and takes the next step whole, in one group."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_interrupted_receiver_proc, args=(port, q), daemon=True)
    proc.start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        group = _InterruptedGroup(BroadcastGroup("127.0.0.1", port, 2, 0, backend="gloo", timeout=TIMEOUT_S))
        s = WeightSender(None, "", 0, 0, bucket_bytes=16 << 10, transport=group)
        sd = {n: torch.randn(4096) for n in ("a.weight", "b.weight", "c.weight")}  # one 16 KiB bucket each
        for k, (at, before) in enumerate(_INTERRUPT_CASES):
            group.arm(at, before)
            with pytest.raises(KeyboardInterrupt):
                s.send(sd, step=2 * k + 1)
            group.arm(-1, False)
            s.send({"d": torch.ones(3)}, step=2 * k + 2)
        results = [q.get(timeout=TIMEOUT_S) for _ in range(2 * len(_INTERRUPT_CASES))]
        group.close()
    finally:
        signal.signal(signal.SIGINT, previous)
        proc.join(timeout=TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
    assert results == [x for k in range(len(_INTERRUPT_CASES)) for x in ((k, "aborted"), (k, ["d"]))], results
    assert proc.exitcode == 0


def _voided(transfers):
    """A bucket's ``[control, payload]`` with the payload's seal made void."""
    h = wire.decode_control(transfers[0])[0]
    return [transfers[0], transfers[1][: -wire.SEAL_SIZE] + wire.encode_void_seal(h)]


def test_void_seal_without_abort_breaks_the_stream():
    """A voided payload must be followed by the sender's ABORT; a bucket in
    its place means the stream cannot be trusted."""
    a = _voided(harness.sync_bucket_transfers([("a", torch.ones(2))], step=1, last=False))
    b = harness.sync_bucket_transfers([("b", torch.ones(2))], step=1, index=1)
    r = _receiver(harness.sync_step_transfers(a, b, harness.sync_end_transfers(1, 2, 2, 16)))
    with pytest.raises(ProtocolError, match="voided"):
        r.receive_all()
    assert r.broken


def test_void_seal_after_end_breaks_the_stream():
    """END promises the step is complete; a voided payload after it (END
    totals leaving that bucket out) is not a successful step."""
    a = harness.sync_bucket_transfers([("a", torch.ones(2))], step=1, last=False)
    b = _voided(harness.sync_bucket_transfers([("b", torch.ones(2))], step=1, index=1))
    r = _receiver(harness.sync_step_transfers(a, b, harness.sync_end_transfers(1, 1, 1, 8)))
    with pytest.raises(ProtocolError, match="voided after"):
        r.receive_all(expected_step=1)
    assert r.broken


def test_nothing_is_handed_out_after_abort():
    """A payload that follows the ABORT control is consumed, never handed
    out, even with a valid seal (only a non-conforming peer sends one)."""
    a = harness.sync_bucket_transfers([("a", torch.ones(2))], step=1)
    abort = [wire.encode_control(*wire.encode_abort(1, "trainer died"))]
    r = _receiver(harness.sync_step_transfers(a, abort))
    seen = []
    with pytest.raises(StepAbortedError, match="trainer died"):
        r.receive_step(lambda ts, m: seen.extend(n for n, _ in ts), expected_step=1)
    assert seen == [] and r.broken is None and r.transport.remaining == 0


def test_bucket_of_another_step_inside_a_step_breaks_the_stream():
    """Every bucket control's step is checked, not only the first's: a bucket
    of step 2 inside step 1 means step 1's end is missing."""
    a = harness.sync_bucket_transfers([("a", torch.ones(2))], step=1, last=False)
    b = harness.sync_bucket_transfers([("b", torch.full((2,), 7.0))], step=2, index=1)
    r = _receiver(harness.sync_step_transfers(a, b, harness.sync_end_transfers(1, 2, 2, 16)))
    with pytest.raises(ProtocolError, match="inside step 1"):
        r.receive_all(expected_step=1)
    assert r.broken


class _Cancelled(BaseException):
    """An interrupt that is not an Exception (as KeyboardInterrupt is)."""


def test_interrupt_during_a_step_breaks_the_receiver_instead_of_misframing():
    """An interrupt from the caller's manifest check lands between reading a
    control and recording what it announced: the receiver cannot know where
    the stream stands, so it breaks (loudly) rather than read the next step
    out of frame."""
    msgs = (_record({f"w{i}": torch.full((512,), float(i)) for i in range(8)}, step=1, bucket_bytes=4096)[0]
            + _record({"v": torch.ones(4)}, step=2)[0])
    r = _receiver(msgs)
    calls = []

    def check(manifest):
        calls.append(manifest)
        if len(calls) == 2:
            raise _Cancelled()
        return []

    with pytest.raises(_Cancelled):
        r.receive_all(expected_step=1, check_manifest=check)
    assert r.broken and "_Cancelled" in r.broken
    with pytest.raises(ReceiverBrokenError):
        r.receive_all(expected_step=2)
    assert not r.transport.aborted


def test_sender_rejects_bad_input():
    rec = RecordingTransport()
    s = WeightSender(None, "", 0, 0, bucket_bytes=4096, transport=rec)
    with pytest.raises(wire.ManifestError):
        s.send({"bad name!": torch.ones(1)}, step=0)
    with pytest.raises(ValueError, match="twice"):
        s.send([("a", torch.ones(1)), ("a", torch.ones(1))], step=0)
    with pytest.raises(ValueError):
        s.send({}, step=-1)
    with pytest.raises(ValueError):
        WeightSender(None, "", 0, 0, bucket_bytes=8, transport=RecordingTransport())


def test_bad_magic_breaks_receiver_loudly():
    msgs, _, _ = _record({"a": torch.ones(4)})
    msgs[0] = b"XXXX" + msgs[0][4:]
    r = _receiver(msgs)
    with pytest.raises(wire.BadMagicError):
        r.receive_all()
    assert r.broken
    with pytest.raises(ReceiverBrokenError):
        r.receive_all()


def test_oversized_payload_claim_is_not_allocated():
    man = b'{"layout":null,"tensors":[]}'
    hdr = wire.encode_header(
        wire.Header(kind=wire.MessageKind.BUCKET, step=0, manifest_len=len(man), payload_len=1 << 40,
                    manifest_crc32=zlib.crc32(man))
    )
    r = _receiver([wire.encode_control(hdr, man)], limits=WireLimits(max_bucket_bytes=1 << 20))
    allocs = []
    r._alloc = lambda n: allocs.append(n) or torch.empty(n, dtype=torch.uint8)
    with pytest.raises(LimitExceededError):
        r.receive_all()
    assert allocs == []  # rejected from the header alone


def test_require_checksum():
    msgs, _, _ = _record({"a": torch.ones(4)}, checksum="none")
    with pytest.raises(ChecksumError):
        _receiver(msgs, require_checksum=True).receive_all()
    assert _receiver(msgs).receive_all().tensors[0][0] == "a"


# ------------------------------------------------------------- real gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receiver_proc(port, world_size, rank, steps, q):
    try:
        with WeightReceiver("127.0.0.1", port, world_size, rank, backend="gloo", timeout=60) as r:
            for step in steps:
                if rank % 2:  # streaming path
                    got = {}

                    def on_bucket(tensors, manifest):
                        got.update(_digests(tensors))

                    summary = r.receive_step(on_bucket, expected_step=step)
                    q.put((rank, step, got, summary.num_buckets))
                else:  # whole-step path
                    out = r.receive_all(expected_step=step)
                    q.put((rank, step, _digests(out.tensors), out.summary.num_buckets))
    except BaseException as e:  # pragma: no cover - reported to the parent
        q.put((rank, -1, repr(e), 0))


def test_gloo_one_sender_two_receivers_three_steps():
    layout = _fp8_layout() if HAVE_FORMATS else None
    plain_steps = [0, 1, 2]
    fp8_steps = [3, 4, 5] if layout is not None else []
    steps = plain_steps + fp8_steps
    port = _free_port()
    world_size = 3
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_receiver_proc, args=(port, world_size, r, steps, q), daemon=True) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        group = BroadcastGroup("127.0.0.1", port, world_size, 0, backend="gloo", timeout=TIMEOUT_S)
        plain = WeightSender(None, "", 0, 0, bucket_bytes=80 << 10, transport=group)
        expected = {}
        for step in plain_steps:
            sd = _state_dict(100 + step)
            stats = plain.send(sd, step=step)
            assert stats.num_buckets >= 4
            expected[step] = (_digests(sd.items()), stats.num_buckets)
        if fp8_steps:
            fp8 = WeightSender(layout, "", 0, 0, bucket_bytes=80 << 10, transport=group)
            for step in fp8_steps:
                sd = _state_dict(100 + step)
                stats = fp8.send(sd, step=step)
                ref = list(quantize_weights(iter(sd.items()), layout))
                assert sum(t.dtype == torch.float8_e4m3fn for _, t in ref) >= 6
                expected[step] = (_digests(ref), stats.num_buckets)
        results = [q.get(timeout=TIMEOUT_S) for _ in range(len(procs) * len(steps))]
        group.close()
    finally:
        for p in procs:
            p.join(timeout=TIMEOUT_S)
            if p.is_alive():
                p.kill()
    for rank, step, got, nb in results:
        assert step >= 0, got
        assert got == expected[step][0], (rank, step)  # bitwise identical
        assert nb == expected[step][1]
    assert sorted((r, s) for r, s, _, _ in results) == sorted((r, s) for r in (1, 2) for s in steps)
    assert all(p.exitcode == 0 for p in procs)


def test_default_reuse_holds_only_the_last_steps_buffers():
    """After a step with fewer buckets than the one before, the receiver
    holds only the buffers of the last step (the memory the docs state)."""
    rec = RecordingTransport()
    s = WeightSender(None, "", 0, 0, bucket_bytes=8 << 10, transport=rec)
    big = {f"w{i}": torch.randn(1000) for i in range(12)}
    small = {f"w{i}": torch.randn(1000) for i in range(3)}
    s.send(big, step=1)
    s.send(small, step=2)
    s.send(small, step=3)
    r = _receiver(rec.messages)
    out = r.receive_all(expected_step=1)
    n_big = len(out.manifests)
    del out
    assert len(r._auto) == n_big
    out = r.receive_all(expected_step=2)
    assert len(out.manifests) < n_big and len(r._auto) == len(out.manifests)
    assert _digests(out.tensors) == _digests(small.items())
    del out
    out = r.receive_all(expected_step=3)
    assert _digests(out.tensors) == _digests(small.items())


def test_peekable_take_keeps_order_and_end():
    """The sender's look-ahead iterator hands out a bucket's worth of items at
    once (layout replay) and keeps order with peeked and pushed-back items
    and at the end of the stream."""
    from vllm_fp8_overlay.sync.grouped import _END
    from vllm_fp8_overlay.sync.sendstate import SendStats, _Peekable

    p = _Peekable(iter(range(10)), SendStats(step=0))
    assert p.take(3) == [0, 1, 2]
    assert p.peek() == 3 and p.take(2) == [3, 4]
    got = p.take(3)
    p.push_back(got)
    assert p.take(4) == [5, 6, 7, 8]
    assert p.take(5) == [9] and p.peek() is _END and p.take(2) == []
    p.push_back([8, 9])
    assert p.take(5) == [8, 9] and p.next() is _END
    q = _Peekable(iter(range(3)), SendStats(step=0))
    assert q.take(3) == [0, 1, 2] and q.peek() is _END and q.take(1) == [] and q.next() is _END
