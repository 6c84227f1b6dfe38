"""vLLM ``general_plugins`` entry point: loads the overlay in every vLLM process.

vLLM calls :func:`register` once per process (API server, engine core, each
worker) before the model is built. Importing the package already activates
the overlay; the call is idempotent.
"""

from __future__ import annotations


def register() -> None:
    from . import auto_activate

    auto_activate()
