"""Detect the FP8 checkpoint layout a vLLM deployment expects.

``detect_layout`` reads a Hugging Face ``config.json`` (or its
``quantization_config`` block) and returns an :class:`FP8Layout` that tells
the quantizer which scale granularity, scale tensor name and ignore rules the
serving checkpoint uses.  It never touches the network.

Supported (weights as ``float8_e4m3fn``):

* HF / vLLM ``quant_method: "fp8"`` with ``activation_scheme: "dynamic"``

  - without ``weight_block_size``: one float32 scalar ``weight_scale`` per
    projection (strategy ``"tensor"``);
  - with ``weight_block_size: [bn, bk]``: float32 ``weight_scale_inv`` of shape
    ``(ceil(rows/bn), ceil(cols/bk))`` (strategy ``"block"``, DeepSeek-V3 /
    Qwen3-FP8 convention).

* ``quant_method: "compressed-tensors"`` with format ``float-quantized`` or
  ``naive-quantized`` and 8-bit float symmetric weights, strategies
  ``tensor`` / ``channel`` / ``block``, dynamic (or absent) input activations.

Everything else raises :class:`UnsupportedQuantization`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "FP8Layout",
    "UnsupportedQuantization",
    "detect_layout",
    "SUPPORTED_FORMATS",
]

#: Human-readable list used in error messages and docs.
SUPPORTED_FORMATS = (
    "quant_method='fp8' (e4m3, activation_scheme='dynamic'), per-tensor "
    "weight_scale or weight_block_size [bn, bk] with weight_scale_inv",
    "quant_method='compressed-tensors' (format float-quantized/naive-quantized), "
    "weights num_bits=8 type=float symmetric, strategy tensor/channel/block, "
    "input activations dynamic or none",
)


class UnsupportedQuantization(ValueError):
    """The target model's quantization_config is not an FP8 layout we can write."""

    def __init__(self, found: str):
        supported = "; ".join(SUPPORTED_FORMATS)
        super().__init__(
            f"unsupported quantization config: {found}. "
            f"Supported FP8 weight layouts: {supported}. "
            "Refusing to fall back to BF16 silently."
        )
        self.found = found


# Module names (last dotted component) that are linear projections in the
# architectures vLLM serves.  Any component ending in ``_proj`` also counts.
_LINEAR_NAMES = frozenset(
    {
        "kv_a_proj_with_mqa",
        "dense",
        "fc1",
        "fc2",
        "w1",
        "w2",
        "w3",
        "wq",
        "wk",
        "wv",
        "wo",
        "query_key_value",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "c_attn",
        "c_proj",
        "c_fc",
    }
)

# Last components that are never quantized although they are 2-D ``.weight``s.
_NEVER_QUANTIZED = frozenset(
    {
        "lm_head",
        "embed_tokens",
        "wte",
        "wpe",
        "embed_in",
        "embed_out",
        "word_embeddings",
        "gate",  # MoE router (mlp.gate)
        "router",
        "shared_expert_gate",
        "score",
        "classifier",
    }
)

# vLLM fuses these checkpoint shards into one module; an ignore entry naming
# the fused module applies to every shard.
_FUSED_SHARDS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}

_EXPERT_RE = re.compile(r"^(?P<parent>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>[^.]+)$")

_FP8_FORMATS_OK = {None, "e4m3", "e4m3fn", "float8_e4m3fn"}


@dataclass(frozen=True)
class FP8Layout:
    """Where and how a serving checkpoint stores FP8 weights.

    Attributes
    ----------
    method: ``"fp8"`` (HF/vLLM native) or ``"compressed-tensors"``.
    strategy: ``"tensor"``, ``"channel"`` or ``"block"``.
    block_size: ``(block_n, block_k)`` for ``"block"``, else ``None``.
    scale_name: checkpoint suffix of the scale tensor (``"weight_scale"`` or
        ``"weight_scale_inv"``).
    ignore: module names / ``re:`` regexes that stay unquantized.
    targets: compressed-tensors targets (``("Linear",)`` for HF fp8).
    activation_dynamic: input activations are quantized at run time (or not
        at all) so no ``input_scale`` is needed.
    ct_format: compressed-tensors ``format`` (``None`` for HF fp8).
    hidden_size: model hidden size if known (orients fused MoE tensors).
    kv_cache_scheme: compressed-tensors kv-cache scheme, if present (the
        quantizer does not create kv scales).
    """

    method: str
    strategy: str
    block_size: tuple[int, int] | None = None
    scale_name: str = "weight_scale"
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ("Linear",)
    activation_dynamic: bool = True
    ct_format: str | None = None
    hidden_size: int | None = None
    kv_cache_scheme: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.method not in ("fp8", "compressed-tensors"):
            raise UnsupportedQuantization(f"layout method {self.method!r}")
        if self.strategy not in ("tensor", "channel", "block"):
            raise UnsupportedQuantization(f"weight strategy {self.strategy!r}")
        if self.strategy == "block":
            bs = self.block_size
            if (
                bs is None
                or len(bs) != 2
                or not all(isinstance(b, int) and b > 0 for b in bs)
            ):
                raise UnsupportedQuantization(
                    f"block strategy needs two positive block sizes, got {bs!r}"
                )
            object.__setattr__(self, "block_size", (int(bs[0]), int(bs[1])))
        elif self.block_size is not None:
            raise ValueError(
                f"block_size {self.block_size!r} given for strategy {self.strategy!r}"
            )
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "targets", tuple(self.targets))

    # ------------------------------------------------------------------ names
    @property
    def scale_dtype(self) -> str:
        """``"float32"`` for HF fp8; ``"weight"`` (same dtype as the input
        weight, the compressed-tensors library convention) otherwise."""
        return "float32" if self.method == "fp8" else "weight"

    def scale_key(self, weight_name: str) -> str:
        """Checkpoint name of the scale belonging to ``...weight``."""
        if not weight_name.endswith(".weight"):
            raise ValueError(f"{weight_name!r} is not a '.weight' tensor")
        return weight_name[: -len("weight")] + self.scale_name

    def _ignored(self, module: str) -> bool:
        candidates = [module]
        m = _EXPERT_RE.match(module)
        if m:
            # vLLM decides for the whole fused-experts module.
            candidates.append(m.group("parent"))
        parent, _, last = module.rpartition(".")
        for fused, shards in _FUSED_SHARDS.items():
            if last in shards:
                candidates.append(f"{parent}.{fused}" if parent else fused)
        for pat in self.ignore:
            for cand in candidates:
                if pat.startswith("re:"):
                    if re.match(pat[3:], cand):
                        return True
                elif pat == cand:  # vLLM matches ignore entries exactly
                    return True
        return False

    def _targeted(self, module: str) -> bool:
        for t in self.targets:
            if t in ("Linear", "LinearBase", "FusedMoE", "RoutedExperts"):
                return True  # decided by name (see is_quantized)
            if t.startswith("re:"):
                if re.match(t[3:], module):
                    return True
            elif t == module:
                return True
        return False

    def is_quantized(self, hf_param_name: str) -> bool:
        """True iff the checkpoint stores ``hf_param_name`` as FP8 + scale."""
        if not hf_param_name.endswith(".weight"):
            return False  # biases, scales, e_score_correction_bias, ...
        module = hf_param_name[: -len(".weight")]
        last = module.rpartition(".")[2]
        if last == "lm_head" and self.method == "compressed-tensors":
            # the head is an nn.Linear: llm-compressor quantizes it whenever a
            # recipe targets it and does not ignore it (e.g. ``ignore=[]``)
            return self._targeted(module) and not self._ignored(module)
        if last in _NEVER_QUANTIZED or "norm" in last or "embed" in last:
            return False
        if not (last.endswith("_proj") or last in _LINEAR_NAMES):
            return False
        if not self._targeted(module):
            return False
        return not self._ignored(module)

    # ---------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "strategy": self.strategy,
            "block_size": list(self.block_size) if self.block_size else None,
            "scale_name": self.scale_name,
            "ignore": list(self.ignore),
            "targets": list(self.targets),
            "activation_dynamic": self.activation_dynamic,
            "ct_format": self.ct_format,
            "hidden_size": self.hidden_size,
            "kv_cache_scheme": (
                dict(self.kv_cache_scheme) if self.kv_cache_scheme else None
            ),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FP8Layout":
        bs = d.get("block_size")
        return cls(
            method=d["method"],
            strategy=d["strategy"],
            block_size=tuple(int(b) for b in bs) if bs else None,
            scale_name=d.get("scale_name", "weight_scale"),
            ignore=tuple(d.get("ignore") or ()),
            targets=tuple(d.get("targets") or ("Linear",)),
            activation_dynamic=bool(d.get("activation_dynamic", True)),
            ct_format=d.get("ct_format"),
            hidden_size=d.get("hidden_size"),
            kv_cache_scheme=d.get("kv_cache_scheme"),
        )


# ---------------------------------------------------------------- detection
def _load_config(cfg: Any) -> dict:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if isinstance(cfg, (str, os.PathLike)):
        path = os.fspath(cfg)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no config.json at {path!r} (detect_layout never downloads; "
                "pass a local model directory, a config.json path or a dict)"
            )
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    raise TypeError(
        f"detect_layout expects a path or a dict, got {type(cfg).__name__}"
    )


def _hidden_size(full: Mapping[str, Any]) -> int | None:
    for c in (full, full.get("text_config") or {}, full.get("llm_config") or {}):
        if isinstance(c, Mapping) and isinstance(c.get("hidden_size"), int):
            return c["hidden_size"]
    return None


def detect_layout(cfg: Any) -> FP8Layout | None:
    """Return the FP8 layout of a model config, or ``None`` for an
    unquantized (plain BF16/FP16) model.

    ``cfg`` is a model directory, a ``config.json`` path, a full HF config
    dict, or just its ``quantization_config`` block.
    """
    full = _load_config(cfg)
    if "quant_method" in full:
        qcfg, hidden = full, None
    else:
        qcfg = full.get("quantization_config") or full.get("compression_config")
        if qcfg is None:
            text = full.get("text_config")
            if isinstance(text, Mapping):
                qcfg = text.get("quantization_config")
        hidden = _hidden_size(full)
        if qcfg is None:
            return None
    if not isinstance(qcfg, Mapping):
        raise UnsupportedQuantization(f"quantization_config of type {type(qcfg)}")
    method = str(qcfg.get("quant_method", "")).lower().replace("_", "-")
    if method == "fp8":
        return _detect_hf_fp8(qcfg, hidden)
    if method == "compressed-tensors":
        return _detect_ct(qcfg, hidden)
    raise UnsupportedQuantization(f"quant_method={qcfg.get('quant_method')!r}")


def _detect_hf_fp8(q: Mapping[str, Any], hidden: int | None) -> FP8Layout:
    fmt = q.get("fmt")
    if fmt not in _FP8_FORMATS_OK:
        raise UnsupportedQuantization(f"quant_method='fp8' with fmt={fmt!r}")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise UnsupportedQuantization(
            f"quant_method='fp8' with activation_scheme={scheme!r}: static "
            "activation scales (input_scale) come from calibration and cannot be "
            "derived from trainer weights"
        )
    if q.get("is_checkpoint_fp8_serialized") is False:
        raise UnsupportedQuantization(
            "quant_method='fp8' with is_checkpoint_fp8_serialized=False "
            "(online quantization; the checkpoint holds BF16 weights)"
        )
    ignore = q.get("ignored_layers") or q.get("modules_to_not_convert") or []
    block = q.get("weight_block_size")
    if block is not None:
        if not isinstance(block, (list, tuple)) or len(block) != 2:
            raise UnsupportedQuantization(f"weight_block_size={block!r}")
        return FP8Layout(
            method="fp8",
            strategy="block",
            block_size=(int(block[0]), int(block[1])),
            scale_name="weight_scale_inv",
            ignore=tuple(ignore),
            hidden_size=hidden,
        )
    return FP8Layout(
        method="fp8",
        strategy="tensor",
        scale_name="weight_scale",
        ignore=tuple(ignore),
        hidden_size=hidden,
    )


_CT_FORMATS = ("float-quantized", "naive-quantized")


def _ct_block(block: Any) -> tuple[int, int]:
    if isinstance(block, str):  # legacy "128x128"
        parts = block.lower().split("x")
        block = [int(p) for p in parts]
    if not isinstance(block, (list, tuple)) or len(block) != 2:
        raise UnsupportedQuantization(f"compressed-tensors block_structure={block!r}")
    return int(block[0]), int(block[1])


def _describe_ct_weights(w: Mapping[str, Any]) -> str:
    keys = ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic")
    return ", ".join(f"{k}={w.get(k)!r}" for k in keys if k in w)


def _detect_ct(q: Mapping[str, Any], hidden: int | None) -> FP8Layout:
    fmt = q.get("format")
    groups = q.get("config_groups") or {}
    kv = q.get("kv_cache_scheme")
    weight_groups = {
        n: g for n, g in groups.items() if isinstance(g, Mapping) and g.get("weights")
    }
    if not weight_groups:
        what = "kv-cache-only fp8" if kv else "no quantized weights"
        raise UnsupportedQuantization(
            f"compressed-tensors config with {what} (config_groups without "
            "weights); use detect_layout only for FP8-weight checkpoints"
        )
    strategies = set()
    block = None
    targets: list[str] = []
    dynamic = True
    for name, g in weight_groups.items():
        w = g["weights"]
        gfmt = g.get("format") or fmt
        num_bits, typ = w.get("num_bits"), w.get("type")
        if not (num_bits == 8 and typ == "float"):
            kind = {
                (4, "int"): "int4 (W4A16 / W4A8)",
                (8, "int"): "int8 (W8A8 / W8A16)",
                (4, "float"): "fp4 (NVFP4 / MXFP4)",
            }.get((num_bits, typ), f"num_bits={num_bits} type={typ}")
            raise UnsupportedQuantization(
                f"compressed-tensors group {name!r} quantizes weights as {kind} "
                f"({_describe_ct_weights(w)}, format={gfmt!r})"
            )
        if gfmt not in _CT_FORMATS:
            raise UnsupportedQuantization(
                f"compressed-tensors format={gfmt!r} for fp8 weights "
                f"(group {name!r}); expected one of {list(_CT_FORMATS)}"
            )
        if not w.get("symmetric", True):
            raise UnsupportedQuantization(
                f"compressed-tensors group {name!r}: asymmetric fp8 weights"
            )
        if w.get("dynamic", False):
            raise UnsupportedQuantization(
                f"compressed-tensors group {name!r}: dynamic weight quantization"
            )
        strategy = w.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise UnsupportedQuantization(
                f"compressed-tensors group {name!r}: fp8 weight strategy "
                f"{strategy!r} ({_describe_ct_weights(w)})"
            )
        if w.get("scale_dtype") not in (None, "float32", "bfloat16", "float16"):
            raise UnsupportedQuantization(
                f"compressed-tensors group {name!r}: scale_dtype={w.get('scale_dtype')!r}"
            )
        if strategy == "block":
            b = _ct_block(w.get("block_structure"))
            if block is not None and b != block:
                raise UnsupportedQuantization(
                    f"compressed-tensors groups with different block sizes {block} / {b}"
                )
            block = b
        strategies.add(strategy)
        ia = g.get("input_activations")
        if ia:
            if ia.get("num_bits") != 8 or ia.get("type") != "float":
                raise UnsupportedQuantization(
                    f"compressed-tensors group {name!r}: fp8 weights with "
                    f"input activations num_bits={ia.get('num_bits')!r} "
                    f"type={ia.get('type')!r}"
                )
            if not ia.get("dynamic", False):
                raise UnsupportedQuantization(
                    f"compressed-tensors group {name!r}: static activation "
                    "quantization (input_scale comes from calibration and cannot "
                    "be derived from trainer weights)"
                )
        targets.extend(g.get("targets") or [])
    if len(strategies) != 1:
        raise UnsupportedQuantization(
            f"compressed-tensors config mixing fp8 weight strategies {sorted(strategies)}"
        )
    strategy = strategies.pop()
    return FP8Layout(
        method="compressed-tensors",
        strategy=strategy,
        block_size=block if strategy == "block" else None,
        scale_name="weight_scale",
        ignore=tuple(q.get("ignore") or ()),
        targets=tuple(dict.fromkeys(targets)) or ("Linear",),
        activation_dynamic=dynamic,
        ct_format=fmt,
        hidden_size=hidden,
        kv_cache_scheme=kv,
    )
