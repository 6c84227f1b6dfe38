"""What the trainer holds, turned into the (name, tensor) stream the sender sends.

A trainer sharded with FSDP2 holds every parameter as a ``DTensor`` split
by rows (``Shard(0)``) over a device mesh; no rank has the model whole, and
a 30B model in BF16 does not fit on one GPU beside its training state.
:func:`sharded_stream` walks such a state dict one tensor at a time, on
every trainer rank in the same order (gathers are collectives):

* a weight the served layout quantizes per **channel** (a scale per output
  row) is quantized by each rank on its own rows -- the scales of a row
  depend on that row only, so the result is bitwise what quantizing the full
  tensor gives -- and only the FP8 bytes and scales are gathered: half the
  gather traffic, and no full BF16 copy anywhere;
* the same for **block** scales when every rank's rows are whole 128-row
  blocks (the shard boundaries fall on block rows);
* anything else (per-tensor scales, which fused shards share; unquantized
  tensors; uneven block shards) is gathered in its own dtype and quantized
  by the sender, as for a plain state dict.

Memory: each rank holds, besides its shards, one gathered tensor at a time
(FP8 + scale, or the tensor in its dtype), and rank 0 the sender's buckets
(two of ``bucket_bytes``). :func:`push_sharded` is the call every trainer
rank makes; rank 0's sends, the others only take part in the gathers.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import torch

__all__ = ["Prequantized", "sharded_stream", "push_sharded", "StreamStats"]


class Prequantized(NamedTuple):
    """A weight already quantized into the served layout (FP8 and its scale);
    the sender sends both as they are."""

    weight: torch.Tensor
    scale: torch.Tensor


class StreamStats:
    """What one rank materialized while streaming a step (for the memory bound)."""

    def __init__(self) -> None:
        self.local_quantized = 0  # weights quantized on this rank's rows, gathered as FP8
        self.gathered = 0  # tensors gathered in their own dtype
        self.max_gathered_bytes = 0  # largest tensor this rank held whole

    def _seen(self, nbytes: int) -> None:
        self.max_gathered_bytes = max(self.max_gathered_bytes, int(nbytes))


def _is_row_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return False
    pl = t.placements
    return len(pl) == 1 and isinstance(pl[0], Shard) and pl[0].dim == 0


def _local_rows_ok(t: Any, multiple: int) -> bool:
    """Every rank's share of rows is a whole number of ``multiple`` rows
    (FSDP2 gives each rank ceil(rows / world) rows, the last the rest)."""
    world = t.device_mesh.size()
    rows = t.shape[0]
    per = -(-rows // world)
    return per % multiple == 0 and rows % multiple == 0


def _gather_rows(local: torch.Tensor, like: Any, rows: int) -> torch.Tensor:
    """All ranks' row blocks of ``local`` (sharded like ``like``), whole."""
    from torch.distributed.tensor import DTensor

    fp8 = local.dtype == torch.float8_e4m3fn
    x = local.view(torch.uint8) if fp8 else local  # gloo has no float8 reductions or copies
    shape = (rows, *x.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    full = DTensor.from_local(x.contiguous(), like.device_mesh, like.placements, shape=shape, stride=stride).full_tensor()
    return full.view(torch.float8_e4m3fn) if fp8 else full


def sharded_stream(weights: Mapping[str, Any] | Iterable[tuple[str, Any]], layout: Any, *,
                   stats: StreamStats | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor | Prequantized)`` for every entry of ``weights``, lazily.

    Run it on every rank of the trainer's mesh, in the same order (it gathers
    as it goes). ``layout``: the served ``FP8Layout`` (or ``None`` for BF16).
    Plain tensors pass through (a rank holding them whole sends them as
    they are)."""
    from ..formats import FP8Layout, quantize_tensor
    from ..formats.quantize import expand_fused_experts

    if isinstance(layout, Mapping):
        layout = FP8Layout.from_dict(layout)
    stats = stats if stats is not None else StreamStats()
    items = weights.items() if isinstance(weights, Mapping) else weights
    for name, t in items:
        if not hasattr(t, "full_tensor"):
            yield name, t
            continue
        local_ok = (layout is not None and _is_row_sharded(t) and t.ndim == 2
                    and expand_fused_experts(name, t, layout.hidden_size) is None
                    and layout.quantizes(name, t.shape) and t.dtype.is_floating_point)
        if local_ok and layout.strategy == "channel":
            pass
        elif local_ok and layout.strategy == "block":
            local_ok = _local_rows_ok(t, int(layout.block_size[0])) and t.shape[1] % int(layout.block_size[1]) == 0
        else:
            local_ok = False
        if not local_ok:
            full = t.full_tensor()
            stats.gathered += 1
            stats._seen(full.numel() * full.element_size())
            yield name, full
            del full
            continue
        local = t.to_local()
        q, s = quantize_tensor(local.detach(), layout, name=name)
        rows = t.shape[0]
        srows = rows if layout.strategy == "channel" else -(-rows // int(layout.block_size[0]))
        wq = _gather_rows(q, t, rows)
        ws = _gather_rows(s, t, srows)
        stats.local_quantized += 1
        stats._seen(wq.numel() + ws.numel() * ws.element_size())
        yield name, Prequantized(wq, ws)
        del wq, ws


def push_sharded(client: Any, weights: Mapping[str, Any] | Iterable[tuple[str, Any]], step: int, *,
                 layout: Any = "client", group: Any = None, stats: StreamStats | None = None, **push_kw: Any):
    """The call every trainer rank makes each step with its sharded state dict.

    Rank 0 passes its :class:`~.client.WeightSyncClient` (and gets the step
    report back); the other ranks pass ``None`` and only take part in the
    gathers. ``layout="client"``: rank 0's client layout, broadcast to the
    others over ``group`` (the trainer's own, trusted ranks)."""
    import torch.distributed as dist

    if layout == "client":
        box = [None if client is None else (client.layout.to_dict() if client.layout is not None else None)]
        dist.broadcast_object_list(box, src=0, group=group)
        layout = box[0]
    stream = sharded_stream(weights, layout, stats=stats)
    if client is None:
        for _ in stream:
            pass
        return None
    return client.push(stream, step, **push_kw)
