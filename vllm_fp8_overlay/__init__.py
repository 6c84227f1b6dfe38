"""vllm-fp8-overlay: version-gated vLLM reload fixes and exact FP8 weight sync.

Importing the package activates the overlay (cheaply: vLLM is not imported;
patches attach when vLLM imports their targets). Set
``VLLM_FP8_OVERLAY_DISABLE=1`` to switch it off.
"""

from __future__ import annotations

from .overlay import DISABLE_ENV, Overlay, PatchStatus, State
from .patches import PATCH_CLASSES

__version__ = "0.1.0"

_OVERLAY = Overlay(cls() for cls in PATCH_CLASSES)


def activate() -> None:
    """Activate the overlay in this process (idempotent)."""
    _OVERLAY.activate()


def deactivate() -> None:
    """Revert every applied patch; vLLM is restored exactly."""
    _OVERLAY.deactivate()


def is_active() -> bool:
    return _OVERLAY.active


def status() -> list[PatchStatus]:
    """Each patch's state for the installed vLLM, and why."""
    return _OVERLAY.status()


def installed_vllm_version():
    from .vllm_version import installed_vllm_version as _v

    return _v()


__all__ = [
    "DISABLE_ENV",
    "PatchStatus",
    "State",
    "activate",
    "deactivate",
    "installed_vllm_version",
    "is_active",
    "status",
    "__version__",
]

activate()
