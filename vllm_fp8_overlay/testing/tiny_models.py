"""Tiny, deterministic Hugging Face checkpoints built locally (no hub access).

Every checkpoint is written by hand from a state dict with the Hugging Face
parameter names and shapes, so it does not depend on which ``transformers``
version (4.57 for vLLM <= 0.18, 5.x later) the environment has, nor on how that
version lays out MoE experts internally. ``config.json`` is passed through the
installed ``transformers`` config class when there is one (so it carries the
field names that version expects) and keeps the aliases other versions read
(for example both ``num_experts`` and ``num_local_experts``).

Weights are bf16 except the GLM-4.5 router bias ``e_score_correction_bias``,
which is float32 as in the real checkpoints and holds distinctive, non-zero
values (``0.10 + 0.01 * expert + 0.001 * layer``), so that a corrupted bias is
easy to detect.

Default sizes are chosen so that each MoE layer holds ``8 experts x 3 x 256 x 128
= 786432`` expert elements.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "make_llama",
    "make_glm4_moe",
    "make_qwen3_moe",
    "perturb_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "load_config",
    "iter_weights",
    "glm4_moe_bias",
]

_DTYPE = torch.bfloat16


# --------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------


class _Init:
    """Deterministic tensor factory: one CPU generator seeded once."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, dtype=torch.float32)
        return (t * std + mean).to(_DTYPE)

    def linear(self, out_features: int, in_features: int) -> torch.Tensor:
        return self.normal(out_features, in_features, std=1.0 / math.sqrt(in_features))

    def norm(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.05, mean=1.0)

    def bias(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.02)


def save_checkpoint(
    directory: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` (+ ``config.json`` / ``generation_config.json``).

    ``config`` may be omitted to replace only the weights of an existing
    checkpoint directory (its ``config.json`` is kept).
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    for stale in d.glob("*.safetensors"):
        stale.unlink()
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        idx.unlink()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (d / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        gen = dict(generation_config or {})
        if not gen:
            gen = {
                "_from_model_config": True,
                "bos_token_id": config.get("bos_token_id", 1),
                "eos_token_id": config.get("eos_token_id", 2),
            }
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    elif not (d / "config.json").exists():
        raise FileNotFoundError(f"{d}/config.json missing and no config given")
    return d


def load_checkpoint(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read every ``*.safetensors`` file of a checkpoint into one state dict."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def load_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text())


def iter_weights(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint-format ``(name, tensor)`` pairs, as ``model.load_weights`` takes them.

    Each tensor is a fresh copy, so a loader that keeps references cannot
    alias the caller's state dict.
    """
    for name, t in state_dict.items():
        yield name, t.clone()


def perturb_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    seed: int,
    scale: float = 0.1,
    *,
    skip: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """New weights ``W1 = W0 + scale * std(W0) * N(0, 1)`` (deterministic in ``seed``).

    Every floating tensor changes (names in ``skip`` excepted), dtypes and
    shapes are kept. Constant tensors (a zero bias, a flat norm) get noise of
    ``scale * max(|mean|, 1e-2)`` so that they change too.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    skip = set(skip)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state_dict):
        t = state_dict[name]
        if name in skip or not t.is_floating_point():
            out[name] = t.clone()
            continue
        f = t.float()
        std = f.std().item() if f.numel() > 1 else 0.0
        if not math.isfinite(std) or std < 1e-6:
            std = max(abs(f.mean().item()), 1e-2)
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        new = (f + scale * std * noise).to(t.dtype)
        if torch.equal(new, t):  # bf16 rounding swallowed the noise
            new = (f * (1 + scale) + scale * std).to(t.dtype)
        out[name] = new
    return out


def _finish_config(model_type: str, base: dict[str, Any]) -> dict[str, Any]:
    """Round-trip ``base`` through the installed transformers config class.

    The result carries the installed version's own field names (``dtype`` vs
    ``torch_dtype``, ``rope_parameters`` vs ``rope_theta`` ...) on top of every
    key of ``base``, so that other versions still find the names they read.
    """
    cfg = dict(base)
    try:
        from transformers import AutoConfig

        hf = AutoConfig.for_model(model_type, **base)
        d = hf.to_dict()
        for k, v in d.items():
            if k not in cfg:
                cfg[k] = v
        # keep the transformers-5 rope block consistent with rope_theta
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            cfg["rope_parameters"] = rp
        import transformers

        cfg["transformers_version"] = transformers.__version__
    except Exception:  # unknown model type / no transformers: hand-written config
        pass
    cfg["model_type"] = model_type
    cfg["torch_dtype"] = "bfloat16"
    cfg["dtype"] = "bfloat16"
    return cfg


def _attention(
    init: _Init,
    sd: dict[str, torch.Tensor],
    p: str,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    bias: bool = False,
    qk_norm: bool = False,
) -> None:
    sd[f"{p}.self_attn.q_proj.weight"] = init.linear(heads * head_dim, hidden)
    sd[f"{p}.self_attn.k_proj.weight"] = init.linear(kv_heads * head_dim, hidden)
    sd[f"{p}.self_attn.v_proj.weight"] = init.linear(kv_heads * head_dim, hidden)
    if bias:
        sd[f"{p}.self_attn.q_proj.bias"] = init.bias(heads * head_dim)
        sd[f"{p}.self_attn.k_proj.bias"] = init.bias(kv_heads * head_dim)
        sd[f"{p}.self_attn.v_proj.bias"] = init.bias(kv_heads * head_dim)
    sd[f"{p}.self_attn.o_proj.weight"] = init.linear(hidden, heads * head_dim)
    if qk_norm:
        sd[f"{p}.self_attn.q_norm.weight"] = init.norm(head_dim)
        sd[f"{p}.self_attn.k_norm.weight"] = init.norm(head_dim)


def _mlp(init: _Init, sd: dict[str, torch.Tensor], p: str, hidden: int, inter: int) -> None:
    sd[f"{p}.gate_proj.weight"] = init.linear(inter, hidden)
    sd[f"{p}.up_proj.weight"] = init.linear(inter, hidden)
    sd[f"{p}.down_proj.weight"] = init.linear(hidden, inter)


def _common_config(
    *, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int
) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "use_cache": True,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }


# --------------------------------------------------------------------------
# Llama
# --------------------------------------------------------------------------


def _decoder_state_dict(
    config: Mapping[str, Any], seed: int, ffn: Any, **attention: Any
) -> dict[str, torch.Tensor]:
    """Embedding, per layer (norms, attention, ``ffn(init, sd, prefix, layer)``
    for the MLP or MoE block), final norm and untied head, drawn in this order."""
    init = _Init(seed)
    h, v = config["hidden_size"], config["vocab_size"]
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": init.normal(v, h, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = init.norm(h)
        _attention(
            init, sd, p, h, config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], **attention,
        )
        sd[f"{p}.post_attention_layernorm.weight"] = init.norm(h)
        ffn(init, sd, f"{p}.mlp", i)
    sd["model.norm.weight"] = init.norm(h)
    sd["lm_head.weight"] = init.linear(v, h)
    return sd


def llama_state_dict(config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    def ffn(init, sd, p, i):
        _mlp(init, sd, p, config["hidden_size"], config["intermediate_size"])

    return _decoder_state_dict(config, seed, ffn)


def make_llama(
    directory: str | Path,
    layers: int = 2,
    hidden: int = 256,
    intermediate: int = 512,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    vocab: int = 512,
    seed: int = 0,
    tied: bool = False,
) -> Path:
    """A tiny ``LlamaForCausalLM`` checkpoint (bf16, no tokenizer; ``tied``:
    the head is the embedding, and the checkpoint has no ``lm_head.weight``)."""
    head_dim = head_dim or hidden // heads
    base = _common_config(
        vocab=vocab, hidden=hidden, inter=intermediate, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim,
    )
    base["tie_word_embeddings"] = tied
    base.update({"architectures": ["LlamaForCausalLM"], "attention_bias": False, "mlp_bias": False,
                 "pretraining_tp": 1})
    cfg = _finish_config("llama", base)
    sd = llama_state_dict(cfg, seed)
    if tied:
        del sd["lm_head.weight"]
    return save_checkpoint(directory, sd, cfg)


# --------------------------------------------------------------------------
# GLM-4.5 MoE (Glm4MoeForCausalLM): noaux_tc routing with e_score_correction_bias
# --------------------------------------------------------------------------


def glm4_moe_bias(n_routed_experts: int, layer: int) -> torch.Tensor:
    """The distinctive router bias written for MoE layer ``layer`` (float32)."""
    return torch.tensor(
        [0.10 + 0.01 * e + 0.001 * layer for e in range(n_routed_experts)], dtype=torch.float32
    )


def glm4_moe_state_dict(config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    h, n_exp, moe_i = config["hidden_size"], config["n_routed_experts"], config["moe_intermediate_size"]

    def ffn(init, sd, p, i):
        if i < config["first_k_dense_replace"]:
            _mlp(init, sd, p, h, config["intermediate_size"])
            return
        sd[f"{p}.gate.weight"] = init.linear(n_exp, h)
        sd[f"{p}.gate.e_score_correction_bias"] = glm4_moe_bias(n_exp, i)
        for e in range(n_exp):
            _mlp(init, sd, f"{p}.experts.{e}", h, moe_i)
        if config.get("n_shared_experts"):
            _mlp(init, sd, f"{p}.shared_experts", h, moe_i * config["n_shared_experts"])

    return _decoder_state_dict(config, seed, ffn, bias=config["attention_bias"], qk_norm=config["use_qk_norm"])


def make_glm4_moe(
    directory: str | Path,
    layers: int = 3,
    first_k_dense_replace: int = 1,
    n_routed_experts: int = 8,
    num_experts_per_tok: int = 2,
    n_shared_experts: int = 1,
    hidden: int = 256,
    intermediate: int = 512,
    moe_intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    vocab: int = 512,
    seed: int = 0,
) -> Path:
    """A tiny GLM-4.5-style MoE (``Glm4MoeForCausalLM``), noaux_tc routing.

    Layers ``< first_k_dense_replace`` are dense; the others have a sigmoid
    router with ``e_score_correction_bias`` (see :func:`glm4_moe_bias`),
    ``n_routed_experts`` routed experts and ``n_shared_experts`` shared ones.
    """
    head_dim = head_dim or hidden // heads
    base = _common_config(
        vocab=vocab, hidden=hidden, inter=intermediate, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim,
    )
    base.update(
        {
            "architectures": ["Glm4MoeForCausalLM"],
            "attention_bias": True,
            "use_qk_norm": False,
            "partial_rotary_factor": 0.5,
            "moe_intermediate_size": moe_intermediate,
            "n_routed_experts": n_routed_experts,
            # aliases read by other model code / transformers versions
            "num_experts": n_routed_experts,
            "num_local_experts": n_routed_experts,
            "n_shared_experts": n_shared_experts,
            "num_experts_per_tok": num_experts_per_tok,
            "first_k_dense_replace": first_k_dense_replace,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
            "n_group": 1,
            "topk_group": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "num_nextn_predict_layers": 0,
        }
    )
    cfg = _finish_config("glm4_moe", base)
    return save_checkpoint(directory, glm4_moe_state_dict(cfg, seed), cfg)


# --------------------------------------------------------------------------
# Qwen3 MoE (Qwen3MoeForCausalLM): softmax router, no shared experts
# --------------------------------------------------------------------------


def qwen3_moe_state_dict(config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    h, n_exp, moe_i = config["hidden_size"], config["num_experts"], config["moe_intermediate_size"]
    sparse_step = config.get("decoder_sparse_step", 1) or 1
    mlp_only = set(config.get("mlp_only_layers") or [])

    def ffn(init, sd, p, i):
        if i in mlp_only or (i + 1) % sparse_step != 0:
            _mlp(init, sd, p, h, config["intermediate_size"])
            return
        sd[f"{p}.gate.weight"] = init.linear(n_exp, h)
        for e in range(n_exp):
            _mlp(init, sd, f"{p}.experts.{e}", h, moe_i)

    return _decoder_state_dict(config, seed, ffn, bias=False, qk_norm=True)


def make_qwen3_moe(
    directory: str | Path,
    layers: int = 2,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    hidden: int = 256,
    intermediate: int = 512,
    moe_intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    vocab: int = 512,
    seed: int = 0,
) -> Path:
    """A tiny ``Qwen3MoeForCausalLM`` (every layer MoE, qk-norm, untied head)."""
    head_dim = head_dim or hidden // heads
    base = _common_config(
        vocab=vocab, hidden=hidden, inter=intermediate, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim,
    )
    base.update(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "attention_bias": False,
            "moe_intermediate_size": moe_intermediate,
            # transformers 4.57 reads num_experts, 5.x writes num_local_experts
            "num_experts": num_experts,
            "num_local_experts": num_experts,
            "num_experts_per_tok": num_experts_per_tok,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "sliding_window": None,
            "use_sliding_window": False,
            "max_window_layers": layers,
        }
    )
    cfg = _finish_config("qwen3_moe", base)
    cfg["num_experts"] = num_experts
    cfg["num_local_experts"] = num_experts
    return save_checkpoint(directory, qwen3_moe_state_dict(cfg, seed), cfg)
