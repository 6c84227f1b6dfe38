"""Names of vLLM's layerwise-reload modules and small fingerprint helpers."""

from __future__ import annotations

import inspect
import sys

from ..overlay import TargetMismatch

PACKAGE = "vllm.model_executor.model_loader.reload"
LAYERWISE = PACKAGE + ".layerwise"
META = PACKAGE + ".meta"
UTILS = PACKAGE + ".utils"
TYPES = PACKAGE + ".types"


def module(name: str):
    try:
        return sys.modules[name]
    except KeyError:
        raise TargetMismatch(f"{name} is not importable") from None


def require_attrs(mod, *names: str) -> None:
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise TargetMismatch(f"{mod.__name__} lacks {', '.join(missing)}")


def require_params(func, expected: tuple[str, ...]) -> None:
    params = tuple(inspect.signature(func).parameters)
    if params != expected:
        raise TargetMismatch(
            f"{func.__module__}.{func.__qualname__}{params} differs from the expected {expected}"
        )


def require_const(func, text: str) -> None:
    """The function's code contains the string constant ``text``."""
    code = getattr(func, "__code__", None)
    if code is None or text not in code.co_consts:
        raise TargetMismatch(f"{func.__module__}.{func.__qualname__} no longer contains {text!r}")


def original_loader(loader):
    """A weight loader with vLLM's layerwise wrappers peeled off."""
    while getattr(loader, "__name__", "") == "online_process_loader":
        loader = loader.__wrapped__
    return loader
