"""Sharded sources on 2 GPUs (NCCL): the grouped quantization of a window.

On CUDA with Triton, ``sharded_stream`` quantizes every row shard of a window
with the grouped kernels straight into the gather buffer. Two ranks
(``vllm_fp8_overlay.testing.sharded_gpu_check`` under ``torch.distributed.run``),
each holding ``Shard(0)`` of the same weights:

* every weight it yields equals, bitwise, the torch backend's quantization
  of the full tensor (no Triton code involved), for channel and 128x128
  block layouts of both recipes, with even and uneven row splits (uneven
  splits that break whole blocks are gathered in BF16 and quantized by the
  sender instead);
* gathered into one rank (one sender, ``dst``), that rank yields the same
  and the other yields nothing and holds no window of full tensors;
* a NaN in one rank's shard makes *both* ranks raise the same error naming
  the rank (a rank that raised alone would leave the other in the next
  gather), either way.
"""

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


def test_grouped_window_quantization_equals_per_tensor_and_nan_stops_every_rank(tmp_path):
    from vllm_fp8_overlay.sync.transport import free_port
    from vllm_fp8_overlay.testing.sharded_gpu_check import NAN_IN

    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vllm_fp8_overlay.testing.sharded_gpu_check", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    reports = json.loads(out.read_text())
    for rank, got in enumerate(reports):
        assert got["mismatches"] == [], (rank, got["mismatches"])
        # 4 layouts x 5 weights; grouped: channel all 5, block the 2 whose shards are whole 128-row blocks
        assert got["checked"] == 20 and got["grouped"] == 14, (rank, got)
        for key in ("nan", "nan_dst0"):
            assert "trainer rank(s) [1] hold non-finite values" in got[key], (rank, got[key])
    assert NAN_IN in reports[1]["nan"] and NAN_IN in reports[1]["nan_dst0"], reports[1]
    # one sender (rank 0): it yields every weight, rank 1 none; where NCCL gathers into one rank
    # (sources.GATHER_INTO_ONE_BACKENDS) rank 1 holds no window either, else it all-gathers
    from vllm_fp8_overlay.sync.sources import GATHER_INTO_ONE_BACKENDS

    assert reports[0]["checked_dst0"] == 20 and reports[0]["max_gathered_dst0"] > 0, reports[0]
    assert reports[1]["checked_dst0"] == 0, reports[1]
    assert (reports[1]["max_gathered_dst0"] == 0) == ("nccl" in GATHER_INTO_ONE_BACKENDS), reports[1]
