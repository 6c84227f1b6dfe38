"""vllm-fp8-overlay: version-gated vLLM reload fixes and exact FP8 weight sync.

Importing the package activates the overlay (cheaply: vLLM is not imported;
patches attach when vLLM imports their targets), and so does vLLM's
``vllm.general_plugins`` hook in every vLLM process. Set
``FP8_OVERLAY_DISABLE=1`` to switch that automatic activation off.
"""

from __future__ import annotations

from .adapters import ADAPTER_CLASSES
from .overlay import DISABLE_ENV, Overlay, PatchStatus, State
from .patches import PATCH_CLASSES

__version__ = "0.1.0"

_OVERLAY = Overlay(cls() for cls in PATCH_CLASSES)
#: features for vLLM's own APIs (the native ``fp8`` weight-transfer backend),
#: on the same machinery but apart from the back-ports: they do not retire
_ADAPTERS = Overlay(cls() for cls in ADAPTER_CLASSES)


def activate() -> None:
    """Activate the overlay in this process (idempotent). Explicit activation
    ignores ``FP8_OVERLAY_DISABLE``, which governs only the automatic one."""
    _OVERLAY.activate()
    _ADAPTERS.activate()


def auto_activate() -> None:
    """What importing the package and vLLM's plugin hook do: activate unless
    ``FP8_OVERLAY_DISABLE`` is set."""
    _OVERLAY.auto_activate()
    _ADAPTERS.auto_activate()


def deactivate() -> None:
    """Revert every applied patch and adapter; vLLM is restored exactly."""
    _OVERLAY.deactivate()
    _ADAPTERS.deactivate()


def is_active() -> bool:
    return _OVERLAY.active


def status() -> list[PatchStatus]:
    """Each back-port patch's state for the installed vLLM, and why."""
    return _OVERLAY.status()


def adapter_status() -> list[PatchStatus]:
    """Each adapter's state (the native ``fp8`` backend), and why."""
    return _ADAPTERS.status()


def installed_vllm_version():
    from .vllm_version import installed_vllm_version as _v

    return _v()


__all__ = [
    "DISABLE_ENV",
    "PatchStatus",
    "State",
    "activate",
    "adapter_status",
    "auto_activate",
    "deactivate",
    "installed_vllm_version",
    "is_active",
    "status",
    "__version__",
]

auto_activate()
