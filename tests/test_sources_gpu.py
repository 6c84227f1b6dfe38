"""Sharded sources on 2 GPUs (NCCL): the grouped quantization of a window.

On CUDA with Triton, ``sharded_stream`` quantizes every row shard of a window
with the grouped kernels straight into the gather buffer. Two ranks, each
holding ``Shard(0)`` of the same weights (``distribute_tensor``):

* every weight it sends equals, bitwise, the per-tensor quantization of the
  full tensor by the torch backend (``formats.quantize_tensor(...,
  backend="torch")``: no Triton code involved), for channel and 128x128 block layouts, both
  recipes, with even and uneven row splits (uneven splits that break whole
  blocks are gathered in BF16 and quantized by the sender instead);
* a NaN in one rank's shard makes *both* ranks raise the same error naming
  the rank (a rank that raised alone would leave the other in the next
  gather).
"""

from __future__ import annotations

import importlib.util
import os
import traceback

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or importlib.util.find_spec("triton") is None,
    reason="needs 2 CUDA devices and triton",
)

SHAPES = {"mlp.gate_proj": (1024, 512), "mlp.up_proj": (256, 384), "mlp.down_proj": (384, 256),
          "self_attn.q_proj": (130, 256), "self_attn.k_proj": (64, 128)}


def _layouts():
    from vllm_fp8_overlay.formats import FP8Layout

    return [FP8Layout(method=method, strategy=strategy, block_size=block, hidden_size=512)
            for method in ("compressed-tensors", "fp8")
            for strategy, block in (("channel", None), ("block", (128, 128)))]


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.0.{k}.weight": (torch.randn(s, generator=g) * 0.03).to(torch.bfloat16)
            for k, s in SHAPES.items()}


def _rank(rank: int, port: int, q) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from vllm_fp8_overlay.formats import quantize_tensor
    from vllm_fp8_overlay.sync.sources import Prequantized, StreamStats, sharded_stream

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=2)
        mesh = init_device_mesh("cuda", (2,))
        report = {"checked": 0, "grouped": 0, "errors": []}
        for layout in _layouts():
            full = {k: v.cuda() for k, v in _weights(7).items()}
            sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
            stats = StreamStats()
            for name, got in sharded_stream(sharded, layout, stats=stats, window_bytes=1 << 20):
                if not layout.quantizes(name, full[name].shape):
                    continue
                if isinstance(got, Prequantized):
                    q, sc = got
                else:  # gathered in BF16: the sender quantizes it
                    q, sc = quantize_tensor(got, layout, name=name)
                rq, rs = quantize_tensor(full[name], layout, name=name, backend="torch")
                same = (q.shape == rq.shape and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
                        and sc.dtype == rs.dtype and sc.shape == rs.shape and torch.equal(sc, rs))
                if not same:
                    report["errors"].append(f"{layout.method}/{layout.strategy} {name}: differs")
                report["checked"] += 1
            report["grouped"] += stats.local_quantized
        # a NaN in rank 1's rows of one weight: both ranks raise, naming rank 1
        layout = _layouts()[0]
        full = {k: v.cuda() for k, v in _weights(8).items()}
        full["model.layers.0.mlp.up_proj.weight"][200, 3] = float("nan")  # rows 128.. are rank 1's
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
        try:
            for _ in sharded_stream(sharded, layout):
                pass
            report["nan"] = "no error"
        except ValueError as e:
            report["nan"] = str(e)
        dist.barrier()
        dist.destroy_process_group()
        q.put((rank, report))
    except BaseException:
        q.put((rank, {"crash": traceback.format_exc()}))


def test_grouped_window_quantization_equals_per_tensor_and_nan_stops_every_rank():
    import torch.multiprocessing as mp

    from vllm_fp8_overlay.sync.transport import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for r in (0, 1):
        assert "crash" not in got[r], got[r]["crash"]
        assert got[r]["errors"] == [], got[r]["errors"]
        assert got[r]["checked"] >= 16 and got[r]["grouped"] >= 8, got[r]
        assert "trainer rank(s) [1] hold non-finite values" in got[r]["nan"], got[r]["nan"]
    assert "model.layers.0.mlp.up_proj.weight" in got[1]["nan"], got[1]["nan"]
