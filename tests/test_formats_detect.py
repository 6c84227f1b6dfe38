"""Layout detection from real-world quantization_config blocks."""

import json
from pathlib import Path

import pytest

from vllm_fp8_overlay.formats import FP8Layout, UnsupportedQuantization, detect_layout

FIX = Path(__file__).parent / "fixtures" / "quant_configs"


def load(name):
    return json.loads((FIX / name).read_text())


@pytest.mark.parametrize(
    "fixture, method, strategy, block, scale_name",
    [
        ("deepseek_v3_fp8_block.json", "fp8", "block", (128, 128), "weight_scale_inv"),
        ("qwen3_fp8_block.json", "fp8", "block", (128, 128), "weight_scale_inv"),
        ("llama_fp8_per_tensor_hf.json", "fp8", "tensor", None, "weight_scale"),
        ("redhat_fp8_dynamic_channel.json", "compressed-tensors", "channel", None, "weight_scale"),
        ("ct_fp8_tensor_dynamic.json", "compressed-tensors", "tensor", None, "weight_scale"),
        ("ct_fp8_block.json", "compressed-tensors", "block", (128, 128), "weight_scale"),
    ],
)
def test_supported_fixtures(fixture, method, strategy, block, scale_name):
    full = load(fixture)
    for cfg in (full, full["quantization_config"]):
        lay = detect_layout(cfg)
        assert isinstance(lay, FP8Layout)
        assert (lay.method, lay.strategy, lay.block_size, lay.scale_name) == (
            method, strategy, block, scale_name)
        assert FP8Layout.from_dict(json.loads(json.dumps(lay.to_dict()))) == lay
    assert detect_layout(full).hidden_size == full.get("hidden_size")


def test_paths_dir_and_file(tmp_path):
    (tmp_path / "config.json").write_text((FIX / "deepseek_v3_fp8_block.json").read_text())
    a = detect_layout(tmp_path)
    b = detect_layout(str(tmp_path / "config.json"))
    assert a == b and a.strategy == "block"
    with pytest.raises(FileNotFoundError, match="never downloads"):
        detect_layout(tmp_path / "missing")


def test_plain_model_returns_none():
    assert detect_layout(load("plain_bf16.json")) is None


@pytest.mark.parametrize(
    "fixture, needle",
    [
        ("neg_ct_w4a16_int4.json", "int4"),
        ("neg_ct_nvfp4.json", "fp4"),
        ("neg_mxfp4_gpt_oss.json", "mxfp4"),
        ("neg_ct_kv_cache_only_fp8.json", "kv-cache-only"),
        ("neg_modelopt_nvfp4.json", "modelopt"),
        ("neg_fp8_e4m3fnuz.json", "e4m3fnuz"),
        ("llama_fp8_static_hf.json", "static"),
    ],
)
def test_unsupported_fixtures(fixture, needle):
    with pytest.raises(UnsupportedQuantization) as ei:
        detect_layout(load(fixture))
    msg = str(ei.value)
    assert needle in msg
    assert "Supported FP8 weight layouts" in msg  # says what would work


def test_more_unsupported():
    base = load("redhat_fp8_dynamic_channel.json")["quantization_config"]
    int8 = json.loads(json.dumps(base))
    int8["config_groups"]["group_0"]["weights"]["type"] = "int"
    int8["format"] = "int-quantized"
    with pytest.raises(UnsupportedQuantization, match="int8"):
        detect_layout(int8)
    static = json.loads(json.dumps(base))
    static["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    with pytest.raises(UnsupportedQuantization, match="static"):
        detect_layout(static)
    with pytest.raises(UnsupportedQuantization, match="gptq"):
        detect_layout({"quant_method": "gptq", "bits": 4})
    with pytest.raises(UnsupportedQuantization, match="weight_block_size"):
        detect_layout({"quant_method": "fp8", "weight_block_size": [128]})


def test_weight_only_fp8_ct_is_accepted():
    q = load("redhat_fp8_dynamic_channel.json")["quantization_config"]
    q["config_groups"]["group_0"]["input_activations"] = None
    assert detect_layout(q).strategy == "channel"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", True),
        ("model.layers.0.self_attn.o_proj.weight", True),
        ("model.layers.0.mlp.gate_proj.weight", True),
        ("model.layers.0.mlp.down_proj.weight", True),
        ("model.layers.3.mlp.experts.7.up_proj.weight", True),
        ("model.layers.3.mlp.shared_experts.down_proj.weight", True),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
        ("model.layers.0.self_attn.q_proj.bias", False),
        ("model.layers.0.input_layernorm.weight", False),
        ("model.layers.0.self_attn.q_norm.weight", False),
        ("model.layers.0.self_attn.kv_a_layernorm.weight", False),
        ("model.norm.weight", False),
        ("model.embed_tokens.weight", False),
        ("lm_head.weight", False),
        ("model.layers.3.mlp.gate.weight", False),
        ("model.layers.3.mlp.gate.e_score_correction_bias", False),
        ("model.layers.3.mlp.shared_expert_gate.weight", False),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", False),
    ],
)
def test_is_quantized_names(name, expected):
    for f in ("deepseek_v3_fp8_block.json", "redhat_fp8_dynamic_channel.json"):
        assert detect_layout(load(f)).is_quantized(name) is expected, (f, name)


def test_ignore_rules():
    ct = detect_layout(
        {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "ignore": [
                "lm_head",
                "model.layers.0.self_attn.o_proj",
                "re:.*layers\\.1\\.mlp\\.",
                "model.layers.2.self_attn.qkv_proj",
                "model.layers.4.mlp.experts",
            ],
            "config_groups": {
                "g": {"targets": ["Linear"],
                      "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
            },
        }
    )
    assert not ct.is_quantized("model.layers.0.self_attn.o_proj.weight")
    assert ct.is_quantized("model.layers.0.self_attn.q_proj.weight")
    assert not ct.is_quantized("model.layers.1.mlp.down_proj.weight")  # regex
    assert ct.is_quantized("model.layers.11.mlp.down_proj.weight")
    assert not ct.is_quantized("model.layers.2.self_attn.k_proj.weight")  # fused name
    assert not ct.is_quantized("model.layers.4.mlp.experts.3.gate_proj.weight")
    assert ct.is_quantized("model.layers.5.mlp.experts.3.gate_proj.weight")

    hf = detect_layout({"quant_method": "fp8", "activation_scheme": "dynamic",
                        "modules_to_not_convert": ["model.layers.0.mlp.down_proj"]})
    assert not hf.is_quantized("model.layers.0.mlp.down_proj.weight")
    assert hf.is_quantized("model.layers.10.mlp.down_proj.weight")  # exact, like vLLM


def test_ct_targets_by_name():
    lay = detect_layout(
        {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "g": {"targets": ["re:.*self_attn.*"],
                      "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}
            },
        }
    )
    assert lay.is_quantized("model.layers.0.self_attn.q_proj.weight")
    assert not lay.is_quantized("model.layers.0.mlp.up_proj.weight")


def test_layout_validation():
    with pytest.raises(UnsupportedQuantization):
        FP8Layout(method="fp8", strategy="block", block_size=(128,), scale_name="weight_scale_inv")
    with pytest.raises(UnsupportedQuantization):
        FP8Layout(method="gptq", strategy="tensor")
    lay = FP8Layout.from_dict({"method": "fp8", "strategy": "block", "block_size": [64, 32],
                               "scale_name": "weight_scale_inv"})
    assert lay.block_size == (64, 32)
    assert lay.scale_key("a.b.weight") == "a.b.weight_scale_inv"
