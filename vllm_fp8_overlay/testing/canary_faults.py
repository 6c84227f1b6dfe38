"""Worker-side faults the canary tests plant after a load (tests only).

Why a worker extension of its own: the faults must reach the model in the
worker process, and ``collective_rpc`` with a callable would need vLLM's
insecure (pickle) serialization. Start the engine with
``worker_extension_cls=FAULT_EXTENSION``: it is the sync extension plus
these methods.

* ``canary_fault_hold_lm_head`` / ``canary_fault_stale_lm_head``: keep the
  head's CPU GEMM closure (``lm_head.cpu_linear``, holding its prepacked
  copy of the tied weight) before a push and put it back after, which is the
  state the known bug leaves (``sync/apply/derived.py``,
  "tied-lm-head-cpu-gemm"), whether or not the repair is installed;
* ``canary_fault_nan_scale``: a NaN in one row of a layer's ``weight_scale``,
  which the receiver refuses in an update, so it is planted after the load.
"""

from __future__ import annotations

from typing import Any

import torch

from ..sync.worker_extension import WeightSyncExtension

__all__ = ["FAULT_EXTENSION", "CanaryFaultExtension"]

FAULT_EXTENSION = "vllm_fp8_overlay.testing.canary_faults.CanaryFaultExtension"


class CanaryFaultExtension(WeightSyncExtension):
    def _canary_model(self) -> torch.nn.Module:
        runner = self.model_runner  # type: ignore[attr-defined]
        get = getattr(runner, "get_model", None)
        return get() if callable(get) else runner.model

    def canary_fault_hold_lm_head(self) -> dict:
        """Keep the head's current GEMM closure (and say whether it is tied)."""
        m = self._canary_model()
        head = m.lm_head
        embed = m.model.embed_tokens
        self._canary_held: Any = getattr(head, "cpu_linear", None)
        return {"has_cpu_linear": self._canary_held is not None,
                "tied": head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()}

    def canary_fault_stale_lm_head(self) -> dict:
        """Put the held closure back: logits come from the held copy again."""
        held = getattr(self, "_canary_held", None)
        if held is None:
            raise RuntimeError("canary_fault_hold_lm_head was not called (or the head has no cpu_linear)")
        m = self._canary_model()
        replaced = m.lm_head.cpu_linear is not held
        m.lm_head.cpu_linear = held
        return {"replaced": replaced}

    def canary_fault_nan_scale(self, module: str, row: int = 0) -> dict:
        """``<module>.weight_scale[row] = NaN`` in the served model."""
        layer = self._canary_model().get_submodule(module)
        with torch.no_grad():
            layer.weight_scale.view(-1)[row] = float("nan")
        return {"module": module, "dtype": str(layer.weight_scale.dtype)}
