"""Receiver-side validation rules (no vLLM needed)."""

from __future__ import annotations

import torch

from vllm_fp8_overlay.sync.worker_extension import read_checkpoint_specs, validate_update
from vllm_fp8_overlay.testing import tiny_models as tm


def test_checkpoint_specs_from_headers(tmp_path):
    sd = {"a.weight": torch.zeros(4, 8, dtype=torch.bfloat16),
          "a.weight_scale": torch.ones(4, 1, dtype=torch.float32),
          "b.weight": torch.zeros(3, dtype=torch.float8_e4m3fn)}
    tm.save_checkpoint(tmp_path, sd, {"architectures": ["X"]})
    assert read_checkpoint_specs(tmp_path) == {
        "a.weight": ("bfloat16", (4, 8)),
        "a.weight_scale": ("float32", (4, 1)),
        "b.weight": ("float8_e4m3fn", (3,)),
    }


def test_validate_update_names_every_problem():
    expected = {"x.weight": ("bfloat16", (2, 2)), "y.weight": ("float32", (3,)), "z.weight": ("bfloat16", (1,))}
    ok = [("x.weight", torch.zeros(2, 2, dtype=torch.bfloat16)), ("y.weight", torch.zeros(3)),
          ("z.weight", torch.zeros(1, dtype=torch.bfloat16))]
    assert validate_update(ok, expected) == []
    bad = [("x.weight", torch.zeros(2, 3, dtype=torch.bfloat16)), ("y.weight", torch.zeros(3, dtype=torch.bfloat16)),
           ("w.weight", torch.zeros(1))]
    problems = " | ".join(validate_update(bad, expected))
    assert "unknown" in problems and "w.weight" in problems
    assert "missing" in problems and "z.weight" in problems
    assert "x.weight: got bfloat16[2, 3], expected bfloat16[2, 2]" in problems
    assert "y.weight: got bfloat16[3], expected float32[3]" in problems
