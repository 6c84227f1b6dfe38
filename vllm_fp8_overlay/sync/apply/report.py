"""Measurements a weight update reports: digests and memory.

``weight_sync_digest`` hashes every parameter and buffer so that two engines
(or an engine and a cold start) can be compared bitwise; the memory figures
(``peak_extra_bytes`` next to ``model_bytes`` and ``largest_layer_bytes``)
say what an update costs on top of the served model.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch

from .validate import dtype_name

__all__ = ["digest", "PeakMemory", "model_sizes"]


def digest(model: torch.nn.Module, per_tensor: bool) -> dict:
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
        total.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}|{h}\n".encode())
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


class PeakMemory:
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


def model_sizes(model: torch.nn.Module) -> dict:
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
