"""A control-plane client for an in-process ``vllm.LLM`` (no vLLM import).

vLLM's trainer engines (0.28+) drive the inference side through any object
with four methods (``VLLMWeightSyncClient``); vLLM ships HTTP and Ray
clients. This one calls an ``LLM`` object in this process, on every release
that has the weight-transfer API (0.22-0.24's ``start_weight_update`` takes
``is_checkpoint_format``; ``fp8`` updates are always checkpoint format).
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["LLMWeightSyncClient"]


class LLMWeightSyncClient:
    """``VLLMWeightSyncClient`` over a ``vllm.LLM`` in this process."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    @property
    def served_model(self) -> str | None:
        """The served model's path (what ``layout="auto"`` reads)."""
        cfg = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        return getattr(cfg, "model", None)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        fn = self.llm.start_weight_update
        if "is_checkpoint_format" in inspect.signature(fn).parameters:
            fn(is_checkpoint_format=True)
        else:
            fn()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        if weight_version is None:
            self.llm.finish_weight_update()
        else:
            self.llm.finish_weight_update(weight_version)

    def shutdown_weight_transfer_engine(self) -> None:
        fn = getattr(self.llm, "shutdown_weight_transfer_engine", None)
        if callable(fn):
            fn()
