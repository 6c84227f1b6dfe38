"""The two test tiers, and how a test says which it belongs to.

* **CI** (``tools/nox -s fast``): what every change must pass on a 2-core
  machine within CI's limit. Each claim about real vLLM is proven there at
  least once; a proof that is repeated for another format, more steps or
  another topology runs there once and in full in the full tier.
* **Full** (``tools/nox -s matrix``, which sets ``FP8_OVERLAY_SOAK=1``):
  every test, on every release of the matrix.

Engine starts decide the cost (a fresh vLLM engine spawns two processes
that import vLLM and torch again: 30-50 s each on a 2-core machine), so the
cuts below are counted in engine starts, not in tests.
"""

from __future__ import annotations

import os

__all__ = ["FULL", "full_tier_only", "steps"]

#: this run is the full tier (``FP8_OVERLAY_SOAK=1``, set by the matrix sessions)
FULL: bool = os.environ.get("FP8_OVERLAY_SOAK") == "1"


def full_tier_only(why: str):
    """A ``skipif`` mark for a test that runs only in the full tier; ``why``
    says what it adds beyond what CI proves and what it costs."""
    import pytest

    return pytest.mark.skipif(not FULL, reason=f"full tier (FP8_OVERLAY_SOAK=1): {why}")


def steps(ci: int, full: int) -> int:
    """How many updates a multi-step proof makes: ``ci`` in CI, ``full`` in the
    full tier. Each step is one more fresh engine to compare with; two steps
    already prove an update on an engine that was updated before."""
    return full if FULL else ci
