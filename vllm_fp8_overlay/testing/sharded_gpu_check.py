"""Two CUDA ranks (NCCL) check the grouped window quantization of ``sharded_stream``.

Run by ``tests/test_sources_gpu.py`` under ``torch.distributed.run``
(``--nproc_per_node 2``); rank 0 writes a JSON report to ``--out``. Each
rank holds ``Shard(0)`` of the same seeded weights (``distribute_tensor``);
every weight the stream yields is compared bitwise with the torch backend's
quantization of the full tensor (no Triton code involved), for channel and
128x128 block layouts of both recipes, with the windows gathered into
every rank and into rank 0 alone (one sender: rank 1 yields nothing and
holds no window); then a NaN in rank 1's rows of one weight must make every
rank raise the same error, either way.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

SHAPES = {"mlp.gate_proj": (1024, 512), "mlp.up_proj": (256, 384), "mlp.down_proj": (384, 256),
          "self_attn.q_proj": (130, 256), "self_attn.k_proj": (64, 128)}
NAN_IN = "model.layers.0.mlp.up_proj.weight"  # row 200: rank 1's half


def layouts():
    from vllm_fp8_overlay.formats import FP8Layout

    return [FP8Layout(method=method, strategy=strategy, block_size=block, hidden_size=512)
            for method in ("compressed-tensors", "fp8")
            for strategy, block in (("channel", None), ("block", (128, 128)))]


def weights(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.0.{k}.weight": (torch.randn(s, generator=g) * 0.03).to(torch.bfloat16).to(device)
            for k, s in SHAPES.items()}


def check(mesh, device) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor

    from vllm_fp8_overlay.formats import quantize_tensor
    from vllm_fp8_overlay.sync.sources import Prequantized, StreamStats, sharded_stream

    report = {"checked": 0, "grouped": 0, "mismatches": [], "checked_dst0": 0, "max_gathered_dst0": 0}
    for layout in layouts():
        full = weights(7, device)
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
        for dst in (None, 0):  # every rank receives the windows; rank 0 alone does (one sender)
            stats = StreamStats()
            for name, got in sharded_stream(sharded, layout, stats=stats, window_bytes=1 << 20, dst=dst):
                if isinstance(got, Prequantized):
                    q, sc = got
                else:  # gathered in BF16: the sender quantizes it
                    q, sc = quantize_tensor(got, layout, name=name)
                rq, rs = quantize_tensor(full[name], layout, name=name, backend="torch")
                same = (q.shape == rq.shape and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
                        and sc.dtype == rs.dtype and sc.shape == rs.shape and torch.equal(sc, rs))
                if not same:
                    report["mismatches"].append(f"{layout.method}/{layout.strategy} {name} dst={dst}")
                report["checked" if dst is None else "checked_dst0"] += 1
            if dst is None:
                report["grouped"] += stats.local_quantized
            else:
                report["max_gathered_dst0"] = max(report["max_gathered_dst0"], stats.max_gathered_bytes)
    full = weights(8, device)
    full[NAN_IN][200, 3] = float("nan")
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    for key, dst in (("nan", None), ("nan_dst0", 0)):
        try:
            for _ in sharded_stream(sharded, layouts()[0], dst=dst):
                pass
            report[key] = "no error"
        except ValueError as e:
            report[key] = str(e)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (it can hang 2-GPU set-ups)
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    report = check(mesh, device)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(args.out).write_text(json.dumps(reports, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
