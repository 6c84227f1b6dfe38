"""Real vLLM engines started with the weight-sync worker extension, and the
proofs the sync tests make on them: every served tensor equal to a cold load
(digests computed in the worker) and, by default, greedy tokens and logprobs
equal to a freshly started engine's (:mod:`.outputs`).

Re-exported by :mod:`.harness` (``harness.start_sync_engine`` and so on),
the one namespace the tests use.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "assert_warm_equals_cold",
    "start_sync_engine",
    "stop_sync_engine",
    "sync_cold_digest",
    "sync_digest",
    "warm_cold_diff",
    "worker_class_restored",
]

@contextlib.contextmanager
def worker_class_restored() -> Iterator[None]:
    """Give vLLM's CPU worker class back its own bases when the block ends.

    vLLM injects ``worker_extension_cls`` into the worker class itself
    (``__bases__ += (extension,)``) in the process that runs the worker.
    Where that is the test process (in-process engines; 0.19 keeps an engine
    in-process once its cached environment says so), a later engine with a
    different extension class that shares attribute names trips vLLM's
    conflict check ("already has an attribute _ws"). Wrap the life of an
    engine with an unusual extension in this block (end it after the engine
    is shut down)."""
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker
    except ImportError:
        yield
        return
    bases = CPUWorker.__bases__
    try:
        yield
    finally:
        if CPUWorker.__bases__ != bases:
            CPUWorker.__bases__ = bases


def start_sync_engine(model_dir: str | os.PathLike[str], **llm_kw: Any) -> Any:
    """A real ``vllm.LLM`` with the weight-sync worker extension; its engine
    core and worker run in subprocesses, as in a deployment. ``llm_kw``
    override or add ``LLM`` arguments (another ``worker_extension_cls``,
    parallelism)."""
    from ..sync.client import EXTENSION

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM

    kw = dict(skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True, max_model_len=128, max_num_seqs=4,
              seed=0, worker_extension_cls=EXTENSION)
    return LLM(model=str(model_dir), **{**kw, **llm_kw})


def stop_sync_engine(llm: Any) -> None:
    """Shut down an engine started by :func:`start_sync_engine` (``None``: no-op)."""
    if llm is None:
        return
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    gc.collect()


def sync_digest(llm: Any) -> str:
    """sha256 over every parameter and buffer of worker 0's model."""
    return llm.collective_rpc("weight_sync_digest")[0]["digest"]


def sync_cold_digest(llm: Any, model_dir: str | os.PathLike[str]) -> str:
    """The same digest of the model a cold start on ``model_dir`` would serve."""
    return llm.collective_rpc("weight_sync_cold_digest", kwargs={"model_dir": str(model_dir)})[0]["digest"]


def warm_cold_diff(llm: Any, model_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the tensors whose served value differs from the cold start's."""
    warm = llm.collective_rpc("weight_sync_digest", kwargs={"per_tensor": True})[0]["tensors"]
    cold = llm.collective_rpc("weight_sync_cold_digest",
                              kwargs={"model_dir": str(model_dir), "per_tensor": True})[0]["tensors"]
    return sorted(n for n in set(warm) | set(cold) if warm.get(n) != cold.get(n))


def assert_warm_equals_cold(llm: Any, model_dir: str | os.PathLike[str], what: str, *,
                            outputs: bool = True) -> None:
    """Every parameter and buffer equals a cold load of ``model_dir`` bitwise,
    and (``outputs``) greedy tokens and logprobs equal, exactly, those of an
    engine freshly started on ``model_dir`` (one start per directory, cached:
    :mod:`.outputs`). Parameters alone can match while derived state is stale."""
    if sync_digest(llm) != sync_cold_digest(llm, model_dir):
        raise AssertionError(f"{what}: warm != cold; differing tensors: {warm_cold_diff(llm, model_dir)}")
    if outputs:
        from .outputs import assert_outputs_equal_cold

        assert_outputs_equal_cold(llm, model_dir, what)
