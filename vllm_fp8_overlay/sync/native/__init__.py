"""FP8 as a backend of vLLM's own weight-transfer API.

* :mod:`.info`: the init / update info both ends agree on (no vLLM import).
* :mod:`.engine`: the worker side, ``Fp8WeightTransferEngine`` (imports vLLM).
* :mod:`.trainer`: the trainer side for vLLM >= 0.28's
  ``WeightTransferTrainerFactory`` (imports vLLM), and ``open_sender`` for
  0.22-0.24.
* :mod:`.clients`: ``LLMWeightSyncClient`` for an in-process ``vllm.LLM``.

The overlay's adapters (:mod:`vllm_fp8_overlay.adapters`) register the
backend as ``fp8`` on the releases whose config accepts a registered name;
``python -m vllm_fp8_overlay status`` says which path a release has.
"""

from .info import BACKEND, Fp8InitInfo, Fp8UpdateInfo

__all__ = ["BACKEND", "Fp8InitInfo", "Fp8UpdateInfo"]
