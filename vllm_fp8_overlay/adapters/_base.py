"""What adapters share: a :class:`~..overlay.Patch` that never retires."""

from __future__ import annotations

import sys
import typing

from packaging.version import Version

from ..overlay import Patch, State, TargetMismatch

FACTORY = "vllm.distributed.weight_transfer.factory"
CONFIG = "vllm.config.weight_transfer"
BACKEND = "fp8"


class Adapter(Patch):
    """A feature for the releases in ``serves``; ``unavailable`` says why
    the others cannot have it (and what serves instead)."""

    fixed_in = Version("0")  # unused: adapters do not retire
    upstream = ""
    unavailable = ""

    def state_for(self, version: Version | None) -> tuple[State, str]:
        if version is None:
            return State.NO_VLLM, "vLLM is not installed"
        if self.serves.contains(version, prereleases=True):
            return State.APPLIED, self.title
        return State.UNAVAILABLE, self.unavailable


def registry_accepts_names() -> None:
    """``WeightTransferConfig.backend`` accepts a registered name (``str`` in
    its annotation); on 0.18-0.20 it is a closed ``Literal`` and vLLM refuses
    any other name before it looks at the registry."""
    config = sys.modules.get(CONFIG)
    if config is None:
        import importlib

        config = importlib.import_module(CONFIG)
    hints = typing.get_type_hints(config.WeightTransferConfig)
    backend = hints.get("backend")
    if backend is None or str not in typing.get_args(backend) and backend is not str:
        raise TargetMismatch(f"WeightTransferConfig.backend is {backend!r}: it does not accept a registered name")


def register(factory_cls: type, name: str, module: str, cls_name: str) -> None:
    """``factory_cls.register_engine(name, module, cls_name)`` unless already there."""
    if name in getattr(factory_cls, "_registry", {}):
        return
    factory_cls.register_engine(name, module, cls_name)


def unregister(factory_cls: type, name: str) -> None:
    getattr(factory_cls, "_registry", {}).pop(name, None)
