"""Tied embeddings and MoE through the whole sync path, proven by outputs.

1. A tied Qwen2 (``tie_word_embeddings``): the trainer is a Hugging Face
   model whose ``state_dict()`` carries ``lm_head.weight`` (the embedding
   again), which the served checkpoint lacks. ``client.push(model.state_dict(),
   step)``, unchanged, for 3 steps (2 in CI): the client drops the alias (reported in
   ``StepReport.dropped_aliases``) and after each push the engine equals a
   cold start on the offline checkpoint of the same weights: parameters
   bitwise, greedy tokens and per-token logprobs exactly
   (``harness.assert_warm_equals_cold``). On vLLM 0.28+ the served head is a
   ``ParallelLMHead`` sharing the embedding, whose CPU GEMM copy only the
   derived-state refresh (``sync/apply/derived.py``) brings up to date.
   Formats: compressed-tensors FP8 channel where it runs on CPU (vLLM >=
   0.24), BF16 on older releases; BF16 there too in the full tier.
2. The same trainer with an untied head (it differs from the embedding) is
   refused before anything loads; a client that cannot read the served
   names sends the alias and the receiver's rejection says what to do.
3. MoE (tiny Qwen3-MoE and GLM-4.5-MoE, BF16): one pushed update, outputs
   equal to a cold start. On 0.28/0.32 CPU this needs the experts' prepack
   rebuilt after the reload. Runs in CI on >= 0.28; on older releases in the
   full tier (``FP8_OVERLAY_SOAK=1``, set by the matrix sessions).

The tiny families draw the embedding with std 1.0; tied to the head that
gives logits so peaked that every logprob is exactly 0.0 and the greedy
tokens never change with the weights, so a stale head could not be seen.
The tied model here scales its embedding by 0.05 (logprobs around -4), so
that these tests can fail.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_tied_moe.py
"""

from __future__ import annotations

import itertools
import re

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vllm_fp8_overlay.load_shortcuts import DECLARED  # noqa: E402
from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, free_port, write_serving_checkpoint  # noqa: E402
from vllm_fp8_overlay.sync.aliases import TiedAliases  # noqa: E402
from vllm_fp8_overlay.sync.client import WeightSyncClient, WeightSyncFailed  # noqa: E402
from vllm_fp8_overlay.testing import families, family_record, harness  # noqa: E402
from vllm_fp8_overlay.testing import outputs as out  # noqa: E402
from vllm_fp8_overlay.testing import tiers  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VERSION = harness.vllm_version_tuple()
FP8_OK = VERSION >= (0, 24)
DIRECT = next(d for d in DECLARED if d.id == "direct-expert-writes").applies_to(harness.vllm_version())
FORMATS = {"bf16": None, "fp8": CT_FP8_CHANNEL_DYNAMIC}
TIMEOUT = 240.0
STEP = itertools.count(1)
EMBED = "model.embed_tokens.weight"


def client_for(llm, **kw) -> WeightSyncClient:
    return WeightSyncClient([llm], host="127.0.0.1", port=free_port(), timeout=TIMEOUT, **kw)


def hf_trainer(base):
    """The trainer's Hugging Face model (its tied head is the embedding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    assert model.lm_head.weight is model.get_input_embeddings().weight, "transformers did not tie the head"
    return model


def train_step(model, seed: int) -> None:
    """An optimizer-like in-place change of every parameter (the tied one once)."""
    params = dict(model.named_parameters())  # deduplicated: no lm_head.weight
    new = tm.perturb_state_dict({n: p.detach() for n, p in params.items()}, seed=seed, scale=0.05)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(new[n])


def served_checkpoint(directory, state_dict, config, quant):
    """What the serving side would hold for these weights: no ``lm_head.weight``."""
    return write_serving_checkpoint(directory, {k: v for k, v in state_dict.items() if k != "lm_head.weight"},
                                    config, quant)


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied_qwen2")
    d = families.make_family("qwen2-tied", root / "family")
    sd = tm.load_checkpoint(d)
    sd[EMBED] = (sd[EMBED].float() * 0.05).to(torch.bfloat16)  # see the module docstring
    return tm.save_checkpoint(root / "trainer_w0", sd, tm.load_config(d)), root


@pytest.mark.parametrize("fmt", ["fp8", pytest.param("bf16", marks=tiers.full_tier_only(
    "the BF16 server where FP8 runs (CI proves the tied head on FP8 there, on BF16 on older releases)"))]
    if FP8_OK else ["bf16"])
def test_tied_qwen2_state_dict_pushed_unchanged(fmt, tied_base):
    base, root = tied_base
    config = tm.load_config(base)
    model = hf_trainer(base)
    w0 = served_checkpoint(root / f"{fmt}_w0", model.state_dict(), config, FORMATS[fmt])
    llm = harness.start_sync_engine(w0)
    try:
        before = out.greedy_outputs(llm)
        with client_for(llm) as client:
            assert (client.layout is not None) == (fmt == "fp8")
            for k in range(1, tiers.steps(ci=2, full=3) + 1):
                train_step(model, seed=300 + k)
                sd = model.state_dict()
                assert "lm_head.weight" in sd and sd["lm_head.weight"].data_ptr() == sd[EMBED].data_ptr()
                ckpt = served_checkpoint(root / f"{fmt}_w{k}", sd, config, FORMATS[fmt])
                rep = client.push(sd, step=next(STEP))
                assert rep.dropped_aliases == ["lm_head.weight"], rep.to_dict()
                assert rep.to_dict()["dropped_aliases"] == ["lm_head.weight"]
                harness.assert_warm_equals_cold(llm, ckpt, f"tied qwen2 {fmt} step {k}")
        after = out.greedy_outputs(llm)
        assert after.tokens != before.tokens, "greedy tokens never changed: the updates had no visible effect"
    finally:
        harness.stop_sync_engine(llm)


def test_untied_head_refused_and_receiver_hint(tied_base):
    """2. A head that is not the embedding is refused before anything is sent
    to the loader (model bitwise unchanged); a client without the served names
    sends ``lm_head.weight`` and the receiver rejects it with the hint."""
    base, root = tied_base
    model = hf_trainer(base)
    w0 = served_checkpoint(root / "hint_w0", model.state_dict(), tm.load_config(base), None)
    llm = harness.start_sync_engine(w0)
    try:
        before = harness.sync_digest(llm)
        with client_for(llm) as client:
            sd = dict(model.state_dict())
            sd["lm_head.weight"] = sd["lm_head.weight"].clone() * 2
            with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
                client.push(sd, step=next(STEP))
            assert harness.sync_digest(llm) == before
            client.__dict__["_tied_aliases"] = TiedAliases(None)  # as when the served dir is not readable here
            with pytest.raises(WeightSyncFailed) as ei:
                client.push(model.state_dict(), step=next(STEP))
            msg = str(ei.value)
            assert "unknown tensor(s) (not in the served checkpoint): lm_head.weight" in msg, msg
            assert "lm_head.weight is tied to model.embed_tokens.weight" in msg and "drop lm_head.weight" in msg, msg
            assert harness.sync_digest(llm) == before
    finally:
        harness.stop_sync_engine(llm)


MOE = {"qwen3-moe": tm.make_qwen3_moe, "glm4-moe": tm.make_glm4_moe}


@pytest.mark.parametrize("name", list(MOE))
def test_moe_update_outputs_equal_cold(name, tmp_path):
    """3. One pushed update of a tiny MoE: parameters and outputs equal a cold start."""
    if VERSION < (0, 28) and not tiers.FULL:
        pytest.skip("CI runs the MoE output proof on vLLM >= 0.28 (where the experts' prepack must be rebuilt); "
                    "older releases in the full tier (FP8_OVERLAY_SOAK=1)")
    base = MOE[name](tmp_path / "w0")
    config = tm.load_config(base)
    w1 = tm.perturb_state_dict(tm.load_checkpoint(base), seed=41, scale=0.05)
    ckpt = write_serving_checkpoint(tmp_path / "w1", w1, config, None)
    llm = harness.start_sync_engine(base)
    try:
        with client_for(llm) as client:
            rep = client.push(w1, step=next(STEP))
            assert rep.workers[0]["ok"] and rep.dropped_aliases == []
            # routed experts go straight into the fused parameters where that shortcut is declared;
            # GLM-4.5's experts layer also holds the router's correction bias, so vLLM's loader keeps it
            routed = sum(1 for n in w1 if re.search(r"\.experts\.\d+\.", n))
            want = routed if DIRECT and name == "qwen3-moe" else 0
            assert rep.workers[0]["direct_expert_tensors"] == want, rep.workers[0]
            harness.assert_warm_equals_cold(llm, ckpt, f"{name} after one update")
    finally:
        harness.stop_sync_engine(llm)
    family_record.check(("serving", harness.vllm_version(), name, "bf16"), "equal")  # docs/families.md
