"""The sender's own cost per step, without a wire: one GPU is enough.

``WeightSender`` sends the synthetic checkpoints of ``bench_sync.py`` (dense
7B, the 10B MoE, the Qwen3-30B-A3B shape) through a transport whose
broadcasts complete at once, so what is left of a step is the sender itself:
its host loop over the items (iterator, memo, bucket-layout replay, launch
keys, manifests) and the quantization kernels it waits for. On two GPUs that
host loop runs beside the wire; when it takes about as long as the wire it
becomes the critical path (the slow mode of ``bench_sync.py``'s MoE
columns). Columns per model, medians of ``--iters`` steps after two
warm-ups (the second one replays the first one's bucket layout):

* host ms: wall time of ``send()`` (host loop plus its waits for the kernels);
* kernels ms: the quantization kernels alone (the sender's prepared grouped
  launches over every weight, CUDA events), the floor of ``send()``;
* us per item: (host - kernels) / items, the host work per checkpoint tensor;
* bf16 host ms: the same with ``layout=None`` (the a_ws path: copies only);
* prequantized host ms: the FP8 send of the same weights already quantized
  (``sources.Prequantized``, what a sharded trainer's ``sharded_stream``
  yields): the sender copies FP8 weights and scales as they are.

``--profile`` writes a cProfile of one replayed step per model.
``--wire-gbps R`` also sends over an emulated wire of R GB/s (``EmulatedWire``:
each broadcast waits for the current stream and then occupies a wire stream
for 10 us + bytes / R, in posting order, as NCCL's stream does): what a step
takes above that wire's own time is the sender's start-up and the gaps where
the wire waits for the sender's host (the receiver is not emulated).

    python benchmarks/sender_host.py --out DIR          # one CUDA GPU
    python benchmarks/sender_host.py --cpu-smoke --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sync import LAYOUT, MODELS, build_weights, host_spans, model_specs, write_host_spans  # noqa: E402
from vllm_fp8_overlay.sync import WeightSender  # noqa: E402
from vllm_fp8_overlay.sync.transport import _Done  # noqa: E402


class NoWire:
    """Rank 0 of a group whose broadcasts complete at once (nothing is sent)."""

    rank = 0
    world_size = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        return _Done() if async_op else None

    def close(self) -> None:
        pass


class _EmulatedWork:
    """An emulated transfer's handle: ``wait()`` orders the current stream
    after it and returns at once, as an NCCL work's does."""

    def __init__(self, event) -> None:
        self.event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


class EmulatedWire(NoWire):
    """Rank 0 of a group whose broadcasts take the time a real wire would:
    each one waits for the current stream (as NCCL's stream does), then
    keeps an emulated wire stream busy for ``latency + bytes / rate``
    (``torch.cuda._sleep``), in posting order. What a step then takes above
    the wire's own time is the sender's: its start-up, and the gaps where
    the wire waits for the host. No receiver: its side is not emulated."""

    def __init__(self, device: torch.device, gbps: float, latency_us: float = 10.0) -> None:
        super().__init__(device)
        self.rate, self.latency = gbps * 1e9, latency_us * 1e-6
        self.stream = torch.cuda.Stream(device=device)
        self.wire_s = 0.0  # emulated wire time of the broadcasts since the last reset
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1 << 20)  # warm
        a.record()
        torch.cuda._sleep(1 << 26)
        b.record()
        b.synchronize()
        self.cycles_per_s = (1 << 26) / (a.elapsed_time(b) / 1e3)

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        t = self.latency + tensor.numel() * tensor.element_size() / self.rate
        self.wire_s += t
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(int(t * self.cycles_per_s))
            done = torch.cuda.Event()
            done.record()
        work = _EmulatedWork(done)
        if async_op:
            return work
        work.wait()
        return None


def _emulated(weights, dev, iters: int, gbps: float, path: Path | None) -> dict:
    """``send()`` over :class:`EmulatedWire`: medians of the step (until the
    wire is through) and of the wire's own time, and their difference."""
    tr = EmulatedWire(dev, gbps)
    snd = WeightSender(LAYOUT, "", 0, 2, transport=tr, device=dev)
    steps, wires = [], []
    for i in range(2 + iters):
        _sync(dev)
        tr.wire_s = 0.0
        t0 = time.perf_counter()
        snd.send(weights, step=i)
        _sync(dev)
        if i >= 2:
            steps.append(time.perf_counter() - t0)
            wires.append(tr.wire_s)
    if path is not None:
        _host_timeline(snd, weights, dev, path)
    med, wire = statistics.median(steps), statistics.median(wires)
    return {"emul_step_s": med, "emul_wire_s": wire, "emul_over_s": med - wire, "emul_runs": steps}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _steps(snd: WeightSender, weights, dev, iters: int, step0: int) -> tuple[float, list[float]]:
    ts = []
    for i in range(2 + iters):
        _sync(dev)
        t0 = time.perf_counter()
        snd.send(weights, step=step0 + i)
        _sync(dev)
        if i >= 2:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def _profile(snd: WeightSender, items, dev, path: Path) -> None:
    """cProfile of one more (replayed) step."""
    prof = cProfile.Profile()
    prof.enable()
    snd.send(items, step=10_000)
    _sync(dev)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(s.getvalue())


def _host_timeline(snd: WeightSender, items, dev, path: Path) -> None:
    """Host timestamps around the sender's per-bucket calls in one more
    (replayed) step, no profiler (``bench_sync.host_spans``)."""
    with host_spans() as spans:
        _sync(dev)
        t0 = time.perf_counter()
        snd.send(items, step=20_000)
        _sync(dev)
        t1 = time.perf_counter()
    write_host_spans(spans, t0, f"one replayed step, no wire: {1e3 * (t1 - t0):.3f} ms", path)


def _kernels_s(weights, dev, iters: int) -> float:
    """The sender's prepared grouped launch over every quantized weight, alone."""
    if dev.type != "cuda":
        return float("nan")
    from vllm_fp8_overlay.kernels.triton_fp8 import prepare_grouped

    qt = [t for n, t in weights if LAYOUT.is_quantized(n)]
    qo, so, end = [], [], 0
    for t in qt:
        qo.append(end)
        end = (end + t.numel() + 63) // 64 * 64
    for t in qt:
        so.append(end)
        end = (end + 4 * -(-t.shape[0] // 128) * -(-t.shape[1] // 128) + 63) // 64 * 64
    out = torch.empty(end, dtype=torch.uint8, device=dev)
    prep = prepare_grouped(qt, "hf", "block", (128, 128), qo, so)
    ts = []
    for i in range(2 + iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        prep(qt, out)
        b.record()
        b.synchronize()
        if i >= 2:
            ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def run(args) -> dict:
    dev = torch.device("cpu") if args.cpu_smoke else torch.device("cuda:0")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        from vllm_fp8_overlay import kernels

        kernels.register(make_default=True)
    res: dict = {"models": {}}
    for kind in args.models:
        specs = model_specs(kind, args.cpu_smoke, 16)
        flat, weights = build_weights(specs, dev)
        r: dict = {"tensors": len(specs)}
        snd = WeightSender(LAYOUT, "", 0, 2, transport=NoWire(dev), device=dev)
        r["host_s"], r["host_runs"] = _steps(snd, weights, dev, args.iters, 0)
        r["kernels_s"] = _kernels_s(weights, dev, args.iters)
        r["us_per_item"] = 1e6 * (r["host_s"] - (0 if r["kernels_s"] != r["kernels_s"] else r["kernels_s"])) / len(specs)
        if args.profile:
            _profile(snd, weights, dev, Path(args.out) / f"profile_{kind}.txt")
        if args.host_timeline:
            _host_timeline(snd, weights, dev, Path(args.out) / f"host_{kind}.txt")
        if args.wire_gbps and dev.type == "cuda":
            r.update(_emulated(weights, dev, args.iters, args.wire_gbps,
                               Path(args.out) / f"host_emulated_{kind}.txt" if args.host_timeline else None))
        raw = WeightSender(None, "", 0, 2, transport=NoWire(dev), device=dev)
        r["bf16_host_s"], r["bf16_host_runs"] = _steps(raw, weights, dev, args.iters, 0)
        del raw
        if dev.type == "cuda":
            from vllm_fp8_overlay.formats import quantize_tensor
            from vllm_fp8_overlay.sync.sources import Prequantized

            pre = [(n, Prequantized(*quantize_tensor(t, LAYOUT, name=n)) if LAYOUT.is_quantized(n) else t)
                   for n, t in weights]
            snd_pre = WeightSender(LAYOUT, "", 0, 2, transport=NoWire(dev), device=dev)
            r["pre_host_s"], r["pre_host_runs"] = _steps(snd_pre, pre, dev, args.iters, 0)
            if args.profile:
                _profile(snd_pre, pre, dev, Path(args.out) / f"profile_prequantized_{kind}.txt")
            del pre, snd_pre
        res["models"][kind] = r
        del flat, weights, snd
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    res["wire_gbps"] = args.wire_gbps
    res["card"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    res["torch"] = torch.__version__
    res["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return res


def report(res: dict, iters: int) -> str:
    lines = [f"# Sender cost per step without a wire ({res['card']}, {res['date']}, torch {res['torch']})", "",
             f"Medians of {iters} steps after two warm-ups.", "",
             "| model | tensors | host ms | kernels ms | us per item | bf16 host ms | prequantized host ms |",
             "|---|---|---|---|---|---|---|"]
    for kind, r in res["models"].items():
        pre = f"{1e3 * r['pre_host_s']:.1f}" if "pre_host_s" in r else "-"
        lines.append(f"| {kind} | {r['tensors']} | {1e3 * r['host_s']:.1f} | {1e3 * r['kernels_s']:.1f} | "
                     f"{r['us_per_item']:.2f} | {1e3 * r['bf16_host_s']:.1f} | {pre} |")
    emul = {k: r for k, r in res["models"].items() if "emul_step_s" in r}
    if emul:
        lines += ["", f"Over an emulated wire ({res['wire_gbps']:g} GB/s, 10 us per transfer, no receiver; medians):", "",
                  "| model | step ms | its wire ms | step - wire ms | steps ms |", "|---|---|---|---|---|"]
        for kind, r in emul.items():
            lines.append(f"| {kind} | {1e3 * r['emul_step_s']:.2f} | {1e3 * r['emul_wire_s']:.2f} | "
                         f"{1e3 * r['emul_over_s']:.2f} | " + " ".join(f"{1e3 * t:.2f}" for t in r["emul_runs"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="sender_host_out")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (the per-tensor path)")
    ap.add_argument("--profile", action="store_true", help="cProfile of one replayed step per model")
    ap.add_argument("--wire-gbps", type=float, default=0.0,
                    help="also send over an emulated wire of this rate (374: NVLink broadcast of 1 GiB on 2x H200)")
    ap.add_argument("--host-timeline", action="store_true",
                    help="host timestamps of the sender's calls in one replayed step per model (host_<model>.txt)")
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --cpu-smoke)")
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
