"""The quantizer never leaves a targeted weight unquantized without saying so.

Each case is a layout (or a tensor) for which the served checkpoint's FP8
tensors cannot be reproduced by passing a weight through as BF16. The
quantizer must either write it in FP8 (where vLLM's decision is known) or
raise a ``ValueError`` naming the tensor and the reason. The tests marked
"silent before" passed the weight through (or dropped a field) without a
word before ``formats/names.py``; the others pin refusals that already held.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_formats_refusals.py
"""

import copy

import pytest
import torch

from vllm_fp8_overlay.formats import (
    FP8Layout,
    UnsupportedQuantization,
    detect_layout,
    quantize_weights,
    register_module_names,
)
from vllm_fp8_overlay.formats import names as names_mod

FP8 = torch.float8_e4m3fn


def _ct(targets=("Linear",), ignore=("lm_head",), strategy="channel", **weights):
    w = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    w.update(weights)
    keep = lambda x: x if isinstance(x, str) else list(x)  # noqa: E731 - a string stays one, to test it
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": keep(ignore),
            "config_groups": {"group_0": {"targets": keep(targets), "weights": w,
                                          "input_activations": {"num_bits": 8, "type": "float",
                                                                "dynamic": True, "strategy": "token"}}}}


def _w(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02


def _out(layout, named):
    return dict(quantize_weights(iter(named), layout))


ATTN = [(f"model.layers.0.self_attn.{p}.weight", _w(32, 32)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]


# --------------------------------------------- targets the old code skipped
def test_fused_module_named_as_target_quantizes_its_shards():
    """silent before: a target naming vLLM's fused module (``qkv_proj``) did
    not match the checkpoint's ``q/k/v_proj``, which went out as BF16 while
    vLLM (which matches the fused name) serves them FP8."""
    lay = detect_layout(_ct(targets=["model.layers.0.self_attn.qkv_proj"], ignore=[]))
    out = _out(lay, ATTN)
    for p in ("q_proj", "k_proj", "v_proj"):
        assert out[f"model.layers.0.self_attn.{p}.weight"].dtype == FP8, p
        assert f"model.layers.0.self_attn.{p}.weight_scale" in out
    assert out["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16  # not targeted


@pytest.mark.parametrize("target", ["QKVParallelLinear", "Embedding", "Conv1d", "Attention"])
def test_unknown_class_target_refused(target):
    """silent before: a class target other than Linear/FusedMoE was taken for
    a module name, matched nothing, and every weight went out BF16."""
    with pytest.raises(UnsupportedQuantization, match=f"target '{target}'.*module class"):
        detect_layout(_ct(targets=[target]))
    with pytest.raises(UnsupportedQuantization, match="module class"):
        FP8Layout(method="compressed-tensors", strategy="channel", targets=(target,))


def test_targets_or_ignore_given_as_a_string_refused():
    """silent before: ``"targets": "Linear"`` became the targets L, i, n, e,
    a, r (nothing quantized); ``"ignore": "lm_head"`` ignored nothing."""
    with pytest.raises(UnsupportedQuantization, match="targets must be a non-empty list"):
        detect_layout(_ct(targets="Linear"))
    with pytest.raises(UnsupportedQuantization, match="ignore must be a list"):
        detect_layout(_ct(ignore="lm_head"))
    with pytest.raises(UnsupportedQuantization, match="not a list"):
        detect_layout({"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": "lm_head"})


def test_group_without_targets_refused():
    """before: a weight group without targets was read as targeting every
    Linear, while vLLM quantizes nothing for it."""
    cfg = _ct()
    del cfg["config_groups"]["group_0"]["targets"]
    with pytest.raises(UnsupportedQuantization, match="targets must be a non-empty list"):
        detect_layout(cfg)
    with pytest.raises(UnsupportedQuantization, match="no targets"):
        FP8Layout(method="compressed-tensors", strategy="channel", targets=())


@pytest.mark.parametrize("field, value, needle", [
    ("expansion", 2, r"unknown field\(s\) \['expansion'\]"),
    ("actorder", "group", "actorder"),
    ("group_size", 128, "group_size=128 with strategy 'channel'"),
])
def test_unknown_or_unsupported_weight_fields_refused(field, value, needle):
    """silent before: fields the quantizer does not implement were dropped."""
    with pytest.raises(UnsupportedQuantization, match=needle):
        detect_layout(_ct(**{field: value}))


def test_unknown_group_fields_and_output_activations_refused():
    cfg = _ct()
    cfg["config_groups"]["group_0"]["transform"] = {"type": "hadamard"}
    with pytest.raises(UnsupportedQuantization, match=r"unknown field\(s\) \['transform'\]"):
        detect_layout(cfg)
    cfg = _ct()
    cfg["config_groups"]["group_0"]["output_activations"] = {"num_bits": 8, "type": "float"}
    with pytest.raises(UnsupportedQuantization, match="output activation"):
        detect_layout(cfg)


def test_layout_dict_with_unknown_field_refused():
    """silent before: ``FP8Layout.from_dict`` dropped keys it did not know
    (and ``quantize_weights`` then failed on a dict with AttributeError)."""
    d = FP8Layout(method="compressed-tensors", strategy="channel").to_dict()
    assert FP8Layout.from_dict(d).strategy == "channel"
    with pytest.raises(UnsupportedQuantization, match=r"unknown field\(s\) \['group_size'\]"):
        FP8Layout.from_dict({**d, "group_size": 128})
    with pytest.raises(UnsupportedQuantization, match=r"missing \['strategy'\]"):
        FP8Layout.from_dict({"method": "fp8"})
    with pytest.raises(UnsupportedQuantization, match="unknown field"):
        list(quantize_weights(iter(ATTN), {**d, "group_size": 128}))
    out = _out(d, ATTN)  # a valid dict works like the layout
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == FP8


def test_invalid_regex_refused_when_the_layout_is_built():
    """before: ``re.error`` (not a ValueError) from the first tensor's lookup."""
    with pytest.raises(UnsupportedQuantization, match="not a valid regular expression"):
        detect_layout(_ct(ignore=["re:(unclosed"]))


def test_unknown_2d_module_targeted_raises_naming_it():
    """silent before: a targeted 2-D weight whose module name is not a known
    projection (a multimodal projector's ``linear_1``) passed through BF16."""
    lay = detect_layout(_ct())
    name = "model.mm_projector.linear_1.weight"
    with pytest.raises(ValueError, match=r"model\.mm_projector\.linear_1\.weight.*'linear_1' is not a module name"):
        _out(lay, [(name, _w(16, 16))])
    # decided where it can be: ignored by the config, or not 2-D
    ignored = detect_layout(_ct(ignore=["lm_head", "re:model\\.mm_projector\\..*"]))
    assert _out(ignored, [(name, _w(16, 16))])[name].dtype == torch.bfloat16
    assert _out(lay, [("model.vision.patch.weight", _w(4, 3, 2, 2))])["model.vision.patch.weight"].ndim == 4
    assert _out(lay, [("model.ln_f.weight", _w(16))])["model.ln_f.weight"].dtype == torch.bfloat16


def test_registered_module_names_decide():
    lay = detect_layout(_ct())
    name = "model.mm_projector.linear_9.weight"
    try:
        register_module_names(linear=["linear_9"])
        assert _out(lay, [(name, _w(16, 16))])[name].dtype == FP8
        register_module_names(never=["linear_9"])
        assert _out(lay, [(name, _w(16, 16))])[name].dtype == torch.bfloat16
    finally:
        names_mod._NEVER.discard("linear_9")
        names_mod._base.cache_clear()
    with pytest.raises(ValueError, match="is not a module name"):
        _out(lay, [(name, _w(16, 16))])


@pytest.mark.parametrize("target, name", [
    ("re:.*mlp\\.gate$", "model.layers.0.mlp.gate.weight"),
    ("model.embed_tokens", "model.embed_tokens.weight"),
])
def test_explicit_target_of_router_or_embedding_raises(target, name):
    """silent before: the layout names the module, the quantizer's table says
    'never quantized', the weight went out BF16. vLLM builds routers
    quantized in some models (Qwen3-MoE passes its quant_config to the
    GateLinear) and unquantized in others, so this cannot be decided."""
    lay = detect_layout(_ct(targets=["Linear", target]))
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: the layout's target"):
        _out(lay, [(name, _w(8, 32))])
    # with a class target only, the router stays unquantized (as vLLM builds
    # it for DeepSeek, GLM, Mixtral, Qwen2-MoE; Qwen3-MoE configs ignore it)
    assert _out(detect_layout(_ct()), [(name, _w(8, 32))])[name].dtype == torch.bfloat16


@pytest.mark.parametrize("cfg, needle", [
    (_ct(ignore=["model.layers.0.self_attn.q_proj"]), "fuses q_proj/k_proj/v_proj into qkv_proj"),
    (_ct(targets=["re:.*(q|o)_proj$"], ignore=[]), "fuses q_proj/k_proj/v_proj into qkv_proj"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic",
      "modules_to_not_convert": ["model.layers.0.self_attn.k_proj"]}, "refuses shards quantized differently"),
])
def test_split_fused_shards_raise(cfg, needle):
    """silent before: q_proj BF16 next to FP8 k/v_proj (or the reverse), a
    fused qkv_proj vLLM refuses to build."""
    lay = detect_layout(cfg)
    with pytest.raises(ValueError, match=rf"self_attn\.[qkv]_proj\.weight: decided .*{needle}"):
        _out(lay, ATTN)


def test_experts_of_one_module_decided_alike():
    """silent before: an ignore entry covering one expert left it BF16 while
    vLLM quantizes all experts of the module as expert 0's projections say."""
    experts = [(f"model.layers.0.mlp.experts.{e}.{p}.weight", _w(16, 16))
               for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    lay = detect_layout(_ct(ignore=["lm_head", "re:.*experts\\.3\\..*"]))
    with pytest.raises(ValueError, match=r"experts\.3\.gate_proj\.weight: decided unquantized.*experts\.0\.gate_proj"):
        _out(lay, experts)
    lay = detect_layout(_ct(ignore=["lm_head", "re:.*experts\\.\\d+\\.down_proj$"]))
    with pytest.raises(ValueError, match="all alike"):
        _out(lay, experts)
    # the whole experts module ignored: consistent, all BF16
    lay = detect_layout(_ct(ignore=["lm_head", "model.layers.0.mlp.experts"]))
    assert all(t.dtype == torch.bfloat16 for t in _out(lay, experts).values())


def test_fused_moe_class_target_covers_experts_only():
    """before: any class target quantized every projection, so a config
    targeting only ``FusedMoE`` got its attention quantized too."""
    lay = detect_layout(_ct(targets=["FusedMoE"], ignore=[]))
    out = _out(lay, ATTN + [("model.layers.0.mlp.experts.0.down_proj.weight", _w(16, 16))])
    assert out["model.layers.0.mlp.experts.0.down_proj.weight"].dtype == FP8
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


# ------------------------------------------------------- pinned refusals
def test_lm_head_targeted_is_quantized_not_skipped():
    """compressed-tensors: a head the recipe targets (Linear without an
    ignore, or by name) is written FP8 like llm-compressor writes it; HF fp8:
    vLLM's Fp8Config quantizes LinearBase only, never ParallelLMHead."""
    head = [("lm_head.weight", _w(64, 32))]
    assert _out(detect_layout(_ct(ignore=[])), head)["lm_head.weight"].dtype == FP8
    assert _out(detect_layout(_ct(targets=["lm_head"], ignore=[])), head)["lm_head.weight"].dtype == FP8
    assert _out(detect_layout(_ct()), head)["lm_head.weight"].dtype == torch.bfloat16  # ignored
    hf = detect_layout({"quant_method": "fp8", "activation_scheme": "dynamic"})
    assert _out(hf, head)["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float8_e5m2, torch.complex64, torch.uint8])
def test_targeted_weight_of_unhandled_dtype_raises(dtype):
    w = torch.zeros(8, 8, dtype=dtype)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: expected"):
        list(quantize_weights([("model.layers.0.mlp.down_proj.weight", w)], detect_layout(_ct())))


@pytest.mark.parametrize("shape", [(8,), (2, 8, 8), ()])
def test_targeted_weight_of_wrong_rank_raises(shape):
    w = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight: quantized linear weight must be 2-D"):
        list(quantize_weights([("model.layers.0.mlp.down_proj.weight", w)], detect_layout(_ct())))


def test_unknown_method_or_strategy_refused():
    with pytest.raises(UnsupportedQuantization, match="strategy 'group'"):
        detect_layout(_ct(strategy="group", group_size=128))
    with pytest.raises(UnsupportedQuantization, match="weight strategy 'row'"):
        FP8Layout(method="compressed-tensors", strategy="row")
    with pytest.raises(UnsupportedQuantization, match="layout method"):
        FP8Layout(method="awq", strategy="channel")


def test_real_configs_still_decide_every_family_tensor():
    """The refusals do not fire on the configs and models the project
    serves: every tensor of every tiny family gets a decision under the
    fixtures' layouts."""
    from pathlib import Path
    import json

    from vllm_fp8_overlay.testing.families import FAMILIES, _BUILDERS, family_state_dict
    from vllm_fp8_overlay.testing.tiny_models import _finish_config

    fx = Path(__file__).parent / "fixtures" / "quant_configs"
    layouts = [detect_layout(json.loads((fx / f).read_text())) for f in
               ("redhat_fp8_dynamic_channel.json", "ct_fp8_block.json", "ct_fp8_tensor_dynamic.json",
                "qwen3_fp8_block.json", "deepseek_v3_fp8_block.json", "llama_fp8_per_tensor_hf.json")]
    for fam in FAMILIES:
        model_type, base, shape = _BUILDERS[fam]()
        sd = family_state_dict(fam, _finish_config(model_type, copy.deepcopy(base)))
        for lay in layouts:
            decided = [lay.quantizes(n, t.shape) for n, t in sd.items()]
            assert sum(decided) >= 4 * 2, (fam, lay)
