"""Test support: tiny local checkpoints and an in-process vLLM harness.

Importing this package does not import vLLM; :mod:`.harness` imports it
lazily, so :mod:`.tiny_models` works in environments without vLLM.
"""

from . import tiny_models

__all__ = ["tiny_models", "harness"]


def __getattr__(name: str):
    if name == "harness":
        import importlib

        return importlib.import_module(f"{__name__}.harness")
    raise AttributeError(name)
