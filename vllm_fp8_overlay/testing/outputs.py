"""Output-level proof that an updated engine equals a cold start.

Equal parameters are not enough: vLLM keeps state derived from the weights
outside the parameters (a tied head's prepacked GEMM copy, prepacked MoE
experts on CPU), and an update can leave it stale while every parameter
digest matches a cold start (see ``vllm_fp8_overlay/sync/apply/derived.py``).
So "warm == cold" here means: the same greedy tokens *and* the same
per-token logprobs, exactly, for several prompts, as an engine freshly
started on the offline checkpoint of the same weights.

Fresh engines cost 10-70 s on a small CPU machine, so the cold outputs are
cached per checkpoint directory, prompts and length for the whole test
process: one start per checkpoint, however many tests compare against it.
The cold engine is built like the warm ones (``harness.start_sync_engine``:
same ``LLM`` arguments, engine core in a subprocess), so both run the same
kernels on the same batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["PROMPTS", "NTOK", "Outputs", "greedy_outputs", "cold_outputs", "assert_outputs_equal",
           "assert_outputs_equal_cold", "cold_starts"]

#: default prompts (token ids valid for every tiny model: vocab 512)
PROMPTS: tuple[tuple[int, ...], ...] = ((1, 5, 9, 33, 100), (7, 7, 300, 12), (400, 2, 3, 4, 5, 6, 11))
NTOK = 8


@dataclass(frozen=True)
class Outputs:
    """Greedy tokens and the logprob of each chosen token, per prompt."""

    tokens: list[list[int]]
    logprobs: list[list[float]]

    def max_logprob_diff(self, other: "Outputs") -> float:
        return max((abs(a - b) for ra, rb in zip(self.logprobs, other.logprobs) for a, b in zip(ra, rb)),
                   default=0.0)


def greedy_outputs(llm: Any, prompts: Sequence[Sequence[int]] = PROMPTS, n: int = NTOK) -> Outputs:
    """Greedy-decode ``n`` tokens per prompt with logprobs. The prefix cache
    is reset first, so no KV block computed with earlier weights is reused."""
    from .harness import greedy

    reset = getattr(llm, "reset_prefix_cache", None)
    if callable(reset):
        with contextlib.suppress(Exception):
            reset()
    tokens, logprobs = greedy(llm, [list(p) for p in prompts], n, logprobs=True)
    return Outputs(tokens, logprobs)


_COLD: dict[tuple[str, tuple[tuple[int, ...], ...], int], Outputs] = {}
_STARTS: list[str] = []


def cold_starts() -> list[str]:
    """Checkpoint directories a cold engine was started on, in order (for reports)."""
    return list(_STARTS)


def cold_outputs(model_dir: str | os.PathLike[str], prompts: Sequence[Sequence[int]] = PROMPTS, n: int = NTOK,
                 start: Callable[[Path], Any] | None = None, stop: Callable[[Any], None] | None = None) -> Outputs:
    """Outputs of an engine freshly started on ``model_dir`` (started once per
    directory, prompts and ``n`` in this process; ``start`` / ``stop``:
    default :func:`harness.start_sync_engine` / ``stop_sync_engine``)."""
    from . import harness

    key = (str(Path(model_dir).resolve()), tuple(tuple(int(t) for t in p) for p in prompts), int(n))
    if key not in _COLD:
        llm = (start or harness.start_sync_engine)(Path(model_dir))
        try:
            _STARTS.append(key[0])
            _COLD[key] = greedy_outputs(llm, prompts, n)
        finally:
            (stop or harness.stop_sync_engine)(llm)
    return _COLD[key]


def assert_outputs_equal(warm: Outputs, cold: Outputs, what: str) -> None:
    """Exact equality of tokens and logprobs (CPU: the same kernels on the same
    batch give the same bits; no tolerance)."""
    if warm.tokens != cold.tokens:
        raise AssertionError(f"{what}: greedy tokens differ from a freshly started engine:\n"
                             f"  warm {warm.tokens}\n  cold {cold.tokens}")
    if warm.logprobs != cold.logprobs:
        raise AssertionError(f"{what}: logprobs differ from a freshly started engine "
                             f"(max |diff| {warm.max_logprob_diff(cold):.3g}):\n"
                             f"  warm {warm.logprobs}\n  cold {cold.logprobs}")


def assert_outputs_equal_cold(llm: Any, model_dir: str | os.PathLike[str], what: str,
                              prompts: Sequence[Sequence[int]] = PROMPTS, n: int = NTOK) -> Outputs:
    """``llm``'s outputs equal those of a fresh engine on ``model_dir``; returns them."""
    warm = greedy_outputs(llm, prompts, n)
    assert_outputs_equal(warm, cold_outputs(model_dir, prompts, n), what)
    return warm
