"""Buckets of the grouped send path, and how a step reuses the last one's.

A model sends the same names, shapes, dtypes and devices every step, so the
grouped path (:mod:`.grouped`) lays out each bucket once and, from the next
step on, checks that the items arriving are the ones it laid out and reuses
the layout (offsets, wire entries, manifest, prepared kernel launch).

That check is the sender's per-item host work, and for a 30B MoE it is
18,768 items per step: at a few microseconds each in Python it takes about
as long as the wire (measured on an H200 host: 87 ms per step against an
84 ms FP8 broadcast, ``benchmarks/sender_host.py``). So a bucket whose items
arrived as plain tensors, one caller item per sent weight, keeps a
:class:`FastPlan`: its names, shapes, dtypes and devices as lists, which
the next step compares list against list (C loops, no Python per item) and
whose kernel jobs and copies it takes by index. Buckets with anything else
(pre-quantized shards, fused experts split on the fly, tensors that require
grad, tensor subclasses) are compared item by item (:func:`replay_items`).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any

import torch

from .wire import TensorEntry

__all__: list[str] = []

_NAME, _TENSOR = itemgetter(0), itemgetter(1)
_SHAPE, _DTYPE, _GRAD = attrgetter("shape"), attrgetter("dtype"), attrgetter("requires_grad")
_DEVICE = torch.Tensor.get_device
#: tensor types the fast comparison accepts (subclasses such as DTensor go item by item)
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})


class Jobs:
    """One grouped quantization launch of a bucket: sources, their offsets in
    the bucket (fp8 bytes, scale) and names, in bucket order."""

    __slots__ = ("srcs", "q_offsets", "s_offsets", "names", "idx")

    def __init__(self) -> None:
        self.srcs: list[torch.Tensor] = []
        self.q_offsets: list[int] = []
        self.s_offsets: list[int] = []
        self.names: list[str] = []
        self.idx: list[int] = []  # position of each source among the bucket's items

    def add(self, x: torch.Tensor, q_offset: int, s_offset: int, name: str, pos: int) -> None:
        self.srcs.append(x)
        self.q_offsets.append(q_offset)
        self.s_offsets.append(s_offset)
        self.names.append(name)
        self.idx.append(pos)


def pick(xs: list, idx) -> list:
    """``[xs[i] for i in idx]`` in one C call (``idx``: a non-empty tuple of positions)."""
    return [xs[idx[0]]] if len(idx) == 1 else list(itemgetter(*idx)(xs))


def jobs_for(b: "Bucket", jk: Any) -> Jobs:
    """The launch of bucket ``b`` for sources of kind ``jk`` (made on first use)."""
    j = b.qjobs.get(jk)
    if j is None:
        j = b.qjobs[jk] = Jobs()
    return j


class Bucket:
    """A bucket of the grouped path: wire entries, quantization and copy jobs."""

    __slots__ = ("slot_idx", "cap", "token", "entries", "qjobs", "centries", "csrcs", "cidx", "end",
                 "manifest_est", "event", "flag", "plan", "num_tensors", "num_bytes", "simple", "fast")

    def __init__(self) -> None:
        self.slot_idx = 0
        self.cap = 0  # payload bytes this bucket may fill (see GroupedSendPath._new_bucket)
        self.token = None  # identity of its layout (BucketPlan.token), for the launch cache
        self.entries: list[TensorEntry] = []
        self.qjobs: dict[Any, Jobs] = {}  # source dtype (or (dtype, "h2d")) -> its launch
        self.centries: list[TensorEntry] = []  # tensors copied as they are: wire entries ...
        self.csrcs: list[torch.Tensor] = []  # ... and sources
        self.cidx: list[int] = []  # ... and positions among the bucket's items
        self.end = 0
        self.manifest_est = 64
        self.event = None
        self.flag = None
        # per item, in arrival order: (name, shape, dtype, quant, device, jk, fp8/byte offset, scale offset,
        # copy entry) -- what a later step with the same items reuses
        self.plan: list[tuple] = []
        self.num_tensors = 0
        self.num_bytes = 0
        self.simple = True  # every item so far was a plain caller tensor, one per item
        self.fast: FastPlan | None = None


@dataclass
class FastPlan:
    """A bucket's items as lists, for the next step's list-against-list check."""

    names: list[str]
    shapes: list
    dtypes: list
    devices: list[int]
    quant: dict  # jk -> (positions, fp8 offsets, scale offsets, names)
    cidx: list[int]
    centries: list[TensorEntry]


@dataclass(frozen=True)
class BucketPlan:
    """Layout of one bucket of an earlier step (no tensor references)."""

    items: list  # Bucket.plan
    entries: list
    end: int
    manifest_est: int
    num_tensors: int
    num_bytes: int
    #: stands for the layout (items, offsets, shapes) in launch-cache keys: a
    #: replayed bucket keys its launch by this and its sources' addresses
    #: instead of hashing every source's shape, stride and offsets again
    token: object = None
    fast: FastPlan | None = None


def plan_of(b: Bucket) -> BucketPlan:
    """What the next step reuses of bucket ``b`` (with a :class:`FastPlan`
    when every item of it was a plain caller tensor)."""
    if b.token is None:
        b.token = object()
    fast = b.fast
    if fast is None and b.simple and b.plan:
        items = b.plan
        fast = FastPlan(
            names=[p[0] for p in items], shapes=[p[1] for p in items], dtypes=[p[2] for p in items],
            devices=[p[4] for p in items],
            quant={jk: (tuple(j.idx), j.q_offsets, j.s_offsets, j.names) for jk, j in b.qjobs.items()},
            cidx=list(b.cidx), centries=list(b.centries))
    b.fast = fast
    return BucketPlan(b.plan, b.entries, b.end, b.manifest_est, b.num_tensors, b.num_bytes, b.token, fast)


def match_fast(got: list, fast: FastPlan) -> list[torch.Tensor] | None:
    """The tensors of the caller's items ``got`` if they are, in order, plain
    tensors with ``fast``'s names, shapes, dtypes and devices, not requiring
    grad; otherwise ``None`` (the items are then planned one by one, which
    also raises the right error for malformed ones)."""
    try:
        # (name, tensor) tuples only (what dict.items() yields); other shapes of item go item by item,
        # where a malformed one gets its error
        if (len(got) != len(fast.names) or set(map(type, got)) != {tuple} or set(map(len, got)) != {2}
                or list(map(_NAME, got)) != fast.names):
            return None
        xs = list(map(_TENSOR, got))
    except (TypeError, IndexError, KeyError):
        return None
    if (not _PLAIN.issuperset(map(type, xs)) or list(map(_SHAPE, xs)) != fast.shapes
            or list(map(_DTYPE, xs)) != fast.dtypes or list(map(_DEVICE, xs)) != fast.devices
            or any(map(_GRAD, xs))):
        return None
    return xs


def fill_fast(cur: Bucket, plan: BucketPlan, xs: list[torch.Tensor]) -> None:
    """Lay ``cur`` out as ``plan``'s bucket with the sources ``xs`` (matched by :func:`match_fast`)."""
    fast = plan.fast
    for jk, (idx, qo, so, names) in fast.quant.items():
        j = Jobs()
        j.srcs = pick(xs, idx)
        j.q_offsets, j.s_offsets, j.names = qo, so, names
        cur.qjobs[jk] = j
    if fast.cidx:
        cidx = fast.cidx
        cur.csrcs = pick(xs, cidx)
        cur.centries = fast.centries
    cur.fast = fast
    _adopt(cur, plan)


def replay_items(got: list, plan: BucketPlan, cur: Bucket) -> bool:
    """Lay ``cur`` out as ``plan``'s bucket if the planned items ``got``
    (``(name, tensor, quantize?, simple)``) are the same, item by item, as
    the plan's (name, shape, dtype, quantized or not, device); else ``False``."""
    if len(got) != len(plan.items):
        return False
    for item, (name, shape, dtype, quant, xdev, _, _, _, _) in zip(got, plan.items):
        x = item[1]
        if (item[0] != name or item[2] is not quant or x.dtype is not dtype or x.shape != shape
                or x.get_device() != xdev):
            return False
    for i, ((name, x, _, _), (_, _, _, quant, _, jk, off, so, entry)) in enumerate(zip(got, plan.items)):
        if quant:
            jobs_for(cur, jk).add(x, off, so, name, i)
        else:
            cur.centries.append(entry)
            cur.csrcs.append(x)
            cur.cidx.append(i)
    cur.simple = all(item[3] for item in got)
    _adopt(cur, plan)
    return True


def _adopt(cur: Bucket, plan: BucketPlan) -> None:
    cur.entries = plan.entries
    cur.token = plan.token
    cur.end = plan.end
    cur.manifest_est = plan.manifest_est
    cur.plan = plan.items
    cur.num_tensors = plan.num_tensors
    cur.num_bytes = plan.num_bytes
