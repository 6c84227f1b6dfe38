"""Our quantizer against llm-compressor, family by family and recipe by recipe.

llm-compressor (the tool that writes most compressed-tensors FP8 checkpoints)
quantizes each tiny family checkpoint in its own locked environment
(``locks/reference-llmcompressor.txt``; ``tools/reference_quantize.py``).
From the same BF16 weights and the ``quantization_config`` llm-compressor
wrote, :func:`detect_layout` + :func:`quantize_weights` must produce exactly
its tensors: the same names, dtypes, shapes and bits.

The reference environment's interpreter comes from ``FP8_OVERLAY_REFERENCE_PYTHON``
(the nox sessions set it); without it the module is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from vllm_fp8_overlay.formats import detect_layout, quantize_weights
from vllm_fp8_overlay.testing import tiny_models
from vllm_fp8_overlay.testing import family_record
from vllm_fp8_overlay.testing.families import FAMILIES, family_state_dict, make_family

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = os.environ.get("FP8_OVERLAY_REFERENCE_PYTHON")

pytestmark = pytest.mark.skipif(
    not REFERENCE_PYTHON, reason="FP8_OVERLAY_REFERENCE_PYTHON (the llm-compressor environment) is not set")

#: recipe name -> llm-compressor QuantizationModifier arguments
RECIPES = {
    "channel": {"scheme": "FP8_DYNAMIC", "ignore": ["lm_head"]},
    "block": {"scheme": "FP8_BLOCK", "ignore": ["lm_head"]},
    "channel-lm-head": {"scheme": "FP8_DYNAMIC", "ignore": []},
    "channel-regex-ignore": {"scheme": "FP8_DYNAMIC", "ignore": ["lm_head", "re:.*mlp\\.down_proj$"]},
    "attention-only": {"scheme": "FP8_DYNAMIC", "ignore": ["lm_head"],
                       "targets": ["re:.*self_attn\\.(q|k|v|o|qkv)_proj$"]},
}
CASES = [(f, r) for f in FAMILIES for r in RECIPES]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Every (family, recipe) quantized by llm-compressor, in one process."""
    root = tmp_path_factory.mktemp("llmcompressor")
    jobs = []
    for family in FAMILIES:
        make_family(family, root / "bf16" / family)
        for recipe, args in RECIPES.items():
            jobs.append({"src": str(root / "bf16" / family), "dst": str(root / recipe / family), **args})
    (root / "jobs.json").write_text(json.dumps(jobs))
    r = subprocess.run([REFERENCE_PYTHON, str(ROOT / "tools" / "reference_quantize.py"),
                        str(root / "jobs.json")], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


@pytest.mark.parametrize("family, recipe", CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_quantizer_equals_llmcompressor(references, family, recipe):
    ref_dir = references / recipe / family
    config = tiny_models.load_config(ref_dir)
    ref = tiny_models.load_checkpoint(ref_dir)
    layout = detect_layout(config)
    assert layout is not None, config.get("quantization_config")
    bf16 = family_state_dict(family, tiny_models.load_config(references / "bf16" / family))
    if "lm_head.weight" in ref and "lm_head.weight" not in bf16:
        # a tied model whose head the recipe quantizes: llm-compressor unties
        # it; the trainer's HF state dict carries the alias (model.state_dict())
        bf16["lm_head.weight"] = bf16["model.embed_tokens.weight"]
    ours = dict(quantize_weights(bf16.items(), layout))
    assert sorted(ours) == sorted(ref), (sorted(set(ours) ^ set(ref)))
    n_fp8 = 0
    for name, t in ref.items():
        if family.startswith("gemma") and name.endswith("norm.weight"):
            # llm-compressor re-encodes Gemma's (1 + w) norms before
            # quantizing (CalibrationOffsetNorm); not a quantization matter
            continue
        assert _same_bits(ours[name], t), (name, ours[name].dtype, t.dtype, ours[name].shape, t.shape)
        n_fp8 += t.dtype == torch.float8_e4m3fn
    assert n_fp8 > 0  # the recipe quantized something, and so did we
    family_record.check(("offline", family, recipe), "bitwise")  # docs/families.md
