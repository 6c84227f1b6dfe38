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


def validate_update(
    tensors: list[tuple[str, torch.Tensor]],
    expected: dict[str, TensorSpec],
    *,
    what: str = "the served checkpoint",
    max_report: int = 20,
) -> list[str]:
    """Problems (empty = valid): names must equal ``expected``'s exactly, each
    dtype and shape too."""
    problems: list[str] = []
    got = {n: (_dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors}
    unknown = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))

    def listing(names: list[str]) -> str:
        s = ", ".join(names[:max_report])
        return s + (f", ... ({len(names) - max_report} more)" if len(names) > max_report else "")

    if unknown:
        problems.append(f"{len(unknown)} unknown tensor(s) (not in {what}): {listing(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (in {what}, not in the update): {listing(missing)}")
    bad = []
    for n in sorted(set(got) & set(expected)):
        if got[n] != expected[n]:
            bad.append(f"{n}: got {got[n][0]}{list(got[n][1])}, expected {expected[n][0]}{list(expected[n][1])}")
    if bad:
        problems.append(f"{len(bad)} dtype/shape mismatch(es): " + "; ".join(bad[:max_report])
                        + (f"; ... ({len(bad) - max_report} more)" if len(bad) > max_report else ""))
    return problems


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
    ) -> dict:
        """Join the trainer's broadcast group as rank ``rank_offset + local rank``.

        Blocks until every rank joined: trigger it without waiting, then build
        the ``WeightSender``. Reads what the served model was loaded from
        (safetensors headers and quantization config of ``checkpoint_dir``,
        default: the served model's directory). Returns this worker's info.
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
                                        device=device, timeout=float(timeout))
        st["info"] = {
            "host": str(host), "port": int(port), "world_size": int(world_size), "rank": rank,
            "local_rank": local, "backend": st["receiver"].transport.backend
            if hasattr(st["receiver"].transport, "backend") else str(backend),
            "device": str(st["receiver"].device), "join_s": time.perf_counter() - t0,
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

    def receive_weights(self, step: int, mode: str = "auto", on_error: str = "raise") -> dict:
        """Receive step ``step`` completely, validate it, then load it.

        Blocks until the trainer has sent the whole step. ``on_error="return"``
        returns ``{"ok": False, "error": ...}`` instead of raising (used by the
        HTTP client: vLLM's HTTP route does not forward exception text).
        """
        try:
            return self._ws_receive(int(step), str(mode))
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

    def _ws_pick_mode(self, mode: str, tensors: list[tuple[str, torch.Tensor]], layout: Any) -> tuple[str, list[str]]:
        served = self._ws_state()["served"]
        if mode not in MODES:
            raise _Reject(f"unknown load mode {mode!r}; one of {MODES}")
        names = {n for n, _ in tensors}
        if mode == "auto":
            if names and names == set(self._ws_param_specs()) and names != set(served["specs"]):
                mode = "kernel"
            elif _has_layerwise_reload():
                mode = "layerwise"
            else:
                mode = "load_weights"
        if mode == "kernel":
            problems = validate_update(tensors, self._ws_param_specs(), what="the model's parameters")
            if layout is not None:
                problems.append("kernel-format updates must be sent without a layout (layout=None)")
            return mode, problems
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
        problems += validate_update(tensors, served["specs"])
        return mode, problems

    def _ws_receive(self, step: int, mode: str) -> dict:
        st = self._ws_state()
        rx = st.get("receiver")
        if rx is None:
            raise WeightSyncError("no weight receiver: call init_weight_receiver first")
        with st["lock"]:
            t0 = time.perf_counter()
            got = rx.receive_all(expected_step=step)  # raises before the model is touched
            t1 = time.perf_counter()
            tensors = got.tensors
            n = len(tensors)
            nbytes = int(got.summary.num_bytes)
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
                tb = traceback.format_exc(limit=6)
                raise WeightLoadFailed(
                    f"step {step}: loading failed after validation in mode {used!r}; THE MODEL MAY BE "
                    f"PARTIALLY UPDATED (resend a complete step or restart): {type(e).__name__}: {e}\n{tb}"
                ) from e
            finally:
                del got, tensors
            t3 = time.perf_counter()
            result = {
                "ok": True, "step": step, "mode": used, "num_tensors": n, "num_bytes": nbytes,
                "receive_s": t1 - t0, "validate_s": t2 - t1, "load_s": t3 - t2, "total_s": t3 - t0,
            }
            st["last"] = dict(result)
            st["last_step"] = step
            st["steps_loaded"] = st.get("steps_loaded", 0) + 1
            st["last_error"] = None
            return result

    def _ws_load(self, mode: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
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
            elif mode == "layerwise":
                from vllm.model_executor.model_loader.reload import (
                    finalize_layerwise_reload,
                    initialize_layerwise_reload,
                )

                with torch.device(device):
                    initialize_layerwise_reload(model)
                    model.load_weights(iter(tensors))
                    finalize_layerwise_reload(model, self.model_config)
            elif mode == "load_weights":
                from vllm.model_executor.model_loader.utils import process_weights_after_loading

                with torch.device(device):
                    model.load_weights(iter(tensors))
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


class _Reject(Exception):
    pass
