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


class RegistryAdapter(Adapter):
    """Registers ``engine`` (module, class name; imported lazily by vLLM)
    as ``fp8`` in the factory class ``factory`` of vLLM's factory module."""

    trigger_module = FACTORY
    factory = ""
    engine: tuple[str, str] = ("", "")

    def check(self) -> None:
        cls = getattr(sys.modules[FACTORY], self.factory, None)
        if cls is None or not callable(getattr(cls, "register_engine", None)) or not hasattr(cls, "_registry"):
            raise TargetMismatch(f"{self.factory}.register_engine / _registry are gone")

    def apply(self) -> None:
        cls = getattr(sys.modules[FACTORY], self.factory)
        if BACKEND not in cls._registry:
            cls.register_engine(BACKEND, *self.engine)
        self._registered = cls

    def revert_extra(self) -> None:
        cls = getattr(self, "_registered", None)
        if cls is not None:
            cls._registry.pop(BACKEND, None)
            self._registered = None
