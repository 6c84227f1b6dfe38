"""The call every trainer rank makes each step: :func:`push_sharded`.

The ranks of a sharded trainer settle together who sends and in which
layout (:func:`agreed_layout`), stream their shards through
:func:`.sources.sharded_stream` (gathered into the one sending rank, or
into every rank when several send) and, with
:class:`~.rank_parts.RankParts`, send what they hold straight to the
workers that load it. Every rank runs the same
collectives in the same order whatever fails, so a failure on one rank
never leaves another waiting in a gather.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping

from .sources import WINDOW_BYTES, StreamStats, sharded_stream

__all__ = ["agreed_layout", "push_sharded"]


def agreed_layout(client: Any, group: Any = None) -> Any:
    """The served layout every sending rank's client found.

    Every trainer rank calls this (a collective over ``group``); ranks with
    a client report its layout, the others ``None``. All clients must serve
    the same layout (the ranks quantize their shards for it together): any
    disagreement, or no client at all, raises the same ``ValueError`` on
    every rank, so none of them waits in a gather the others never start."""
    return _agree(client, group)[0]


def _agree(client: Any, group: Any) -> tuple[Any, list[int]]:
    """:func:`agreed_layout`, and the global ranks that send."""
    import json

    import torch.distributed as dist

    mine = (client is not None,
            None if client is None or client.layout is None else client.layout.to_dict())
    boxes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(boxes, mine, group=group)
    senders = [r for r, (has, _) in enumerate(boxes) if has]
    if not senders:
        raise ValueError("push_sharded: no trainer rank passed a client; at least one must send")
    seen = {json.dumps(lay, sort_keys=True) for has, lay in boxes if has}
    if len(seen) > 1:
        found = {r: boxes[r][1] for r in senders}
        raise ValueError(f"push_sharded: the sending ranks' engines serve different layouts "
                         f"(rank -> layout): {found}; every engine a step feeds must serve the same checkpoint format")
    glob = [r if group is None else dist.get_global_rank(group, r) for r in senders]
    return boxes[senders[0]][1], glob


def push_sharded(client: Any, weights: Mapping[str, Any] | Iterable[tuple[str, Any]], step: int, *,
                 layout: Any = "client", group: Any = None, stats: StreamStats | None = None,
                 window_bytes: int = WINDOW_BYTES, parts: Any = None, **push_kw: Any):
    """The call every trainer rank makes each step with its sharded state dict.

    A rank that passes a :class:`~.client.WeightSyncClient` sends the step
    to that client's engines and gets its step report back; the others pass
    ``None`` and only take part in the gathers. One client (rank 0's, say)
    feeds every engine from one rank; several ranks with clients for
    different engines feed them in parallel, each from the full tensors the
    gathers already put on every rank (no extra trainer traffic).
    ``layout="client"``: the layout the clients found, which must agree
    (:func:`agreed_layout`); over ``group``, the trainer's own trusted ranks.

    With one sending rank (and ``layout="client"``, where the ranks agree on
    who sends) the windows are gathered into that rank alone: the others
    send it their shards and hold no window of full tensors. With several,
    every rank receives every window (each sender needs all of it).

    If a rank's push fails, that rank still takes part in the rest of the
    step's gathers before it raises, so the other ranks finish their steps.

    ``parts``: this rank's :class:`~.rank_parts.RankParts`: what it holds
    that travels as it is (experts sharded over experts, row shards whose
    served form depends on their own rows) is then not gathered; every rank
    sends it to the workers that load it, beside the gathered stream."""
    dst = None
    if layout == "client":
        layout, senders = _agree(client, group)
        dst = senders[0] if len(senders) == 1 else None
    sending = None
    if parts is not None:
        part, weights = parts.split(weights)
        sending = parts.send_in_background(part, step)
    stream = sharded_stream(weights, layout, stats=stats, window_bytes=window_bytes, dst=dst)
    try:
        report = _push_stream(client, stream, step, dict(push_kw, rank_parts=True) if parts is not None else push_kw)
    except BaseException:
        if sending is not None:
            with contextlib.suppress(BaseException):  # its own error, if any, comes second to this one
                sending.result()
        raise
    if sending is not None:
        sending.result()
    return report


def _push_stream(client: Any, stream: Iterator[tuple[str, Any]], step: int, push_kw: dict) -> Any:
    if client is None:
        for _ in stream:
            pass
        return None
    try:
        return client.push(stream, step, **push_kw)
    except BaseException:
        # the gathers the other ranks still wait for; the push's error is the one raised
        with contextlib.suppress(Exception):
            for _ in stream:
                pass
        raise
