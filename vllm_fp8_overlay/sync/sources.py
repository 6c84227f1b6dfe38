"""What the trainer holds, turned into the (name, tensor) stream the sender sends.

A trainer sharded with FSDP2 holds every parameter as a ``DTensor`` split
by rows (``Shard(0)``) over a device mesh; no rank has the model whole, and
a 30B model in BF16 does not fit on one GPU beside its training state.
:func:`sharded_stream` walks such a state dict in order, on every
trainer rank in the same order (gathers are collectives):

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

Gathers go in windows (``window_bytes`` of full tensors, 256 MiB by
default): one collective per window, not one or two per tensor. On CUDA
with Triton, the shards a window quantizes are quantized together by the
grouped kernels straight into the window's gather buffer (a few launches
and one finiteness flag per window, which every rank sees after the
gather), instead of one quantization and one host sync per weight. Memory:
a rank that receives the windows holds, besides its shards, one window of
full tensors (twice that while a window is cut out of the gathered buffer;
a tensor larger than the window alone), and each sending rank the sender's
buckets (two of ``bucket_bytes``). :func:`.sharded_push.push_sharded` is
the call every trainer rank makes with it. With one sending rank
(``dst``), the windows are gathered into it alone: the other ranks hold no
window of full tensors, and the trainer's links carry each shard once.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import torch

__all__ = ["Prequantized", "sharded_stream", "StreamStats", "WINDOW_BYTES"]


class Prequantized(NamedTuple):
    """A weight already quantized into the served layout (FP8 and its scale);
    the sender sends both as they are."""

    weight: torch.Tensor
    scale: torch.Tensor


#: default gather window: bytes of gathered (full) tensors one collective brings
WINDOW_BYTES = 256 << 20
#: every part of a window starts on this boundary (the grouped kernels' fast path)
_ALIGN = 16
#: bytes at the head of each rank's window: its "all shards finite" flag
_HEAD = _ALIGN


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class StreamStats:
    """What one rank materialized while streaming a step (for the memory bound)."""

    def __init__(self) -> None:
        self.local_quantized = 0  # weights quantized on this rank's rows, gathered as FP8
        self.gathered = 0  # tensors gathered in their own dtype
        self.collectives = 0  # gathers issued (one per window)
        self.max_gathered_bytes = 0  # largest window (or lone tensor) this rank held whole

    def _seen(self, nbytes: int) -> None:
        self.max_gathered_bytes = max(self.max_gathered_bytes, int(nbytes))


def _is_row_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return False
    pl = t.placements
    return len(pl) == 1 and isinstance(pl[0], Shard) and pl[0].dim == 0 and t.ndim >= 1


def _rows_per_rank(rows: int, world: int) -> list[int]:
    """Rows each rank holds under ``Shard(0)`` (``torch.chunk``: ceil(rows / world)
    each, the last ranks the rest, possibly none)."""
    per = -(-rows // world)
    return [max(0, min(per, rows - r * per)) for r in range(world)]


class _Part:
    """One tensor to gather by rows: this rank's rows (``None``: written into
    the buffer by the window's grouped quantization), every rank's row count,
    and the bytes every rank reserves for it (sized once: a MoE step has
    thousands of parts)."""

    __slots__ = ("local", "rows", "rest", "dtype", "row_bytes", "slot")

    def __init__(self, local: torch.Tensor | None, rows: list[int], rest: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        self.local, self.rows, self.rest, self.dtype = local, rows, rest, dtype
        n = dtype.itemsize
        for d in rest:
            n *= d
        self.row_bytes = n
        self.slot = _aligned(max(rows) * n)


class _Window:
    """Tensors gathered together: one ``all_gather`` of a byte buffer per
    window instead of one or two collectives per tensor (a 10B MoE has
    6256 weights; per-tensor gathers made a sharded step 270x slower than an
    unsharded one). Every rank packs its rows of each part at the part's
    offset (slots sized for the largest share), gathers, and cuts each
    part's full tensor out of the ranks' slots.

    Entries: ``raw`` (gathered in their own dtype), ``q`` (quantized here
    already: FP8 and scale parts) and ``g`` (a BF16 shard the window
    quantizes itself, with every other ``g`` entry, by the grouped kernels,
    into its FP8 and scale slots)."""

    def __init__(self, group: Any, device: torch.device, layout: Any = None, dst: int | None = None) -> None:
        self.group, self.device, self.layout, self.dst = group, device, layout, dst
        self.entries: list[tuple[str, str, list[_Part], torch.Tensor | None]] = []
        self.nbytes = _HEAD

    def add(self, name: str, kind: str, parts: list[_Part], source: torch.Tensor | None = None) -> None:
        self.entries.append((name, kind, parts, source))
        self.nbytes += sum(p.slot for p in parts)

    def _quantize_into(self, buf: torch.Tensor, me: int) -> torch.Tensor | None:
        """Grouped quantization of this rank's ``g`` shards into ``buf``; the
        returned flag (on the device) is 1 iff every one was finite."""
        from ..formats.quantize import _recipe
        from ..kernels.triton_fp8 import quantize_grouped

        jobs: dict[torch.dtype, tuple[list, list, list]] = {}
        off = _HEAD
        for _, kind, parts, src in self.entries:
            if kind == "g" and parts[0].rows[me]:
                srcs, qo, so = jobs.setdefault(src.dtype, ([], [], []))
                srcs.append(src)
                qo.append(off)
                so.append(off + parts[0].slot)
            off += sum(p.slot for p in parts)
        if not jobs:
            return None
        lay = self.layout
        recipe = _recipe(lay)
        flags = []
        for srcs, qo, so in jobs.values():
            _, _, am = quantize_grouped(srcs, recipe, lay.strategy, lay.block_size, out=buf, q_offsets=qo,
                                        s_offsets=so, amax="any", views=False)
            flags.append(torch.isfinite(am).all().reshape(1))
        return torch.cat(flags).all() if len(flags) > 1 else flags[0][0]

    def _nonfinite(self, flags: torch.Tensor, me: int) -> None:
        """Every rank raises the same error when any rank's shards were not
        finite (a rank that raised alone would leave the others in the next
        gather). ``flags``: every rank's "all finite" byte."""
        bad = [r for r, flag in enumerate(flags.tolist()) if not flag]
        if not bad:
            return
        mine = [name for name, kind, parts, src in self.entries
                if kind == "g" and me in bad and parts[0].rows[me] and not bool(torch.isfinite(src).all())]
        names = [name for name, kind, _, _ in self.entries if kind == "g"]
        raise ValueError(f"trainer rank(s) {bad} hold non-finite values in weights to quantize "
                         f"({', '.join(mine) or f'one of {names[0]} .. {names[-1]}'}); refusing to quantize")

    def gather(self, stats: StreamStats) -> list[tuple[str, Any]]:
        """The window's full tensors. With :attr:`dst` (a global rank in this
        window's group) only that rank receives them (one ``gather``; the
        others hold none and get ``[]``), else every rank does
        (``all_gather``). Either way every rank learns every rank's
        finiteness flag first."""
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        me = dist.get_rank(self.group)
        buf = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        ok = self._quantize_into(buf, me)
        if ok is not None:
            buf[0].copy_(ok)
        else:
            buf[0] = 1
        off = _HEAD
        for _, _, parts, _ in self.entries:
            for p in parts:
                n = p.rows[me] * p.row_bytes
                if n and p.local is not None:
                    buf[off:off + n].copy_(p.local.contiguous().view(-1).view(torch.uint8))
                off += p.slot
        stats.collectives += 1
        if self.dst is None:
            out = _all_gather(buf, world, self.group)
            self._nonfinite(out.view(world, self.nbytes)[:, 0], me)
        else:
            self._nonfinite(_all_gather(buf[:_HEAD], world, self.group).view(world, _HEAD)[:, 0], me)
            mine = dist.get_global_rank(self.group, me) == self.dst
            out = torch.empty(world * self.nbytes, dtype=torch.uint8, device=self.device) if mine else None
            dist.gather(buf, list(out.chunk(world)) if mine else None, dst=self.dst, group=self.group)
        del buf
        done = []
        if out is not None:
            stats._seen(out.numel())
            done = self._cut(out.view(world, self.nbytes), world)
        del out  # the cut tensors are copies: only they stay while the sender takes them
        self.entries, self.nbytes = [], _HEAD
        return done

    def _cut(self, ranks: torch.Tensor, world: int) -> list[tuple[str, Any]]:
        """Every part's full tensor, out of the ranks' slots: the window's
        pieces are split out with one ``split_with_sizes`` per rank and copied by
        one multi-tensor copy into one buffer, where each part's ranks lie
        back to back (a 10B MoE window holds thousands of parts; per-part
        slicing in Python was most of a sharded step's host time)."""
        parts = [p for _, _, ps, _ in self.entries for p in ps]
        per_rank = [[p.rows[r] * p.row_bytes for p in parts] for r in range(world)]
        totals = [sum(col) for col in zip(*per_rank)]
        pads = [_aligned(t) - t for t in totals]
        full = torch.empty(max(sum(totals) + sum(pads), 1), dtype=torch.uint8, device=ranks.device)
        # destinations: per part, rank 0's rows, rank 1's rows, ..., then its padding
        dst_sizes = [x for i in range(len(parts)) for x in (*(per_rank[r][i] for r in range(world)), pads[i])]
        dst_all = full.split_with_sizes(dst_sizes)
        dsts = [d for k, d in enumerate(dst_all) if k % (world + 1) != world]
        # sources: per rank, its slot of each part (used bytes, then the slot's rest)
        srcs_by_rank = []
        for r in range(world):
            sizes = [_HEAD] + [x for i, p in enumerate(parts) for x in (per_rank[r][i], p.slot - per_rank[r][i])]
            sizes.append(ranks.shape[1] - sum(sizes))
            srcs_by_rank.append(ranks[r].split_with_sizes(sizes)[1:-1:2])
        srcs = [x for piece in zip(*srcs_by_rank) for x in piece]
        pairs = [(d, s_) for d, s_ in zip(dsts, srcs) if d.numel()]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s_ for _, s_ in pairs])
        regions = full.split_with_sizes([x for t, pad in zip(totals, pads) for x in (t, pad)])[0::2]
        done: list[tuple[str, Any]] = []
        i = 0
        for name, kind, ps, _ in self.entries:
            got = [regions[i + k].view(p.dtype).view(sum(p.rows), *p.rest) for k, p in enumerate(ps)]
            i += len(ps)
            done.append((name, got[0]) if kind == "raw" else (name, Prequantized(got[0], got[1])))
        return done


def _all_gather(buf: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    """Every rank's ``buf``, rank by rank, in one flat tensor."""
    import torch.distributed as dist

    out = torch.empty(world * buf.numel(), dtype=buf.dtype, device=buf.device)
    if out.device.type == "cuda":
        dist.all_gather_into_tensor(out, buf, group=group)
    else:  # gloo: the list form
        dist.all_gather(list(out.chunk(world)), buf, group=group)
    return out


_HOW: dict[tuple, str] = {}


def _how(name: str, shape: tuple[int, ...], dtype: torch.dtype, rows: list[int], layout: Any,
         device: torch.device) -> str:
    """How one row-sharded weight travels: ``g`` (quantized on its rows by the
    window's grouped kernels), ``q`` (quantized on its rows here, one by
    one: no CUDA/Triton), or ``raw`` (gathered in its own dtype; the sender
    quantizes it if the layout does). Remembered per name, shape, split and
    layout: the same weights come every step."""
    try:
        key = (name, shape, dtype, tuple(rows), layout, device)
        hit = _HOW.get(key)
    except TypeError:  # an unhashable layout: decide every time
        key, hit = None, None
    if hit is not None:
        return hit
    from ..formats.quantize import expand_fused_experts

    ok = (layout is not None and len(shape) == 2 and min(rows) > 0 and dtype.is_floating_point
          and expand_fused_experts(name, torch.empty(shape, dtype=dtype, device="meta"), layout.hidden_size) is None
          and layout.quantizes(name, shape))
    if ok and layout.strategy == "block":
        bn, bk = (int(x) for x in layout.block_size)
        ok = all(n % bn == 0 for n in rows) and shape[1] % bk == 0
    elif ok and layout.strategy != "channel":
        ok = False
    how = "raw"
    if ok:
        how = "g" if _grouped_here(device, layout) else "q"
    if key is not None:
        if len(_HOW) > 1 << 20:
            _HOW.clear()
        _HOW[key] = how
    return how


def _grouped_here(device: torch.device, layout: Any) -> bool:
    """Quantize a window's shards with the grouped kernels (CUDA + Triton)."""
    if device.type != "cuda" or layout is None:
        return False
    from ..kernels import triton_available

    return triton_available()


def _rows_per_scale(layout: Any) -> int:
    """Weight rows that share a scale row: 1 per channel, the block's rows per block."""
    return 1 if layout.strategy == "channel" else int(layout.block_size[0])


def _scale_part(layout: Any, rows: list[int], cols: int, dtype: torch.dtype) -> _Part:
    """The scale slots of a weight quantized per channel or per block (scale
    dtype as the quantizer computes it: float32 for HF fp8, else the weight's)."""
    from ..formats.quantize import _recipe, scale_dtype

    cd = scale_dtype(_recipe(layout), dtype)
    per = _rows_per_scale(layout)
    rest = (1,) if layout.strategy == "channel" else (-(-cols // int(layout.block_size[1])),)
    return _Part(None, [n // per for n in rows], rest, cd)


def sharded_stream(weights: Mapping[str, Any] | Iterable[tuple[str, Any]], layout: Any, *,
                   stats: StreamStats | None = None, window_bytes: int = WINDOW_BYTES,
                   dst: int | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor | Prequantized)`` for every entry of ``weights``, lazily
    and in order. Run it on every rank of the trainer's mesh, in the same
    order (it gathers as it goes). ``layout``: the served ``FP8Layout`` (or
    ``None`` for BF16). Plain tensors pass through (a rank holding them
    whole sends them as they are). Row-sharded tensors are gathered in
    windows of about ``window_bytes`` of full tensors (one collective each);
    other ``DTensor`` placements one at a time (``full_tensor``).

    ``dst``: the global rank of the only rank that sends. It alone receives
    the windows (a ``gather`` into it instead of an ``all_gather`` into
    every rank) and yields; the other ranks only take part, hold no window
    of full tensors and yield nothing. ``None``: every rank yields."""
    from ..formats import FP8Layout, quantize_tensor

    if isinstance(layout, Mapping):
        layout = FP8Layout.from_dict(layout)
    stats = stats if stats is not None else StreamStats()
    items = weights.items() if isinstance(weights, Mapping) else weights
    window: _Window | None = None
    meshes: dict[int, tuple] = {}  # id(mesh) -> (size, group, this rank's index, the gather's dst in it)
    import torch.distributed as dist

    yields = dst is None or dist.get_rank() == dst
    for name, t in items:
        if not hasattr(t, "full_tensor"):
            if window is not None and window.entries:
                yield from _flushed(window, stats, yields)
            if yields:
                yield name, t
            continue
        if not _is_row_sharded(t):
            if window is not None and window.entries:
                yield from _flushed(window, stats, yields)
            full = t.full_tensor()
            stats.gathered += 1
            stats.collectives += 1
            stats._seen(full.numel() * full.element_size())  # every rank holds it for a moment
            if yields:
                yield name, full
            del full
            continue
        mesh = t.device_mesh
        m = meshes.get(id(mesh))
        if m is None:
            group = mesh.get_group()
            m = meshes[id(mesh)] = (mesh.size(), group, mesh.get_local_rank(), _member(group, dst))
        world, group, me, group_dst = m
        # the shard itself, without to_local()'s autograd wrapper (a third of a MoE step's host time;
        # the shard is only read): DTensor's own attribute where this torch has it
        local = getattr(t, "_local_tensor", None)
        if local is None:
            local = t.to_local()
        shape = tuple(t.shape)
        rows = _rows_per_rank(shape[0], world)
        if local.shape[0] != rows[me]:
            raise ValueError(f"{name}: this rank holds {local.shape[0]} rows of {shape[0]}, not the "
                             f"{rows[me]} an even Shard(0) split gives")
        if window is None or window.group is not group:
            if window is not None and window.entries:
                yield from _flushed(window, stats, yields)
            window = _Window(group, local.device, layout, group_dst)
        how = _how(name, shape, t.dtype, rows, layout, local.device)
        if how == "g":
            window.add(name, "g", [_Part(None, rows, shape[1:], torch.float8_e4m3fn),
                                   _scale_part(layout, rows, shape[1], t.dtype)], local.detach())
            stats.local_quantized += 1
        elif how == "q":
            q, sc = quantize_tensor(local.detach(), layout, name=name)
            per = _rows_per_scale(layout)
            window.add(name, "q", [_Part(q, rows, tuple(q.shape[1:]), q.dtype),
                                   _Part(sc, [n // per for n in rows], tuple(sc.shape[1:]), sc.dtype)])
            stats.local_quantized += 1
        else:
            window.add(name, "raw", [_Part(local.detach(), rows, shape[1:], t.dtype)])
            stats.gathered += 1
        if window.nbytes * world >= window_bytes:
            yield from _flushed(window, stats, yields)
    if window is not None and window.entries:
        yield from _flushed(window, stats, yields)


def _flushed(window: _Window, stats: StreamStats, yields: bool) -> list[tuple[str, Any]]:
    """Gather ``window``; what this rank yields of it."""
    done = window.gather(stats)
    return done if yields else []


#: backends whose ``gather`` into one rank is proven here (the rest all-gather)
GATHER_INTO_ONE_BACKENDS = frozenset({"gloo"})


def _member(group: Any, rank: int | None) -> int | None:
    """``rank`` if it belongs to ``group`` and the group's backend gathers
    into one rank (:data:`GATHER_INTO_ONE_BACKENDS`), else ``None`` (every
    rank of the group receives its windows)."""
    import torch.distributed as dist

    if rank is None or dist.get_backend(group) not in GATHER_INTO_ONE_BACKENDS:
        return None
    try:
        dist.get_group_rank(group, rank)
    except (ValueError, RuntimeError):
        return None
    return rank
