"""Trainer-side FP8 checkpoint formats (no vLLM needed at run time).

>>> from vllm_fp8_overlay.formats import detect_layout, quantize_weights
>>> layout = detect_layout("/models/Qwen3-8B-FP8")          # doctest: +SKIP
>>> for name, t in quantize_weights(model.named_parameters(), layout):  # doctest: +SKIP
...     send(name, t)
"""

from .detect import (
    SUPPORTED_FORMATS,
    FP8Layout,
    UnsupportedQuantization,
    detect_layout,
)
from .names import register_module_names
from .quantize import (
    FP8_E4M3_MAX,
    QuantBackend,
    dequantize_tensor,
    expand_fused_experts,
    get_backend,
    quantize_tensor,
    quantize_weights,
    register_backend,
)

__all__ = [
    "SUPPORTED_FORMATS",
    "FP8Layout",
    "UnsupportedQuantization",
    "detect_layout",
    "FP8_E4M3_MAX",
    "QuantBackend",
    "dequantize_tensor",
    "expand_fused_experts",
    "get_backend",
    "quantize_tensor",
    "quantize_weights",
    "register_backend",
    "register_module_names",
]
