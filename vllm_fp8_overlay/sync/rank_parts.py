"""What each trainer rank holds, sent by that rank to the workers that load it.

Why: on the broadcast path (:func:`.sharded_push.push_sharded`) a sharded
(FSDP2) trainer gathers every weight into one sending rank, which sends it
to every worker: one rank's link and one gather carry the whole step, and
an expert-parallel worker receives every expert although it loads only its
own (experts are most of a MoE's bytes: a Qwen3-30B-A3B holds 29.0 B of its
30.5 B parameters in them). Here each rank sends what it holds itself:

* **routed experts**: transformers keeps a MoE layer's experts as fused
  parameters ``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj``
  (E, H, I); sharded over experts (``Shard(0)``) each rank holds whole
  experts, and sends each worker the ones it loads (an expert-parallel
  worker its own, any other all), as per-expert checkpoint tensors;
* **row shards**: a weight sharded by rows whose served form depends on
  its own rows only (unquantized; FP8 with channel scales; FP8 with
  128x128 blocks when every rank holds whole blocks of rows, the rule
  ``sources.sharded_stream`` quantizes shards by) is sent by every rank as
  its rows, to every worker; the worker puts the rows back together in
  trainer-rank order before loading.

Everything else (per-tensor scales, uneven blocks, tensors that are not
sharded, tied aliases) stays on the gathered path. Nothing of the rest is
gathered.

How: :class:`RankParts` is set up once, collectively over the trainer's
ranks, one of which holds the :class:`~.client.WeightSyncClient`:

1. every worker says which experts it loads (``weight_sync_describe``:
   ``experts``);
2. rank r holds experts ``[start_r, stop_r)`` (``torch.chunk`` of E over
   the ranks, as ``Shard(0)`` places them); it opens a 2-rank group (its own
   ``WeightSender``) to every worker;
3. the workers join those groups (``weight_sync_join_parts``) in
   trainer-rank order, while each rank builds its senders in worker order,
   so no join waits for one that waits for it.

Each step, ``push_sharded(..., parts=)`` leaves what the parts carry out of
its gathered stream, and every rank sends, from a thread beside the
gathers, each worker its part, quantized into the served layout by that
group's sender like any other tensor. A worker receives the main stream
and its parts together and checks and loads them as one update
(``apply.steps.StepJob``): a name missing from every stream, a whole tensor
in two streams, or row shards that do not add up to the served tensor
reject the step with the model unchanged.

What it costs: R x W groups (trainer ranks x workers); each worker
receives the rows of every shardable weight once (from R ranks instead of
one), and only its own experts at EP; a worker that loads every expert
(TP = 1; TP without EP, where vLLM's loader slices each expert) gets each
expert once per worker, which for a TP engine without EP is more trainer
traffic than one broadcast (docs/multinode.md says when to use which).
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import threading
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import torch
import torch.distributed as dist

from ..formats.quantize import _FUSED_EXPERTS_RE
from .transport import DEFAULT_TIMEOUT_S, free_port

__all__ = ["RankParts", "PARTS_BACKENDS", "Split", "fused_expert_range", "rows_travel_alone"]

#: backends whose part groups are proven (real gloo with real vLLM on CPU).
#: NCCL joins once ``tests/test_rank_parts_gpu.py`` has passed on 2 GPUs: a
#: worker then drives two communicators at once, and a trainer rank several.
PARTS_BACKENDS = frozenset({"gloo"})

_EXPERT_ID = re.compile(r"\.experts\.(\d+)\.")  # a per-expert checkpoint tensor


def fused_expert_range(num_experts: int, world: int, rank: int) -> tuple[int, int]:
    """Experts ``[start, stop)`` rank ``rank`` of ``world`` holds under
    ``Shard(0)``: the expert dimension's rows, as ``sources`` splits rows."""
    from .sources import _rows_per_rank

    counts = _rows_per_rank(num_experts, world)
    start = sum(counts[:rank])
    return start, start + counts[rank]


def rows_travel_alone(name: str, shape: tuple[int, ...], dtype: torch.dtype, world: int, layout: Any) -> bool:
    """Whether a weight's served form, cut into ``world`` ranks' rows as
    ``Shard(0)`` cuts it, is those ranks' row shards (each in its served
    form) put side by side: any rows for a tensor served as it is; for an
    FP8 weight, ``sources.sharded_stream``'s rule for quantizing on shards
    (channel scales; 128x128 blocks when every rank holds whole blocks of
    rows). Fused 3-D experts never (the sender splits them per expert)."""
    from .sources import _how, _rows_per_rank

    if _FUSED_EXPERTS_RE.match(name):
        return False
    if layout is None or len(shape) != 2 or not layout.quantizes(name, shape):
        return True
    return _how(name, shape, dtype, _rows_per_rank(shape[0], world), layout, torch.device("cpu")) != "raw"


class RankParts:
    """One trainer rank's part senders (see the module docstring).

    Construct it on every trainer rank, collectively over ``group`` (the
    trainer's ranks; default: the default group), after the client: exactly
    one rank passes its ``WeightSyncClient``, the others ``None``. ``host``:
    this rank's address as the workers reach it (each rank hosts the stores
    of its own groups). Raises the same error on every rank when the engines
    cannot take parts (expert placement by vLLM's load balancer, engines
    with different expert counts, a backend not in :data:`PARTS_BACKENDS`)."""

    def __init__(self, client: Any, group: Any = None, *, host: str = "127.0.0.1", backend: str = "auto",
                 device: Any = None, bucket_bytes: int | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        from .sender import WeightSender
        from .transport import resolve_backend

        resolved = resolve_backend(backend, device)[0]
        if resolved not in PARTS_BACKENDS:  # the same on every rank: nobody is left in a collective
            raise ValueError(f"rank parts over {resolved} are not proven yet (proven: {sorted(PARTS_BACKENDS)}); "
                             "use the gathered path (push_sharded without parts=)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        holders = [None] * self.world
        dist.all_gather_object(holders, client is not None, group=group)
        if holders.count(True) != 1:
            raise ValueError(f"RankParts needs exactly one trainer rank with a client, got {holders.count(True)}")
        root = holders.index(True)
        box = [_plan(client) if client is not None else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, root) if group is not None else root,
                                   group=group)
        plan = box[0]
        if plan["error"]:
            raise ValueError(f"rank parts cannot be set up: {plan['error']}")
        layout = plan["layout"]
        if isinstance(layout, Mapping):
            from ..formats import FP8Layout

            layout = FP8Layout.from_dict(layout)
        self.layout = layout
        #: tied aliases and their embeddings: on the main stream, where the client
        #: checks that the alias equals its embedding before dropping it
        self.aliases = frozenset(plan["aliases"])
        self.num_experts = plan["num_experts"]  # None: the engines serve no fused-MoE experts
        self.start, self.stop = fused_expert_range(self.num_experts or 0, self.world, self.rank)
        mine = set(range(self.start, self.stop))
        #: (target index, worker local rank, expert ids this rank sends it)
        self.pairs = [(ti, li, sorted(mine if owned is None else mine & set(owned)))
                      for ti, li, owned in plan["workers"]]
        #: per pair, the experts its worker loads (``None``: all): per-expert
        #: weights sharded by rows go only where their expert is loaded
        self.owned = [None if owned is None else frozenset(owned) for _, _, owned in plan["workers"]]
        ports = [free_port(host) for _ in self.pairs]
        every = [None] * self.world
        dist.all_gather_object(every, [(ti, li, host, port) for (ti, li, _), port in zip(self.pairs, ports)],
                               group=group)
        futs = []
        if client is not None:
            for ti, target in enumerate(client.targets):
                parts: dict[str, list[dict]] = {}
                for rank_pairs in every:  # trainer-rank order
                    for t, li, h, port in rank_pairs:
                        if t == ti:
                            parts.setdefault(str(li), []).append({"host": h, "port": port})
                futs.append(client._pool.submit(target.call, "weight_sync_join_parts", {
                    "parts": parts, "backend": backend, "timeout": timeout, "on_error": "return"}, timeout + 60))
        self.senders: list[Any] = []
        error = None
        try:
            for (ti, li, _), port in zip(self.pairs, ports):
                self.senders.append(WeightSender(layout, host, port, 2, backend=backend,
                                                 bucket_bytes=bucket_bytes, device=device, timeout=timeout,
                                                 group_id=plan["group_id"]))
        except BaseException as e:  # noqa: BLE001 - every rank raises together below
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        if futs:
            done, _ = cf.wait(futs, timeout=timeout + 90)
            for target, f in zip(client.targets, futs):
                if f not in done or f.exception() is not None:
                    error = error or f"{target.name}: weight_sync_join_parts: {f.exception() if f in done else 'timed out'}"
                    continue
                for i, r in enumerate(f.result()):
                    if isinstance(r, dict) and r.get("ok") is False:
                        error = error or f"{target.name} worker {i}: {r.get('error')}"
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=group)
        if any(errors):
            self.close()
            raise RuntimeError("rank parts could not be set up: " + "; ".join(e for e in errors if e))
        #: per sender, the last step's ``SendStats``
        self.last: list[Any] = []

    # ------------------------------------------------------------ per step

    def split(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> tuple["Split", list[tuple[str, Any]]]:
        """What this rank's parts carry, and the rest (the gathered stream).
        The same on every rank: it depends on names, shapes and the layout."""
        from .sources import _is_row_sharded

        part = Split([], [])
        rest: list[tuple[str, Any]] = []
        for name, t in (weights.items() if isinstance(weights, Mapping) else weights):
            if _FUSED_EXPERTS_RE.match(name) and _is_row_sharded(t) and t.ndim == 3 and self.num_experts:
                if int(t.shape[0]) != self.num_experts:
                    raise ValueError(f"{name}: {t.shape[0]} experts, the engines serve {self.num_experts}")
                part.experts.append((name, t))
            elif name not in self.aliases and _is_row_sharded(t) and rows_travel_alone(
                    name, tuple(int(x) for x in t.shape), t.dtype, self.world, self.layout):
                part.rows.append((name, t))
            else:
                rest.append((name, t))
        return part, rest

    def send(self, part: "Split", step: int) -> list[Any]:
        """Send every worker its part (one group after another); returns each
        sender's ``SendStats``."""
        stats = []
        for sender, (_, _, ids), owned in zip(self.senders, self.pairs, self.owned):
            stats.append(sender.send(self._tensors(part, ids, owned), step))
        self.last = stats
        return stats

    def send_in_background(self, part: "Split", step: int) -> "_Sending":
        """:meth:`send` in a thread (beside the gathers of the main stream)."""
        return _Sending(self, part, step)

    def _tensors(self, part: "Split", ids: list[int], owned: frozenset[int] | None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        from ..formats.quantize import expand_fused_experts

        for name, t in part.experts:
            local = t.to_local()
            if int(local.shape[0]) != self.stop - self.start:
                raise ValueError(f"{name}: this rank holds {local.shape[0]} experts, Shard(0) places "
                                 f"{self.stop - self.start} here ({self.start}..{self.stop - 1})")
            for e in ids:
                yield from expand_fused_experts(name, local[e - self.start:e - self.start + 1], first=e)
        for name, t in part.rows:
            expert = _EXPERT_ID.search(name)
            if owned is not None and expert is not None and int(expert.group(1)) not in owned:
                continue  # another worker's expert (an expert-parallel engine)
            local = t.to_local()
            if local.shape[0]:
                yield name, local

    def close(self) -> None:
        for s in self.senders:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self.senders = []


class Split(NamedTuple):
    """One step's share of the parts: fused expert parameters sharded over
    experts, and weights whose row shards travel as they are."""

    experts: list[tuple[str, Any]]
    rows: list[tuple[str, Any]]


class _Sending:
    """A background :meth:`RankParts.send`; :meth:`result` re-raises its error."""

    def __init__(self, parts: RankParts, part: Split, step: int) -> None:
        self.stats: list[Any] = []
        self.error: BaseException | None = None
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

        def run() -> None:
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                self.stats = parts.send(part, step)
            except BaseException as e:  # noqa: BLE001 - re-raised by result()
                self.error = e

        self._thread = threading.Thread(target=run, name=f"rank-parts-step-{step}", daemon=True)
        self._thread.start()

    def result(self) -> list[Any]:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.stats


def _plan(client: Any) -> dict:
    """What every rank needs to know, from the client's descriptions."""
    workers, counts, aliases, error = [], set(), set(), None
    for ti, (target, desc) in enumerate(zip(client.targets, client.descriptions)):
        for li, w in enumerate(desc):
            ex = w.get("experts") or {}
            if ex.get("refused"):
                error = error or f"{target.name} worker {li}: {ex['refused']}"
            counts.add(ex.get("num_experts"))
            for alias, target in (w.get("tied_aliases") or {}).items():  # the client checks one against the other
                aliases.update((alias, target))
            workers.append((ti, int(w.get("local_rank", li)), ex.get("owned")))
    if len(counts) > 1:
        error = error or f"the engines serve different expert counts: {sorted(counts, key=str)}"
    layout = client.layout.to_dict() if hasattr(client.layout, "to_dict") else client.layout
    return {"error": error, "num_experts": counts.pop() if len(counts) == 1 else None, "workers": workers,
            "layout": layout, "group_id": client.group_id, "aliases": sorted(aliases)}
