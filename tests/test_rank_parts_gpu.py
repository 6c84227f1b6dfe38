"""Rank parts over NCCL on 2 GPUs: a trainer sends a step's main stream and
two parts (experts and row shards) at once, through three communicators, and
a worker receives them with ``StepJob(parts=...)``
(``vllm_fp8_overlay.testing.parts_gpu_check`` under ``torch.distributed.run``):
every tensor, rows put back together, bitwise the torch backend's
quantization of the whole weights, for a block and a channel layout over
four steps each; a step whose main stream repeats a tensor of a part is
rejected and the next one arrives whole on every group. Passing here is
what ``rank_parts.PARTS_BACKENDS`` waits for to take NCCL."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or importlib.util.find_spec("triton") is None,
    reason="needs 2 CUDA devices and triton",
)

ROOT = Path(__file__).resolve().parents[1]


def test_main_stream_and_part_over_nccl_equal_the_torch_quantization(tmp_path):
    from vllm_fp8_overlay.sync.transport import free_port

    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vllm_fp8_overlay.testing.parts_gpu_check", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    from vllm_fp8_overlay.testing.parts_gpu_check import problems

    assert problems(json.loads(out.read_text())) == []
