"""Soak: 500 updates into one real vLLM engine, faults mixed in, flat memory.

Every 10th step carries a NaN in one tensor (rejected by the trainer before
sending), every 25th a tensor of the wrong shape (rejected by the worker,
model unchanged), every 50th is streamed; the rest are good whole steps. The
worker's resident set before each update (``memory_before_bytes``, measured
after the allocator returned free memory to the OS) and the trainer's must
stay flat: nothing a step allocates, caches or fails with may accumulate.

Not part of the fast tier: marked ``soak`` and skipped unless
``FP8_OVERLAY_SOAK=1``::

    tools/nox -s "matrix(vllm='0.32.0')" -- -m soak tests/test_sync_faults_soak.py

(the ``matrix`` sessions, the full tier, set ``FP8_OVERLAY_SOAK=1``; ``fast`` does not)
"""

from __future__ import annotations

import os
import statistics

import pytest

pytest.importorskip("vllm")

from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, free_port, write_serving_checkpoint  # noqa: E402
from vllm_fp8_overlay.sync.client import WeightSyncClient, WeightSyncFailed  # noqa: E402
from vllm_fp8_overlay.testing import harness  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402

pytestmark = [
    pytest.mark.soak, pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FP8_OVERLAY_SOAK") != "1", reason="soak test: set FP8_OVERLAY_SOAK=1"),
]

UPDATES = int(os.environ.get("FP8_OVERLAY_SOAK_UPDATES", "500"))
FLAT_BYTES = 48 << 20  # allowed growth of a resident set from the warm-up window to the end
VERSION = harness.vllm_version_tuple()
FMT = "fp8" if VERSION >= (0, 24) else "bf16"


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_soak_500_updates_flat_memory(tmp_path):
    base = tm.make_llama(tmp_path / "w0")
    config = tm.load_config(base)
    w = [tm.load_checkpoint(base)]
    w.append(tm.perturb_state_dict(w[0], seed=901, scale=0.05))
    qcfg = CT_FP8_CHANNEL_DYNAMIC if FMT == "fp8" else None
    ckpts = [write_serving_checkpoint(tmp_path / f"s{k}", x, config, qcfg) for k, x in enumerate(w)]
    llm = harness.start_sync_engine(ckpts[0])
    worker_rss, trainer_rss, outcomes = [], [], {"ok": 0, "refused": 0, "rejected": 0}
    last_good = 0
    nan_name, shape_name = "model.norm.weight", "model.layers.1.mlp.down_proj.weight"
    try:
        with WeightSyncClient([llm], host="127.0.0.1", port=free_port(), timeout=120, bucket_bytes=256 << 10) as c:
            for i in range(1, UPDATES + 1):
                good = w[i % 2]
                if i % 10 == 0:
                    bad = {**good, nan_name: good[nan_name].clone().fill_(float("nan"))}
                    with pytest.raises(ValueError, match=nan_name):
                        c.push(bad, step=i)
                    outcomes["refused"] += 1
                elif i % 25 == 0:
                    bad = {**good, shape_name: good[shape_name][:, :-8].contiguous()}
                    with pytest.raises(WeightSyncFailed, match="model unchanged"):
                        c.push(bad, step=i)
                    outcomes["rejected"] += 1
                else:
                    r = c.push(good, step=i, stream=(i % 50 == 1)).workers[0]
                    assert r["ok"], r
                    outcomes["ok"] += 1
                    last_good = i % 2
                    if r.get("memory_before_bytes"):
                        worker_rss.append(r["memory_before_bytes"])
                    trainer_rss.append(_rss())
            st = c.status()[0][0]
        harness.assert_warm_equals_cold(llm, ckpts[last_good], "after the soak")
    finally:
        harness.stop_sync_engine(llm)
    assert outcomes["ok"] > 0.8 * UPDATES and st["steps_loaded"] == outcomes["ok"], (outcomes, st)
    for what, xs in (("worker", worker_rss), ("trainer", trainer_rss)):
        warm = statistics.median(xs[len(xs) // 10: len(xs) // 5])
        end = statistics.median(xs[-len(xs) // 10:])
        print(f"{what} resident set: {warm / 2**20:.1f} MiB after warm-up, {end / 2**20:.1f} MiB at the end")
        assert end - warm < FLAT_BYTES, f"{what} resident set grew {(end - warm) / 2**20:.1f} MiB over the soak"
