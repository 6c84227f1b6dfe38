"""vLLM side of the weight sync: a worker extension.

Pass the class to vLLM and drive it through ``collective_rpc``::

    LLM(model=..., worker_extension_cls="vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension")
    vllm serve MODEL --worker-extension-cls vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension

vLLM appends the class to its worker's bases, so every method below runs in
each worker process with ``self.model_runner``, ``self.vllm_config`` etc.
The trainer-side helpers in :mod:`vllm_fp8_overlay.sync.client` call them.

Per step a worker (1) receives the *complete* step into memory
(``WeightReceiver.receive_all``), (2) validates it against what the served
model was loaded from -- tensor names, dtypes and shapes read from the served
checkpoint's safetensors headers at init, and the FP8 layout of its
``quantization_config`` -- and only then (3) loads it. A rejected step leaves
the model untouched and raises :class:`WeightUpdateRejected` naming every
offending tensor. A failure while loading raises
:class:`WeightLoadFailed`, which says that the model may be partially updated.

``receive_weights(step, stream=True)`` trades that guarantee for memory: each
bucket is validated on arrival and its tensors go straight to vLLM's loader,
so the step is never resident as a whole. A problem in the first bucket is
still a :class:`WeightUpdateRejected` with the model untouched; a problem
found later (a bad tensor in a later bucket, a missing tensor at the end, a
transport error) is a :class:`WeightLoadFailed`. ``stream=False`` is the
default.

Every result reports the peak extra memory of the update
(``peak_extra_bytes``: CUDA allocator peak, or the resident-set high-water
mark on CPU) next to the model's and its largest layer's bytes.

Load modes (``receive_weights(step, mode=...)``):

* ``"layerwise"``: vLLM's layerwise reload (``initialize_layerwise_reload``,
  ``model.load_weights``, ``finalize_layerwise_reload``), present from vLLM
  0.16. Checkpoint-format tensors; each layer is re-processed (FP8 repacking,
  scale conversion ...) exactly as at a cold start.
* ``"load_weights"``: plain ``model.load_weights`` + vLLM's
  ``process_weights_after_loading``; for releases without the reload module,
  unquantized (BF16/FP16) models only: processing already-processed FP8
  parameters a second time would corrupt them.
* ``"kernel"``: ``param.copy_`` of tensors that are already in vLLM's kernel
  format, keyed by vLLM parameter name (``named_parameters()``), each of the
  worker's own shard. Chosen when the update's names are the model's
  parameter names rather than checkpoint names.
* ``"auto"``: ``kernel`` when the update matches the parameter names,
  otherwise ``layerwise`` where available, else ``load_weights``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("vllm.fp8_overlay.sync")

__all__ = [
    "WeightSyncExtension",
    "WeightSyncError",
    "WeightUpdateRejected",
    "WeightLoadFailed",
    "TensorSpec",
    "read_checkpoint_specs",
    "validate_update",
]

MODES = ("auto", "layerwise", "load_weights", "kernel")

# the layout fields that decide the bytes of a checkpoint (hidden_size and
# kv_cache_scheme do not change how weights are stored)
_LAYOUT_KEYS = ("method", "strategy", "block_size", "scale_name", "ignore", "targets",
                "activation_dynamic", "ct_format")

_ST_DTYPES = {
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "BOOL": "bool",
}


class WeightSyncError(RuntimeError):
    """Base class of the extension's errors."""


class WeightUpdateRejected(WeightSyncError):
    """The update did not pass validation; the model was not touched."""


class WeightLoadFailed(WeightSyncError):
    """Loading failed after validation: the model may be partially updated."""


TensorSpec = tuple[str, tuple[int, ...]]  # (dtype name, shape)


# --------------------------------------------------------------------------
# what the served model was loaded from
# --------------------------------------------------------------------------


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 512 << 20:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        return json.loads(f.read(n))


def read_checkpoint_specs(model_dir: str | os.PathLike[str]) -> dict[str, TensorSpec]:
    """``{name: (dtype, shape)}`` of every tensor in a checkpoint directory,
    from the safetensors headers only (no tensor data is read)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {d}")
    specs: dict[str, TensorSpec] = {}
    for f in files:
        for name, meta in _read_header(f).items():
            if name == "__metadata__":
                continue
            dt = _ST_DTYPES.get(meta["dtype"], meta["dtype"])
            specs[name] = (dt, tuple(int(x) for x in meta["shape"]))
    return specs


def _resolve_model_dir(model_config: Any) -> Path | None:
    """Local directory of the served checkpoint (a path, or the HF cache snapshot)."""
    name = str(getattr(model_config, "model", "") or "")
    if name and Path(name).is_dir():
        return Path(name)
    with contextlib.suppress(Exception):
        from huggingface_hub import snapshot_download

        p = snapshot_download(name, revision=getattr(model_config, "revision", None),
                              allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
        return Path(p)
    return None


def _layout_key(layout: Any) -> dict | None:
    if layout is None:
        return None
    from ..formats import FP8Layout

    if not isinstance(layout, FP8Layout):
        layout = FP8Layout.from_dict(layout)
    d = layout.to_dict()
    return {k: d[k] for k in _LAYOUT_KEYS}


def _listing(names: list[str], max_report: int) -> str:
    s = ", ".join(names[:max_report])
    return s + (f", ... ({len(names) - max_report} more)" if len(names) > max_report else "")


def _spec_problems(
    tensors: list[tuple[str, torch.Tensor]],
    expected: dict[str, TensorSpec],
    *,
    what: str,
    max_report: int = 20,
    check_missing: bool = True,
) -> list[str]:
    problems: list[str] = []
    got = {n: (_dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors}
    unknown = sorted(set(got) - set(expected))
    if unknown:
        problems.append(f"{len(unknown)} unknown tensor(s) (not in {what}): {_listing(unknown, max_report)}")
    if check_missing:
        missing = sorted(set(expected) - set(got))
        if missing:
            problems.append(f"{len(missing)} missing tensor(s) (in {what}, not in the update): "
                            f"{_listing(missing, max_report)}")
    bad = []
    for n in sorted(set(got) & set(expected)):
        if got[n] != expected[n]:
            bad.append(f"{n}: got {got[n][0]}{list(got[n][1])}, expected {expected[n][0]}{list(expected[n][1])}")
    if bad:
        problems.append(f"{len(bad)} dtype/shape mismatch(es): " + "; ".join(bad[:max_report])
                        + (f"; ... ({len(bad) - max_report} more)" if len(bad) > max_report else ""))
    return problems


def validate_update(
    tensors: list[tuple[str, torch.Tensor]],
    expected: dict[str, TensorSpec],
    *,
    what: str = "the served checkpoint",
    max_report: int = 20,
) -> list[str]:
    """Problems (empty = valid): names must equal ``expected``'s exactly, each
    dtype and shape too."""
    return _spec_problems(tensors, expected, what=what, max_report=max_report)


def _vllm_version() -> str:
    from ..vllm_version import installed_vllm_version

    v = installed_vllm_version()
    return str(v) if v is not None else "unknown"


def _has_layerwise_reload() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None
    except ModuleNotFoundError:
        return False


def _as_bool(x: Any) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("1", "true", "yes", "on")
    return bool(x)


def _digest(model: torch.nn.Module, per_tensor: bool) -> dict:
    total = hashlib.sha256()
    per: dict[str, str] = {}
    seen: set[int] = set()
    items = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in sorted(items, key=lambda x: x[0]):
        if id(t) in seen:
            continue
        seen.add(id(t))
        t = t.detach()
        data = t.contiguous().cpu().reshape(-1)
        raw = (data.to(torch.uint8) if data.dtype == torch.bool else data.view(torch.uint8)).numpy().tobytes()
        h = hashlib.sha256(raw).hexdigest()
        total.update(f"{name}|{_dtype_name(t.dtype)}|{list(t.shape)}|{h}\n".encode())
        if per_tensor:
            per[name] = h[:24]
    return {"digest": total.hexdigest(), "num_tensors": len(seen), "tensors": per}


def _proc_status_bytes(*keys: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024  # kB
    return out


def _release_cpu_free_memory() -> list[str]:
    """Return memory that the C allocator keeps after frees to the OS
    (tcmalloc, which vLLM's CPU build preloads, and glibc), so that the
    resident set is the memory in use. Best effort; which ones ran."""
    import ctypes

    done = []
    with contextlib.suppress(Exception):
        fn = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)
        if fn is not None:
            fn()
            done.append("tcmalloc")
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        done.append("glibc")
    return done


class _PeakMemory:
    """Peak memory above the level at construction, until :meth:`finish`.

    CUDA: the caching allocator's peak (``reset_peak_memory_stats``,
    ``max_memory_allocated() - memory_allocated()`` before). CPU (Linux): the
    resident-set high-water mark, reset by writing ``5`` to
    ``/proc/self/clear_refs``, minus ``VmRSS`` before. Free memory the C
    allocator still holds is returned to the OS first (otherwise an update
    reuses the pages a previous one freed and its peak does not show); the
    figure still counts every thread of the process and memory the allocator
    keeps during the update. Best effort: ``None`` where neither is
    available."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source: str | None = None
        self.before = 0
        self.released: list[str] = []
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                self.before = int(torch.cuda.memory_allocated(device))
                self.source = "cuda_allocator"
            else:
                self.released = _release_cpu_free_memory()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.before = _proc_status_bytes("VmRSS")["VmRSS"]
                self.source = "rss_hwm"
        except Exception:  # no CUDA stats / not Linux / not permitted
            self.source = None

    def finish(self) -> dict:
        peak = None
        try:
            if self.source == "cuda_allocator":
                torch.cuda.synchronize(self.device)
                peak = int(torch.cuda.max_memory_allocated(self.device)) - self.before
            elif self.source == "rss_hwm":
                peak = _proc_status_bytes("VmHWM")["VmHWM"] - self.before
        except Exception:
            peak = None
        return {"peak_extra_bytes": peak, "peak_extra_source": self.source if peak is not None else None,
                "memory_before_bytes": self.before if peak is not None else None,
                "allocator_released": list(self.released)}


def _tensor_bytes(tensors: Any) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _module_bytes(m: torch.nn.Module) -> int:
    return _tensor_bytes(list(m.parameters()) + list(m.buffers()))


def _model_sizes(model: torch.nn.Module) -> dict:
    """Parameter + buffer bytes of the model and of its largest decoder layer
    (the largest child of the first ``ModuleList`` named ``layers``, else of
    the largest ``ModuleList``). Best effort."""
    out: dict[str, Any] = {"model_bytes": None, "largest_layer_bytes": None, "largest_layer": None}
    with contextlib.suppress(Exception):
        out["model_bytes"] = _module_bytes(model)
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        named = [x for x in lists if x[0].rsplit(".", 1)[-1] == "layers"]
        cands = named[:1] or sorted(lists, key=lambda x: -len(x[1]))[:1]
        if cands:
            prefix, layers = cands[0]
            sizes = [(_module_bytes(layer), f"{prefix}.{i}") for i, layer in enumerate(layers)]
            out["largest_layer_bytes"], out["largest_layer"] = max(sizes)
    return out


_LAYER_RE = re.compile(r"(?:^|\.)layers\.\d+\.")


class _StreamProblem(Exception):
    """A bucket of a streamed step failed validation."""


# --------------------------------------------------------------------------
# the extension
# --------------------------------------------------------------------------


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); call through
    ``collective_rpc``. Arguments may arrive as strings (vLLM's HTTP
    ``/collective_rpc`` route) and are coerced."""

    # ---- life cycle -----------------------------------------------------

    def init_weight_receiver(
        self,
        host: str,
        port: int,
        world_size: int,
        rank_offset: int,
        backend: str = "auto",
        timeout: float = 300.0,
        checkpoint_dir: str | None = None,
        keep_step_buffers: bool = False,
    ) -> dict:
        """Join the trainer's broadcast group as rank ``rank_offset + local rank``.

        Blocks until every rank joined: trigger it without waiting, then build
        the ``WeightSender``. Reads what the served model was loaded from
        (safetensors headers and quantization config of ``checkpoint_dir``,
        default: the served model's directory). Returns this worker's info.
        ``keep_step_buffers``: keep the receive buffers (and the tensor views
        over them) from one step to the next instead of allocating them each
        step (``WeightReceiver(keep_step_buffers=True)``): faster for models
        with many tensors, but the size of a step stays allocated on this
        worker between updates.
        """
        from .receiver import WeightReceiver

        self.close_weight_receiver()
        st = self._ws_state()
        if checkpoint_dir or st.get("served") is None:
            st["served"] = self._ws_served(checkpoint_dir)
        local = self._ws_local_rank()
        rank = int(rank_offset) + local
        dev = getattr(self, "device", None)
        device = dev if isinstance(dev, torch.device) and dev.type == "cuda" else torch.device("cpu")
        if backend == "gloo":
            device = torch.device("cpu")
        t0 = time.perf_counter()
        st["receiver"] = WeightReceiver(str(host), int(port), int(world_size), rank, backend=str(backend),
                                        device=device, timeout=float(timeout),
                                        keep_step_buffers=_as_bool(keep_step_buffers))
        st["info"] = {
            "host": str(host), "port": int(port), "world_size": int(world_size), "rank": rank,
            "local_rank": local, "backend": st["receiver"].transport.backend
            if hasattr(st["receiver"].transport, "backend") else str(backend),
            "device": str(st["receiver"].device), "join_s": time.perf_counter() - t0,
            "keep_step_buffers": st["receiver"].keep_step_buffers,
        }
        logger.info("weight sync: joined group %s:%s as rank %d/%d", host, port, rank, int(world_size))
        return dict(st["info"])

    def weight_sync_describe(self, checkpoint_dir: str | None = None) -> dict:
        """What this worker serves (read once, cached): checkpoint directory,
        FP8 layout (``FP8Layout.to_dict()`` or ``None``), tensor count, local
        rank. The client uses it to pick the sender's layout and rank offsets."""
        st = self._ws_state()
        if checkpoint_dir or st.get("served") is None:
            st["served"] = self._ws_served(checkpoint_dir)
        served = st["served"]
        return {
            "checkpoint_dir": served["dir"], "layout": served["layout_full"],
            "layout_error": served["layout_error"], "num_tensors": len(served["specs"]),
            "local_rank": self._ws_local_rank(), "vllm_version": _vllm_version(),
        }

    def close_weight_receiver(self) -> bool:
        """Leave the broadcast group (idempotent). Returns whether one was open."""
        st = self._ws_state()
        rx = st.pop("receiver", None)
        if rx is None:
            return False
        with contextlib.suppress(Exception):
            rx.close()
        return True

    # ---- one step -------------------------------------------------------

    def receive_weights(self, step: int, mode: str = "auto", on_error: str = "raise",
                        stream: bool = False) -> dict:
        """Receive step ``step``, validate it, load it.

        ``stream=False`` (the default, and the safe choice): the whole step is
        received and validated before the model is touched, so a bad update is
        rejected with the model unchanged; the price is memory for the whole
        step. ``stream=True``: buckets are validated one by one and handed to
        vLLM's loader as they arrive, so the extra memory is about a layer and
        a couple of buckets instead of the step; a problem found after the
        first tensor was handed over (a bad tensor in a later bucket, a
        missing tensor, a transport error) raises :class:`WeightLoadFailed`
        (the model may be partially updated; send a complete good step). With
        ``stream=True``, ``mode="auto"`` means ``layerwise`` (``load_weights``
        on vLLM without the reload module); pass ``mode="kernel"`` for
        kernel-format streams.

        Blocks until the trainer has sent the whole step. The result carries
        stage times, bytes and the peak extra memory of the update
        (``peak_extra_bytes``, ``peak_extra_source``) next to ``model_bytes``
        and ``largest_layer_bytes``. ``on_error="return"`` returns
        ``{"ok": False, "error": ...}`` instead of raising (used by the HTTP
        client: vLLM's HTTP route does not forward exception text).
        """
        try:
            return self._ws_receive(int(step), str(mode), stream=_as_bool(stream))
        except Exception as e:
            st = self._ws_state()
            st["last_error"] = f"{type(e).__name__}: {e}"
            logger.error("weight sync: step %s failed: %s", step, st["last_error"])
            if on_error == "return":
                return {"ok": False, "step": int(step), "error": st["last_error"],
                        "error_type": type(e).__name__, "model_touched": isinstance(e, WeightLoadFailed)}
            raise

    def weight_sync_status(self) -> dict:
        """Last step, per-stage timings, bytes, mode, vLLM version, overlay status."""
        import vllm_fp8_overlay as overlay

        st = self._ws_state()
        served = st.get("served") or {}
        out = {
            "vllm_version": _vllm_version(),
            "layerwise_reload_available": _has_layerwise_reload(),
            "overlay_active": overlay.is_active(),
            "overlay": [s.as_dict() for s in overlay.status()],
            "overlay_plugin_loaded": "vllm_fp8_overlay.plugin" in sys.modules,
            "receiver": dict(st.get("info") or {}) if st.get("receiver") is not None else None,
            "served_checkpoint": served.get("dir"),
            "served_layout": served.get("layout"),
            "served_tensors": len(served.get("specs") or {}),
            "steps_loaded": st.get("steps_loaded", 0),
            "last_step": st.get("last_step"),
            "last": dict(st.get("last") or {}) or None,
            "last_error": st.get("last_error"),
        }
        return out

    def weight_sync_digest(self, per_tensor: bool = False) -> dict:
        """sha256 over every parameter and buffer of this worker's model, for
        bitwise comparisons (``{"digest": hex, "num_tensors": n, "tensors": {name: hex}}``)."""
        return _digest(self.model_runner.model, _as_bool(per_tensor))

    def weight_sync_cold_digest(self, model_dir: str, per_tensor: bool = False) -> dict:
        """Digest of the model a *cold start* on ``model_dir`` would serve.

        Builds a second model object with vLLM's own ``get_model`` (what the
        worker's ``load_model`` runs at start-up: construct, load the
        checkpoint with the configured loader, ``process_weights_after_loading``)
        from ``model_dir`` -- a checkpoint of the same architecture and format
        -- hashes it like :meth:`weight_sync_digest` and drops it. The served
        model is not touched; memory for a second copy of this worker's
        weights is needed while it runs. Used to prove warm == cold.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader import get_model

        cfg = self.vllm_config
        mc = cfg.model_config
        cc = cfg.compilation_config
        saved = {a: getattr(mc, a) for a in ("model", "model_weights", "revision") if hasattr(mc, a)}
        ctx = getattr(cc, "static_forward_context", None)
        saved_ctx = dict(ctx) if ctx is not None else None
        moe = getattr(cc, "static_all_moe_layers", None)
        saved_moe = list(moe) if isinstance(moe, list) else None
        try:
            mc.model = str(model_dir)
            if "model_weights" in saved:
                mc.model_weights = ""
            if "revision" in saved:
                mc.revision = None
            if ctx is not None:
                ctx.clear()  # the new model's layers register under the same names
            if saved_moe is not None:
                moe.clear()
            with set_current_vllm_config(cfg):
                model = get_model(vllm_config=cfg)
            out = _digest(model, _as_bool(per_tensor))
            del model
            return out
        finally:
            for a, v in saved.items():
                setattr(mc, a, v)
            if ctx is not None:
                ctx.clear()
                ctx.update(saved_ctx)
            if saved_moe is not None:
                moe.clear()
                moe.extend(saved_moe)

    # ---- internals ------------------------------------------------------

    def _ws_state(self) -> dict:
        st = self.__dict__.get("_weight_sync_state")
        if st is None:
            st = {"lock": threading.Lock()}
            self.__dict__["_weight_sync_state"] = st
        return st

    def _ws_local_rank(self) -> int:
        with contextlib.suppress(Exception):
            from vllm.distributed import parallel_state as ps

            tp = ps.get_tensor_model_parallel_world_size()
            return ps.get_pp_group().rank_in_group * tp + ps.get_tensor_model_parallel_rank()
        return int(getattr(self, "rank", 0) or 0)

    def _ws_served(self, checkpoint_dir: str | None) -> dict:
        from ..formats import detect_layout

        d = Path(checkpoint_dir) if checkpoint_dir else _resolve_model_dir(self.model_config)
        if d is None or not d.is_dir():
            raise WeightSyncError(
                f"cannot find the served checkpoint of {getattr(self.model_config, 'model', '?')!r} "
                "locally; pass checkpoint_dir= to init_weight_receiver so updates can be validated")
        specs = read_checkpoint_specs(d)
        layout_err = None
        try:
            layout = detect_layout(str(d))
        except Exception as e:  # a quantization the sync cannot write
            layout, layout_err = None, f"{type(e).__name__}: {e}"
        return {"dir": str(d), "specs": specs, "layout": _layout_key(layout),
                "layout_full": None if layout is None else layout.to_dict(), "layout_error": layout_err}

    def _ws_param_specs(self) -> dict[str, TensorSpec]:
        model = self.model_runner.model
        return {n: (_dtype_name(p.dtype), tuple(p.shape)) for n, p in model.named_parameters()}

    def _ws_resolve_mode(self, mode: str, names: set[str] | None) -> str:
        """``auto`` -> a concrete mode (``names`` = the whole update's names, or
        ``None`` for a stream, whose names are not known in advance)."""
        if mode not in MODES:
            raise _Reject(f"unknown load mode {mode!r}; one of {MODES}")
        if mode != "auto":
            return mode
        served = self._ws_state()["served"]
        if names is not None and names and names == set(self._ws_param_specs()) and names != set(served["specs"]):
            return "kernel"
        return "layerwise" if _has_layerwise_reload() else "load_weights"

    def _ws_mode_problems(self, mode: str, layout: Any) -> tuple[dict[str, TensorSpec], str, list[str]]:
        """What updates in ``mode`` are checked against (specs, their
        description) and the problems of ``mode`` + ``layout`` themselves."""
        served = self._ws_state()["served"]
        if mode == "kernel":
            problems = []
            if layout is not None:
                problems.append("kernel-format updates must be sent without a layout (layout=None)")
            return self._ws_param_specs(), "the model's parameters", problems
        problems = []
        if mode == "layerwise" and not _has_layerwise_reload():
            problems.append(f"vLLM {_vllm_version()} has no layerwise reload (needs >= 0.16); use mode='load_weights'")
        if served.get("layout_error"):
            problems.append(f"the served model's quantization cannot be updated in checkpoint format: "
                            f"{served['layout_error']}")
        want = served["layout"]
        got = _layout_key(layout)
        if got != want:
            problems.append(f"scheme mismatch: update layout {got} but the served model expects {want}")
        if mode == "load_weights" and want is not None:
            problems.append("mode 'load_weights' would re-process already processed FP8 parameters; "
                            "use 'layerwise' (vLLM >= 0.16) or 'kernel'")
        return served["specs"], "the served checkpoint", problems

    def _ws_pick_mode(self, mode: str, tensors: list[tuple[str, torch.Tensor]], layout: Any) -> tuple[str, list[str]]:
        mode = self._ws_resolve_mode(mode, {n for n, _ in tensors})
        expected, what, problems = self._ws_mode_problems(mode, layout)
        return mode, problems + validate_update(tensors, expected, what=what)

    def _ws_device(self) -> torch.device:
        try:
            return next(self.model_runner.model.parameters()).device
        except Exception:
            return torch.device("cpu")

    def _ws_sizes(self) -> dict:
        st = self._ws_state()
        if st.get("sizes") is None:  # parameter storage does not change across updates
            st["sizes"] = _model_sizes(self.model_runner.model)
        return dict(st["sizes"])

    def _ws_receive(self, step: int, mode: str, stream: bool = False) -> dict:
        st = self._ws_state()
        rx = st.get("receiver")
        if rx is None:
            raise WeightSyncError("no weight receiver: call init_weight_receiver first")
        with st["lock"]:
            sizes = self._ws_sizes()
            peak = _PeakMemory(self._ws_device())
            if stream:
                result = self._ws_receive_stream(rx, step, mode)
            else:
                result = self._ws_receive_whole(rx, step, mode)
            result.update(peak.finish())
            result.update(sizes)
            st["last"] = dict(result)
            st["last_step"] = step
            st["steps_loaded"] = st.get("steps_loaded", 0) + 1
            st["last_error"] = None
            return result

    def _ws_receive_whole(self, rx: Any, step: int, mode: str) -> dict:
        t0 = time.perf_counter()
        got = rx.receive_all(expected_step=step)  # raises before the model is touched
        t1 = time.perf_counter()
        tensors = got.tensors
        n = len(tensors)
        nbytes = int(got.summary.num_bytes)
        nbuckets = len(got.manifests)
        max_bucket = max((int(m.payload_len) for m in got.manifests), default=0)
        try:
            used, problems = self._ws_pick_mode(mode, tensors, got.layout)
        except _Reject as e:
            used, problems = mode, [str(e)]
        t2 = time.perf_counter()
        if problems:
            raise WeightUpdateRejected(
                f"step {step} rejected, model unchanged ({n} tensors received): " + " | ".join(problems))
        try:
            self._ws_load(used, tensors)
        except Exception as e:
            raise _load_failed(step, used, e, "after validation") from e
        finally:
            del got, tensors
        t3 = time.perf_counter()
        return {
            "ok": True, "step": step, "mode": used, "stream": False, "num_tensors": n, "num_bytes": nbytes,
            "num_buckets": nbuckets, "max_bucket_bytes": max_bucket,
            "receive_s": t1 - t0, "validate_s": t2 - t1, "load_s": t3 - t2, "total_s": t3 - t0,
        }

    def _ws_receive_stream(self, rx: Any, step: int, mode: str) -> dict:
        """``stream=True``: validate each bucket, then hand its tensors to the
        loader; never hold the whole step.

        vLLM's layerwise reload keeps *references* to the tensors it is given
        (``info.loaded_weights``) until the last weight of their layer arrived,
        and a layer may straddle buckets. So every bucket is received into its
        own buffer (the receiver's ``fresh`` mode, as ``receive_all`` uses;
        ``iter_buckets`` reuses one buffer and would overwrite buffered
        weights) and nothing here keeps a bucket once its tensors were handed
        over: a buffer is freed when vLLM drops the last view into it.
        """
        t0 = time.perf_counter()
        timer = {"receive": 0.0, "validate": 0.0}
        stats = {"handed": 0, "tensors": 0, "bytes": 0, "buckets": 0, "max_bucket": 0, "end": None}
        layer_buckets: dict[str, set[int]] = {}  # decoder layer -> buckets that carried its tensors
        gen = rx._iter(step, fresh=True)  # a fresh buffer per bucket, see the docstring

        def next_bucket() -> Any:
            t = time.perf_counter()
            try:
                return next(gen)
            except StopIteration as stop:
                stats["end"] = stop.value
                return None
            finally:
                timer["receive"] += time.perf_counter() - t

        # 1. the first bucket decides mode and layout; nothing is touched yet
        try:
            first = next_bucket()
            while first is not None and not first.tensors:  # an empty bucket validates nothing
                stats["buckets"] += 1
                first = next_bucket()
        except BaseException:
            gen.close()
            raise
        try:
            used = self._ws_resolve_mode(mode, None)
            tv = time.perf_counter()
            expected, what, problems = self._ws_mode_problems(used, first.manifest.layout if first else None)
            if first is None:
                problems += ["empty step"] + validate_update([], expected, what=what)
            else:
                problems += _spec_problems(first.tensors, expected, what=what, check_missing=False)
            timer["validate"] += time.perf_counter() - tv
        except _Reject as e:
            used, problems = mode, [str(e)]
        if problems:
            gen.close()  # the receiver drains the rest of the step: the group stays in sync
            where = f"bucket {first.index} ({len(first.tensors)} tensors)" if first is not None else "no tensors"
            raise WeightUpdateRejected(f"step {step} rejected, model unchanged ({where}; stream): "
                                       + " | ".join(problems))
        want_layout = first.manifest.layout
        seen: set[str] = set()
        pending = [first]
        del first  # only `pending` may hold the bucket, and only until it is handed over

        # 2. the loader pulls tensors; each bucket is validated before any of
        #    its tensors is yielded
        def tensors() -> Any:
            while pending:
                bucket = pending.pop()
                if stats["handed"]:  # the first bucket was checked above
                    tv = time.perf_counter()
                    if bucket.manifest.layout != want_layout:
                        raise _StreamProblem(f"bucket {bucket.index}: layout {_layout_key(bucket.manifest.layout)} "
                                             f"differs from the step's {_layout_key(want_layout)}")
                    bad = _spec_problems(bucket.tensors, expected, what=what, check_missing=False)
                    if bad:
                        raise _StreamProblem(f"bucket {bucket.index}: " + " | ".join(bad))
                    timer["validate"] += time.perf_counter() - tv
                stats["buckets"] += 1
                stats["max_bucket"] = max(stats["max_bucket"], int(bucket.manifest.payload_len))
                items, index = bucket.tensors, bucket.index
                bucket = None
                for name, t in items:
                    seen.add(name)
                    m = _LAYER_RE.search(name)
                    if m:
                        layer_buckets.setdefault(m.group(0), set()).add(index)
                    stats["handed"] += 1
                    stats["tensors"] += 1
                    stats["bytes"] += t.numel() * t.element_size()
                    yield name, t
                items = name = t = None  # no reference into this bucket while the next one arrives
                nxt = next_bucket()
                if nxt is not None:
                    pending.append(nxt)
                nxt = None

        def finished() -> None:
            """End of step: the loader consumed everything and nothing is missing."""
            if stats["end"] is None:
                raise _StreamProblem("the loader stopped before the end of the step")
            missing = sorted(set(expected) - seen)
            if missing:
                raise _StreamProblem(f"{len(missing)} missing tensor(s) (in {what}, not in the update): "
                                     + _listing(missing, 20))

        tgen = tensors()
        try:
            self._ws_load(used, tgen, before_finalize=finished)
        except Exception as e:
            with contextlib.suppress(Exception):
                tgen.close()
            gen.close()  # drain the rest of the step
            raise _load_failed(step, used, e, f"while streaming (after {stats['handed']} tensor(s) were "
                                              "handed to the loader)") from e
        finally:
            pending.clear()
        t1 = time.perf_counter()
        total = t1 - t0
        return {
            "ok": True, "step": step, "mode": used, "stream": True, "num_tensors": stats["tensors"],
            "num_bytes": int(stats["end"].num_bytes), "num_buckets": stats["buckets"], "max_bucket_bytes": stats["max_bucket"],
            "straddling_layers": sum(len(b) > 1 for b in layer_buckets.values()),
            "receive_s": timer["receive"], "validate_s": timer["validate"],
            "load_s": max(0.0, total - timer["receive"] - timer["validate"]), "total_s": total,
        }

    def _ws_load(self, mode: str, tensors: Any, before_finalize: Any = None) -> None:
        """Load ``tensors`` (a list, or an iterator the loader pulls lazily) in
        ``mode``. ``before_finalize()`` runs after the last tensor was loaded
        and before the layerwise reload is finalized / weights are processed;
        if it or the loader raises during a layerwise reload, the reload is
        wound down (see :func:`_abandon_layerwise_reload`) and the error
        re-raised."""
        model = self.model_runner.model
        cfg = getattr(self, "vllm_config", None)
        ctx: Any = contextlib.nullcontext()
        if cfg is not None:
            from vllm.config import set_current_vllm_config

            ctx = set_current_vllm_config(cfg)
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        with ctx, torch.no_grad():
            if mode == "kernel":
                params = dict(model.named_parameters())
                for name, t in tensors:
                    params[name].data.copy_(t)
                if before_finalize is not None:
                    before_finalize()
            elif mode == "layerwise":
                from vllm.model_executor.model_loader.reload import (
                    finalize_layerwise_reload,
                    initialize_layerwise_reload,
                )

                with torch.device(device):
                    initialize_layerwise_reload(model)
                    try:
                        model.load_weights(iter(tensors))
                        if before_finalize is not None:
                            before_finalize()
                    except BaseException:
                        _abandon_layerwise_reload(model, self.model_config)
                        raise
                    finalize_layerwise_reload(model, self.model_config)
            elif mode == "load_weights":
                from vllm.model_executor.model_loader.utils import process_weights_after_loading

                with torch.device(device):
                    model.load_weights(iter(tensors))
                    if before_finalize is not None:
                        before_finalize()
                    process_weights_after_loading(model, self.model_config, device)
            else:  # pragma: no cover - validated before
                raise ValueError(mode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for hook in ("reset_mm_cache", "reset_encoder_cache"):
            fn = getattr(self.model_runner, hook, None)
            if callable(fn):
                with contextlib.suppress(Exception):
                    fn()


def _load_failed(step: int, mode: str, e: BaseException, when: str) -> WeightLoadFailed:
    tb = traceback.format_exc(limit=6)
    return WeightLoadFailed(
        f"step {step}: loading failed {when} in mode {mode!r}; THE MODEL MAY BE PARTIALLY UPDATED "
        f"(resend a complete step or restart): {type(e).__name__}: {e}\n{tb}")


def _abandon_layerwise_reload(model: torch.nn.Module, model_config: Any) -> None:
    """Wind down a layerwise reload that stopped half-way.

    Layers whose every weight arrived were already processed and hold the new
    values. A layer that got only some of its weights would be processed by
    ``finalize_layerwise_reload`` with uninitialized memory for the rest, so
    its buffered weights are dropped first; finalize then puts the layer's
    previous tensors back (as for every layer that got nothing) and resets
    the reload state, so the next step starts clean. Best effort: errors are
    logged, the caller raises the original one."""
    try:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.reload import layerwise as lw

        infos = getattr(lw, "LAYERWISE_INFO", {})
        for m in model.modules():
            info = infos.get(m)
            if info is None or not info.can_load():
                continue
            if 0 < info.load_numel < (info.load_numel_total or 0):
                info.loaded_weights.clear()
                info.load_numel = 0
        finalize_layerwise_reload(model, model_config)
    except Exception:
        logger.exception("weight sync: could not wind down the interrupted layerwise reload")


class _Reject(Exception):
    pass
