"""Trainer-side helpers of the ``fp8`` backend that need no vLLM.

Used by :mod:`.trainer` (vLLM >= 0.28's trainer factory) and directly by
trainers on vLLM 0.22-0.24, whose ``vllm`` has no trainer-side base classes.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any, Iterator

import torch

from ..sender import WeightSender

__all__ = ["served_layout", "open_sender", "materialized"]


def served_layout(layout: Any, served_model: str | None, client: Any = None) -> Any:
    """Resolve ``layout="auto"`` to the served checkpoint's layout."""
    if layout != "auto":
        return layout
    from ...formats import detect_layout

    model = served_model or _model_of(client)
    if model is None:
        raise ValueError("fp8 weight transfer: layout='auto' needs the served model: pass served_model= "
                         "(its local directory) or layout=")
    return detect_layout(model)


def open_sender(layout: Any, master_address: str, master_port: int, world_size: int, *,
                transport: str = "auto", bucket_bytes: int | None = None, timeout: float = 300.0,
                group_id: str | None = None, device: Any = None) -> WeightSender:
    """The trainer's end of the group (rank 0); blocks until the workers join."""
    return WeightSender(layout, master_address, int(master_port), int(world_size), backend=transport,
                        bucket_bytes=bucket_bytes, device=device, timeout=timeout, group_id=group_id)


def materialized(source: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``source``'s ``(name, full tensor)`` pairs, for every vLLM release's
    ``WeightSource``: up to 0.32 a source is iterated itself; from 0.33 it
    is not iterable and yields full tensors from ``iter_full()`` (and this
    rank's pieces from ``iter_local()``, which the FP8 sender cannot use: it
    quantizes whole tensors). A sharded tensor left in the pairs is gathered
    (``full_tensor()``: a collective every owning rank joins in order)."""
    implements = getattr(source, "implements_iter_full", None)
    if callable(implements):  # vLLM >= 0.33
        if not implements():
            raise TypeError(f"fp8 weight transfer needs full tensors: {type(source).__name__} does not implement "
                            "iter_full() (a source of local pieces only, for NCCL M2N, cannot feed it)")
        items = source.iter_full()
    else:
        items = iter(source)
    for name, tensor in items:
        full = getattr(tensor, "full_tensor", None)
        yield name, (full() if callable(full) else tensor)


def _model_of(client: Any) -> str | None:
    """The served model's path as the client can tell it."""
    if client is None:
        return None
    model = getattr(client, "served_model", None)
    if isinstance(model, str):
        return model
    base = getattr(client, "base_url", None)
    if isinstance(base, str):  # vLLM's HTTPVLLMWeightSyncClient
        with urllib.request.urlopen(base.rstrip("/") + "/v1/models", timeout=30) as r:
            data = json.loads(r.read()).get("data") or [{}]
        return data[0].get("root") or data[0].get("id")
    return None

