"""The worker's value checks of a received step, per bucket: one GPU.

The synthetic checkpoints of ``bench_sync.py`` are sent by ``WeightSender``
(library defaults) into a transport that keeps every message on the GPU,
and received by ``WeightReceiver`` from it, bucket by bucket, as a vLLM
worker receives them. Then, over the same received buckets, side by side:

* tensor by tensor: ``values.value_problems(bucket.tensors)`` per bucket
  (what ``BucketChecks.check_payload`` ran on every platform before);
* per bucket: ``BucketChecks.check_payload(bucket)`` (on CUDA with Triton:
  one launch per dtype over the payload, ``kernels.value_check``).

Medians of ``--iters`` passes over the whole step after one warm-up, each
ending with a device synchronization.

    python benchmarks/receiver_checks.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sync import LAYOUT, MODELS, build_weights, model_specs  # noqa: E402
from vllm_fp8_overlay.sync import WeightReceiver, WeightSender  # noqa: E402
from vllm_fp8_overlay.sync.apply.validate import BucketChecks  # noqa: E402
from vllm_fp8_overlay.sync.transport import _Done  # noqa: E402
from vllm_fp8_overlay.sync.values import value_problems  # noqa: E402


class DeviceLoop:
    """Both ends of a group on one device: the sender's broadcasts are kept
    (copies, in order) and the receiver's broadcasts are filled from them."""

    world_size = 2

    def __init__(self, device: torch.device, rank: int, queue: deque) -> None:
        self.device, self.rank, self.queue = device, rank, queue

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        flat = tensor.view(torch.uint8).view(-1) if tensor.numel() else tensor
        if self.rank == 0:
            self.queue.append(flat.clone())
        elif tensor.numel():
            src = self.queue.popleft()
            flat[: src.numel()].copy_(src)
        return _Done() if async_op else None

    def close(self) -> None:
        pass


def _timed(fn, dev, iters):
    fn()
    torch.cuda.synchronize(dev)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(args) -> dict:
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    from vllm_fp8_overlay import kernels

    kernels.register(make_default=True)
    res: dict = {"models": {}}
    for kind in args.models:
        specs = model_specs(kind, False, 16)
        flat, weights = build_weights(specs, dev)
        q: deque = deque()
        snd = WeightSender(LAYOUT, "", 0, 2, transport=DeviceLoop(dev, 0, q), device=dev)
        snd.send(weights, step=1)
        del flat, weights, snd
        torch.cuda.empty_cache()
        rcv = WeightReceiver("", 0, 2, 1, transport=DeviceLoop(dev, 1, q), device=dev)
        buckets = list(rcv.iter_fresh_buckets(1))
        checks = BucketChecks([], scale_name=LAYOUT.scale_name)
        assert all(checks.check_payload(b) == [] for b in buckets)
        r = {"tensors": sum(len(b.tensors) for b in buckets), "buckets": len(buckets)}
        r["per_tensor_s"] = _timed(lambda bs=buckets: [value_problems(b.tensors, scale_name=LAYOUT.scale_name)
                                                       for b in bs], dev, args.iters)
        r["per_bucket_s"] = _timed(lambda bs=buckets: [checks.check_payload(b) for b in bs], dev, args.iters)
        res["models"][kind] = r
        buckets.clear()
        del rcv
        torch.cuda.empty_cache()
    res["card"] = torch.cuda.get_device_name(dev)
    res["torch"] = torch.__version__
    res["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return res


def report(res: dict, iters: int) -> str:
    lines = [f"# Value checks of a received step ({res['card']}, {res['date']}, torch {res['torch']})", "",
             f"Medians of {iters} passes after one warm-up.", "",
             "| model | received tensors | buckets | tensor by tensor ms | per bucket ms | ratio |",
             "|---|---|---|---|---|---|"]
    for kind, r in res["models"].items():
        lines.append(f"| {kind} | {r['tensors']} | {r['buckets']} | {1e3 * r['per_tensor_s']:.1f} | "
                     f"{1e3 * r['per_bucket_s']:.1f} | {r['per_tensor_s'] / r['per_bucket_s']:.0f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="receiver_checks_out")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    res = run(args)
    md = report(res, args.iters)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
