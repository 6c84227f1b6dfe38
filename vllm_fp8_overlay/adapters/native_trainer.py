"""Register the ``fp8`` backend in vLLM's trainer-side registry (0.28+).

Why: from 0.28 a trainer builds its sender with
``WeightTransferTrainerFactory.trainer_init(init_info, client=, source=)``,
dispatched on ``init_info.backend``. Registered, ``Fp8TrainerInitInfo``
selects :class:`vllm_fp8_overlay.sync.native.trainer.Fp8TrainerWeightTransferEngine`.

How: ``WeightTransferTrainerFactory.register_engine("fp8", module, class)``
when vLLM imports the factory.

Serves: 0.28.0 and later. Before 0.28 there is no trainer-side factory
(trainers call the engine's static ``trainer_send_weights``; ours takes
``{"sender": open_sender(...), "step": n}``).
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from . import _base
from ._base import RegistryAdapter


class NativeFp8Trainer(RegistryAdapter):
    id = "native-fp8-trainer"
    title = "'fp8' backend in vLLM's WeightTransferTrainerFactory"
    serves = SpecifierSet(">=0.28.0")
    unavailable = ("no WeightTransferTrainerFactory before 0.28: call "
                   "Fp8WeightTransferEngine.trainer_send_weights(weights, {'sender': ..., 'step': n})")
    factory = "WeightTransferTrainerFactory"
    engine = ("vllm_fp8_overlay.sync.native.trainer", "Fp8TrainerWeightTransferEngine")
    targets = (_base.FACTORY + ".WeightTransferTrainerFactory",)
