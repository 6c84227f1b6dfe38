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
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import names as _names

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


_FP8_FORMATS_OK = {None, "e4m3", "e4m3fn", "float8_e4m3fn"}

_LAYOUT_KEYS = frozenset({"method", "strategy", "block_size", "scale_name", "ignore", "targets",
                          "activation_dynamic", "ct_format", "hidden_size", "kv_cache_scheme"})


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
        try:
            object.__setattr__(self, "ignore", _names.check_patterns(self.ignore, "ignore", targets=False))
            object.__setattr__(self, "targets", _names.check_patterns(self.targets, "targets", targets=True))
        except ValueError as e:
            raise UnsupportedQuantization(str(e)) from None

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

    def is_quantized(self, hf_param_name: str) -> bool:
        """True iff the checkpoint stores ``hf_param_name`` as FP8 + scale,
        decided from the name alone; raises ``ValueError`` naming the tensor
        where the layout targets it but the name cannot decide (see
        :mod:`.names`). :meth:`quantizes` also knows the tensor's rank."""
        return _names.decide(self, hf_param_name)

    def quantizes(self, hf_param_name: str, shape: Any = None) -> bool:
        """:meth:`is_quantized` for a tensor of ``shape``: a module name the
        tables do not know is decided (not quantized) for a tensor that is
        not 2-D, and raises for a targeted 2-D one."""
        return _names.decide(self, hf_param_name, None if shape is None else len(shape))

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
        """Inverse of :meth:`to_dict`. An unknown key is refused, not
        dropped: a field this version does not know may change what is
        quantized."""
        if not isinstance(d, Mapping):
            raise UnsupportedQuantization(f"layout of type {type(d).__name__}")
        unknown = sorted(set(d) - _LAYOUT_KEYS)
        missing = sorted({"method", "strategy"} - set(d))
        if unknown or missing:
            raise UnsupportedQuantization(
                f"layout with unknown field(s) {unknown} / missing {missing} (known: {sorted(_LAYOUT_KEYS)})")
        bs = d.get("block_size")
        return cls(
            method=d["method"],
            strategy=d["strategy"],
            block_size=tuple(int(b) for b in bs) if bs else None,
            scale_name=d.get("scale_name", "weight_scale"),
            ignore=d.get("ignore") or (),
            targets=d.get("targets") or ("Linear",),
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
    if isinstance(ignore, str) or not isinstance(ignore, (list, tuple)):
        raise UnsupportedQuantization(f"quant_method='fp8' with ignored layers {ignore!r} (not a list)")
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

# compressed-tensors' QuantizationScheme / QuantizationArgs fields (0.17-0.19;
# both models forbid extra keys, so vLLM refuses any other key too)
_CT_GROUP_KEYS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
_CT_ARGS_KEYS = frozenset({"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure",
                           "dynamic", "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"})


def _check_ct_group(name: str, g: Mapping[str, Any]) -> None:
    """Refuse what this quantizer would otherwise ignore in a weight group:
    unknown keys (a newer scheme field may change the format), no targets
    (vLLM would quantize nothing, we would quantize every Linear), output
    activation quantization, act-order or group sizes on FP8 weights."""
    unknown = sorted(set(g) - _CT_GROUP_KEYS)
    if unknown:
        raise UnsupportedQuantization(f"compressed-tensors group {name!r} with unknown field(s) {unknown}")
    t = g.get("targets")
    if isinstance(t, str) or not isinstance(t, (list, tuple)) or not t:
        raise UnsupportedQuantization(
            f"compressed-tensors group {name!r}: targets must be a non-empty list, got {t!r}")
    for part in ("weights", "input_activations"):
        args = g.get(part)
        if args is None:
            continue
        if not isinstance(args, Mapping):
            raise UnsupportedQuantization(f"compressed-tensors group {name!r}: {part} of type {type(args).__name__}")
        unknown = sorted(set(args) - _CT_ARGS_KEYS)
        if unknown:
            raise UnsupportedQuantization(
                f"compressed-tensors group {name!r}: {part} with unknown field(s) {unknown}")
    if g.get("output_activations"):
        raise UnsupportedQuantization(f"compressed-tensors group {name!r}: output activation quantization")
    w = g["weights"]
    if w.get("actorder"):
        raise UnsupportedQuantization(
            f"compressed-tensors group {name!r}: actorder={w['actorder']!r} (activation-ordered weights)")
    if w.get("group_size") is not None and w.get("strategy") != "group":
        raise UnsupportedQuantization(
            f"compressed-tensors group {name!r}: group_size={w['group_size']!r} with strategy "
            f"{w.get('strategy')!r}")


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
        _check_ct_group(name, g)
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
        targets.extend(g["targets"])
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
        ignore=q.get("ignore") or (),
        targets=tuple(dict.fromkeys(targets)) or ("Linear",),
        activation_dynamic=dynamic,
        ct_format=fmt,
        hidden_size=hidden,
        kv_cache_scheme=kv,
    )
