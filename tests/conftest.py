"""Shared test configuration.

Markers (registered in pyproject.toml):

* ``vllm``: needs a real vLLM; skipped when vLLM cannot be imported.
* ``slow``: starts real vLLM engines.

``FP8_OVERLAY_EXPECT_VLLM`` (set by the nox sessions) names the vLLM
release the run is meant for; the ``expected_vllm`` fixture returns it, and
the run aborts at start-up if the installed vLLM is a different one.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

EXPECT_ENV = "FP8_OVERLAY_EXPECT_VLLM"


def _installed_vllm() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm_fp8_overlay.testing.harness import vllm_version

    return vllm_version()


def _vllm_importable() -> tuple[bool, str]:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build (undefined symbol ...)
        return False, f"vLLM not importable: {type(exc).__name__}: {exc}"
    return True, ""


_VLLM_STATE: tuple[bool, str] | None = None


def vllm_state() -> tuple[bool, str]:
    global _VLLM_STATE
    if _VLLM_STATE is None:
        _VLLM_STATE = _vllm_importable()
    return _VLLM_STATE


def pytest_configure(config: pytest.Config) -> None:
    # markers are also in pyproject.toml; repeated here so that running with
    # another rootdir/ini still knows them
    config.addinivalue_line("markers", "vllm: needs a real vLLM installed (skipped otherwise)")
    config.addinivalue_line("markers", "slow: starts real vLLM engines")
    config.addinivalue_line("markers", "soak: long fault soak (500 updates); FP8_OVERLAY_SOAK=1 -m soak")
    expected = os.environ.get(EXPECT_ENV)
    if expected:
        installed = _installed_vllm()
        if installed != expected:
            raise pytest.UsageError(
                f"{EXPECT_ENV}={expected} but the installed vLLM is {installed or 'absent'}"
            )


def pytest_report_header(config: pytest.Config) -> list[str]:
    installed = _installed_vllm()
    lines = [f"vllm: {installed or 'not installed'}"]
    try:
        import torch

        lines.append(f"torch: {torch.__version__}")
    except Exception:
        pass
    try:
        import transformers

        lines.append(f"transformers: {transformers.__version__}")
    except Exception:
        pass
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("vllm") for item in items):
        return
    ok, why = vllm_state()
    if ok:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if item.get_closest_marker("vllm"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def expected_vllm() -> str | None:
    """The vLLM version this run is meant for (``None`` outside nox)."""
    return os.environ.get(EXPECT_ENV)


@pytest.fixture(scope="session")
def vllm_version() -> str:
    """The installed vLLM version; skips when vLLM is absent."""
    ok, why = vllm_state()
    if not ok:
        pytest.skip(why)
    from vllm_fp8_overlay.testing.harness import vllm_version as v

    return v()


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory per test session for generated checkpoints."""
    return tmp_path_factory.mktemp("tiny_models")
