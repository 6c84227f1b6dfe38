"""The benchmark's --cpu-smoke mode (tiny shapes, gloo on CPU) runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cpu_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sync.py"), "--cpu-smoke", "--iters", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for kind in ("dense", "moe"):
        assert res[kind]["c_grouped_equals_per_tensor"] is True
        assert res[kind]["c_grouped_s"] > 0 and res[kind]["a_bf16_raw_s"] > 0
    assert (tmp_path / "results.md").read_text().startswith("# Weight sync benchmark")
