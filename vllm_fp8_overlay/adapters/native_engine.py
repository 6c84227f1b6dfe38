"""Register the ``fp8`` backend in vLLM's worker-side engine registry.

Why: trainers written against vLLM's weight-transfer API
(``LLM.init_weight_transfer_engine`` / ``update_weights``, the
``/init_weight_transfer_engine`` ... routes) pick the engine by name from
``WeightTransferConfig(backend=...)``. Registered as ``fp8``, our engine
(:class:`vllm_fp8_overlay.sync.native.engine.Fp8WeightTransferEngine`)
receives FP8 in the served layout and validates it before loading.

How: ``WeightTransferEngineFactory.register_engine("fp8", module, class)``
(lazy: the engine module is imported only when an engine is created), in
every vLLM process, as soon as vLLM imports the factory.

Serves: 0.22.1 and later. 0.16-0.20 declare ``WeightTransferConfig.backend``
as ``Literal["nccl", "ipc"]``, so a registered name is refused by config
validation before the registry is consulted; 0.22.1 declares ``str`` (0.24+
``Literal[...] | str``), validated against the registry when the engine is
created. On the closed releases the worker extension path serves.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from . import _base
from ._base import RegistryAdapter


class NativeFp8Engine(RegistryAdapter):
    id = "native-fp8-engine"
    title = "'fp8' backend in vLLM's WeightTransferEngineFactory"
    serves = SpecifierSet(">=0.22.1")
    unavailable = ("WeightTransferConfig.backend is a closed Literal['nccl', 'ipc'] before 0.22.1: "
                   "the worker extension path serves")
    factory = "WeightTransferEngineFactory"
    engine = ("vllm_fp8_overlay.sync.native.engine", "Fp8WeightTransferEngine")
    targets = (_base.FACTORY + ".WeightTransferEngineFactory",)

    def check(self) -> None:
        super().check()
        _base.registry_accepts_names()
