"""Fused GPU kernels for the FP8 quantizer.

Importing this package is cheap: the Triton module is only imported on
demand. :func:`register` adds the ``"triton"`` backend to
:mod:`vllm_fp8_overlay.formats.quantize` and, when CUDA and Triton are both
available, makes it the default; on a CPU-only machine the torch reference
stays the default.
"""

from __future__ import annotations

import importlib.util

__all__ = ["triton_available", "register", "get_triton_backend", "quantize_grouped"]

_registered = [False]


def triton_available() -> bool:
    """True iff Triton is importable and a CUDA device is visible."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()


def get_triton_backend():
    """The ``QuantBackend`` of the Triton kernels (imports Triton)."""
    from .triton_fp8 import BACKEND

    return BACKEND


def register(make_default: bool | None = None) -> bool:
    """Register the Triton backend; returns whether it is the default now.

    ``make_default=None`` makes it the default only when CUDA and Triton are
    available. Returns ``False`` without touching anything when Triton cannot
    be imported.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    from ..formats.quantize import register_backend

    if make_default is None:
        make_default = triton_available()
    register_backend(get_triton_backend(), make_default=bool(make_default))
    _registered[0] = True
    return bool(make_default)


def quantize_grouped(*args, **kwargs):
    """See :func:`vllm_fp8_overlay.kernels.triton_fp8.quantize_grouped`."""
    from .triton_fp8 import quantize_grouped as f

    return f(*args, **kwargs)
