"""Sharded trainer vs single-rank trainer: time and trainer memory per rank.

Three processes on 2 GPUs, spawned by this script:

  rank 0  trainer, cuda:0: holds its FSDP2 row shards (``DTensor``, ``Shard(0)``)
          and runs the ``WeightSender``
  rank 1  trainer, cuda:1: holds the other row shards, takes part in the gathers
  rank 2  receiver, cuda:1 (shares the GPU with trainer rank 1): ``receive_all``

per model (the 7B dense and 10B MoE shapes of ``bench_sync.py``, FP8 128x128
blocks), three modes side by side in one run:

  sharded  both trainer ranks run ``sharded_stream``: each weight is
           quantized on each rank's rows and gathered as FP8 + scales into
           both ranks (what ``push_sharded`` does with several senders); rank 0
           sends the stream
  into0    the same, gathered into rank 0 alone (``dst=0``: what
           ``push_sharded`` does with one sending rank)
  single   rank 0 holds the whole BF16 model and sends it (``WeightSender.send``,
           the grouped path of ``bench_sync.py``'s column c)

Time: median of ``--iters`` steps, from a barrier of all three until the
receiver holds the step. Memory: ``torch.cuda.max_memory_allocated`` of each
trainer rank during the steps, above what it held before (its weights), and
the weights it holds. The last received steps of both modes are compared
bitwise.

    python benchmarks/bench_sharded.py --out DIR [--iters 5] [--models dense moe]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench_sync as B  # noqa: E402
from vllm_fp8_overlay.sync import WeightReceiver, WeightSender  # noqa: E402
from vllm_fp8_overlay.sync.sources import sharded_stream  # noqa: E402

GiB = 1 << 30


def _worker(rank: int, args, ports, q) -> None:
    try:
        out = _run(rank, args, ports)
        if rank == 0:
            q.put(("ok", out))
    except BaseException:
        q.put(("err", f"rank {rank}: " + traceback.format_exc()))
        raise


def _run(rank: int, args, ports) -> dict:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dev = torch.device("cuda", 0 if rank == 0 else 1)
    torch.cuda.set_device(dev)
    from vllm_fp8_overlay import kernels

    kernels.register(make_default=True)
    # default group: gloo over the three processes (barriers, results; ranks 1
    # and 2 share a GPU, so no NCCL there); the trainers' mesh: NCCL over 0, 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=3)
    trainers = dist.new_group([0, 1], backend="nccl")
    mesh = None
    if rank < 2:
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(trainers, "cuda")
    results: dict = {}
    for mi, kind in enumerate(args.models):
        specs = B.model_specs(kind, False, args.moe_layers)
        port = ports[1 + mi]
        r: dict = {"tensors": len(specs)}
        if rank == 0:
            snd = WeightSender(B.LAYOUT, "127.0.0.1", port, 2, device=dev)
        elif rank == 2:
            rcv = WeightReceiver("127.0.0.1", port, 2, 1, device=dev)
        held = {}

        def timed(fn):
            ts = []
            for i in range(1 + args.iters):
                dist.barrier()
                t0 = time.perf_counter()
                fn(i)
                torch.cuda.synchronize(dev)
                dist.barrier()
                if i:
                    ts.append(time.perf_counter() - t0)
            return statistics.median(ts), ts

        # ---- sharded: each trainer rank holds its rows only
        dts = []
        if rank < 2:
            from torch.distributed.tensor import DTensor, Shard

            flat, weights = B.build_weights(specs, dev)  # same seed on both ranks: one model
            for name, t in weights:
                local = t.chunk(2, dim=0)[rank].clone()
                dts.append((name, DTensor.from_local(local, mesh, [Shard(0)], shape=t.shape, stride=t.stride())))
            del flat, weights, t, local
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            r[f"sharded_weights_GiB_rank{rank}"] = base / GiB
        step = [0]

        def stream_only(i):
            if rank < 2:
                for _ in sharded_stream(dts, B.LAYOUT):
                    pass

        r["stream_s"], r["stream_runs"] = timed(stream_only)

        def sharded_mode(dst, key):
            """Rank 0 sends the sharded stream (windows into every rank, or into ``dst``
            alone), rank 1 takes part, rank 2 receives into ``held[key]``."""

            def run(i):
                step[0] += 1
                if rank == 0 and i == 1 and args.profile and dst is None:
                    import cProfile
                    import io
                    import pstats

                    prof = cProfile.Profile()
                    prof.enable()
                    snd.send(sharded_stream(dts, B.LAYOUT), step=step[0])
                    torch.cuda.synchronize(dev)
                    prof.disable()
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
                    Path(args.out).mkdir(parents=True, exist_ok=True)
                    (Path(args.out) / f"profile_rank0_{kind}.txt").write_text(buf.getvalue())
                elif rank == 0:
                    snd.send(sharded_stream(dts, B.LAYOUT, dst=dst), step=step[0])
                elif rank == 1:
                    for _ in sharded_stream(dts, B.LAYOUT, dst=dst):
                        pass
                else:
                    held.pop(key, None)
                    held[key] = rcv.receive_all().tensors

            return run

        # every rank receives the windows (several senders), then rank 0 alone (push_sharded, one sender)
        for mode, dst, key in (("sharded", None, "s"), ("into0", 0, "d")):
            r[f"{mode}_s"], r[f"{mode}_runs"] = timed(sharded_mode(dst, key))
            if rank < 2:
                r[f"{mode}_peak_extra_GiB_rank{rank}"] = (torch.cuda.max_memory_allocated(dev) - base) / GiB
                torch.cuda.reset_peak_memory_stats(dev)
        del dts
        torch.cuda.empty_cache()

        # ---- single: rank 0 holds the whole model
        if rank == 0:
            flat, weights = B.build_weights(specs, dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            r["single_weights_GiB_rank0"] = base / GiB

        def single(i):
            step[0] += 1
            if rank == 0:
                snd.send(weights, step=step[0])
            elif rank == 2:
                held.pop("1", None)
                held["1"] = rcv.receive_all().tensors

        r["single_s"], r["single_runs"] = timed(single)
        if rank == 0:
            r["single_peak_extra_GiB_rank0"] = (torch.cuda.max_memory_allocated(dev) - base) / GiB
            del flat, weights
            snd.close()
        same = [None]
        if rank == 2:
            b = dict(held["1"])
            same[0] = all(a.keys() == b.keys() and all(
                torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype == torch.float8_e4m3fn
                else torch.equal(a[k], b[k]) for k in a) for a in (dict(held["s"]), dict(held["d"])))
            held.clear()
            rcv.close()
        box = [r, same[0]]
        parts = [None, None, None]
        dist.all_gather_object(parts, box)
        merged = {}
        for p in parts:
            merged.update({k: v for k, v in p[0].items() if v is not None})
        merged["sharded_equals_single"] = parts[2][1]
        results[kind] = merged
        torch.cuda.empty_cache()
    if rank == 0:
        results["card"] = torch.cuda.get_device_name(dev)
    dist.barrier()
    dist.destroy_process_group()
    return results


def report(res: dict, args) -> str:
    lines = [f"# Sharded vs single-rank trainer ({res['card']}, {res['date']}, torch {res['torch']})", "",
             "| model | mode | median ms | trainer rank 0: weights / peak extra GiB | "
             "trainer rank 1: weights / peak extra GiB | runs ms |", "|---|---|---|---|---|---|"]
    for kind in args.models:
        r = res[kind]
        f = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        lines.append(f"| {kind} | sharded (2 ranks) | {1e3 * r['sharded_s']:.1f} | {f('sharded_weights_GiB_rank0')} / "
                     f"{f('sharded_peak_extra_GiB_rank0')} | {f('sharded_weights_GiB_rank1')} / "
                     f"{f('sharded_peak_extra_GiB_rank1')} | "
                     + " ".join(f"{1e3 * t:.0f}" for t in r["sharded_runs"]) + " |")
        lines.append(f"| {kind} | sharded, gathered into rank 0 alone (push_sharded, one sender) | "
                     f"{1e3 * r['into0_s']:.1f} | {f('sharded_weights_GiB_rank0')} / "
                     f"{f('into0_peak_extra_GiB_rank0')} | {f('sharded_weights_GiB_rank1')} / "
                     f"{f('into0_peak_extra_GiB_rank1')} | " + " ".join(f"{1e3 * t:.0f}" for t in r["into0_runs"]) + " |")
        lines.append(f"| {kind} | sharded stream only (gathers + quantization, nothing sent) | "
                     f"{1e3 * r['stream_s']:.1f} | - | - | " + " ".join(f"{1e3 * t:.0f}" for t in r["stream_runs"]) + " |")
        lines.append(f"| {kind} | single rank | {1e3 * r['single_s']:.1f} | {f('single_weights_GiB_rank0')} / "
                     f"{f('single_peak_extra_GiB_rank0')} | - | " + " ".join(f"{1e3 * t:.0f}" for t in r["single_runs"])
                     + " |")
    lines += ["", "Received bytes of the last sharded steps (both modes) == last single-rank step: "
              + ", ".join(f"{k}: {res[k]['sharded_equals_single']}" for k in args.models), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_sharded_out")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--moe-layers", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    ap.add_argument("--profile", action="store_true", help="cProfile rank 0's second sharded step (tottime, top 40)")
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < 2:
        sys.exit("needs 2 CUDA devices")
    ports = [B._free_port() for _ in range(1 + len(args.models))]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, ports, q)) for r in range(3)]
    for p in procs:
        p.start()
    status, res = q.get(timeout=3600)
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    if status != "ok":
        sys.exit(res)
    res["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["torch"] = torch.__version__
    B.write_results(res, report(res, args), args.out)
    return res


if __name__ == "__main__":
    main()
