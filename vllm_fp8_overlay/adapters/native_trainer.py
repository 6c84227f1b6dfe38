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
from ._base import Adapter


class NativeFp8Trainer(Adapter):
    id = "native-fp8-trainer"
    title = "'fp8' backend in vLLM's WeightTransferTrainerFactory"
    serves = SpecifierSet(">=0.28.0")
    unavailable = ("no WeightTransferTrainerFactory before 0.28: call "
                   "Fp8WeightTransferEngine.trainer_send_weights(weights, {'sender': ..., 'step': n})")
    trigger_module = _base.FACTORY
    targets = (_base.FACTORY + ".WeightTransferTrainerFactory",)

    def check(self) -> None:
        import sys

        cls = getattr(sys.modules[_base.FACTORY], "WeightTransferTrainerFactory", None)
        if cls is None or not callable(getattr(cls, "register_engine", None)) or not hasattr(cls, "_registry"):
            raise _base.TargetMismatch("WeightTransferTrainerFactory.register_engine / _registry are gone")

    def apply(self) -> None:
        import sys

        cls = sys.modules[_base.FACTORY].WeightTransferTrainerFactory
        _base.register(cls, _base.BACKEND, "vllm_fp8_overlay.sync.native.trainer", "Fp8TrainerWeightTransferEngine")
        self._registered = cls

    def revert_extra(self) -> None:
        cls = getattr(self, "_registered", None)
        if cls is not None:
            _base.unregister(cls, _base.BACKEND)
            self._registered = None
