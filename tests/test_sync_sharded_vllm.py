"""A 2-process FSDP2 trainer pushing into real vLLM servers (CPU, gloo).

The trainer (``torch.distributed.run``, two ranks, ``fully_shard``; see
:mod:`vllm_fp8_overlay.testing.fsdp_trainer`) never holds its model whole:
every rank streams its shards with ``push_sharded`` (FP8 weights quantized
on the shards and gathered as FP8, one tensor at a time), rank 0 sends.

(b) two ``vllm serve`` engines at TP = 1 fed in one step (one group, rank
    offsets from the engines' world sizes); after each of two steps (one in CI) each
    engine's greedy tokens and logprobs equal a freshly started engine's on
    the same weights, and its parameters a cold load's.
(d) the same two engines, each fed by its own trainer rank (every rank
    holding a client sends; its own group).
(a) one engine at TP = 2 (two workers, each loading its own shard of every
    weight through vLLM's loader): after the step, outputs equal a freshly
    started TP = 2 engine's.
(c) a Qwen3-MoE engine at TP = 2 with expert parallelism (each worker holds
    half the experts): the FSDP2 trainer (transformers' fused 3-D expert
    parameters, sharded over experts) pushes one BF16 step; the engine's
    parameters equal a cold load's and its outputs a freshly started EP
    engine's. vLLM's CPU fused-MoE kernels ignore the expert map (an EP
    engine cannot generate on CPU as shipped), so both engines run with the
    test-side shim :mod:`vllm_fp8_overlay.testing.ep_shim` (routed ids mapped
    to local experts, as GPU kernels do with the map); with it the EP engine's
    first greedy token and its logprob agree with a TP = 1 engine's on the
    same weights (checked below).

(e), (f), (g): rank parts (``sync/rank_parts.py``): every trainer rank
sends what it holds itself, nothing gathered: its experts to the workers
that load them and its rows of every other weight to every worker, which
put the rows back together. (e) the MoE into a TP = 1 engine; (f) into the
TP = 2 + EP engine of (c), each EP worker receiving only its own experts;
(g) a tied dense model into a TP = 2 engine. Each: parameters == a cold load,
outputs == a freshly started engine's.

FP8 (compressed-tensors channel) from vLLM 0.24, BF16 before (the MoE of
(c), (e), (f): BF16, the format MoE runs in on vLLM's CPU builds). CI runs
(b) and (e); (a), (c), (d), (f) and (g) run in the full tier. The trainer ranks leave with ``os._exit`` once
their results are written (``fsdp_trainer._exit_skipping_teardown``): torch's
gloo group sometimes aborts a finished process at interpreter exit.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_sharded_vllm.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, write_serving_checkpoint  # noqa: E402
from vllm_fp8_overlay.sync.client import EXTENSION  # noqa: E402
from vllm_fp8_overlay.sync.transport import free_port  # noqa: E402
from vllm_fp8_overlay.testing import harness  # noqa: E402
from vllm_fp8_overlay.testing import tiers  # noqa: E402
from vllm_fp8_overlay.testing import outputs as out  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402
from vllm_fp8_overlay.testing.serve import completions, rpc, vllm_serve  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VERSION = harness.vllm_version_tuple()
FMT = "fp8" if VERSION >= (0, 24) else "bf16"
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11]]
NTOK = 8
STEPS = tiers.steps(ci=1, full=2)  # each step: a torchrun trainer and a fresh engine
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


def push(root: Path, base: Path, urls: list[str], step_ckpt: Path, step: int, per_rank: bool = False,
         rank_parts: bool = False) -> dict:
    """One step from a fresh 2-rank FSDP2 trainer (it re-joins the group):
    rank 0 sends to every engine, or (``per_rank``) rank r to ``urls[r]``;
    with ``rank_parts`` every rank sends what it holds itself (``RankParts``)."""
    out = root / f"push_{step}{'_per_rank' if per_rank else ''}{'_parts' if rank_parts else ''}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vllm_fp8_overlay.testing.fsdp_trainer", "push", "--model", str(base), "--url", *urls,
           "--steps", str(step_ckpt), "--first-step", str(step), "--out", str(out)]
    cmd += (["--url-per-rank"] if per_rank else []) + (["--rank-parts"] if rank_parts else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-6000:]
    result = json.loads(out.read_text())
    assert [x["ok"] for x in result["reports"]] == [True], result
    return result


def assert_params_cold(url: str, model_dir: Path, workers: int) -> None:
    """Each of the ``workers`` workers of the server at ``url`` holds the
    parameters a cold load of ``model_dir`` gives that worker."""
    warm = rpc(url, "weight_sync_digest")
    cold = rpc(url, "weight_sync_cold_digest", model_dir=str(model_dir))
    assert len(warm) == len(cold) == workers, (len(warm), len(cold))
    for rank, (w, c) in enumerate(zip(warm, cold)):
        assert w["digest"] == c["digest"], f"worker {rank}: parameters differ from a cold load"


def assert_serves_cold(url: str, served: list[Path], k: int, cold: tuple[list, list]) -> None:
    """The one worker of the server at ``url`` equals a cold load of W_k, and
    its greedy tokens and logprobs a fresh engine's (``cold``)."""
    assert_params_cold(url, served[k], workers=1)
    warm = completions(url, str(served[0]), PROMPTS, NTOK)
    assert warm[0] == cold[0], f"{url} step {k}: tokens {warm[0]} vs cold {cold[0]}"
    assert warm[1] == cold[1], f"{url} step {k}: logprobs {warm[1]} vs cold {cold[1]}"


def cold_outputs(model_dir: Path) -> tuple[list, list]:
    """Greedy tokens and logprobs of a fresh engine on ``model_dir`` (one start per checkpoint)."""
    cold = out.cold_outputs(model_dir, PROMPTS, NTOK)
    return cold.tokens, cold.logprobs


def test_fsdp2_trainer_feeds_two_engines(weights, tmp_path):
    """(b) two TP = 1 engines, one group, two steps (one in CI); each engine == cold by
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
                assert_serves_cold(url, served, k, cold)
        print(f"peak RSS per trainer rank: {result['peak_rss_bytes_per_rank']}")


@tiers.full_tier_only("two engines fed by two sending ranks; CI runs (b), one rank feeding both")
def test_fsdp2_each_rank_feeds_its_own_engine(weights, tmp_path):
    """(d) several senders: each trainer rank pushes to its own TP = 1 engine
    (its own group), from the full tensors the gathers put on every rank.
    Both ranks send the whole step; each engine == cold by outputs and
    parameters."""
    root, hf, served = weights
    with vllm_serve(served[0], tmp_path / "a.log", args=EXT) as a, \
            vllm_serve(served[0], tmp_path / "b.log", args=EXT) as b:
        result = push(root, hf[0], [a, b], hf[1], step=1, per_rank=True)
        per_rank = result["reports_per_rank"]
        assert [[x["ok"] for x in rank] for rank in per_rank] == [[True], [True]], per_rank
        sent = [rank[0]["num_bytes"] for rank in per_rank]
        assert sent[0] == sent[1] > 0, f"each rank sends the whole step to its engine: {sent}"
        cold = cold_outputs(served[1])
        for url in (a, b):
            assert_serves_cold(url, served, 1, cold)
        print(f"peak RSS per trainer rank: {result['peak_rss_bytes_per_rank']}")


TP2 = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def tp2_cold(weights, tmp_path_factory):
    """Greedy tokens and logprobs of a freshly started TP = 2 engine on W1."""
    _, _, served = weights
    with vllm_serve(served[1], tmp_path_factory.mktemp("tp2_cold") / "cold.log", args=TP2, env=TP2_ENV) as url:
        return completions(url, str(served[1]), PROMPTS, NTOK)


@tiers.full_tier_only("two TP=2 engines (four workers on a 2-core machine); CI runs (b)")
def test_fsdp2_trainer_feeds_tp2_engine(weights, tp2_cold, tmp_path):
    """(a) one TP = 2 engine: each worker loads its own shard through vLLM's
    loader; outputs equal a freshly started TP = 2 engine's on W1."""
    root, hf, served = weights
    with vllm_serve(served[0], tmp_path / "warm.log", args=EXT + TP2, env=TP2_ENV) as warm_url:
        push(root, hf[0], [warm_url], hf[1], step=1)
        assert len(rpc(warm_url, "weight_sync_digest")) == 2
        warm = completions(warm_url, str(served[0]), PROMPTS, NTOK)
    assert warm[0] == tp2_cold[0], f"TP=2: tokens {warm[0]} vs cold {tp2_cold[0]}"
    assert warm[1] == tp2_cold[1], f"TP=2: logprobs {warm[1]} vs cold {tp2_cold[1]}"


@pytest.fixture(scope="module")
def tied_weights(tmp_path_factory):
    """A tied Llama (no lm_head.weight in its checkpoints; the trainer's head is its embedding)."""
    root = tmp_path_factory.mktemp("sharded_tied")
    base = tm.make_llama(root / "trainer_w0", tied=True)
    config = tm.load_config(base)
    ws = [tm.load_checkpoint(base)]
    ws.append(tm.perturb_state_dict(ws[0], seed=520, scale=0.05))
    hf = [base, tm.save_checkpoint(root / "trainer_w1", ws[1], config)]
    served = [write_serving_checkpoint(root / f"{FMT}_w{k}", w, config,
                                       CT_FP8_CHANNEL_DYNAMIC if FMT == "fp8" else None) for k, w in enumerate(ws)]
    return root, hf, served


@tiers.full_tier_only("two TP=2 engines (four workers on a 2-core machine); CI runs (e)")
def test_fsdp2_ranks_send_their_rows_to_tp2_engine(tied_weights, tmp_path):
    """(g) rank parts into a TP = 2 engine (a tied dense model; FP8 channel
    from vLLM 0.24): each trainer rank sends both workers its rows of every
    weight, quantized on its rows; only the tied embedding is gathered (rank
    0's main stream checks the head against it, then drops the head); each
    worker puts the rows back together and vLLM's loader takes its TP slice.
    Parameters == a cold load per worker, outputs == a freshly started TP = 2
    engine's."""
    root, hf, served = tied_weights
    with vllm_serve(served[0], tmp_path / "warm.log", args=EXT + TP2, env=TP2_ENV) as warm_url:
        result = push(root, hf[0], [warm_url], hf[1], step=1, rank_parts=True)
        rep = result["reports"][0]
        # gathered: the embedding, and its tied head (the same parameter) under its own name
        assert [r[0]["gathered"] for r in result["reports_per_rank"]] == [2, 2], result
        assert rep["worker_parts"] == [2, 2], rep
        for rank, r in enumerate(result["reports_per_rank"]):
            assert [p["worker"] for p in r[0]["rank_parts"]] == [0, 1], (rank, r)
        assert_params_cold(warm_url, served[1], workers=2)
        warm = completions(warm_url, str(served[0]), PROMPTS, NTOK)
    with vllm_serve(served[1], tmp_path / "cold.log", args=TP2, env=TP2_ENV) as cold_url:
        cold = completions(cold_url, str(served[1]), PROMPTS, NTOK)
    assert warm[0] == cold[0], f"TP=2 parts: tokens {warm[0]} vs cold {cold[0]}"
    assert warm[1] == cold[1], f"TP=2 parts: logprobs {warm[1]} vs cold {cold[1]}"


@pytest.fixture(scope="module")
def moe_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_moe")
    base = tm.make_qwen3_moe(root / "trainer_w0", num_experts=8)
    config = tm.load_config(base)
    w1 = tm.perturb_state_dict(tm.load_checkpoint(base), seed=410, scale=0.05)
    hf1 = tm.save_checkpoint(root / "trainer_w1", w1, config)
    served = [write_serving_checkpoint(root / "bf16_w0", tm.load_checkpoint(base), config, None),
              write_serving_checkpoint(root / "bf16_w1", w1, config, None)]
    return root, [base, hf1], served


def ep_engine() -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` arguments and environment of a TP = 2 engine with expert
    parallelism on CPU (its MoE kernels behind the test shim)."""
    from vllm_fp8_overlay.testing.ep_shim import EXTENSION as EP_EXTENSION

    return (["--tensor-parallel-size", "2", "--enable-expert-parallel", "--distributed-executor-backend", "mp",
             "--worker-extension-cls", EP_EXTENSION], {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})


@tiers.full_tier_only("two TP=2 expert-parallel engines")
def test_fsdp2_trainer_feeds_expert_parallel_engine(moe_weights, tmp_path):
    """(c) TP = 2 + expert parallelism, one step; parameters == a cold load,
    outputs == a freshly started EP engine's (both with the EP test shim)."""
    root, hf, served = moe_weights
    ep, env = ep_engine()
    with vllm_serve(served[0], tmp_path / "warm.log", args=ep, env=env) as warm_url:
        before = completions(warm_url, str(served[0]), PROMPTS, NTOK)
        result = push(root, hf[0], [warm_url], hf[1], step=1)
        assert result["reports"][0]["gathered"] > 0, result  # the fused 3-D experts travel gathered
        # each EP worker left the other rank's experts out of vLLM's loader (skip-other-ranks-experts):
        # 4 of 8 experts x 3 projections x 2 layers
        assert result["reports"][0]["other_ranks_expert_tensors"] == [24, 24], result
        assert_params_cold(warm_url, served[1], workers=2)
        warm = completions(warm_url, str(served[0]), PROMPTS, NTOK)
    assert warm != before, "the update changed no output"
    with vllm_serve(served[1], tmp_path / "cold.log", args=ep, env=env) as cold_url:
        cold = completions(cold_url, str(served[1]), PROMPTS, NTOK)
    assert warm[0] == cold[0], f"EP: tokens {warm[0]} vs cold {cold[0]}"
    assert warm[1] == cold[1], f"EP: logprobs {warm[1]} vs cold {cold[1]}"
    # The shim computes the MoE, not something merely deterministic: a TP = 1 engine on the same
    # weights picks the same first token for every prompt with nearly the same logprob. Not exactly:
    # each EP rank rounds its partial sum to BF16 and the all-reduce adds them in BF16, where one
    # rank sums all routed experts before rounding once (measured |dlogprob|: ~3e-4 where the CPU MoE
    # runs its vector kernels; 0.0145 on vLLM 0.19.1 with its AMX BF16 grouped-GEMM kernel, on
    # 2026-12-01; a later near-tie token may then differ). The bound is 0.05. What it catches,
    # measured with transformers on this model (one expert's down projection zeroed in every
    # layer): 4 of the 8 experts change a first token, 3 move a logprob by 0.106-0.176; the
    # weakest moves it by 0.0175, which no first-token bound can tell from the AMX rounding. This
    # checks the test shim only; the sync's proofs are the exact comparisons above.
    tp1 = cold_outputs(served[1])
    for i in range(len(PROMPTS)):
        assert tp1[0][i][0] == cold[0][i][0], f"EP shim: prompt {i}: first token {cold[0][i][0]} vs TP=1 {tp1[0][i][0]}"
        assert abs(tp1[1][i][0] - cold[1][i][0]) < 0.05, f"EP shim: prompt {i}: {cold[1][i][0]} vs TP=1 {tp1[1][i][0]}"


def _assert_parts(result: dict, experts_to: dict[int, int]) -> None:
    """What each trainer rank sent each worker: rank r of 2 holds experts
    4r..4r+3 of 8 (Shard(0)) and sends them to worker ``experts_to[r]`` (4
    experts x 3 projections x 2 layers = 24 tensors), and its rows of the 21
    other tensors (every one is sharded by rows and served as it is) to
    every worker; nothing is gathered."""
    workers = sorted(set(experts_to.values()))
    for rank, reports in enumerate(result["reports_per_rank"]):
        sent = reports[0]["rank_parts"]
        mine = list(range(4 * rank, 4 * rank + 4))
        assert [(p["worker"], p["expert_ids"], p["tensors"]) for p in sent] == \
            [(w, mine if experts_to[rank] == w else [], 21 + (24 if experts_to[rank] == w else 0))
             for w in range(max(workers) + 1)], (rank, sent)
        assert reports[0]["gathered"] == 0, (rank, reports[0])


def test_fsdp2_ranks_send_their_experts_to_one_engine(moe_weights, tmp_path):
    """(e) rank parts into a TP = 1 engine: each trainer rank sends the
    experts it holds and its rows of every other weight; nothing is gathered
    and rank 0's main stream is empty; the worker puts the rows back
    together and loads the three streams as one update. Parameters == a cold
    load, greedy tokens and logprobs == a freshly started engine's."""
    root, hf, served = moe_weights
    with vllm_serve(served[0], tmp_path / "warm.log", args=EXT) as url:
        before = completions(url, str(served[0]), PROMPTS, NTOK)
        result = push(root, hf[0], [url], hf[1], step=1, rank_parts=True)
        rep = result["reports"][0]
        _assert_parts(result, experts_to={0: 0, 1: 0})
        assert rep["worker_parts"] == [2], rep  # the main stream and one part per trainer rank
        assert rep["worker_tensors"] == [69], rep  # 21 put together from rows, 24 + 24 experts
        assert rep["num_bytes"] == 0, rep  # the main stream carried nothing
        assert_params_cold(url, served[1], workers=1)
        warm = completions(url, str(served[0]), PROMPTS, NTOK)
    assert warm != before, "the update changed no output"
    cold = cold_outputs(served[1])
    assert warm[0] == cold[0], f"tokens {warm[0]} vs cold {cold[0]}"
    assert warm[1] == cold[1], f"logprobs {warm[1]} vs cold {cold[1]}"


@tiers.full_tier_only("two TP=2 expert-parallel engines")
def test_fsdp2_ranks_feed_expert_parallel_workers_their_own_experts(moe_weights, tmp_path):
    """(f) rank parts into a TP = 2 + EP engine: trainer rank r holds the
    experts EP worker r serves and sends them to it alone (and its rows of
    the other weights to both); neither worker receives the other's experts.
    Parameters == a cold load per worker,
    outputs == a freshly started EP engine's (both with the EP test shim)."""
    root, hf, served = moe_weights
    ep, env = ep_engine()
    with vllm_serve(served[0], tmp_path / "warm.log", args=ep, env=env) as warm_url:
        before = completions(warm_url, str(served[0]), PROMPTS, NTOK)
        result = push(root, hf[0], [warm_url], hf[1], step=1, rank_parts=True)
        rep = result["reports"][0]
        _assert_parts(result, experts_to={0: 0, 1: 1})
        assert rep["worker_parts"] == [2, 2], rep
        # each worker received 21 non-expert tensors and its own 24 expert tensors, none of the other's
        assert rep["worker_tensors"] == [45, 45], rep
        assert rep["other_ranks_expert_tensors"] == [0, 0], rep
        assert_params_cold(warm_url, served[1], workers=2)
        warm = completions(warm_url, str(served[0]), PROMPTS, NTOK)
    assert warm != before, "the update changed no output"
    with vllm_serve(served[1], tmp_path / "cold.log", args=ep, env=env) as cold_url:
        cold = completions(cold_url, str(served[1]), PROMPTS, NTOK)
    assert warm[0] == cold[0], f"EP: tokens {warm[0]} vs cold {cold[0]}"
    assert warm[1] == cold[1], f"EP: logprobs {warm[1]} vs cold {cold[1]}"
