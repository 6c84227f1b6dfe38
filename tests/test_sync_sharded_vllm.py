"""A 2-process FSDP2 trainer pushing into real vLLM servers (CPU, gloo).

The trainer (``torch.distributed.run``, two ranks, ``fully_shard``; see
:mod:`vllm_fp8_overlay.testing.fsdp_trainer`) never holds its model whole:
every rank streams its shards with ``push_sharded`` (FP8 weights quantized
on the shards and gathered as FP8, one tensor at a time), rank 0 sends.

(b) two ``vllm serve`` engines at TP = 1 fed in one step (one group, rank
    offsets from the engines' world sizes); after each of two steps each
    engine's greedy tokens and logprobs equal a freshly started engine's on
    the same weights, and its parameters a cold load's.
(a) one engine at TP = 2 (two workers, each loading its own shard of every
    weight through vLLM's loader): after the step, outputs equal a freshly
    started TP = 2 engine's.

FP8 (compressed-tensors channel) from vLLM 0.24, BF16 before. CI runs (b);
(a) runs in the full tier. The trainer ranks leave with ``os._exit`` once
their results are written (``fsdp_trainer._exit_skipping_teardown``): torch's
gloo group sometimes aborts a finished process at interpreter exit.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_sharded_vllm.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, write_serving_checkpoint  # noqa: E402
from vllm_fp8_overlay.sync.client import EXTENSION  # noqa: E402
from vllm_fp8_overlay.sync.transport import free_port  # noqa: E402
from vllm_fp8_overlay.testing import harness  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402
from vllm_fp8_overlay.testing.serve import completions, rpc, vllm_serve  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
#: (a) starts two TP = 2 engines (four workers on this 2-core machine): full tier only
FULL = os.environ.get("FP8_OVERLAY_SOAK") == "1"

ROOT = Path(__file__).resolve().parents[1]
VERSION = harness.vllm_version_tuple()
FMT = "fp8" if VERSION >= (0, 24) else "bf16"
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11]]
NTOK = 8
STEPS = 2
EXT = ["--worker-extension-cls", EXTENSION]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    base = tm.make_llama(root / "trainer_w0")
    config = tm.load_config(base)
    ws = [tm.load_checkpoint(base)]
    for k in range(1, STEPS + 1):
        ws.append(tm.perturb_state_dict(ws[-1], seed=300 + k, scale=0.05))
    hf = [base] + [tm.save_checkpoint(root / f"trainer_w{k}", ws[k], config) for k in range(1, STEPS + 1)]
    served = [write_serving_checkpoint(root / f"{FMT}_w{k}", w, config,
                                       CT_FP8_CHANNEL_DYNAMIC if FMT == "fp8" else None) for k, w in enumerate(ws)]
    return root, hf, served


def push(root: Path, base: Path, urls: list[str], step_ckpt: Path, step: int) -> dict:
    """One step from a fresh 2-rank FSDP2 trainer (it re-joins the group)."""
    out = root / f"push_{step}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vllm_fp8_overlay.testing.fsdp_trainer", "push", "--model", str(base), "--url", *urls,
           "--steps", str(step_ckpt), "--first-step", str(step), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-6000:]
    result = json.loads(out.read_text())
    assert [x["ok"] for x in result["reports"]] == [True], result
    return result


def cold_outputs(model_dir: Path) -> tuple[list, list]:
    llm = harness.start_sync_engine(model_dir)
    try:
        return harness.greedy(llm, PROMPTS, NTOK, logprobs=True)
    finally:
        harness.stop_sync_engine(llm)


def test_fsdp2_trainer_feeds_two_engines(weights, tmp_path):
    """(b) two TP = 1 engines, one group, two steps; each engine == cold by
    outputs and parameters after each step."""
    root, hf, served = weights
    with vllm_serve(served[0], tmp_path / "a.log", args=EXT) as a, \
            vllm_serve(served[0], tmp_path / "b.log", args=EXT) as b:
        for k in range(1, STEPS + 1):
            result = push(root, hf[0], [a, b], hf[k], step=k)
            rep = result["reports"][0]
            if FMT == "fp8":  # every linear weight quantized on the shards, gathered as FP8
                assert rep["local_quantized"] == 14, rep
            cold = cold_outputs(served[k])
            for url in (a, b):
                for w in rpc(url, "weight_sync_digest"):
                    cold_digest = rpc(url, "weight_sync_cold_digest", model_dir=str(served[k]))[0]["digest"]
                    assert w["digest"] == cold_digest, f"{url} step {k}: parameters differ from a cold load"
                warm = completions(url, str(served[0]), PROMPTS, NTOK)
                assert warm[0] == cold[0], f"{url} step {k}: tokens {warm[0]} vs cold {cold[0]}"
                assert warm[1] == cold[1], f"{url} step {k}: logprobs {warm[1]} vs cold {cold[1]}"
        print(f"peak RSS per trainer rank: {result['peak_rss_bytes_per_rank']}")


@pytest.mark.skipif(not FULL, reason="full tier (FP8_OVERLAY_SOAK=1): two TP=2 engines; CI runs (b)")
def test_fsdp2_trainer_feeds_tp2_engine(weights, tmp_path):
    """(a) one TP = 2 engine: each worker loads its own shard through vLLM's
    loader; outputs equal a freshly started TP = 2 engine's on W1."""
    root, hf, served = weights
    tp2 = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with vllm_serve(served[0], tmp_path / "warm.log", args=EXT + tp2, env=env) as warm_url:
        push(root, hf[0], [warm_url], hf[1], step=1)
        assert len(rpc(warm_url, "weight_sync_digest")) == 2
        warm = completions(warm_url, str(served[0]), PROMPTS, NTOK)
    with vllm_serve(served[1], tmp_path / "cold.log", args=tp2, env=env) as cold_url:
        cold = completions(cold_url, str(served[1]), PROMPTS, NTOK)
    assert warm[0] == cold[0], f"TP=2: tokens {warm[0]} vs cold {cold[0]}"
    assert warm[1] == cold[1], f"TP=2: logprobs {warm[1]} vs cold {cold[1]}"
