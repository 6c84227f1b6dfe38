"""FP8 quantizer: bit-exactness, error bounds, streaming, MoE and errors."""

import math

import pytest
import torch

from vllm_fp8_overlay.formats import (
    FP8Layout,
    QuantBackend,
    dequantize_tensor,
    get_backend,
    quantize_tensor,
    quantize_weights,
    register_backend,
)

SHAPES = [(1, 7), (128, 256), (300, 200), (257, 129), (64, 1000)]

CT = {
    s: FP8Layout(method="compressed-tensors", strategy=s,
                 block_size=(128, 128) if s == "block" else None)
    for s in ("tensor", "channel", "block")
}
HF_BLOCK = FP8Layout(method="fp8", strategy="block", block_size=(128, 128),
                     scale_name="weight_scale_inv")
HF_TENSOR = FP8Layout(method="fp8", strategy="tensor", scale_name="weight_scale")


def _weights(shape, dtype, seed, dist="normal"):
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.02
    else:  # heavy-tailed: student-t with df=2 (infinite variance)
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        chi2 = torch.randn((2,) + tuple(shape), generator=g, dtype=torch.float64).pow(2).sum(0)
        w = z / torch.sqrt(chi2 / 2) * 0.02
    w = w.to(dtype)
    w.view(-1)[0] = -0.0  # sign of zero must follow the reference too
    if w.numel() > 3:
        w.view(-1)[1] = 0.0
    return w


def _u8(t):
    return t.contiguous().view(torch.uint8)


# ------------------------------------------------ compressed-tensors library
ct_lib = pytest.importorskip("compressed_tensors")


def _ct_library_quantize(w, strategy, block=(128, 128)):
    """What llm-compressor + compressed-tensors write for this weight."""
    pytest.importorskip(
        "compressed_tensors.compressors.naive_quantized.base",
        reason="the reference path is written against compressed-tensors >= 0.15 "
        f"(installed {ct_lib.__version__})",
    )
    from compressed_tensors.compressors.naive_quantized.base import (
        NaiveQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import (
        calculate_qparams,
        maybe_pad_tensor_for_block_quant,
    )

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy,
                            block_structure=list(block) if strategy == "block" else None)
    if strategy == "tensor":
        mn, mx = torch.aminmax(w)
    elif strategy == "channel":
        mn, mx = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        wp = maybe_pad_tensor_for_block_quant(w, tuple(block))
        r, c = wp.shape
        b = wp.reshape(r // block[0], block[0], c // block[1], block[1])
        mn, mx = b.amin(dim=(1, 3)), b.amax(dim=(1, 3))
    scale, zp = calculate_qparams(mn, mx, args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out = NaiveQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    return out["weight"], out["weight_scale"]


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dist", ["normal", "student_t2"])
def test_ct_bitwise_equals_library(strategy, dtype, dist):
    for i, shape in enumerate(SHAPES):
        w = _weights(shape, dtype, seed=i, dist=dist)
        q, s = quantize_tensor(w, CT[strategy])
        rq, rs = _ct_library_quantize(w, strategy)
        assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
        assert s.dtype == rs.dtype == dtype and s.shape == rs.shape
        assert torch.equal(_u8(q), _u8(rq)), (strategy, shape)
        assert torch.equal(s.contiguous().view(torch.uint8), rs.contiguous().view(torch.uint8))


def test_ct_scale_shapes():
    w = _weights((300, 200), torch.bfloat16, 0)
    assert quantize_tensor(w, CT["tensor"])[1].shape == (1,)
    assert quantize_tensor(w, CT["channel"])[1].shape == (300, 1)
    assert quantize_tensor(w, CT["block"])[1].shape == (3, 2)


def test_ct_zero_rows_use_library_eps():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    w[1] = 1.0
    q, s = quantize_tensor(w, CT["channel"])
    rq, rs = _ct_library_quantize(w, "channel")
    assert torch.equal(_u8(q), _u8(rq)) and torch.equal(s, rs)
    assert s[0, 0].item() == torch.finfo(torch.bfloat16).eps


# ------------------------------------------------ independent HF reference
def _ref_e4m3_round(v):
    """Round float64 values (|v| <= 448) to e4m3fn, nearest-even, in float64."""
    a = v.abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    e = torch.clamp(e, min=-6.0)  # subnormals share the 2**-6 binade spacing
    ulp = torch.exp2(e - 3)
    r = torch.round(a / ulp) * ulp  # torch.round: half to even; a/ulp exact
    return torch.copysign(r, v)


def _ref_hf(w, strategy, block=(128, 128)):
    """DeepSeek-V3 / HF fp8 convention, written out in float64.

    scale = fp32(amax / 448) (1.0 for an all-zero group);
    q = e4m3(clamp(fp32(w / scale), +-448)); weight ~= q * scale.
    """
    w64 = w.to(torch.float64)
    rows, cols = w64.shape
    if strategy == "tensor":
        amax = w64.abs().max().reshape(1, 1)
        rep = lambda s: s.expand(rows, cols)  # noqa: E731
    else:
        bn, bk = block
        rb, cb = -(-rows // bn), -(-cols // bk)
        amax = torch.zeros(rb, cb, dtype=torch.float64)
        for i in range(rb):
            for j in range(cb):
                amax[i, j] = w64[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max()
        rep = lambda s: s.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]  # noqa: E731
    scale = (amax / 448.0).to(torch.float32).to(torch.float64)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    v = (w64 / rep(scale)).to(torch.float32).to(torch.float64)
    q = _ref_e4m3_round(v.clamp(-448.0, 448.0))
    return q, scale.to(torch.float32)


@pytest.mark.parametrize("dist", ["normal", "student_t2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hf_block_and_tensor_equal_float64_reference(dist, dtype):
    for i, shape in enumerate(SHAPES):
        w = _weights(shape, dtype, seed=100 + i, dist=dist)
        for lay, strat in ((HF_BLOCK, "block"), (HF_TENSOR, "tensor")):
            q, s = quantize_tensor(w, lay)
            rq, rs = _ref_hf(w, strat)
            assert s.dtype == torch.float32
            if strat == "tensor":
                assert s.shape == ()
            else:
                assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
            assert torch.equal(s.reshape(rs.shape), rs), (strat, shape)
            assert torch.equal(q.to(torch.float64), rq), (strat, shape)


def test_reference_rounding_matches_torch_cast_on_all_codes():
    # sanity of the independent reference: every e4m3fn value and midpoints
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)
    codes = codes[torch.isfinite(codes)]
    codes = codes.sort().values
    mids = (codes[1:] + codes[:-1]) / 2
    # perturbation 2**-20 survives torch's float64 -> float32 -> fp8 cast path
    probe = torch.cat([codes, mids, mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20)])
    probe = probe.clamp(-448, 448)
    assert torch.equal(_ref_e4m3_round(probe),
                       probe.to(torch.float8_e4m3fn).to(torch.float64))


# ------------------------------------------------ dequantization error
LAYOUTS = {
    "HF fp8 block 128x128": HF_BLOCK,
    "HF fp8 per-tensor": HF_TENSOR,
    "CT tensor": CT["tensor"],
    "CT channel": CT["channel"],
    "CT block 128x128": CT["block"],
}


def _ulp_e4m3(v):
    a = v.abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    return torch.exp2(torch.clamp(e, min=-6.0) - 3)


def _expand_scale(s, lay, shape):
    s = s.to(torch.float64)
    if lay.strategy == "tensor":
        return s.reshape(1, 1).expand(shape)
    if lay.strategy == "channel":
        return s.expand(shape)
    bn, bk = lay.block_size
    return s.repeat_interleave(bn, 0)[: shape[0]].repeat_interleave(bk, 1)[:, : shape[1]]


def error_figures(w, lay):
    """Check the per-element bound and return summary figures.

    With v = w / s (s = stored scale of the element's group) and
    u(v) = e4m3 spacing in v's binade (2**(max(floor(log2|v|), -6) - 3)):

      HF (fp32 math): |q*s - w| <= s*u(v)/2 + |w|*2**-22
      CT (weight-dtype math, w/s rounded to bf16 before fp8, bf16 scale
         may sit 2**-9 below amax/448 so |v| may exceed 448 by <= 2**-8
         relative and get clamped):   |q*s - w| <= s*u(v)/2 + |w|*2**-8
    For |v| >= 2**-6 (normal range) u(v)/2 <= |v|*2**-4, i.e. at most 6.25 %
    relative error (+ the small terms above); below it the error is absolute
    (<= s*2**-10).
    """
    q, s = quantize_tensor(w, lay)
    w64 = w.to(torch.float64)
    s_full = _expand_scale(s, lay, w.shape)
    dq = q.to(torch.float64) * s_full
    err = (dq - w64).abs()
    v = w64 / s_full
    extra = 2.0 ** -22 if lay.method == "fp8" else 2.0 ** (-8 if w.dtype == torch.bfloat16 else -10)
    bound = s_full * _ulp_e4m3(v) / 2 + w64.abs() * extra + 1e-300
    assert bool((err <= bound * (1 + 1e-12)).all()), (err / bound).max()
    normal = v.abs() >= 2.0 ** -6
    rel = err[normal] / w64.abs()[normal]
    return {
        "rel_fro": (err.norm() / w64.norm()).item(),
        "max_rel_normal": rel.max().item(),
        "mean_rel_normal": rel.mean().item(),
        "frac_subnormal": 1 - normal.float().mean().item(),
        "max_err_over_bound": (err / bound).max().item(),
    }


@pytest.mark.parametrize("dist", ["normal", "student_t2"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dequantization_error_bound(name, dist, record_property):
    w = _weights((512, 640), torch.bfloat16, seed=7, dist=dist)
    fig = error_figures(w, LAYOUTS[name])
    assert fig["max_rel_normal"] <= 2.0 ** -4 + 2.0 ** -8 + 1e-9
    record_property("figures", fig)
    print(f"\n{name:22s} {dist:10s} " + " ".join(f"{k}={v:.3g}" for k, v in fig.items()))


# ------------------------------------------------ chunking / backend table
@pytest.mark.parametrize("recipe", ["ct", "hf"])
def test_chunked_paths_equal_one_shot(recipe):
    be = get_backend()
    w = _weights((777, 300), torch.bfloat16, seed=3)
    for fn, extra in ((be.tensorwise, ()), (be.channelwise, ()), (be.blockwise, ((128, 128),))):
        q1, s1, _ = fn(w, recipe, *extra)
        q2, s2, _ = fn(w, recipe, *extra, chunk_elements=1000)
        assert torch.equal(_u8(q1), _u8(q2)) and torch.equal(s1, s2)
    # non-contiguous input (e.g. a transposed expert slice)
    wt = w.t().contiguous().t()
    q3, s3, _ = be.blockwise(wt, recipe, (128, 128), chunk_elements=5000)
    assert torch.equal(_u8(q3), _u8(be.blockwise(w, recipe, (128, 128))[0]))


def test_backend_table_is_pluggable():
    calls = []
    base = get_backend("torch")

    def counting(fn):
        def inner(*a, **k):
            calls.append(fn.__name__)
            return fn(*a, **k)
        return inner

    register_backend(QuantBackend("counting", counting(base.tensorwise),
                                  counting(base.channelwise), counting(base.blockwise)))
    w = _weights((64, 64), torch.bfloat16, 0)
    q, s = quantize_tensor(w, CT["channel"], backend="counting")
    assert calls == ["_torch_channelwise"]
    assert torch.equal(_u8(q), _u8(quantize_tensor(w, CT["channel"])[0]))
    with pytest.raises(ValueError, match="unknown quantization backend"):
        quantize_tensor(w, CT["channel"], backend="nope")


# ------------------------------------------------ streaming API
def _tiny_moe_state(E=3, H=256, I=128):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    return [
        ("model.embed_tokens.weight", r(512, H)),
        ("model.layers.0.input_layernorm.weight", torch.ones(H, dtype=torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.weight", r(256, H)),
        ("model.layers.0.self_attn.q_proj.bias", r(256)),
        ("model.layers.0.self_attn.k_proj.weight", r(128, H)),
        ("model.layers.0.self_attn.o_proj.weight", r(H, 256)),
        ("model.layers.0.mlp.gate.weight", r(E, H)),
        ("model.layers.0.mlp.gate.e_score_correction_bias", torch.zeros(E)),
        ("model.layers.0.mlp.experts.gate_up_proj", r(E, 2 * I, H)),
        ("model.layers.0.mlp.experts.down_proj", r(E, H, I)),
        ("model.layers.1.mlp.experts.0.gate_proj.weight", r(I, H)),
        ("model.norm.weight", torch.ones(H, dtype=torch.bfloat16)),
        ("lm_head.weight", r(512, H)),
    ]


@pytest.mark.parametrize("lay", [HF_BLOCK, CT["channel"], HF_TENSOR], ids=lambda l: l.method + "-" + l.strategy)
def test_quantize_weights_stream(lay):
    state = _tiny_moe_state()
    src = dict(state)
    out = list(quantize_weights(iter(state), lay))
    names = [n for n, _ in out]
    d = dict(out)
    assert len(names) == len(d)
    sn = lay.scale_name
    # passthrough: same object, same dtype
    for n in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.gate.weight",
              "model.layers.0.mlp.gate.e_score_correction_bias", "model.norm.weight"):
        assert d[n] is src[n]
    if lay.method == "compressed-tensors":  # a Linear the layout does not ignore
        assert d["lm_head.weight"].dtype == torch.float8_e4m3fn and f"lm_head.{sn}" in d
    else:  # HF fp8 never quantizes the head
        assert d["lm_head.weight"] is src["lm_head.weight"]
    # quantized: weight then its scale
    i = names.index("model.layers.0.self_attn.q_proj.weight")
    assert names[i + 1] == f"model.layers.0.self_attn.q_proj.{sn}"
    assert d["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    # experts expanded (E, 2I, H): gate = first half of dim 1
    assert "model.layers.0.mlp.experts.gate_up_proj" not in d
    gu = src["model.layers.0.mlp.experts.gate_up_proj"]
    dn = src["model.layers.0.mlp.experts.down_proj"]
    for e in range(3):
        for proj, ref in (("gate_proj", gu[e, :128]), ("up_proj", gu[e, 128:]), ("down_proj", dn[e])):
            n = f"model.layers.0.mlp.experts.{e}.{proj}.weight"
            q, s = quantize_tensor(ref, lay)
            assert torch.equal(_u8(d[n]), _u8(q)) and torch.equal(d[f"{n[:-6]}{sn}"], s)
    # already per-expert input keeps its name
    assert d["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn


def test_transposed_experts_with_hidden_size():
    H, I, E = 64, 48, 2
    lay = FP8Layout(method="compressed-tensors", strategy="channel", hidden_size=H)
    gu = torch.randn(E, H, 2 * I, dtype=torch.bfloat16)  # (E, H, 2I)
    dn = torch.randn(E, I, H, dtype=torch.bfloat16)  # (E, I, H)
    d = dict(quantize_weights([("m.layers.0.mlp.experts.gate_up_proj", gu),
                               ("m.layers.0.mlp.experts.down_proj", dn)], lay))
    q, _ = quantize_tensor(gu[1, :, I:].t(), lay)
    assert d["m.layers.0.mlp.experts.1.up_proj.weight"].shape == (I, H)
    assert torch.equal(_u8(d["m.layers.0.mlp.experts.1.up_proj.weight"]), _u8(q))
    assert d["m.layers.0.mlp.experts.0.down_proj.weight"].shape == (H, I)


def test_none_layout_passes_through():
    state = _tiny_moe_state()
    out = list(quantize_weights(state, None))
    assert all(a[1] is b[1] and a[0] == b[0] for a, b in zip(out, state))


def test_generator_is_lazy():
    def src():
        yield "model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8)
        raise RuntimeError("should not be reached yet")

    it = quantize_weights(src(), CT["channel"])
    assert next(it)[0].endswith("q_proj.weight")
    assert next(it)[0].endswith("q_proj.weight_scale")


# ------------------------------------------------ bad input
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("lay", [HF_BLOCK, CT["tensor"], CT["channel"]], ids=str)
def test_non_finite_named(bad, lay):
    w = torch.randn(16, 16, dtype=torch.bfloat16)
    w[3, 4] = bad
    name = "model.layers.5.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=r"model\.layers\.5\.mlp\.down_proj\.weight.*(NaN|inf)"):
        list(quantize_weights([(name, w)], lay))


def test_wrong_rank_named():
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.o_proj\.weight.*2-D"):
        list(quantize_weights([("model.layers.0.self_attn.o_proj.weight",
                                torch.randn(2, 4, 4))], CT["channel"]))
    with pytest.raises(ValueError, match=r"o_proj\.weight.*2-D"):
        list(quantize_weights([("model.layers.0.self_attn.o_proj.weight",
                                torch.randn(4))], CT["channel"]))
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj.*3-D"):
        list(quantize_weights([("model.layers.0.mlp.experts.gate_up_proj",
                                torch.randn(4, 4))], CT["channel"]))


def test_already_fp8_named():
    w = torch.randn(8, 8).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"q_proj\.weight.*already quantized"):
        list(quantize_weights([("model.layers.0.self_attn.q_proj.weight", w)], CT["channel"]))


def test_block_shape_contradiction_named():
    w = torch.randn(100, 256, dtype=torch.bfloat16)  # q_proj rows not a multiple of 128
    with pytest.raises(ValueError, match=r"q_proj\.weight.*block_n=128"):
        list(quantize_weights([("model.layers.0.self_attn.q_proj.weight", w)], HF_BLOCK))
    # v_proj is the last shard of qkv: vLLM allows a ragged tail, so do we
    out = dict(quantize_weights([("model.layers.0.self_attn.v_proj.weight", w)], HF_BLOCK))
    assert out["model.layers.0.self_attn.v_proj.weight_scale_inv"].shape == (1, 2)
    gu = torch.randn(2, 2 * 96, 256, dtype=torch.bfloat16)  # moe intermediate 96
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight.*block_n"):
        list(quantize_weights([("model.layers.0.mlp.experts.gate_up_proj", gu)], CT["block"]))


def test_dequantize_roundtrip_close():
    w = _weights((300, 200), torch.bfloat16, 1)
    for lay in LAYOUTS.values():
        q, s = quantize_tensor(w, lay)
        dq = dequantize_tensor(q, s, lay)
        assert (dq - w.float()).norm() / w.float().norm() < 0.05
