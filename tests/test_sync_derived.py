"""The derived-state refresh (``sync/apply/derived.py``) is needed and sufficient.

A tied Llama (its head a ``ParallelLMHead`` sharing the embedding on every
release) in an in-process engine: vLLM's own layerwise reload of changed
weights, *without* the refresh, leaves the head's CPU GEMM copy stale --
every parameter is new, the logits are not -- on each release where the
refresh is declared; after ``refresh_derived_state`` the outputs equal,
exactly, those of an engine freshly started on the same weights. (MoE
experts: the same two-sided check in ``tests/test_overlay_matrix.py``,
``test_moe_shared_bias_reload``.) Also: after a kernel-format copy the
refresh refuses CPU linear layers whose weights live only in a packed copy.

The family's std-1.0 embedding is scaled by 0.05 first: tied to the head it
would give logprobs of exactly 0.0 and tokens no update changes.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_derived.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vllm_fp8_overlay.derived_state import declared_for  # noqa: E402
from vllm_fp8_overlay.sync.apply.derived import DerivedStateError, last_refreshed, refresh_derived_state  # noqa: E402
from vllm_fp8_overlay.testing import families, harness  # noqa: E402
from vllm_fp8_overlay.testing import outputs as out  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _head_error(model) -> float:
    """max |lm_head.cpu_linear(x) - x @ lm_head.weight^T|: 0 when the packed copy is current."""
    head = model.lm_head
    x = torch.randn(3, head.weight.shape[1], dtype=head.weight.dtype, generator=torch.Generator().manual_seed(0))
    return float((head.cpu_linear(x, head.weight, None).float() - (x @ head.weight.t()).float()).abs().max())


def test_tied_head_refresh_needed_and_sufficient(tmp_path):
    if not harness.has_layerwise_reload():
        pytest.skip(f"vLLM {harness.vllm_version()} has no layerwise reload")
    assert "tied-lm-head-cpu-gemm" in declared_for(harness.vllm_version())
    d = families.make_family("llama-tied", tmp_path / "family")
    w0 = tm.load_checkpoint(d)
    w0["model.embed_tokens.weight"] = (w0["model.embed_tokens.weight"].float() * 0.05).to(torch.bfloat16)
    config = tm.load_config(d)
    d0 = tm.save_checkpoint(tmp_path / "w0", w0, config)
    w1 = tm.perturb_state_dict(w0, seed=5, scale=0.05)
    d1 = tm.save_checkpoint(tmp_path / "w1", w1, config)
    llm = harness.start_llm(d0)
    try:
        model = harness.get_model(llm)
        assert model.lm_head is not model.model.embed_tokens and model.lm_head.weight is model.model.embed_tokens.weight
        assert _head_error(model) == 0.0
        harness.reload_weights(llm, w1)  # vLLM's reload alone
        stale_err = _head_error(model)
        stale = out.greedy_outputs(llm)
        done = refresh_derived_state(model, harness.get_vllm_config(llm))
        assert done == last_refreshed(model)
        assert any(r["id"] == "tied-lm-head-cpu-gemm" and "lm_head" in r["modules"] for r in done), done
        assert _head_error(model) == 0.0
        fixed = out.greedy_outputs(llm)
        assert stale_err > 0.0, "the head's packed copy followed the reload: the refresh is not needed here"
        assert stale != fixed, "outputs did not change with the refresh"
        with pytest.raises(DerivedStateError, match="prepacked GEMM copy.*use mode='layerwise'"):
            refresh_derived_state(model, harness.get_vllm_config(llm), reprocessed=False)
    finally:
        harness.shutdown_llm(llm)
    with harness.llm_session(d1) as cold:
        out.assert_outputs_equal(fixed, out.greedy_outputs(cold), "tied llama: reload + refresh vs a fresh engine")
