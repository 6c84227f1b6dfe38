"""Every tiny model family, served and updated: warm == cold in outputs.

Per family (``vllm_fp8_overlay/testing/families.py``) and serving format that
runs on this vLLM release's CPU build: an engine started on W0 receives W1
through ``WeightSyncClient.push(state_dict, step)``, the state dict being
what a Hugging Face trainer's ``model.state_dict()`` holds (for tied families
``lm_head.weight`` too, the same tensor as the embedding: the client drops
it). Afterwards the engine must equal a cold start on the offline checkpoint
of W1: parameters bitwise, greedy tokens and logprobs of three prompts
exactly (``harness.assert_warm_equals_cold``). Each measured cell is checked
against ``docs/families.json``, from which ``docs/families.md`` is rendered
(``vllm_fp8_overlay/testing/family_record.py``).

Two engine starts per cell (10-70 s each here), so the cells run in the full
tier only (``FP8_OVERLAY_SOAK=1``, set by the matrix sessions); CI (``fast``)
proves tied Qwen2 and MoE in ``tests/test_sync_tied_moe.py``. The markdown's
freshness is checked everywhere.

Tied families scale their embedding by 0.05 first: drawn with std 1.0 and
tied to the head, it gives logprobs of exactly 0.0 and tokens no update
changes, and the test could not fail.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_families.py
"""

from __future__ import annotations

import itertools

import pytest

from vllm_fp8_overlay.testing import family_record, tiers

VLLM = pytest.mark.vllm
FORMATS = ("bf16", "ct-fp8-channel")
STEP = itertools.count(1)


def test_families_doc_is_rendered_from_the_record():
    assert family_record.DOC.read_text() == family_record.render(), (
        "docs/families.md is stale: `python -m vllm_fp8_overlay.testing.family_record --write`")


def _cases():
    from vllm_fp8_overlay.testing.families import FAMILIES

    return [(f, fmt) for f in FAMILIES for fmt in FORMATS]


@VLLM
@pytest.mark.slow
@tiers.full_tier_only("two engine starts per cell; CI proves tied Qwen2 and MoE in test_sync_tied_moe.py")
@pytest.mark.parametrize("family, fmt", _cases(), ids=[f"{f}-{m}" for f, m in _cases()])
def test_family_update_equals_cold(family, fmt, tmp_path):
    pytest.importorskip("vllm")
    import torch

    from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, free_port, write_serving_checkpoint
    from vllm_fp8_overlay.sync.client import WeightSyncClient
    from vllm_fp8_overlay.testing import families, harness
    from vllm_fp8_overlay.testing import tiny_models as tm

    release = harness.vllm_version()
    why = family_record.not_run(release, fmt)
    if why:
        pytest.skip(why)
    quant = CT_FP8_CHANNEL_DYNAMIC if fmt == "ct-fp8-channel" else None
    d = families.make_family(family, tmp_path / "family")
    config = tm.load_config(d)
    w0 = tm.load_checkpoint(d)
    tied = bool(config.get("tie_word_embeddings"))
    if tied:
        w0["model.embed_tokens.weight"] = (w0["model.embed_tokens.weight"].float() * 0.05).to(torch.bfloat16)
    w1 = tm.perturb_state_dict(w0, seed=17, scale=0.05)
    served0 = write_serving_checkpoint(tmp_path / "w0", w0, config, quant)
    served1 = write_serving_checkpoint(tmp_path / "w1", w1, config, quant)
    trainer = dict(w1)
    if tied:
        trainer["lm_head.weight"] = trainer["model.embed_tokens.weight"]  # as HF state_dict() of a tied model
    llm = harness.start_sync_engine(served0)
    try:
        with WeightSyncClient([llm], host="127.0.0.1", port=free_port(), timeout=240.0) as client:
            rep = client.push(trainer, step=next(STEP))
            assert rep.dropped_aliases == (["lm_head.weight"] if tied else [])
            harness.assert_warm_equals_cold(llm, served1, f"{family} {fmt} after one update")
    finally:
        harness.stop_sync_engine(llm)
    family_record.check(("serving", release, family, fmt), "equal")
