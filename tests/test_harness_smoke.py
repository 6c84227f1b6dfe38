"""The test harness itself, against the installed vLLM release.

One tiny Llama engine serves most tests (module scope, tests run in file
order); it is closed before the cold start on the perturbed weights, and a
tiny GLM-4.5-MoE engine is started once at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vllm_fp8_overlay.testing import tiny_models

PROMPTS = [[1, 17, 33, 65, 129], [1, 300, 7], [2, 2, 2, 2, 2, 2, 2, 2]]
N_TOKENS = 8


# --------------------------------------------------------------------------
# checkpoints (no vLLM needed)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_w0(tiny_model_root: Path) -> Path:
    return tiny_models.make_llama(tiny_model_root / "llama_w0", seed=0)


@pytest.fixture(scope="module")
def llama_w1(tiny_model_root: Path, llama_w0: Path) -> Path:
    sd = tiny_models.perturb_state_dict(tiny_models.load_checkpoint(llama_w0), seed=1)
    return tiny_models.save_checkpoint(
        tiny_model_root / "llama_w1", sd, tiny_models.load_config(llama_w0)
    )


def test_tiny_models_deterministic(tmp_path: Path) -> None:
    a = tiny_models.load_checkpoint(tiny_models.make_llama(tmp_path / "a", seed=3))
    b = tiny_models.load_checkpoint(tiny_models.make_llama(tmp_path / "b", seed=3))
    c = tiny_models.load_checkpoint(tiny_models.make_llama(tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    p = tiny_models.perturb_state_dict(a, seed=1)
    assert all(not torch.equal(a[k], p[k]) for k in a)
    assert tiny_models.perturb_state_dict(a, seed=1).keys() == p.keys()
    assert all(torch.equal(p[k], q) for k, q in tiny_models.perturb_state_dict(a, seed=1).items())


def test_tiny_moe_checkpoints(tmp_path: Path) -> None:
    glm = tiny_models.make_glm4_moe(tmp_path / "glm")
    cfg = tiny_models.load_config(glm)
    sd = tiny_models.load_checkpoint(glm)
    assert cfg["architectures"] == ["Glm4MoeForCausalLM"]
    assert cfg["n_routed_experts"] == cfg["num_experts"] == cfg["num_local_experts"] == 8
    assert "model.layers.0.mlp.gate_proj.weight" in sd  # dense first layer
    for layer in (1, 2):
        bias = sd[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32
        assert torch.equal(bias, tiny_models.glm4_moe_bias(8, layer))
        assert bias.min().item() >= 0.1 and len(set(bias.tolist())) == 8
        assert f"model.layers.{layer}.mlp.experts.7.down_proj.weight" in sd
        assert f"model.layers.{layer}.mlp.shared_experts.up_proj.weight" in sd
    qwen = tiny_models.make_qwen3_moe(tmp_path / "qwen")
    qcfg = tiny_models.load_config(qwen)
    assert qcfg["num_experts"] == qcfg["num_local_experts"] == 8
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in tiny_models.load_checkpoint(qwen)


# --------------------------------------------------------------------------
# real vLLM
# --------------------------------------------------------------------------


_OPEN: list[Engine] = []


class Engine:
    """A module-scoped engine that a test may close early."""

    def __init__(self, llm) -> None:
        self.llm = llm
        _OPEN.append(self)

    @staticmethod
    def close_all() -> None:
        for eng in _OPEN:
            eng.close()

    def close(self) -> None:
        from vllm_fp8_overlay.testing import harness

        if self.llm is not None:
            harness.shutdown_llm(self.llm)
            self.llm = None

    def get(self):
        if self.llm is None:
            pytest.skip("engine closed by an earlier test")
        return self.llm


@pytest.fixture(scope="module")
def llama_engine(llama_w0: Path, vllm_version: str):
    from vllm_fp8_overlay.testing import harness

    eng = Engine(harness.start_llm(llama_w0))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def baseline(llama_engine: Engine) -> dict:
    """Tokens / logprobs / parameters of the freshly started W0 engine."""
    from vllm_fp8_overlay.testing import harness

    llm = llama_engine.get()
    tokens, lps = harness.greedy(llm, PROMPTS, N_TOKENS, logprobs=True)
    return {
        "tokens": tokens,
        "logprobs": lps,
        "params": harness.param_snapshot(harness.get_model(llm)),
    }


@pytest.mark.vllm
def test_expected_version(vllm_version: str, expected_vllm: str | None) -> None:
    if expected_vllm is None:
        pytest.skip("not run from a nox matrix session")
    assert vllm_version == expected_vllm


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_deterministic(llama_engine: Engine, baseline: dict) -> None:
    from vllm_fp8_overlay.testing import harness

    llm = llama_engine.get()
    tokens = baseline["tokens"]
    assert [len(t) for t in tokens] == [N_TOKENS] * len(PROMPTS)
    assert all(0 <= x < 512 for t in tokens for x in t)
    assert all(len(lp) == N_TOKENS and all(v <= 0.0 for v in lp) for lp in baseline["logprobs"])
    again, lps = harness.greedy(llm, PROMPTS, N_TOKENS, logprobs=True)
    assert again == tokens
    assert lps == baseline["logprobs"]
    assert harness.greedy(llm, PROMPTS[:1], N_TOKENS) == tokens[:1]


@pytest.mark.vllm
@pytest.mark.slow
def test_get_model_and_snapshot(llama_engine: Engine, baseline: dict, llama_w0: Path) -> None:
    from vllm_fp8_overlay.testing import harness

    model = harness.get_model(llama_engine.get())
    assert isinstance(model, torch.nn.Module)
    assert type(model).__name__ == "LlamaForCausalLM"
    snap = baseline["params"]
    assert set(snap) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    live = dict(model.named_parameters())
    name = "model.embed_tokens.weight"
    assert snap[name].data_ptr() != live[name].data_ptr()  # a copy, not a view
    harness.assert_params_equal(snap, harness.param_snapshot(model))
    # the served embedding is the checkpoint's (vocab 512 is not padded on CPU)
    ckpt = tiny_models.load_checkpoint(llama_w0)
    assert torch.equal(snap[name][: ckpt[name].shape[0]], ckpt[name])
    # a mismatch is reported by name
    broken = dict(snap)
    broken[name] = snap[name].clone()
    broken[name].view(-1)[0] += 1
    with pytest.raises(AssertionError, match="embed_tokens"):
        harness.assert_params_equal(snap, broken)
    assert harness.get_model_config(llama_engine.get()).max_model_len == 256


@pytest.mark.vllm
@pytest.mark.slow
def test_reload_same_weights_is_identity(
    llama_engine: Engine, baseline: dict, llama_w0: Path
) -> None:
    from vllm_fp8_overlay.testing import harness

    if not harness.has_layerwise_reload():
        pytest.skip(f"vLLM {harness.vllm_version()} has no layerwise reload")
    llm = llama_engine.get()
    w0 = tiny_models.load_checkpoint(llama_w0)
    harness.reload_weights(llm, w0)
    harness.assert_params_equal(baseline["params"], harness.param_snapshot(harness.get_model(llm)))
    tokens, lps = harness.greedy(llm, PROMPTS, N_TOKENS, logprobs=True)
    assert tokens == baseline["tokens"]
    assert lps == baseline["logprobs"]
    # the same through the worker's own entry point
    harness.worker_reload_weights(llm, w0)
    harness.assert_params_equal(baseline["params"], harness.param_snapshot(harness.get_model(llm)))
    assert harness.greedy(llm, PROMPTS, N_TOKENS) == baseline["tokens"]


@pytest.mark.vllm
def test_reload_unavailable_is_explicit(vllm_version: str) -> None:
    from vllm_fp8_overlay.testing import harness

    if harness.has_layerwise_reload():
        pytest.skip("this release has layerwise reload")
    with pytest.raises(harness.LayerwiseReloadUnavailable, match="0.16.0"):
        harness.layerwise_reload(torch.nn.Linear(2, 2), [], None)


@pytest.mark.vllm
@pytest.mark.slow
def test_reload_new_weights_equals_cold_start(
    llama_engine: Engine, baseline: dict, llama_w1: Path
) -> None:
    from vllm_fp8_overlay.testing import harness

    if not harness.has_layerwise_reload():
        pytest.skip(f"vLLM {harness.vllm_version()} has no layerwise reload")
    llm = llama_engine.get()
    harness.reload_weights(llm, tiny_models.load_checkpoint(llama_w1))
    reloaded = harness.param_snapshot(harness.get_model(llm))
    tokens, lps = harness.greedy(llm, PROMPTS, N_TOKENS, logprobs=True)
    assert harness.diff_params(baseline["params"], reloaded), "reload changed nothing"
    llama_engine.close()  # one engine at a time

    with harness.llm_session(llama_w1) as cold:
        harness.assert_params_equal(harness.param_snapshot(harness.get_model(cold)), reloaded)
        cold_tokens, cold_lps = harness.greedy(cold, PROMPTS, N_TOKENS, logprobs=True)
    assert tokens == cold_tokens
    assert lps == cold_lps


@pytest.mark.vllm
@pytest.mark.slow
def test_glm4_moe_loads_and_generates(tiny_model_root: Path, vllm_version: str) -> None:
    from vllm_fp8_overlay.testing import harness

    Engine.close_all()  # one engine at a time
    ckpt = tiny_models.make_glm4_moe(tiny_model_root / "glm4_moe")
    with harness.capture_vllm_logs(logging.DEBUG) as logs:
        llm = harness.start_llm(ckpt)
    try:
        assert logs.records, "no vLLM log records captured"
        assert logs.matching("Starting to load model") or logs.matching("load")
        model = harness.get_model(llm)
        snap = harness.param_snapshot(model)
        biases = {n: t for n, t in snap.items() if n.endswith("e_score_correction_bias")}
        assert biases, sorted(snap)[:20]
        for name, t in biases.items():
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert torch.equal(t.float(), tiny_models.glm4_moe_bias(8, layer)), name
        tokens = harness.greedy(llm, PROMPTS, N_TOKENS)
        assert [len(t) for t in tokens] == [N_TOKENS] * len(PROMPTS)
        assert harness.greedy(llm, PROMPTS, N_TOKENS) == tokens
    finally:
        harness.shutdown_llm(llm)
