"""Direct expert writes (``sync/apply/experts.py``), proven on real vLLM by outputs.

Where the shortcut is declared (``load_shortcuts.DECLARED``: vLLM >= 0.28 on
CPU), a pushed update of a BF16 MoE writes every routed-expert tensor straight
into the fused expert parameters instead of one vLLM weight-loader call per
tensor. These tests show, on the engine itself:

1. whole-step and streamed updates both take the shortcut for exactly the
   routed-expert tensors (3 per expert per MoE layer), and the engine then
   equals a cold start: every parameter bitwise, greedy tokens and per-token
   logprobs exactly (``harness.assert_warm_equals_cold``);
2. where the release is outside the declared range, nothing is written
   directly (the update still equals a cold start: the MoE test in
   ``test_sync_tied_moe.py`` runs there in the full tier).

The before/after load times are in ``benchmarks/moe_load.py`` (BENCHMARKS.md).
The plan's own checks (which names, which slots, a layer written in part)
are tested without vLLM below, on a layer built like vLLM's.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_moe_load.py
"""

from __future__ import annotations

import pytest
import torch

from vllm_fp8_overlay.load_shortcuts import DECLARED

SHORTCUT = next(d for d in DECLARED if d.id == "direct-expert-writes")


# --------------------------------------------------------------- the plan, no vLLM


class _Parallel:
    tp_size, use_ep = 1, False


class _MoEConfig:
    moe_parallel_config, is_act_and_mul = _Parallel(), True


class UnquantizedFusedMoEMethod:  # the name the plan checks, as vLLM spells it
    pass


class _Experts(torch.nn.Module):
    """Parameters and attributes as vLLM's unquantized fused-MoE layer has them."""

    def __init__(self, e: int, i: int, h: int) -> None:
        super().__init__()
        self.w13_weight = torch.nn.Parameter(torch.zeros(e, 2 * i, h, dtype=torch.bfloat16), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(torch.zeros(e, h, i, dtype=torch.bfloat16), requires_grad=False)
        self.quant_method = UnquantizedFusedMoEMethod()
        self.moe_config = _MoEConfig()


class _Container(torch.nn.Module):
    def __init__(self, e: int, i: int, h: int) -> None:
        super().__init__()
        self.routed_experts = _Experts(e, i, h)


def _model_and_served(e=4, i=8, h=16):
    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = _Container(e, i, h)
    served = {}
    for x in range(e):
        served[f"mlp.experts.{x}.gate_proj.weight"] = ("bfloat16", (i, h))
        served[f"mlp.experts.{x}.up_proj.weight"] = ("bfloat16", (i, h))
        served[f"mlp.experts.{x}.down_proj.weight"] = ("bfloat16", (h, i))
    served["mlp.gate.weight"] = ("bfloat16", (e, h))
    return model, served


@pytest.fixture
def on_cpu_release(monkeypatch):
    """The plan as on a release and platform inside the declared range."""
    from vllm_fp8_overlay.sync.apply import experts

    monkeypatch.setattr(experts, "enabled", lambda model, cfg: True)


def test_plan_writes_each_expert_into_its_slot(on_cpu_release):
    from vllm_fp8_overlay.sync.apply.experts import plan_direct_expert_writes

    model, served = _model_and_served()
    plan = plan_direct_expert_writes(model, None, served)
    assert plan is not None and len(plan.targets) == 12
    g = torch.Generator().manual_seed(0)
    sent = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, (_, s) in served.items()}
    rest = list(plan.others(sent.items()))
    assert [n for n, _ in rest] == ["mlp.gate.weight"]  # only what the plan does not cover goes to vLLM
    plan.check_complete()
    layer = model.mlp.experts.routed_experts
    for x in range(4):
        assert torch.equal(layer.w13_weight[x, :8], sent[f"mlp.experts.{x}.gate_proj.weight"])
        assert torch.equal(layer.w13_weight[x, 8:], sent[f"mlp.experts.{x}.up_proj.weight"])
        assert torch.equal(layer.w2_weight[x], sent[f"mlp.experts.{x}.down_proj.weight"])


def test_plan_refuses_a_layer_written_in_part(on_cpu_release):
    from vllm_fp8_overlay.sync.apply.experts import plan_direct_expert_writes

    model, served = _model_and_served()
    plan = plan_direct_expert_writes(model, None, served)
    part = [(n, torch.zeros(s, dtype=torch.bfloat16)) for n, (_, s) in served.items() if ".3." not in n]
    list(plan.others(part))
    with pytest.raises(RuntimeError, match=r"written only in part: mlp.experts.routed_experts \(9/12\)"):
        plan.check_complete()


@pytest.mark.parametrize("change", ["shape", "dtype", "missing expert", "expert parallel", "bias"])
def test_plan_leaves_layers_it_cannot_fill_to_vllm(change, on_cpu_release):
    from vllm_fp8_overlay.sync.apply.experts import plan_direct_expert_writes

    model, served = _model_and_served()
    layer = model.mlp.experts.routed_experts
    if change == "shape":
        served["mlp.experts.1.down_proj.weight"] = ("bfloat16", (16, 16))
    elif change == "dtype":
        served["mlp.experts.1.up_proj.weight"] = ("float32", (8, 16))
    elif change == "missing expert":
        del served["mlp.experts.2.gate_proj.weight"]
    elif change == "expert parallel":
        layer.moe_config = type("C", (), {"moe_parallel_config": type("P", (), {"tp_size": 1, "use_ep": True})(),
                                          "is_act_and_mul": True})()
    else:
        layer.w13_bias = torch.nn.Parameter(torch.zeros(4, 16), requires_grad=False)
    assert plan_direct_expert_writes(model, None, served) is None


def test_shortcut_is_declared_off_outside_its_range():
    assert SHORTCUT.applies_to("0.28.0") and SHORTCUT.applies_to("0.32.0")
    assert not SHORTCUT.applies_to("0.19.1") and not SHORTCUT.applies_to(None)


# --------------------------------------------------------------- real vLLM


@pytest.mark.vllm
@pytest.mark.slow
def test_direct_expert_writes_whole_and_stream_equal_cold(tmp_path):
    """1./2. A 16-expert Qwen3-MoE: a whole-step push, then a streamed push;
    each writes exactly the routed experts directly (in range), and the engine
    equals a cold start: parameters after the first, parameters and outputs
    after the second."""
    pytest.importorskip("vllm")
    from vllm_fp8_overlay.testing import harness, tiers

    if not SHORTCUT.applies_to(harness.vllm_version()) and not tiers.FULL:
        pytest.skip("CI runs it where the shortcut is declared; elsewhere (nothing written directly) in the full tier")
    from vllm_fp8_overlay.demo import free_port, write_serving_checkpoint
    from vllm_fp8_overlay.sync.client import WeightSyncClient
    from vllm_fp8_overlay.testing import tiny_models as tm

    experts, layers = 16, 2
    base = tm.make_qwen3_moe(tmp_path / "w0", layers=layers, num_experts=experts, hidden=128, moe_intermediate=64)
    config = tm.load_config(base)
    w = tm.load_checkpoint(base)
    want = 3 * experts * layers if SHORTCUT.applies_to(harness.vllm_version()) else 0
    llm = harness.start_sync_engine(base)
    try:
        with WeightSyncClient([llm], host="127.0.0.1", port=free_port(), timeout=240) as client:
            for step, stream in ((1, False), (2, True)):
                w = tm.perturb_state_dict(w, seed=70 + step, scale=0.05)
                rep = client.push(w, step=step, stream=stream)
                got = rep.workers[0]
                assert got["ok"] and got["stream"] == stream and got["direct_expert_tensors"] == want, got
                ckpt = write_serving_checkpoint(tmp_path / f"w{step}", w, config, None)
                harness.assert_warm_equals_cold(llm, ckpt, f"qwen3-moe step {step} (stream={stream})",
                                                outputs=step == 2)
    finally:
        harness.stop_sync_engine(llm)
