"""Tiny dense checkpoints of the model families users serve, built locally.

Each family differs from Llama in what matters to weight sync and FP8
quantization: tied embeddings (no ``lm_head.weight`` in the checkpoint, or one
that aliases the embedding), attention biases, q/k norms, projections that are
already fused in the checkpoint (Phi-3's ``qkv_proj`` / ``gate_up_proj``),
extra norms and soft-capping (Gemma2), scaling multipliers (Granite).

Weights come from :mod:`.tiny_models`' seeded generator, so every build is
identical whatever ``transformers`` is installed; ``config.json`` goes through
the installed ``transformers`` config class like the other tiny models.

``make_family(name, directory)`` builds one; ``FAMILIES`` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .tiny_models import _attention, _common_config, _finish_config, _Init, _mlp, save_checkpoint

__all__ = ["FAMILIES", "make_family", "family_state_dict"]

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 512
HEAD_DIM = HIDDEN // HEADS


def _base(**extra: Any) -> dict[str, Any]:
    cfg = _common_config(vocab=VOCAB, hidden=HIDDEN, inter=INTER, layers=LAYERS, heads=HEADS,
                         kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    cfg.update(extra)
    return cfg


def _state_dict(config: Mapping[str, Any], seed: int, *, bias: bool = False, qk_norm: bool = False,
                fused: bool = False, gemma_norms: bool = False) -> dict[str, torch.Tensor]:
    """Embedding, layers, final norm and (untied only) the head, in a fixed draw order."""
    init = _Init(seed)
    h, v = config["hidden_size"], config["vocab_size"]
    norm = (lambda n: init.normal(n, std=0.05)) if gemma_norms else init.norm  # Gemma: (1 + w)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": init.normal(v, h, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = norm(h)
        if fused:
            q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
            sd[f"{p}.self_attn.qkv_proj.weight"] = init.linear(q + 2 * kv, h)
            sd[f"{p}.self_attn.o_proj.weight"] = init.linear(h, q)
        else:
            _attention(init, sd, p, h, HEADS, KV_HEADS, HEAD_DIM, bias=bias, qk_norm=qk_norm)
        sd[f"{p}.post_attention_layernorm.weight"] = norm(h)
        if gemma_norms:
            sd[f"{p}.pre_feedforward_layernorm.weight"] = norm(h)
            sd[f"{p}.post_feedforward_layernorm.weight"] = norm(h)
        if fused:
            sd[f"{p}.mlp.gate_up_proj.weight"] = init.linear(2 * INTER, h)
            sd[f"{p}.mlp.down_proj.weight"] = init.linear(h, INTER)
        else:
            _mlp(init, sd, f"{p}.mlp", h, INTER)
    sd["model.norm.weight"] = norm(h)
    if not config.get("tie_word_embeddings"):
        sd["lm_head.weight"] = init.linear(v, h)
    return sd


def _llama(tied: bool) -> tuple[str, dict, dict]:
    return "llama", _base(architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
                          tie_word_embeddings=tied), {}


def _qwen2() -> tuple[str, dict, dict]:
    return "qwen2", _base(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True,
                          use_sliding_window=False, sliding_window=None,
                          max_window_layers=LAYERS), {"bias": True}


def _qwen3(tied: bool) -> tuple[str, dict, dict]:
    return "qwen3", _base(architectures=["Qwen3ForCausalLM"], tie_word_embeddings=tied,
                          attention_bias=False, use_sliding_window=False, sliding_window=None,
                          max_window_layers=LAYERS), {"qk_norm": True}


def _phi3() -> tuple[str, dict, dict]:
    return "phi3", _base(architectures=["Phi3ForCausalLM"], tie_word_embeddings=False,
                         resid_pdrop=0.0, embd_pdrop=0.0, original_max_position_embeddings=2048,
                         sliding_window=None, pad_token_id=0), {"fused": True}


def _gemma2() -> tuple[str, dict, dict]:
    return "gemma2", _base(architectures=["Gemma2ForCausalLM"], tie_word_embeddings=True,
                           hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                           query_pre_attn_scalar=HEAD_DIM, sliding_window=64,
                           final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                           attention_bias=False), {"gemma_norms": True}


def _granite() -> tuple[str, dict, dict]:
    return "granite", _base(architectures=["GraniteForCausalLM"], tie_word_embeddings=True,
                            attention_bias=False, mlp_bias=False, embedding_multiplier=12.0,
                            residual_multiplier=0.22, attention_multiplier=0.015625,
                            logits_scaling=8.0), {}


def _mistral() -> tuple[str, dict, dict]:
    return "mistral", _base(architectures=["MistralForCausalLM"], tie_word_embeddings=False,
                            sliding_window=None), {}


_BUILDERS: dict[str, Callable[[], tuple[str, dict, dict]]] = {
    "llama": lambda: _llama(False),
    "llama-tied": lambda: _llama(True),
    "qwen2-tied": _qwen2,
    "qwen3": lambda: _qwen3(False),
    "qwen3-tied": lambda: _qwen3(True),
    "phi3": _phi3,
    "gemma2-tied": _gemma2,
    "granite-tied": _granite,
    "mistral": _mistral,
}
FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def family_state_dict(name: str, config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    _, _, shape = _BUILDERS[name]()
    return _state_dict(config, seed, **shape)


def make_family(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint of family ``name`` (see ``FAMILIES``) to ``directory``."""
    model_type, base, shape = _BUILDERS[name]()
    cfg = _finish_config(model_type, base)
    cfg["tie_word_embeddings"] = base["tie_word_embeddings"]
    return save_checkpoint(directory, _state_dict(cfg, seed, **shape), cfg)
