"""Triton FP8 kernels on CUDA: bitwise equality with the torch backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs CUDA and triton",
)

RECIPES = ("ct", "hf")
STRATS = (("block", (128, 128)), ("channel", None), ("tensor", None))
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (1000, 1000), (129, 257), (1, 300), (300, 1), (768, 2048), (2048, 768)]


def _sample(shape, dtype, kind, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "t":
        x = torch.distributions.StudentT(torch.tensor(2.5, device="cuda")).sample(shape) * 0.02
    elif kind == "wide":
        x = torch.randn(shape, device="cuda", generator=g) * torch.logspace(-6, 2, shape[1], device="cuda")
    else:
        x = torch.randn(shape, device="cuda", generator=g) * 0.03
    return x.to(dtype)


def _ref(strat, w, recipe, blk):
    from vllm_fp8_overlay.formats import quantize as R

    if strat == "block":
        return R._torch_blockwise(w, recipe, blk)
    return {"tensor": R._torch_tensorwise, "channel": R._torch_channelwise}[strat](w, recipe)


def _ker(strat, w, recipe, blk):
    from vllm_fp8_overlay.kernels import triton_fp8 as K

    if strat == "block":
        return K.blockwise(w, recipe, blk)
    return {"tensor": K.tensorwise, "channel": K.channelwise}[strat](w, recipe)


def _assert_same(a, b, what):
    qa, sa, ma = a
    qb, sb, mb = b
    assert sa.dtype == sb.dtype and sa.shape == sb.shape, what
    nq = int((qa.view(torch.uint8) != qb.view(torch.uint8)).sum())
    ns = int((sa.reshape(-1) != sb.reshape(-1)).sum())
    assert nq == 0 and ns == 0, f"{what}: {nq} fp8 bytes and {ns} scales differ"
    assert float(ma) == float(mb), what


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("strat,blk", STRATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitwise_random_and_heavy_tailed(recipe, strat, blk, dtype):
    for i, shape in enumerate(SHAPES):
        for kind in ("n", "t", "wide"):
            w = _sample(shape, dtype, kind, seed=i)
            _assert_same(_ref(strat, w, recipe, blk), _ker(strat, w, recipe, blk), f"{kind} {shape}")


@pytest.mark.parametrize("strat,blk", STRATS)
def test_fp16_hf_and_noncontiguous(strat, blk):
    w = _sample((1000, 1000), torch.float16, "t", 7)
    _assert_same(_ref(strat, w, "hf", blk), _ker(strat, w, "hf", blk), "fp16")
    big = _sample((512, 1536), torch.bfloat16, "t", 8)
    view = big[:, 256:1280]  # row stride != cols
    for recipe in RECIPES:
        _assert_same(_ref(strat, view, recipe, blk), _ker(strat, view, recipe, blk), "strided")


def test_odd_block_sizes():
    w = _sample((1000, 333), torch.bfloat16, "t", 9)
    for blk in ((64, 64), (128, 64), (32, 256)):
        for recipe in RECIPES:
            _assert_same(_ref("block", w, recipe, blk), _ker("block", w, recipe, blk), str(blk))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("strat,blk", STRATS)
def test_many_small_matrices_grouped(recipe, strat, blk):
    from vllm_fp8_overlay.kernels.triton_fp8 import quantize_grouped

    ws = [_sample((768, 2048), torch.bfloat16, "t", s) for s in range(64)]
    ws += [_sample((2048, 768), torch.bfloat16, "n", 100 + s) for s in range(32)]
    ws += [_sample((130, 96), torch.bfloat16, "n", 200), _sample((5, 33), torch.bfloat16, "t", 201)]
    qs, ss, am = quantize_grouped(ws, recipe, strat, blk)
    for i, w in enumerate(ws):
        r = _ref(strat, w, recipe, blk)
        _assert_same(r, (qs[i], ss[i].reshape(r[1].shape), am[i].to(r[2].dtype)), f"#{i}")


def test_grouped_into_byte_buffer():
    from vllm_fp8_overlay.kernels.triton_fp8 import quantize_grouped

    ws = [_sample((256, 512), torch.bfloat16, "t", s) for s in range(5)]
    out = torch.full((1 << 22,), 0xAB, dtype=torch.uint8, device="cuda")
    q_offs = [64 + i * (256 * 512 + 64) for i in range(5)]
    s_offs = [(3 << 20) + i * 256 for i in range(5)]
    qs, ss, _ = quantize_grouped(ws, "hf", "block", (128, 128), out=out, q_offsets=q_offs, s_offsets=s_offs)
    for i, w in enumerate(ws):
        r = _ref("block", w, "hf", (128, 128))
        assert torch.equal(out[q_offs[i] : q_offs[i] + w.numel()], r[0].view(torch.uint8).reshape(-1))
        assert torch.equal(ss[i], r[1])
    assert int(out[0]) == 0xAB and int(out[63]) == 0xAB


def test_quantize_tensor_seam_and_nan():
    from vllm_fp8_overlay import kernels
    from vllm_fp8_overlay.formats.detect import FP8Layout
    from vllm_fp8_overlay.formats.quantize import get_backend, quantize_tensor

    assert kernels.register() is True
    assert get_backend().name == "triton"
    layouts = [
        FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv"),
        FP8Layout(method="compressed-tensors", strategy="channel"),
        FP8Layout(method="compressed-tensors", strategy="tensor"),
        FP8Layout(method="fp8", strategy="tensor"),
    ]
    w = _sample((1100, 700), torch.bfloat16, "t", 11)
    for lay in layouts:
        qa, sa = quantize_tensor(w, lay, backend="torch")
        qb, sb = quantize_tensor(w, lay)
        assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(sa, sb)
        assert sa.shape == sb.shape and sa.dtype == sb.dtype
    w[5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_tensor(w, layouts[0], name="x.weight")


def test_grouped_amax_any_and_cached_plan():
    from vllm_fp8_overlay.kernels import triton_fp8 as K

    ws = [_sample((256, 384), torch.bfloat16, "t", s) for s in range(4)] + [_sample((128, 128), torch.bfloat16, "n", 9)]
    qs, ss, am = K.quantize_grouped(ws, "hf", "block", (128, 128))
    hits = K._stats["plan_hits"]
    qs2, ss2, any_ = K.quantize_grouped(ws, "hf", "block", (128, 128), amax="any")
    assert K._stats["plan_hits"] > hits
    assert bool(torch.isfinite(any_).all())
    for a, b in zip(qs, qs2):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    ws[2][3, 4] = float("inf")
    _, _, any_ = K.quantize_grouped(ws, "hf", "block", (128, 128), amax="any")
    assert not bool(torch.isfinite(any_).all())


def _assert_torch_reference(got: dict, sd: dict, layout, what: str) -> None:
    """``got`` (received tensors by name) equals the torch reference
    quantization of ``sd``, bitwise, name for name."""
    from vllm_fp8_overlay.formats import quantize as R

    ref = {n: t.cpu() for n, t in R.quantize_weights(iter([(n, t.detach()) for n, t in sd.items()]), layout,
                                                     backend="torch")}
    assert got.keys() == ref.keys()
    for n, r in ref.items():
        g = got[n].cpu()
        assert g.dtype == r.dtype and tuple(g.shape) == tuple(r.shape), n
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                           r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r), f"{what}: {n}"


@pytest.mark.parametrize("method,strat", [("fp8", "block"), ("compressed-tensors", "channel")])
@pytest.mark.parametrize("bucket_kib", [96, 192])
def test_sender_grouped_path_repeated_steps(method, strat, bucket_kib):
    """WeightSender's grouped, pipelined path over several steps (the second
    and later steps reuse cached entries, manifests and prepared launches):
    every received tensor equals the torch reference bitwise, also after the
    weights change in place, after a tensor moves to a new address, after a
    shape changes and after a tensor is dropped. With 96 KiB buckets one
    weight is larger than a bucket (sent alone; no bucket layout is reused),
    with 192 KiB none is."""
    from vllm_fp8_overlay.formats import FP8Layout
    from vllm_fp8_overlay.sync import WeightReceiver, WeightSender
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    if method == "fp8":
        layout = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv")
    else:
        layout = FP8Layout(method="compressed-tensors", strategy="channel", block_size=None, scale_name="weight_scale")
    sd = {}
    for i in range(2):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.randn(256, device="cuda").bfloat16()
        sd[p + "self_attn.q_proj.weight"] = _sample((256, 256), torch.bfloat16, "t", i)
        sd[p + "mlp.down_proj.weight"] = _sample((256, 384), torch.bfloat16, "wide", i)
        for e in range(6):
            sd[p + f"mlp.experts.{e}.gate_proj.weight"] = _sample((128, 256), torch.bfloat16, "n", 10 * i + e)
    rec = RecordingTransport(device="cuda")
    snd = WeightSender(layout, "", 0, 0, bucket_bytes=bucket_kib << 10, transport=rec)
    reused = []
    for step in range(7):
        if step == 2:
            for t in sd.values():
                t.mul_(1.5)
        if step == 3:
            k = "model.layers.1.self_attn.q_proj.weight"
            sd[k] = sd[k].clone() * -0.5
        if step == 4:  # a shape changes mid-step: the buckets from there on are laid out afresh
            sd["model.layers.1.mlp.experts.2.gate_proj.weight"] = _sample((256, 256), torch.bfloat16, "n", 99)
        if step == 6:  # the last tensor is gone
            sd.pop("model.layers.1.mlp.experts.5.gate_proj.weight")
        rec.messages.clear()
        st = snd.send(sd, step=step)
        assert st.num_buckets > 2
        reused.append((st.reused_buckets, st.num_buckets))
        got = dict(WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages))).receive_all().tensors)
        _assert_torch_reference(got, sd, layout, f"step {step}")
    if bucket_kib == 96:
        assert all(r == 0 for r, _ in reused)
    else:  # every bucket reused from step 1 on, except after the changes of steps 4 and 6
        assert reused[0][0] == 0 and all(reused[i][0] == reused[i][1] for i in (1, 2, 3, 5))
        assert 0 < reused[4][0] < reused[4][1] and reused[6][0] < reused[6][1]
    # a name sent twice is caught also when the buckets before it were reused
    items = list(sd.items())
    with pytest.raises(ValueError, match="twice"):
        snd.send(items + [items[0]], step=7)


def test_sender_stages_controls_and_seals_per_slot():
    """On CUDA each bucket slot stages its controls and seals through memory
    kept for the slot (``outbox._ControlStage``) instead of allocating per
    bucket. Every control on the wire is exactly ``header || manifest`` and
    zeros, also when a slot's manifest is shorter than the one it held
    before (long names, then short ones, then long again), and every payload
    arrives with its own seal: the receiver takes each step and it equals
    the torch reference bitwise."""
    from vllm_fp8_overlay.formats import FP8Layout
    from vllm_fp8_overlay.sync import WeightReceiver, WeightSender, wire
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    layout = FP8Layout(method="compressed-tensors", strategy="channel", block_size=None, scale_name="weight_scale")

    def weights(prefix: str) -> dict:
        return {f"{prefix}.layers.{i}.mlp.experts.{e}.up_proj.weight": _sample((128, 256), torch.bfloat16, "n", 7 * i + e)
                for i in range(3) for e in range(8)}

    long_sd, short_sd = weights("model.a_rather_long_prefix_that_makes_the_manifest_longer"), weights("m")
    rec = RecordingTransport(device="cuda")
    snd = WeightSender(layout, "", 0, 0, bucket_bytes=160 << 10, transport=rec)
    for step, sd in enumerate([long_sd, short_sd, long_sd, short_sd]):
        rec.messages.clear()
        st = snd.send(sd, step=step)
        assert st.num_buckets >= 4
        controls = [m for m in rec.messages if len(m) == wire.CONTROL_SIZE]
        assert len(controls) == st.num_buckets + 1  # the buckets' and END's
        for c in controls:
            h, man = wire.decode_control(c)
            assert c == wire.encode_control(c[:wire.HEADER_SIZE], man), f"step {step}: control not zero padded"
        got = dict(WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages))).receive_all().tensors)
        _assert_torch_reference(got, sd, layout, f"step {step}")
    assert all(s.stage is not None for s in snd._slots[:2])


def test_sender_fast_replay_equals_the_torch_reference():
    """A bucket of plain caller tensors is matched list against list on the
    next step (``sync.replay``): every bucket of steps 1.. is reused without
    the item-by-item comparison, and the bytes stay exactly the torch
    reference's when a parameter's storage is replaced (``p.data = ...``,
    same object), when a tensor starts requiring grad or changes dtype
    (compared item by item then), with a non-contiguous copy source, and a
    NaN in a reused bucket is still refused by name."""
    from vllm_fp8_overlay.formats import FP8Layout
    from vllm_fp8_overlay.sync import StepAbortedError, WeightReceiver, WeightSender, replay, wire
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    layout = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv")
    sd = {}
    for i in range(3):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.nn.Parameter(torch.randn(256, device="cuda").bfloat16(),
                                                              requires_grad=False)
        sd[p + "mlp.gate.weight"] = torch.randn(256, 16, device="cuda").bfloat16().t()  # not contiguous
        for e in range(8):
            sd[p + f"mlp.experts.{e}.down_proj.weight"] = torch.nn.Parameter(
                _sample((256, 128), torch.bfloat16, "n", 10 * i + e), requires_grad=False)
    rec = RecordingTransport(device="cuda")
    snd = WeightSender(layout, "", 0, 0, bucket_bytes=160 << 10, transport=rec)
    slow_calls = []
    real = replay.replay_items

    def counting(got, plan, cur):
        slow_calls.append(len(got))
        return real(got, plan, cur)

    replay.replay_items = counting
    try:
        for step in range(7):
            slow_calls.clear()
            if step == 2:  # new storage behind the same Parameter objects
                for n, t in sd.items():
                    if isinstance(t, torch.nn.Parameter):
                        t.data = t.data.clone() * -2
            if step == 3:
                sd["model.layers.1.mlp.experts.3.down_proj.weight"].requires_grad_(True)
            if step == 4:
                sd["model.layers.1.mlp.experts.3.down_proj.weight"].requires_grad_(False)
                sd["model.layers.2.input_layernorm.weight"] = torch.randn(256, device="cuda")  # float32 now
            if step == 6:  # new values in place: a replayed launch graph must read them
                for t in sd.values():
                    t.data.mul_(-0.5)
            rec.messages.clear()
            st = snd.send(sd, step=step)
            assert st.num_buckets > 3
            got = dict(WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages))).receive_all().tensors)
            _assert_torch_reference(got, sd, layout, f"step {step}")
            if step in (1, 2, 5, 6):  # same items as the step before: every bucket reused, none item by item
                assert st.reused_buckets == st.num_buckets and slow_calls == [], (step, slow_calls)
            if step == 3:  # the grad-requiring tensor's bucket is compared item by item, and still reused
                assert st.reused_buckets == st.num_buckets and len(slow_calls) == 1
            if step == 4:  # a dtype changed: that bucket is laid out afresh
                assert slow_calls and st.reused_buckets < st.num_buckets
            if step in (0, 2):  # launch graphs only for work prepared before on the same addresses
                assert st.graph_buckets == 0, step
            if step == 1:
                assert st.graph_buckets > 0
            if step == 6:  # every bucket but the one copying the non-contiguous gate weights
                assert st.graph_buckets >= st.num_buckets - 3 > 0, (st.graph_buckets, st.num_buckets)
    finally:
        replay.replay_items = real
    bad = dict(sd)
    k = "model.layers.2.mlp.experts.5.down_proj.weight"
    bad[k] = sd[k].detach().clone()
    bad[k].view(-1)[7] = float("nan")
    rec.messages.clear()
    with pytest.raises(ValueError, match=k.replace(".", r"\.")):
        snd.send(bad, step=7)
    # on the wire: the refused bucket was announced already, so its payload
    # went out voided, with the ABORT control in the next control's place
    aborted = list(rec.messages)
    controls = [wire.decode_control(m)[0] for m in aborted if len(m) == wire.CONTROL_SIZE]
    assert controls[-1].kind == wire.MessageKind.ABORT
    voided = [h for h in controls if h.kind == wire.MessageKind.BUCKET
              and any(m[-wire.SEAL_SIZE:] == wire.encode_void_seal(h) for m in aborted if len(m) != wire.CONTROL_SIZE)]
    assert voided
    rec.messages.clear()
    snd.send(sd, step=70)
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(aborted + list(rec.messages), device="cuda"))
    handed = []
    with pytest.raises(StepAbortedError, match=k.replace(".", r"\.")):
        for b in rx.iter_fresh_buckets(7):
            handed += [n for n, _ in b.tensors]
    assert k not in handed and rx.broken is None  # earlier buckets may stream out; the voided one never
    _assert_torch_reference(dict(rx.receive_all(expected_step=70).tensors), sd, layout, "after the abort")
    # a NaN in the step's last bucket fails before END goes out (no ABORT may follow an END)
    last = list(sd)[-1]
    bad = dict(sd)
    bad[last] = sd[last].detach().clone()
    bad[last].view(-1)[0] = float("nan")
    rec.messages.clear()
    with pytest.raises(ValueError, match=last.replace(".", r"\.")):
        snd.send(bad, step=71)
    kinds = [wire.decode_control(m)[0].kind for m in rec.messages if len(m) == wire.CONTROL_SIZE]
    assert kinds[-1] == wire.MessageKind.ABORT and wire.MessageKind.END not in kinds
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages), device="cuda"))
    with pytest.raises(StepAbortedError):
        rx.receive_all(expected_step=71)
    assert rx.broken is None and rx.transport.remaining == 0
    k = "model.layers.0.input_layernorm.weight"
    bad = dict(sd)
    bad[k] = sd[k].detach().clone()
    bad[k][3] = float("inf")
    snd.send(sd, step=8)  # a refused step leaves no layout behind: this one lays it out again
    with pytest.raises(ValueError, match=k.replace(".", r"\.")):
        snd.send(bad, step=9)
    # a NaN written in place, where the bucket's launch work replays as a CUDA graph
    for step in (10, 11, 12):
        st = snd.send(sd, step=step)
    assert st.graph_buckets > 0
    k = "model.layers.1.mlp.experts.2.down_proj.weight"
    keep = sd[k].data[5, 9].clone()
    sd[k].data[5, 9] = float("nan")
    with pytest.raises(ValueError, match=k.replace(".", r"\.")):
        snd.send(sd, step=13)
    sd[k].data[5, 9] = keep
    for step in (14, 15, 16):
        rec.messages.clear()
        st = snd.send(sd, step=step)
    assert st.graph_buckets > 0
    got = dict(WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages))).receive_all().tensors)
    _assert_torch_reference(got, sd, layout, "graphs, step 16")
    snd.close()
    assert not snd._launch_graphs


def test_sender_replays_prequantized_and_fused_items_item_by_item():
    """Pre-quantized weights (``sources.Prequantized``, what the sharded
    stream yields) and fused 3-D experts split on the fly are not plain
    tensors: their buckets are compared item by item on later steps, still
    reused, and every received tensor equals the torch reference bitwise."""
    from vllm_fp8_overlay.formats import FP8Layout, quantize_tensor
    from vllm_fp8_overlay.formats import quantize as R
    from vllm_fp8_overlay.sync import WeightReceiver, WeightSender
    from vllm_fp8_overlay.sync.sources import Prequantized
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    layout = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv",
                       hidden_size=256)
    full = {f"model.layers.{i}.mlp.down_proj.weight": _sample((256, 384), torch.bfloat16, "n", i) for i in range(4)}
    fused = _sample((4, 256, 256), torch.bfloat16, "n", 50)  # [experts, 2 * intermediate, hidden]
    rec = RecordingTransport(device="cuda")
    snd = WeightSender(layout, "", 0, 0, bucket_bytes=256 << 10, transport=rec)
    for step in range(4):
        if step == 2:
            for t in (*full.values(), fused):
                t.mul_(-0.75)
        items = [(n, Prequantized(*quantize_tensor(t, layout, name=n, backend="torch"))) if k % 2 else (n, t)
                 for k, (n, t) in enumerate(full.items())]
        items.append(("model.layers.0.mlp.experts.gate_up_proj", fused))
        rec.messages.clear()
        st = snd.send(items, step=step)
        if step:
            assert st.reused_buckets == st.num_buckets > 1
        got = dict(WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages))).receive_all().tensors)
        ref = {n: t.cpu() for n, t in R.quantize_weights(
            iter([*full.items(), ("model.layers.0.mlp.experts.gate_up_proj", fused)]), layout, backend="torch")}
        assert got.keys() == ref.keys() and len(ref) == 2 * 4 + 2 * 8
        for n, r in ref.items():
            g = got[n].cpu()
            assert g.dtype == r.dtype and tuple(g.shape) == tuple(r.shape), n
            assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                               r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r), f"step {step}: {n}"


def test_bucket_value_check_on_cuda():
    """On CUDA the worker's payload check is one launch per dtype over the
    bucket (``kernels.value_check``): its count of offending elements equals
    torch's, tensor by tensor, for every case of
    ``testing.value_check_cases``; ``BucketChecks.check_payload`` passes a
    clean bucket without checking tensor by tensor and names the tensor of a
    poisoned one."""
    from vllm_fp8_overlay.sync import values
    from vllm_fp8_overlay.sync.apply.validate import BucketChecks
    from vllm_fp8_overlay.testing.value_check_cases import _buckets, run_cases

    count, fails = run_cases("cuda")
    assert count >= 100 and fails == [], fails[:5]
    scale_name, buckets = _buckets(torch.device("cuda"))
    checks = BucketChecks([], scale_name=scale_name)
    real = values.value_problems
    calls = []
    try:
        values.value_problems = lambda *a, **k: calls.append(1) or real(*a, **k)
        import vllm_fp8_overlay.sync.apply.validate as V

        V.value_problems = values.value_problems
        assert all(checks.check_payload(b) == [] for b in buckets) and calls == []
        name, t = next((n, t) for b in buckets for n, t in b.tensors if t.dtype == torch.float8_e4m3fn)
        t.view(torch.uint8).view(-1)[-1] = 0xFF
        bad = [p for b in buckets for p in checks.check_payload(b)]
        assert calls and len(bad) == 1 and bad[0].startswith(name)
    finally:
        values.value_problems = real
        V.value_problems = real


def test_cuda_receiver_checks_manifests_before_allocating():
    """With a caller's manifest check (the vLLM worker's), the CUDA receiver
    reads each control one message ahead of its payload and runs the check
    before the payload's buffer exists (protocol 3: every allocation follows
    the check of its own bucket); from the second step on the payloads go
    into buffers it already holds (nothing allocated); a bucket the check
    rejects is not handed out, the step is rejected naming it, and the next
    step is received normally (after a failed step, whose buffers are
    released, into new buffers checked first again)."""
    from vllm_fp8_overlay.sync import StepRejectedError, WeightReceiver, WeightSender
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    rec = RecordingTransport(device="cuda")
    snd = WeightSender(None, "", 0, 0, bucket_bytes=64 << 10, transport=rec)
    sd = {f"w{i}.weight": torch.randn(64, 96, device="cuda").bfloat16() for i in range(16)}
    for step in range(1, 6):
        snd.send(sd, step=step)
    r = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages), device="cuda"))
    events = []
    real_alloc = r._alloc
    r._alloc = lambda n: events.append(("alloc", n)) or real_alloc(n)

    def check(m):
        events.append(("check", m.index))
        return [f"{m.tensors[0].name}: refused"] if reject[0] and m.index == 1 else []

    def checked_first():
        checks = allocs = 0
        for kind, _ in events:
            checks += kind == "check"
            allocs += kind == "alloc"
            if allocs > checks:
                return False
        return True

    reject = [False]
    got = dict(r.receive_all(expected_step=1, check_manifest=check).tensors)
    n_buckets = sum(k == "check" for k, _ in events)
    assert n_buckets > 2 and checked_first()
    assert sum(k == "alloc" for k, _ in events) >= n_buckets  # first step: every payload buffer is new
    assert all(torch.equal(got[n], t) for n, t in sd.items())
    del got
    for step in (2, 3, 4, 5):
        events.clear()
        reject[0] = step == 3
        if step == 3:
            with pytest.raises(StepRejectedError, match="refused"):
                r.receive_all(expected_step=step, check_manifest=check)
            assert r.broken is None and checked_first()
            continue
        got = dict(r.receive_all(expected_step=step, check_manifest=check).tensors)
        assert all(torch.equal(got[n], t) for n, t in sd.items())
        allocs = [n for k, n in events if k == "alloc"]
        if step == 4:  # a failed step releases every buffer: checked before allocating again
            assert allocs and checked_first()
        else:  # held buffers: nothing allocated
            assert allocs == []
        del got


def test_cuda_worker_value_verdicts_read_at_the_end_of_the_step():
    """The worker's payload check in ``receive_all`` (``check_payload_deferred``)
    queues the one-launch check per bucket and reads every verdict after the
    step's END: a clean step is handed out whole; an FP8 NaN byte written
    into a payload on the wire rejects the step naming the tensor, nothing of
    it is handed out, and the next step is received normally."""
    from vllm_fp8_overlay.formats import FP8Layout
    from vllm_fp8_overlay.sync import StepRejectedError, WeightReceiver, WeightSender
    from vllm_fp8_overlay.sync.apply.validate import BucketChecks
    from vllm_fp8_overlay.sync.received import DeferredProblems
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    layout = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv")
    g = torch.Generator(device="cuda").manual_seed(4)
    sd = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(256, 384, device="cuda", generator=g).bfloat16()
          for i in range(6)}
    sd["model.norm.weight"] = torch.randn(256, device="cuda", generator=g).bfloat16()
    rec = RecordingTransport(device="cuda")
    snd = WeightSender(layout, "", 0, 0, bucket_bytes=256 << 10, transport=rec)
    steps = []
    for step in (1, 2, 3):
        rec.messages.clear()
        snd.send(sd, step=step)
        steps.append(list(rec.messages))
    from vllm_fp8_overlay.sync import wire

    k = next(i for i, m in enumerate(steps[1]) if len(m) != wire.CONTROL_SIZE)  # step 2's first payload
    poisoned = bytearray(steps[1][k])
    poisoned[0] = 0xFF  # the first byte of the first FP8 weight: a NaN encoding
    steps[1][k] = bytes(poisoned)
    r = WeightReceiver("", 0, 0, 0, transport=ReplayTransport(steps[0] + steps[1] + steps[2], device="cuda"))
    checks = BucketChecks([], scale_name=layout.scale_name)
    returned = []

    def check(bucket):
        out = checks.check_payload_deferred(bucket)
        returned.append(out)
        return out

    first = dict(r.receive_all(expected_step=1, check_payload=check).tensors)
    assert returned and all(isinstance(x, DeferredProblems) for x in returned)
    with pytest.raises(StepRejectedError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        r.receive_all(expected_step=2, check_payload=check)
    assert r.broken is None
    third = dict(r.receive_all(expected_step=3, check_payload=check).tensors)
    assert third.keys() == first.keys()
    for n, t in first.items():
        a, b = (t.view(torch.uint8), third[n].view(torch.uint8)) if t.dtype == torch.float8_e4m3fn else (t, third[n])
        assert torch.equal(a, b), n


@pytest.mark.parametrize("dtype,recipe", [(torch.bfloat16, "hf"), (torch.bfloat16, "ct"), (torch.float16, "hf")])
def test_block_kernel_equals_torch_on_every_16bit_pair(dtype, recipe):
    """Every (amax, x) pair of the dtype (about 2.7e9 elements) through the
    production block kernel and the torch reference: identical bytes."""
    from vllm_fp8_overlay.kernels.exhaustive import exhaustive_check

    nq, ns, n = exhaustive_check(dtype, recipe)
    assert n > 2 * 10**9
    assert (nq, ns) == (0, 0), f"{nq} fp8 bytes and {ns} scales differ of {n}"


def test_fast_quotient_is_what_the_kernels_use():
    from vllm_fp8_overlay.kernels import triton_fp8 as K

    k, _ = K._consts("hf", torch.bfloat16, torch.device("cuda"), "auto")
    assert k["DIV"] == (K.DIV_FAST if torch.bfloat16 in K.FAST_DIV_DTYPES else K.DIV_RN)
    k32, _ = K._consts("hf", torch.float32, torch.device("cuda"), "auto")
    assert k32["DIV"] == K.DIV_RN


def test_sender_ramp_and_cuda_receiver_reuse(monkeypatch):
    """Ramped bucket sizes (first bucket small, doubling up to bucket_bytes)
    and a CUDA receiver (next header posted behind each payload, seal checked
    from its host copy, buffers and views reused once the caller dropped the
    previous step) over several steps whose weights change in place: every
    received tensor equals the torch reference bitwise, a held step is never
    overwritten, and a released one lends its buffers to the next."""
    from vllm_fp8_overlay.formats import FP8Layout
    from vllm_fp8_overlay.formats import quantize as R
    from vllm_fp8_overlay.sync import WeightReceiver, WeightSender, grouped, wire
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    monkeypatch.setattr(grouped, "RAMP_FIRST_BYTES", 24 << 10)
    layout = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv")
    sd = {}
    for i in range(3):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.randn(256, device="cuda").bfloat16()
        sd[p + "self_attn.q_proj.weight"] = _sample((256, 256), torch.bfloat16, "t", i)
        for e in range(8):
            sd[p + f"mlp.experts.{e}.gate_proj.weight"] = _sample((128, 256), torch.bfloat16, "n", 10 * i + e)
    rec = RecordingTransport(device="cuda")
    snd = WeightSender(layout, "", 0, 0, bucket_bytes=192 << 10, transport=rec)
    steps, refs = [], []
    for step in range(5):
        if step:
            for t in sd.values():
                t.mul_(-1.25)
        rec.messages.clear()
        st = snd.send(sd, step=step)
        steps.append(list(rec.messages))
        refs.append({n: t.cpu() for n, t in R.quantize_weights(iter(list(sd.items())), layout, backend="torch")})
    heads = [wire.decode_header(m[:wire.HEADER_SIZE]) for m in steps[0]
             if len(m) == wire.CONTROL_SIZE and m[:4] == wire.MAGIC]
    sizes = [h.payload_len for h in heads if h.kind == wire.MessageKind.BUCKET]
    assert sizes[0] <= 24 << 10 and max(sizes) > 96 << 10 and st.num_buckets == len(sizes)
    rx = WeightReceiver("", 0, 0, 0, transport=ReplayTransport([m for s in steps for m in s], device="cuda"))
    assert rx._cuda

    def check(got, ref, step):
        assert got.keys() == ref.keys()
        for n, r in ref.items():
            g = got[n].cpu()
            assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                               r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r), f"step {step}: {n}"

    held = dict(rx.receive_all(expected_step=0).tensors)
    check(held, refs[0], 0)
    out = rx.receive_all(expected_step=1)  # step 0 still held: new buffers
    check(dict(out.tensors), refs[1], 1)
    check(held, refs[0], 0)
    ptrs = sorted(t.data_ptr() for _, t in out.tensors if t.numel())
    del held, out
    for step in (2, 3, 4):  # dropped each time: the same buffers
        out = rx.receive_all(expected_step=step)
        check(dict(out.tensors), refs[step], step)
        assert sorted(t.data_ptr() for _, t in out.tensors if t.numel()) == ptrs
        del out
    assert rx._ctl_ready is None and rx._pend == [] and rx.transport.remaining == 0


def test_bf16_grouped_send_and_batched_value_checks_on_cuda():
    """``layout=None`` on CUDA goes through the grouped path (one multi-tensor
    copy per bucket, batched value checks): received bytes equal the sent
    ones over repeated steps; a NaN, an Inf, an FP8 NaN byte or a zero scale
    anywhere is refused naming the tensor; huge finite tensors (whose
    squares overflow the batched norm) still go out. The receiver-side
    batched checks find the same offenders on the device."""
    from vllm_fp8_overlay.sync import WeightReceiver, WeightSender
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport
    from vllm_fp8_overlay.sync.values import device_values_many, value_problems

    g = torch.Generator(device="cuda").manual_seed(5)
    sd = {f"model.layers.{i}.mlp.w{j}.weight": torch.randn(300, 257, device="cuda", generator=g).bfloat16()
          for i in range(3) for j in range(4)}
    sd["model.norm.weight"] = torch.randn(64, device="cuda", generator=g)
    sd["model.pos"] = torch.arange(100, device="cuda")
    sd["model.q.weight"] = torch.randn(256, 256, device="cuda", generator=g).to(torch.float8_e4m3fn)
    sd["model.q.weight_scale"] = torch.rand(256, 1, device="cuda", generator=g) + 0.1
    sd["model.t.weight"] = torch.randn(64, 48, device="cuda", generator=g).bfloat16().t()  # not contiguous
    sd["huge.a.weight"] = torch.full((70_000,), 3e38, device="cuda")
    sd["huge.b.weight"] = torch.full((70_000,), -3e38, device="cuda")
    rec = RecordingTransport(device="cuda")
    snd = WeightSender(None, "", 0, 0, bucket_bytes=256 << 10, transport=rec)
    assert snd._grouped_ok()
    for step in range(3):
        for n, t in sd.items():
            if (t.is_floating_point() and t.dtype != torch.float8_e4m3fn and not n.endswith("scale")
                    and t.abs().max() < 1e30):
                t.mul_(-1)
        rec.messages.clear()
        st = snd.send(sd, step=step)
        assert st.num_buckets > 2
        got = dict(WeightReceiver("", 0, 0, 0, transport=ReplayTransport(list(rec.messages))).receive_all().tensors)
        assert got.keys() == sd.keys()
        for n, t in sd.items():
            a, b = got[n].cpu(), t.cpu().contiguous()
            if a.dtype == torch.float8_e4m3fn:
                a, b = a.view(torch.uint8), b.view(torch.uint8)
            assert a.dtype == b.dtype and torch.equal(a, b), (step, n)
    big = [(f"x.{i}.weight", torch.randn(70_000, device="cuda").bfloat16()) for i in range(3)]
    f8 = [(f"y.{i}.weight", torch.randn(70_000, device="cuda").to(torch.float8_e4m3fn)) for i in range(3)]
    assert value_problems(big + f8) == [] and all(bool(o.all()) for o in device_values_many(big + f8))
    for name, poison in [("model.layers.1.mlp.w2.weight", float("nan")), ("model.layers.2.mlp.w0.weight",
                         float("inf")), ("model.q.weight", 0x7F), ("model.q.weight", 0xFF),
                         ("model.q.weight_scale", 0.0)]:
        bad = {k: v.clone() for k, v in sd.items()}
        t = bad[name]
        (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).view(-1)[17] = poison
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            snd.send(bad, step=10)
        if t.dtype != torch.float8_e4m3fn or name.endswith("scale"):
            continue
        for pool in (big, f8):
            items = pool + [(name, t)] if t.dtype == pool[0][1].dtype else pool
            if t.dtype == pool[0][1].dtype:
                assert [p.split(":")[0] for p in value_problems(items)] == [name]
                assert not all(bool(o.all()) for o in device_values_many(items))
    for name, poison in [("x.1.weight", float("nan")), ("x.2.weight", float("-inf"))]:
        items = [(n, v.clone()) for n, v in big]
        dict(items)[name][5] = poison
        assert [p.split(":")[0] for p in value_problems(items)] == [name]
        assert not all(bool(o.all()) for o in device_values_many(items))
    for b in (0x7F, 0xFF):
        items = [(n, v.clone()) for n, v in f8]
        items[1][1].view(torch.uint8)[-2] = b
        assert [p.split(":")[0] for p in value_problems(items)] == ["y.1.weight"]
        assert not all(bool(o.all()) for o in device_values_many(items))


def test_cuda_receiver_early_path_rejects_bad_messages():
    """On CUDA the receiver posts manifest, payload and next header together
    and validates the manifest while the payload arrives: a corrupted
    manifest still breaks the stream with a clear error before anything is
    handed out, a short payload fails its seal, and a peer of another wire
    version is refused by its header."""
    from vllm_fp8_overlay.sync import ChecksumError, WeightReceiver, WeightSender, wire
    from vllm_fp8_overlay.sync.transport import RecordingTransport, ReplayTransport

    rec = RecordingTransport(device="cuda")
    snd = WeightSender(None, "", 0, 0, bucket_bytes=64 << 10, transport=rec)
    sd = {f"w{i}.weight": torch.randn(64, 96, device="cuda").bfloat16() for i in range(8)}
    snd.send(sd, step=1)
    msgs = list(rec.messages)
    heads = [i for i, m in enumerate(msgs) if len(m) == wire.CONTROL_SIZE and m[:4] == wire.MAGIC]
    k = heads[1]  # the second bucket's control; its payload follows the third control (C1 C2 P1 C3 P2 ...)

    def rx(stream):
        return WeightReceiver("", 0, 0, 0, transport=ReplayTransport(stream, device="cuda"))

    ok = dict(rx(list(msgs)).receive_all(expected_step=1).tensors)
    assert all(torch.equal(ok[n], t) for n, t in sd.items())
    bad = list(msgs)
    n = wire.HEADER_SIZE + wire.decode_header(bad[k][:wire.HEADER_SIZE]).manifest_len
    bad[k] = bad[k][: n - 2] + b"}}" + bad[k][n:]  # manifest bytes no longer match the header's crc
    r = rx(bad)
    with pytest.raises(ChecksumError, match="manifest"):
        r.receive_all(expected_step=1)
    assert r.broken
    short = list(msgs)
    p = heads[2] + 1
    short[p] = short[p][: len(short[p]) // 2]  # half a payload: the seal is missing
    r = rx(short)
    with pytest.raises(ChecksumError, match="seal"):
        r.receive_all(expected_step=1)
    other = list(msgs)
    h = wire.decode_header(other[heads[0]][:wire.HEADER_SIZE])
    import dataclasses

    other[heads[0]] = (wire.encode_header(dataclasses.replace(h, version=wire.PROTOCOL_VERSION + 1))
                       + other[heads[0]][wire.HEADER_SIZE:])
    r = rx(other)
    with pytest.raises(wire.VersionMismatchError):
        r.receive_all(expected_step=1)
