"""A real FSDP2 trainer on CPU (gloo) for the sharded-sender tests.

Run with ``torch.distributed.run --nproc_per_node N -m
vllm_fp8_overlay.testing.fsdp_trainer ...``. Every rank loads the same HF
checkpoint, shards it with ``torch.distributed.fsdp.fully_shard`` (every
decoder layer, then the model), and then either

* ``check``: streams the sharded state dict for each layout in
  ``--layouts`` (a JSON list of ``FP8Layout`` dicts) with
  :func:`~vllm_fp8_overlay.sync.sources.sharded_stream` and, on rank 0,
  compares every tensor bitwise with ``quantize_weights`` on the unsharded
  weights; or
* ``push``: for each ``--steps`` checkpoint, loads its weights into the
  sharded model (as a training step would change them) and calls
  :func:`~vllm_fp8_overlay.sync.sharded_push.push_sharded` on every rank; rank 0
  holds a ``WeightSyncClient`` for the ``--url`` servers, or with
  ``--url-per-rank`` every rank r one for the r-th server; with
  ``--rank-parts`` every rank sends the routed experts it holds itself
  (:class:`~vllm_fp8_overlay.sync.rank_parts.RankParts`).

* ``agree``: how ``push_sharded`` settles which ranks send and with which
  layout (clients that disagree, none, one rank's push failing mid-step).

Rank 0 writes a JSON result to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _sharded_model(model_dir: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fused_experts(name: str, shape: tuple[int, ...], state_dict: dict) -> "torch.Tensor | None":
    """transformers 5 keeps a MoE layer's experts as 3-D ``experts.gate_up_proj``
    (gate then up rows of each expert) and ``experts.down_proj``; build them
    from a checkpoint's per-expert tensors, in the parameter's orientation."""
    for fused, parts in ((".experts.gate_up_proj", ("gate_proj", "up_proj")), (".experts.down_proj", ("down_proj",))):
        if not name.endswith(fused):
            continue
        prefix = name[: -len(fused)] + ".experts"
        per = []
        for e in range(shape[0]):
            keys = [f"{prefix}.{e}.{p}.weight" for p in parts]
            if not all(k in state_dict for k in keys):
                return None
            per.append(torch.cat([state_dict[k] for k in keys]))
        t = torch.stack(per)
        return t if tuple(t.shape) == tuple(shape) else t.transpose(1, 2).contiguous()
    return None


def _load_full(model, state_dict: dict) -> None:
    """Put full tensors into the sharded parameters (each rank keeps its rows)."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, p in model.state_dict().items():
            src = state_dict.get(name)
            if src is None:
                src = _fused_experts(name, tuple(p.shape), state_dict)
            if src is None:
                continue
            src = src.to(p.dtype)
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{name}: checkpoint {tuple(src.shape)} vs model {tuple(p.shape)}")
            if hasattr(p, "device_mesh"):
                p.copy_(distribute_tensor(src, p.device_mesh, p.placements))
            else:
                p.copy_(src)


def _check(args, model) -> dict:
    from vllm_fp8_overlay.formats import FP8Layout, quantize_weights
    from vllm_fp8_overlay.sync.sources import StreamStats, sharded_stream
    from vllm_fp8_overlay.testing import tiny_models as tm

    full = tm.load_checkpoint(args.model)
    out = {}
    for d in json.loads(args.layouts):
        layout = FP8Layout.from_dict(d)
        stats = StreamStats()
        got = list(sharded_stream(model.state_dict(), layout, stats=stats))
        one_by_one = StreamStats()  # a window of 1 byte: one gather per tensor, same bytes
        single = list(sharded_stream(model.state_dict(), layout, stats=one_by_one, window_bytes=1))
        # gathered into the last rank alone (one sender): it yields the same, the others nothing
        last = dist.get_world_size() - 1
        into = StreamStats()
        to_last = list(sharded_stream(model.state_dict(), layout, stats=into, dst=last))
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, {"yielded": len(to_last), "max_gathered_bytes": into.max_gathered_bytes,
                                      "collectives": into.collectives})
        if dist.get_rank() == last:
            rebuilt = dict(quantize_weights(iter(to_last), layout))
        if dist.get_rank() != 0:
            if dist.get_rank() == last:
                dist.send_object_list([{n: bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                                        for n, t in rebuilt.items()}], dst=0)
            continue
        to_last_bytes = [None]
        dist.recv_object_list(to_last_bytes, src=last)
        flat = list(quantize_weights(iter(got), layout))  # what the sender sends: gathered ones quantized there
        sharded_names = list(model.state_dict())
        want = dict(quantize_weights(((n, full[n]) for n in sharded_names), layout))
        got_d = dict(flat)

        def bits(t):
            return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

        bad = sorted(set(got_d) ^ set(want))
        single_d = dict(quantize_weights(iter(single), layout))
        bad += [f"window=1: {n}" for n in want if n not in single_d or not torch.equal(bits(single_d[n]), bits(want[n]))]
        bad += [n for n in want if n in got_d and (got_d[n].dtype != want[n].dtype or got_d[n].shape != want[n].shape
                                                   or not torch.equal(bits(got_d[n]), bits(want[n])))]
        bad += [f"dst={last}: {n}" for n in want
                if to_last_bytes[0].get(n) != bytes(want[n].contiguous().reshape(-1).view(torch.uint8).numpy())]
        largest = max(t.numel() * t.element_size() for t in full.values())
        out[f"{layout.method}/{layout.strategy}"] = {
            "mismatches": bad, "local_quantized": stats.local_quantized, "gathered": stats.gathered,
            "max_gathered_bytes": stats.max_gathered_bytes, "largest_full_bytes": largest,
            "collectives": stats.collectives, "collectives_window_1": one_by_one.collectives,
            "into_one_rank": seen}
    return out


def _push(args, model) -> dict:
    from vllm_fp8_overlay.sync.client import WeightSyncClient
    from vllm_fp8_overlay.sync.sharded_push import push_sharded
    from vllm_fp8_overlay.sync.sources import StreamStats
    from vllm_fp8_overlay.testing import tiny_models as tm

    client = None
    rank = dist.get_rank()
    if args.url_per_rank:  # every rank sends, each to its own engine
        if len(args.url) != dist.get_world_size():
            raise SystemExit(f"--url-per-rank needs one --url per rank, got {len(args.url)}")
        client = WeightSyncClient([args.url[rank]], host="127.0.0.1", timeout=args.timeout)
    elif rank == 0:
        client = WeightSyncClient(args.url, host="127.0.0.1", timeout=args.timeout)
    parts = None
    if args.rank_parts:  # every rank sends the experts it holds to the workers that load them
        from vllm_fp8_overlay.sync.rank_parts import RankParts

        parts = RankParts(client, host="127.0.0.1", timeout=args.timeout)
    reports = []
    try:
        for i, ckpt in enumerate(args.steps):
            _load_full(model, tm.load_checkpoint(ckpt))
            stats = StreamStats()
            dist.barrier()
            t0 = time.perf_counter()
            rep = push_sharded(client, model.state_dict(), args.first_step + i, stats=stats, parts=parts)
            push_s = time.perf_counter() - t0
            reports.append({"step": args.first_step + i, "ok": rep is None or all(w.get("ok") for w in rep.workers),
                            "local_quantized": stats.local_quantized, "gathered": stats.gathered,
                            "max_gathered_bytes": stats.max_gathered_bytes,
                            "num_bytes": None if rep is None else rep.send.num_bytes,
                            "other_ranks_expert_tensors": None if rep is None else
                            [w.get("other_ranks_expert_tensors") for w in rep.workers],
                            "worker_tensors": None if rep is None else [w.get("num_tensors") for w in rep.workers],
                            "worker_parts": None if rep is None else [w.get("parts") for w in rep.workers],
                            "worker_bytes": None if rep is None else [w.get("num_bytes") for w in rep.workers],
                            "worker_receive_s": None if rep is None else [w.get("receive_s") for w in rep.workers],
                            "worker_load_s": None if rep is None else [w.get("load_s") for w in rep.workers],
                            "push_s": push_s,
                            "rank_parts": None if parts is None else
                            [{"expert_ids": ids, "target": ti, "worker": li, "tensors": st.num_tensors,
                              "bytes": st.num_bytes} for (ti, li, ids), st in zip(parts.pairs, parts.last)]})
            dist.barrier()
    finally:
        if parts is not None:
            parts.close()
        if client is not None:
            client.close()
    every = [None] * dist.get_world_size()  # each rank's reports (ranks without a client: ok=True, no bytes)
    dist.all_gather_object(every, reports)
    return {"reports": reports, "reports_per_rank": every}


class _LayoutClient:
    """Stands in for a ``WeightSyncClient`` where only its layout and its
    push failing matter (``agree`` mode: the ranks' collective agreement)."""

    def __init__(self, layout, fail_after: int | None = None) -> None:
        self.layout = layout
        self.fail_after = fail_after
        self.read = 0

    def push(self, stream, step, **_kw):
        for _ in stream:
            self.read += 1
            if self.fail_after is not None and self.read >= self.fail_after:
                raise RuntimeError(f"push failed after {self.read} tensors")
        return "pushed"


def _agree(args, model) -> dict:
    """How ``push_sharded`` settles which ranks send: each case's outcome per rank."""
    from vllm_fp8_overlay.formats import FP8Layout
    from vllm_fp8_overlay.sync.sharded_push import push_sharded
    from vllm_fp8_overlay.sync.sources import StreamStats

    rank = dist.get_rank()
    channel = FP8Layout(method="compressed-tensors", strategy="channel", ignore=("lm_head",))
    block = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv",
                      ignore=("lm_head",))
    cases = {
        "layouts_differ": _LayoutClient(channel if rank == 0 else block),
        "no_client": None,
        "one_rank_fails": _LayoutClient(channel, fail_after=3) if rank == 1 else None,
        "both_send": _LayoutClient(channel),
    }
    out = {}
    for case, client in cases.items():
        stats = StreamStats()
        try:  # a 1-byte window: one gather per tensor, so a failed push leaves gathers to drain
            got = push_sharded(client, model.state_dict(), 1, stats=stats, window_bytes=1)
            out[case] = {"result": got, "collectives": stats.collectives}
        except (ValueError, RuntimeError) as e:
            out[case] = {"error": f"{type(e).__name__}: {e}", "collectives": stats.collectives}
        dist.barrier()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    return {"per_rank": every}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["check", "push", "agree"])
    p.add_argument("--model", required=True, help="HF checkpoint every rank starts from")
    p.add_argument("--layouts", default="[]")
    p.add_argument("--url", nargs="*", default=[])
    p.add_argument("--url-per-rank", action="store_true", help="rank r sends to --url[r] only")
    p.add_argument("--rank-parts", action="store_true",
                   help="every rank sends the experts it holds to the workers that load them (RankParts)")
    p.add_argument("--steps", nargs="*", default=[])
    p.add_argument("--first-step", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        model = _sharded_model(args.model)
        result = {"check": _check, "push": _push, "agree": _agree}[args.mode](args, model)
        # peak resident memory of each rank, for the per-rank bound
        peak = [None] * dist.get_world_size()
        dist.all_gather_object(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if dist.get_rank() == 0:
            result["peak_rss_bytes_per_rank"] = peak
            Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()
    return 0


def _exit_skipping_teardown(rc: int) -> None:
    """Leave without the interpreter's teardown. With torch's gloo process
    group, a process that ran collectives sometimes aborts *after* it
    finished and destroyed its group ("terminate called without an active
    exception", SIGABRT at exit: 1 run in 5-10 of a bare 2-rank
    ``dist.all_gather`` loop, torch 2.10 and 2.13), which would fail a run
    whose results are already written. Nothing is left to clean up here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    _exit_skipping_teardown(main())
