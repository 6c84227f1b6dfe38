"""Runtime canary (``sync.canary``): the bound's derivation, the comparison,
and on real vLLM that it passes correct pushes and catches what tensor
checks cannot see.

Unit part (no vLLM): the rounding constants the bound is built from equal
the error of real casts; one FP8 GEMM with per-token FP8 activations is off
by exactly the relative error the derivation assumes; the comparison's
rules (same tokens, parted tokens, non-finite values); a recorded vLLM
0.32.0 ``/v1/completions`` answer parses.

Engine part (marker ``vllm``): one engine serving the tiny tied Qwen2 (FP8
compressed-tensors channel on vLLM >= 0.24, BF16 before), started with the
test worker extension ``testing.canary_faults`` that plants faults after a
load:

* (i) tied-head desync: the head's prepacked GEMM copy from before a push
  is put back after it (the state of the known CPU bug), the canary fails
  naming engine, prompt, position, expected and got; the control push
  without the fault passes;
* (ii) a NaN in a ``weight_scale`` planted after the load (the receiver
  refuses one in an update) fails the canary with "not finite".

The false-alarm measurement over many pushes and families, and the HTTP
path on a ``vllm serve``, are in ``tests/test_sync_canary_soak.py``.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_canary.py
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from vllm_fp8_overlay.sync.canary import (
    U_BF16,
    U_FP8,
    Canary,
    CanaryFailed,
    Reference,
    Sample,
    _compare,
    hidden_error,
    logprob_sigma,
    parse_completions,
    rounding_rms,
)

FIXTURES = Path(__file__).parent / "fixtures" / "canary"
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11]]


# ------------------------------------------------------------ the bound
@pytest.mark.parametrize("dtype, bits", [(torch.float8_e4m3fn, 3), (torch.bfloat16, 7)])
def test_rounding_rms_equals_the_cast_error(dtype, bits):
    """The per-element constant of the derivation, against the real cast of
    a million values spread over 6 binades each way (normal range of both
    formats)."""
    g = torch.Generator().manual_seed(0)
    v = torch.exp(torch.empty(10 ** 6, dtype=torch.float64).uniform_(-4, 4, generator=g))
    measured = ((v.to(dtype).to(torch.float64) - v) / v).pow(2).mean().sqrt().item()
    assert measured == pytest.approx(rounding_rms(bits), rel=0.01)
    assert (U_FP8, U_BF16) == (rounding_rms(3), rounding_rms(7))


def test_one_fp8_gemm_is_off_by_the_assumed_relative_error():
    """y = Q(W) Q(x) against W x: FP8 channel weights from this package's
    quantizer and per-token FP8 activations (what CT FP8-dynamic runs) put
    a relative RMS error of sqrt(2) * U_FP8 on the output -- the per-GEMM
    term of ``hidden_error``."""
    from vllm_fp8_overlay.formats import FP8Layout, dequantize_tensor, quantize_tensor

    g = torch.Generator().manual_seed(1)
    w = torch.randn(1024, 1024, generator=g, dtype=torch.float64) / 32
    x = torch.randn(1024, 64, generator=g, dtype=torch.float64)
    lay = FP8Layout(method="compressed-tensors", strategy="channel")
    wq = dequantize_tensor(*quantize_tensor(w.float(), lay), lay, torch.float64)
    sx = x.abs().amax(0, keepdim=True) / 448.0
    xq = (x / sx).float().to(torch.float8_e4m3fn).to(torch.float64) * sx
    y = w @ x
    rel = ((wq @ xq - y).norm() / y.norm()).item()
    assert rel == pytest.approx(math.sqrt(2) * U_FP8, rel=0.03)


def test_hidden_error_counts_gemms_and_roundings():
    assert hidden_error(2, False) == pytest.approx(math.sqrt(2 * 21) * U_BF16)
    assert hidden_error(2, True) ** 2 == pytest.approx(8 * 2 * U_FP8 ** 2 + 42 * U_BF16 ** 2)
    assert hidden_error(2, True, head_fp8=True) > hidden_error(2, True) > hidden_error(1, True)


def test_logprob_sigma_confident_positions_hardly_move():
    z = torch.zeros(512, dtype=torch.float64)
    flat = logprob_sigma(z + torch.randn(512, generator=torch.Generator().manual_seed(0)), 3, 0.1)
    assert 0.09 < flat < 0.15  # ~ rho * std(z) * sqrt(1 + sum p^2) with std(z) ~ 1
    z[7] = 60.0  # p(7) = 1 - 1e-23
    assert logprob_sigma(z, 7, 0.1) < 1e-4  # only the float32 log-softmax rounding is left
    assert logprob_sigma(z, 3, 0.1) > 0.1 * z.std().item()  # a token far from the top moves with the logits


# ------------------------------------------------------ the comparison
def _ref(tokens, vocab=16, seed=0):
    logits = torch.randn(len(tokens), vocab, generator=torch.Generator().manual_seed(seed))
    return Reference(list(tokens), logits=logits)


def test_compare_same_tokens_within_and_beyond_the_bound():
    ref = _ref([3, 4, 5])
    lp = torch.log_softmax(ref.logits.double(), -1)
    exact = Sample([3, 4, 5], [float(lp[j, t]) for j, t in enumerate([3, 4, 5])])
    rows = _compare(exact, ref, 0.1, None, 5.0)
    assert [r["ok"] for r in rows] == [True] * 3 and max(r["deviation"] for r in rows) < 1e-6
    off = Sample([3, 4, 5], [exact.logprobs[0], exact.logprobs[1] - 2.0, exact.logprobs[2]])
    rows = _compare(off, ref, 0.1, None, 5.0)
    assert [r["ok"] for r in rows] == [True, False, True]
    assert rows[1]["deviation"] == pytest.approx(2.0) and rows[1]["bound"] < 2.0


def test_compare_non_finite_fails_whatever_the_bound():
    ref = _ref([1, 2])
    rows = _compare(Sample([1, 2], [math.nan, -1.0]), ref, 0.1, 1e9, 5.0)
    assert not rows[0]["ok"] and "not finite" in rows[0]["why"]


def test_compare_parted_tokens_uses_the_reference_row_then_stops():
    """The engine picked token 9 where the reference continued with 4: the
    reference's logits at that position still give log p(9) (same context),
    later positions have other contexts and are not compared."""
    ref = _ref([3, 4, 5, 6])
    lp = torch.log_softmax(ref.logits.double(), -1)
    s = Sample([3, 9, 1, 1], [float(lp[0, 3]), float(lp[1, 9]), -50.0, -50.0])
    rows = _compare(s, ref, 0.1, None, 5.0)
    assert [r["position"] for r in rows] == [0, 1] and all(r["ok"] for r in rows)


def test_compare_previous_answer_through_top_k():
    prev = Reference([3, 4], logprobs=[-1.0, -2.0], top=[{3: -1.0, 8: -1.1}, {4: -2.0, 9: -2.05}])
    same = _compare(Sample([3, 4], [-1.01, -2.02]), prev, None, 0.1, 5.0)
    assert all(r["ok"] for r in same) and len(same) == 2
    parted = _compare(Sample([8, 4], [-1.12, -2.0], [{8: -1.12, 3: -1.13}]), prev, None, 0.1, 5.0)
    assert len(parted) == 1 and parted[0]["ok"] and parted[0]["token"] == 8
    lost = _compare(Sample([7, 4], [-0.1, -2.0], [{7: -0.1}]), prev, None, 0.1, 5.0)
    assert not lost[0]["ok"] and "neither in the other's top-k" in lost[0]["why"]


def test_canary_config_refusals():
    with pytest.raises(ValueError, match="needs bound="):
        Canary(PROMPTS, "previous")
    with pytest.raises(ValueError, match="non-empty"):
        Canary([[]], "previous", bound=1.0)
    with pytest.raises(ValueError, match="references for"):
        Canary(PROMPTS, [Reference([1], logits=torch.zeros(1, 4))])
    with pytest.raises(ValueError, match="without logits needs bound"):
        Canary(PROMPTS[:1], [Reference([1], logprobs=[-1.0])])
    with pytest.raises(ValueError, match="bound must be > 0"):
        Canary(PROMPTS, "previous", bound=0.0)


def test_parse_recorded_vllm_0_32_completions():
    """A real answer of vLLM 0.32.0's /v1/completions to the canary's
    request (tests/fixtures/canary, recorded with the soak test's server)."""
    out = json.loads((FIXTURES / "vllm_0_32_0_completions_logprobs.json").read_text())
    samples = parse_completions(out, 3)
    assert [len(s.tokens) for s in samples] == [4, 4, 4]
    for s, ch in zip(samples, out["choices"]):
        assert s.tokens == ch["token_ids"]
        for j, t in enumerate(s.tokens):
            assert s.top[j][t] == s.logprobs[j]  # the chosen token's logprob is in its top-k
            assert len(s.top[j]) == 5
    nan = json.loads((FIXTURES / "vllm_0_32_0_completions_nan_400.json").read_text())
    from vllm_fp8_overlay.sync.canary import _NOT_JSON

    assert nan["error"]["message"] == _NOT_JSON  # what _http_samples recognizes as a non-finite logprob


# ------------------------------------------------------------ real vLLM
STEP = itertools.count(1)


@pytest.fixture(scope="module")
def canary_engine(tmp_path_factory):
    """(llm, client, hf reference model, W0, fmt) on the tiny tied Qwen2."""
    pytest.importorskip("vllm")
    transformers = pytest.importorskip("transformers")
    from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, free_port, write_serving_checkpoint
    from vllm_fp8_overlay.sync.client import WeightSyncClient
    from vllm_fp8_overlay.testing import families, harness
    from vllm_fp8_overlay.testing import tiny_models as tm
    from vllm_fp8_overlay.testing.canary_faults import FAULT_EXTENSION

    fmt = "fp8" if harness.vllm_version_tuple() >= (0, 24) else "bf16"
    root = tmp_path_factory.mktemp("canary")
    src = families.make_family("qwen2-tied", root / "bf16")
    w0 = tm.load_checkpoint(src)
    served = write_serving_checkpoint(root / fmt, w0, tm.load_config(src),
                                      CT_FP8_CHANNEL_DYNAMIC if fmt == "fp8" else None)
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from vllm import LLM

    with harness.worker_class_restored():  # the fault extension must not stay injected in this process
        llm = LLM(model=str(served), skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
                  max_model_len=128, max_num_seqs=4, seed=0, worker_extension_cls=FAULT_EXTENSION)
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(src)).float().eval()
        client = WeightSyncClient([llm], host="127.0.0.1", port=free_port(), timeout=240)
        try:
            yield llm, client, ref, w0, fmt
        finally:
            client.close()
            harness.stop_sync_engine(llm)


def _trainer_holds(ref, w):
    """The trainer's model takes the weights it pushes (float32 forward)."""
    missing, unexpected = ref.load_state_dict({k: v.float() for k, v in w.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)


def _big_update(w, seed):
    """A training jump large enough that a head stuck on the old copy of the
    tied embedding answers differently (30% of each tensor's spread)."""
    from vllm_fp8_overlay.testing import tiny_models as tm

    return tm.perturb_state_dict(w, seed=seed, scale=0.3)


@pytest.mark.vllm
@pytest.mark.slow
def test_canary_passes_correct_pushes_and_reports_its_cost(canary_engine):
    from vllm_fp8_overlay.sync.canary import hf_reference
    from vllm_fp8_overlay.testing import tiny_models as tm

    llm, client, ref, w0, fmt = canary_engine
    canary = Canary(PROMPTS, hf_reference(ref), max_tokens=4)
    w = w0
    for k in range(3):
        w = tm.perturb_state_dict(w, seed=100 + k, scale=0.02) if k < 2 else _big_update(w, 200)
        _trainer_holds(ref, w)
        rep = client.push(w, next(STEP), canary=canary)
        c = rep.canary
        assert c["positions"] == len(PROMPTS) * 4 and c["comparisons"] >= 5 * c["positions"], c
        assert c["max_ratio"] <= 1.0, c
        assert c["cost_ms"] > 0 and c["engine_ms"] > 0 and rep.to_dict()["canary"] is c
    every = Canary(PROMPTS, hf_reference(ref), every=2)
    assert "positions" in every.run(client, 0) and every.run(client, 0) == {"skipped": True}


@pytest.mark.vllm
@pytest.mark.slow
def test_canary_catches_stale_tied_head(canary_engine):
    """(i) The head keeps its GEMM copy of the embedding from before the push
    (what the CPU bug does): every parameter is the new one, the outputs are
    not. The canary names the engine, prompt, position, expected and got."""
    from vllm_fp8_overlay.sync.canary import hf_reference

    llm, client, ref, w0, fmt = canary_engine
    canary = Canary(PROMPTS, hf_reference(ref), max_tokens=4)
    held = llm.collective_rpc("canary_fault_hold_lm_head")[0]
    assert held == {"has_cpu_linear": True, "tied": True}, held
    w1 = _big_update(w0, 300)
    _trainer_holds(ref, w1)
    step = next(STEP)
    client.push(w1, step)
    # with the repair (sync/apply/derived.py) the push rebuilt the copy and this
    # puts the old one back; without it the copy was never rebuilt: stale either way
    llm.collective_rpc("canary_fault_stale_lm_head")
    with pytest.raises(CanaryFailed) as ei:
        canary.run(client, step)
    msg = str(ei.value)
    assert re.search(rf"{re.escape(client.targets[0].name)} prompt \d \[[\d, ]+\] position \d token \d+: "
                     r"expected logprob -?\d+\.\d+, got -?\d+\.\d+ \(\|diff\| \d+\.\d+ > bound \d+\.\d+\)", msg), msg
    assert ei.value.report["failures"] and ei.value.report["max_ratio"] > 1.0
    # the next push rebuilds the head: the canary passes again
    w2 = _big_update(w1, 301)
    _trainer_holds(ref, w2)
    assert client.push(w2, next(STEP), canary=canary).canary["max_ratio"] <= 1.0


@pytest.mark.vllm
@pytest.mark.slow
def test_canary_catches_nan_scale_planted_after_load(canary_engine):
    """(ii) A NaN weight scale (refused by the receiver in an update) planted
    in the served model: both the trainer-forward and the previous-answer
    canary fail, naming the non-finite logprob."""
    from vllm_fp8_overlay.sync.canary import hf_reference
    from vllm_fp8_overlay.testing import tiny_models as tm

    llm, client, ref, w0, fmt = canary_engine
    if fmt != "fp8":
        pytest.skip("BF16 engine (FP8 needs vLLM >= 0.24 on CPU): no weight_scale to corrupt")
    trainer = Canary(PROMPTS, hf_reference(ref))
    previous = Canary(PROMPTS, "previous", bound=0.5)
    w = tm.perturb_state_dict(w0, seed=400, scale=0.02)
    _trainer_holds(ref, w)
    step = next(STEP)
    client.push(w, step, canary=trainer)
    assert previous.run(client, step)["positions"] == 0  # the baseline answer
    llm.collective_rpc("canary_fault_nan_scale", kwargs={"module": "model.layers.1.mlp.down_proj", "row": 3})
    for c in (trainer, previous):
        with pytest.raises(CanaryFailed, match=r"position 0 token \d+: expected logprob .*, got nan .*not finite"):
            c.run(client, step)
    # a push reloads the layer (its scale included): served outputs are right again
    w = tm.perturb_state_dict(w, seed=401, scale=0.02)
    _trainer_holds(ref, w)
    assert client.push(w, next(STEP), canary=trainer).canary["max_ratio"] <= 1.0
