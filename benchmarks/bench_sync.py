"""Weight-sync benchmark: BF16 broadcast vs naive FP8 vs fused Triton FP8.

One command, no torchrun: spawns 2 processes itself (rank 0 = trainer on
cuda:0, rank 1 = receiver on cuda:1), builds synthetic bf16 weights on the GPU
for a 7B-shaped dense model, a 10B MoE and the Qwen3-30B-A3B shape (``MODELS``),
and times per model

  a      BF16 broadcast of the whole model (raw NCCL, 256 MiB messages)
  a_ws   BF16 through WeightSender/WeightReceiver (layout=None)
  b      naive: per 128x128 block x.float(), amax, scale, divide, clamp, cast
         (one tensor at a time), then sent through WeightSender (layout=None)
  c_pt   per tensor: WeightSender's per-tensor path (quantize_tensor with the
         Triton backend per weight, a host sync each, then a copy into the bucket)
  c      ours: WeightSender(layout).send(): every bucket is quantized by grouped
         kernel launches (one per shape) straight into the bucket buffer (fp8 +
         scales at their wire offsets) on a side CUDA stream, one finiteness
         check per bucket; bucket k+1 is quantized while bucket k is on the wire;
         the receiver allocates each step's buckets afresh (``receive_all``)
  c_keep c with ``WeightReceiver(keep_step_buffers=True)``: the receiver reuses
         its bucket buffers and tensor views across steps
  c_worker c with the vLLM worker's per-bucket checks inside ``receive_all``
         (``BucketChecks``: manifests against the served checkpoint, value sentinels)

each end to end: from a barrier until the receiver holds every tensor
(``receive_all``, ready for the loader) and both sides are synchronized.
Per model also the phases of an update, each alone: quantize (the sender's
prepared kernels), wire (raw FP8 broadcast), validate (the receiver's value
sentinels) and load (a ``_foreach_copy_`` stand-in for the loader).
Also: device-copy bandwidth, quantization-kernel bandwidth (the prepared grouped launch the
sender runs, and a one-shot ``quantize_grouped()`` call with its host-side planning), fp8 broadcast.

    python benchmarks/bench_sync.py --out results/            # 2 GPUs
    python benchmarks/bench_sync.py --cpu-smoke --out /tmp/x  # gloo, tiny, CPU

Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_fp8_overlay.formats.detect import FP8Layout  # noqa: E402
from vllm_fp8_overlay.formats import quantize as Q  # noqa: E402
from vllm_fp8_overlay.sync import WeightReceiver, WeightSender, wire  # noqa: E402
from vllm_fp8_overlay.sync.wire import ALIGNMENT  # noqa: E402

LAYOUT = FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv")
BUCKET = 256 << 20


# ------------------------------------------------------------------ models
#: named models of the default run: dense 7B (Llama-8B-shaped block, 32 layers), a 10B MoE
#: (16 layers) and the Qwen3-30B-A3B shape (48 layers of the same MoE block: 128 experts,
#: hidden 2048, expert intermediate 768; 18,768 tensors)
MODELS = ("dense", "moe", "qwen3-30b-a3b")
#: models whose slow columns (b, c_pt, per-tensor kernel timings) are skipped: minutes per run
SLOW_SKIPPED = ("qwen3-30b-a3b",)


def model_specs(kind: str, smoke: bool, moe_layers: int):
    """[(name, shape)] of a synthetic checkpoint."""
    out = []
    if kind == "qwen3-30b-a3b":
        kind, moe_layers = "moe", (2 if smoke else 48)
    if kind == "dense":
        L, H, I, KV = (2, 256, 384, 128) if smoke else (32, 4096, 14336, 1024)
        for i in range(L):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (H, H)),
                (p + "self_attn.k_proj.weight", (KV, H)),
                (p + "self_attn.v_proj.weight", (KV, H)),
                (p + "self_attn.o_proj.weight", (H, H)),
                (p + "post_attention_layernorm.weight", (H,)),
                (p + "mlp.gate_proj.weight", (I, H)),
                (p + "mlp.up_proj.weight", (I, H)),
                (p + "mlp.down_proj.weight", (H, I)),
            ]
    else:
        L, E, H, I, Q_, KV = (2, 8, 256, 128, 512, 128) if smoke else (moe_layers, 128, 2048, 768, 4096, 512)
        for i in range(L):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (Q_, H)),
                (p + "self_attn.k_proj.weight", (KV, H)),
                (p + "self_attn.v_proj.weight", (KV, H)),
                (p + "self_attn.o_proj.weight", (H, Q_)),
                (p + "post_attention_layernorm.weight", (H,)),
                (p + "mlp.gate.weight", (E, H)),
            ]
            for e in range(E):
                out += [
                    (p + f"mlp.experts.{e}.gate_proj.weight", (I, H)),
                    (p + f"mlp.experts.{e}.up_proj.weight", (I, H)),
                    (p + f"mlp.experts.{e}.down_proj.weight", (H, I)),
                ]
    return out


def build_weights(specs, device):
    """One flat bf16 storage; every weight is a view (random normal, 0.02)."""
    total = sum(_numel(s) for _, s in specs)
    flat = torch.empty(total, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    chunk = 1 << 26
    for o in range(0, total, chunk):
        n = min(chunk, total - o)
        flat[o : o + n] = (torch.randn(n, device=device, generator=g) * 0.02).to(torch.bfloat16)
    out, o = [], 0
    for name, shape in specs:
        n = _numel(shape)
        out.append((name, flat[o : o + n].view(shape)))
        o += n
    return flat, out


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------ naive path
def naive_block_quant(w: torch.Tensor, bn: int = 128, bk: int = 128):
    """The float32-upcast reference algorithm, one 2-D tensor at a time."""
    rows, cols = w.shape
    rb, cb = -(-rows // bn), -(-cols // bk)
    x = torch.nn.functional.pad(w, (0, cb * bk - cols, 0, rb * bn - rows)).float()
    x = x.reshape(rb, bn, cb, bk)
    amax = x.abs().amax(dim=(1, 3))
    scale = amax / 448.0
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    q = (x / scale[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.reshape(rb * bn, cb * bk)[:rows, :cols].contiguous(), scale


def naive_items(weights):
    out = []
    for name, t in weights:
        if LAYOUT.is_quantized(name):
            q, s = naive_block_quant(t)
            out += [(name, q), (LAYOUT.scale_key(name), s)]
        else:
            out.append((name, t))
    return out


def _align(n, a=ALIGNMENT):
    return (n + a - 1) // a * a


# ---------------------------------------------------------------- workers
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _ev_time(fn, dev, iters, warmup=1):
    """Median seconds of fn() (device-synchronized)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _receiver_phases(tensors, dev, iters):
    """Seconds of what a worker does with a received step, median of ``iters``:
    validate (the receiver's value sentinels over every tensor, as the vLLM
    worker runs them before loading) and load (GPU stand-in: one
    ``_foreach_copy_`` of every tensor into preallocated destinations, the
    bytes a loader's ``param.copy_`` calls move)."""
    from vllm_fp8_overlay.sync.values import value_problems

    validate = _ev_time(lambda: value_problems(tensors, scale_name=LAYOUT.scale_name), dev, iters)
    srcs = [t for _, t in tensors]
    dests = [torch.empty_like(t) for t in srcs]

    def load():
        try:
            torch._foreach_copy_(dests, srcs)
        except (RuntimeError, NotImplementedError):  # a dtype without a fused copy
            for d, x in zip(dests, srcs):
                d.copy_(x)

    ld = _ev_time(load, dev, iters)
    del dests
    return [validate, ld]


def _trace_one(fn, rank, kind, dev, out):
    """One more c_keep iteration (the default's steady state) under torch.profiler: the
    device timeline per rank (``trace_<model>_rank<r>.json.gz``) and a text
    summary of its kernels and host waits (``timeline_<model>_rank<r>.txt``),
    to see where the wire idles."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(0)
        _sync(dev)
    dist.barrier()
    Path(out).mkdir(parents=True, exist_ok=True)
    raw = Path(out) / f"trace_{kind}_rank{rank}.json"
    prof.export_chrome_trace(str(raw))
    data = json.loads(raw.read_text())
    with gzip.open(str(raw) + ".gz", "wt") as f:
        json.dump(data, f)
    raw.unlink()
    evs = [e for e in data.get("traceEvents", []) if e.get("ph") == "X"]
    t0 = min(e["ts"] for e in evs)
    kern = sorted((e for e in evs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    host = sorted((e for e in evs if e.get("cat") == "cuda_runtime" and "ynchronize" in e.get("name", "")),
                  key=lambda e: e["ts"])
    lines = [f"{kind} rank {rank}: span {(max(e['ts'] + e['dur'] for e in evs) - t0) / 1e3:.2f} ms", "",
             "device work (start ms, duration ms, stream, name):"]
    for e in kern:
        lines.append(f"{(e['ts'] - t0) / 1e3:9.3f} {e['dur'] / 1e3:8.3f} {e.get('tid')} {e['name'][:70]}")
    lines += ["", "host waits (start ms, duration ms, call):"]
    for e in host:
        lines.append(f"{(e['ts'] - t0) / 1e3:9.3f} {e['dur'] / 1e3:8.3f} {e['name']}")
    (Path(out) / f"timeline_{kind}_rank{rank}.txt").write_text("\n".join(lines) + "\n")


#: (class path, method) pairs timed by ``--host-timeline`` (a module's function: (path, "")):
#: the sender's and the receiver's host work per bucket
_HOST_SPANS = (
    ("vllm_fp8_overlay.sync.sender.WeightSender", "send"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_replay_next"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_close_bucket"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_launch_bucket"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_bucket_ready"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_send_control"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_send_owed"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_send_end_of_step"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_grouped_ok"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_new_bucket"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_dispatch"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_manifest"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_header"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_announce"),
    ("vllm_fp8_overlay.sync.transport.BroadcastGroup", "evicted"),
    ("vllm_fp8_overlay.sync.wire.write_seal", ""),
    ("vllm_fp8_overlay.sync.replay.match_fast", ""),
    ("vllm_fp8_overlay.sync.replay.fill_fast", ""),
    ("vllm_fp8_overlay.sync.replay.plan_of", ""),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_graph_key"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_launch_work"),
    ("vllm_fp8_overlay.sync.sender.WeightSender", "_capture_launch"),
    ("vllm_fp8_overlay.sync.outbox._ControlStage", "write_seal"),
    ("vllm_fp8_overlay.sync.outbox._ControlStage", "control"),
    ("vllm_fp8_overlay.sync.outbox._ControlStage", "_host_free"),
    ("vllm_fp8_overlay.sync.sendstate._Slot", "wait"),
    ("torch.cuda.graphs.CUDAGraph", "replay"),
    ("vllm_fp8_overlay.sync.transport.BroadcastGroup", "broadcast"),
    ("vllm_fp8_overlay.sync.transport._WorkHandle", "wait"),
    ("vllm_fp8_overlay.sync.receiver.WeightReceiver", "_announce"),
    ("vllm_fp8_overlay.sync.receiver.WeightReceiver", "_take"),
    ("vllm_fp8_overlay.sync.receiver.WeightReceiver", "_read_control"),
    ("vllm_fp8_overlay.sync.receiver.WeightReceiver", "_post_control"),
    ("vllm_fp8_overlay.sync.receiver.WeightReceiver", "_post_payload"),
    ("vllm_fp8_overlay.sync.receiver.WeightReceiver", "_consume_payload"),
)


@contextlib.contextmanager
def host_spans(extra: tuple = ()):
    """Within the block, every call of ``_HOST_SPANS`` (and ``extra``) is timed on
    the host: yields the list that collects ``(start, seconds, call, depth)``."""
    import importlib

    spans, depth, saved = [], [0], []
    for path, attr in (*_HOST_SPANS, *extra):
        mod, cls = path.rsplit(".", 1)
        label = f"{cls}.{attr}"
        if not attr:  # a module's function
            owner, attr, label = importlib.import_module(mod), cls, cls
        else:
            owner = getattr(importlib.import_module(mod), cls)
        orig = getattr(owner, attr, None)
        if orig is None:
            continue

        def wrapped(*a, _orig=orig, _name=label, **k):
            t = time.perf_counter()
            depth[0] += 1
            try:
                return _orig(*a, **k)
            finally:
                depth[0] -= 1
                spans.append((t, time.perf_counter() - t, _name, depth[0]))

        saved.append((owner, attr, owner.__dict__.get(attr)))
        setattr(owner, attr, wrapped)
    try:
        yield spans
    finally:
        for owner, attr, orig in saved:
            if orig is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, orig)


def write_host_spans(spans: list, t0: float, title: str, path: Path) -> None:
    """One line per timed call: start ms after ``t0``, duration ms, call (indented by depth)."""
    lines = [title, ""]
    for t, d, name, dp in sorted(spans):
        lines.append(f"{1e3 * (t - t0):9.3f} {1e3 * d:8.3f} {'  ' * dp}{name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _host_timeline_one(fn, rank, kind, dev, out):
    """One more c iteration with host timestamps around the sender's and the
    receiver's per-bucket calls (``_HOST_SPANS``), no profiler: the host
    clock is shared by both ranks, so the two files line up
    (``host_<model>_rank<r>.txt``: start ms after the barrier, duration ms, call)."""
    with host_spans() as spans:
        dist.barrier()
        t0 = time.perf_counter()
        fn(0)
        _sync(dev)
        t1 = time.perf_counter()
        dist.barrier()
    write_host_spans(spans, t0, f"{kind} rank {rank}: barrier at host clock {t0:.6f} s, step {1e3 * (t1 - t0):.3f} ms",
                     Path(out) / f"host_{kind}_rank{rank}.txt")


def worker(rank, args, ports, q):
    try:
        res = _worker(rank, args, ports)
        if rank == 0:
            q.put(("ok", res))
    except BaseException:
        q.put(("err", f"rank {rank}: " + traceback.format_exc()))
        raise


def _worker(rank, args, ports):
    smoke = args.cpu_smoke
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.nccl_high_priority:
        # ProcessGroupNCCL reads it when the group is created: NCCL kernels on
        # high-priority streams are scheduled ahead of the quantization kernels
        os.environ["TORCH_NCCL_HIGH_PRIORITY"] = "1"
    bucket = (args.bucket_mb << 20) or None  # None: the sender's default for the device
    dev = torch.device("cpu") if smoke else torch.device(f"cuda:{rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        from vllm_fp8_overlay import kernels

        kernels.register(make_default=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=2)
    backend = "gloo" if smoke else "nccl"
    iters, warm = (min(args.iters, 2), 0) if smoke else (args.iters, 1)
    results = {}
    pi = 1
    for kind in args.models:
        specs = model_specs(kind, smoke, args.moe_layers)
        r = {}
        slow = not args.quick and kind not in SLOW_SKIPPED
        if rank == 0:
            flat, weights = build_weights(specs, dev)
            r["params"] = flat.numel()
            r["tensors"] = len(specs)
            r["quantized_tensors"] = sum(LAYOUT.is_quantized(n) for n, _ in specs)
        port = ports[pi]
        pi += 1
        if rank == 0:
            snd = WeightSender(LAYOUT, "127.0.0.1", port, 2, backend=backend, bucket_bytes=bucket, device=dev,
                               checksum=args.checksum)
            snd_raw = WeightSender(None, "127.0.0.1", 0, 2, transport=snd.transport, bucket_bytes=bucket)
            tr = snd.transport
        else:
            rcv = WeightReceiver("127.0.0.1", port, 2, 1, backend=backend, device=dev)
            tr = rcv.transport
        nbytes_bf16 = sum(_numel(s) * 2 for _, s in specs)

        def timed(fn0, fn1, iters=iters):
            """Barrier, run, device sync, barrier: seconds on rank 0."""
            ts = []
            for i in range(warm + iters):
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    fn0(i)
                else:
                    fn1(i)
                _sync(dev)
                dist.barrier()
                if i >= warm:
                    ts.append(time.perf_counter() - t0)
            return statistics.median(ts), ts

        # (a) raw bf16 broadcast, 256 MiB messages
        msg = BUCKET // 2
        if rank == 1:
            rflat = torch.empty(nbytes_bf16 // 2, dtype=torch.bfloat16, device=dev)

        def raw0(_):
            hs = [tr.broadcast(flat[o : o + msg], async_op=True) for o in range(0, flat.numel(), msg)]
            for h in hs:
                h.wait()

        def raw1(_):
            hs = [tr.broadcast(rflat[o : o + msg], async_op=True) for o in range(0, rflat.numel(), msg)]
            for h in hs:
                h.wait()

        r["a_bf16_raw_s"], r["a_runs"] = timed(raw0, raw1)
        if rank == 1:
            del rflat
        step = [0]

        def recv(_):
            out = rcv.receive_all()
            got = out.tensors
            del out
            return got

        # (a_ws) bf16 through the sync path
        def ws0(_):
            step[0] += 1
            snd_raw.send(weights, step=step[0])

        r["a_bf16_sender_s"], _ = timed(ws0, recv)

        # (b) naive quantize + send
        def nv0(_):
            step[0] += 1
            snd_raw.send(naive_items(weights), step=step[0])

        if slow:
            r["b_naive_s"], _ = timed(nv0, recv)
        if rank == 0 and slow:
            _sync(dev)
            r["naive_quant_only_s"] = _ev_time(lambda: naive_items(weights), dev, iters)

        # (c_pt) WeightSender with the registered (Triton) backend, per tensor
        got = {}

        def pt0(_):
            step[0] += 1
            snd._grouped = False  # the per-tensor path: quantize_tensor per weight, then a copy
            try:
                snd.send(weights, step=step[0])
            finally:
                snd._grouped = None

        def pt1(i):
            got["pt"] = recv(i)

        if slow:
            r["c_per_tensor_s"], _ = timed(pt0, pt1)
        else:
            got["pt"] = {}

        # (c) the sender's own path: grouped kernels straight into the buckets,
        # pipelined on a side stream (the per-tensor path on CPU)
        def gr0(_):
            step[0] += 1
            st = snd.send(weights, step=step[0])
            r["buckets"] = st.num_buckets
            r.setdefault("c_stats", []).append(st.to_dict())

        def gr1(i):
            got.pop("gr", None)  # a loader is done with the previous step before the next one arrives
            got["gr"] = recv(i)

        r["c_grouped_s"], r["c_runs"] = timed(gr0, gr1)

        variants = _variants(args)
        if variants:
            # side by side with c, receiving as c does: the sender's bucket ramp
            # starting larger, and none; launch graphs off. Each variant is
            # followed by c again, so that it has a neighbour in time.
            from vllm_fp8_overlay.sync import bucketlaunch as L, grouped as G

            ramp0, graphs0 = G.RAMP_FIRST_BYTES, L.LAUNCH_GRAPHS
            for vname, (ramp, graphs) in variants.items():
                def v0(_, ramp=ramp, graphs=graphs):
                    step[0] += 1
                    G.RAMP_FIRST_BYTES, L.LAUNCH_GRAPHS = ramp, graphs
                    try:
                        snd.send(weights, step=step[0])
                    finally:
                        G.RAMP_FIRST_BYTES, L.LAUNCH_GRAPHS = ramp0, graphs0

                def c0(_):
                    step[0] += 1
                    snd.send(weights, step=step[0])

                r[vname + "_s"], r[vname + "_runs"] = timed(v0, gr1)
                r[vname + "_c_s"], r[vname + "_c_runs"] = timed(c0, gr1)

        if args.drift:
            # c again, many iterations, with Python's collector off during each one (both ranks)
            # beside it on (default): does c drift over a run, and is the collector part of it?
            import gc

            def off(fn):
                def run(i):
                    gc.disable()
                    try:
                        fn(i)
                    finally:
                        gc.enable()
                return run

            for vname, f0, f1 in (("c_gcoff", off(gr0), off(gr1)), ("c_drift", gr0, gr1)):
                r[vname + "_s"], r[vname + "_runs"] = timed(f0, f1, iters=3 * iters)

        # (c_keep) the same, the receiver keeping its step buffers and views
        def gk0(_):
            step[0] += 1
            snd.send(weights, step=step[0])

        def gk1(i):
            rcv.keep_step_buffers = True
            got.pop("keep", None)
            got["keep"] = recv(i)

        keep_default = rcv.keep_step_buffers if rank == 1 else None
        r["c_keep_s"], r["c_keep_runs"] = timed(gk0, gk1)

        # (c_worker) c as a vLLM worker receives it: the receiver's defaults plus the worker's
        # per-bucket checks (names, dtypes and shapes against the served checkpoint, remembered
        # across steps; value sentinels per bucket), as apply/steps.py runs them
        if rank == 1:
            from vllm_fp8_overlay.sync.apply.validate import BucketChecks, PassedManifests, dtype_name, layout_key

            rcv.keep_step_buffers = keep_default
            served = {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in got["keep"]}
            want = layout_key(LAYOUT.to_dict())[0]
            passed = PassedManifests()

        def gw1(i):
            got.pop("keep", None)
            got.pop("w", None)
            checks = BucketChecks([(served, "the served checkpoint", want)], scale_name=LAYOUT.scale_name,
                                  passed=passed)
            out = rcv.receive_all(check_manifest=checks.check_manifest, check_payload=checks.check_payload_deferred)
            got["w"] = out.tensors

        r["c_worker_s"], r["c_worker_runs"] = timed(gk0, gw1)
        if rank == 1:
            got["keep"] = got.pop("w")
        if args.profile:
            # one more c iteration (library defaults) under cProfile on both ranks: where the host time goes
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            dist.barrier()
            prof.enable()
            if rank == 1:
                rcv.keep_step_buffers = keep_default
            (gr0 if rank == 0 else gr1)(0)
            _sync(dev)
            prof.disable()
            dist.barrier()
            buf_s = io.StringIO()
            ps = pstats.Stats(prof, stream=buf_s).sort_stats("tottime")
            ps.print_stats(25)
            ps.print_callers(8)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"profile_{kind}_rank{rank}.txt").write_text(buf_s.getvalue())
        if args.trace:
            _trace_one(gk0 if rank == 0 else gk1, rank, kind, dev, args.out)
        if args.host_timeline:
            if rank == 1:
                rcv.keep_step_buffers = keep_default
            for _ in range(2):  # the second is the steady state's
                _host_timeline_one(gr0 if rank == 0 else gr1, rank, kind, dev, args.out)
        if rank == 1:
            a, b = dict(got.pop("keep")), dict(got["gr"])
            same = a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                                 for k in a)
            rcv.keep_step_buffers = False
            rcv.release_buffers()
            flag = torch.tensor([1 if same else 0], dtype=torch.int64)
        else:
            flag = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(flag, src=1)
        r["c_keep_equals_grouped"] = bool(flag[0])
        if rank == 1:
            a, b = dict(got["pt"] or got["gr"]), dict(got["gr"])
            same = a.keys() == b.keys() and all(
                torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                            b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)
            flag = torch.tensor([1 if same else 0, sum(t.numel() * t.element_size() for t in a.values())])
            phases = _receiver_phases(list(got["gr"]), dev, iters)
            got.clear()
        else:
            flag = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(flag, src=1)
        r["c_grouped_equals_per_tensor"] = bool(flag[0]) if slow else None
        r["fp8_step_bytes"] = int(flag[1])
        ph = torch.tensor(phases if rank == 1 else [0.0, 0.0], dtype=torch.float64)
        dist.broadcast(ph, src=1)
        r["validate_s"], r["load_s"] = float(ph[0]), float(ph[1])

        # fp8-only broadcast of the step's bytes (raw), for reference
        fp8_n = int(flag[1])
        buf = torch.empty(max(fp8_n, 1), dtype=torch.uint8, device=dev)

        def f80(_):
            hs = [tr.broadcast(buf[o : o + BUCKET], async_op=True) for o in range(0, fp8_n, BUCKET)]
            for h in hs:
                h.wait()

        r["fp8_raw_bcast_s"], _ = timed(f80, f80)
        del buf

        # kernel-only timings (rank 0)
        if rank == 0:
            qt = [t for n, t in weights if LAYOUT.is_quantized(n)]
            n_el = sum(t.numel() for t in qt)
            n_sc = sum(-(-t.shape[0] // 128) * -(-t.shape[1] // 128) for t in qt)
            moved = n_el * 2 + n_el + n_sc * 4
            r["quant_bytes_moved"] = moved
            if dev.type == "cuda":
                from vllm_fp8_overlay.kernels.triton_fp8 import quantize_grouped

                out = torch.empty(n_el + n_sc * 4 + 64 * 2 * len(qt) + (1 << 20), dtype=torch.uint8, device=dev)
                qo, so, e = [], [], 0
                for t in qt:
                    qo.append(e)
                    e = _align(e + t.numel())
                for t in qt:
                    so.append(e)
                    e = _align(e + 4 * -(-t.shape[0] // 128) * -(-t.shape[1] // 128))

                def kgrp():
                    quantize_grouped(qt, "hf", "block", (128, 128), out=out, q_offsets=qo, s_offsets=so)

                if slow:
                    r["quant_grouped_s"] = _ev_time(kgrp, dev, max(iters, 5))
                # the launch the sender runs: planned once, then only the kernels
                from vllm_fp8_overlay.kernels.triton_fp8 import prepare_grouped

                prep = prepare_grouped(qt, "hf", "block", (128, 128), qo, so)
                r["quant_prepared_s"] = _ev_time(lambda: prep(qt, out), dev, max(iters, 5))
                r["quant_prepared_GBps"] = moved / r["quant_prepared_s"] / 1e9
                del out, prep
                if slow:
                    r["quant_per_tensor_s"] = _ev_time(lambda: [Q.quantize_tensor(t, LAYOUT) for t in qt], dev,
                                                       iters)
                    r["quant_torch_backend_s"] = _ev_time(
                        lambda: [Q.quantize_tensor(t, LAYOUT, backend="torch") for t in qt], dev, iters)
                    r["quant_grouped_GBps"] = moved / r["quant_grouped_s"] / 1e9
        if rank == 0:
            snd_raw._closed = True  # shares the transport with snd
            snd.close()
        else:
            rcv.close()
        if rank == 0:
            del flat, weights
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        results[kind] = r
    # device copy bandwidth
    if rank == 0:
        n = (64 << 20) if smoke else (2 << 30)
        x = torch.randn(n // 4, device=dev).view(torch.uint8)
        t = _ev_time(lambda: torch.empty_like(x).copy_(x), dev, max(iters, 5))
        results["copy_GBps"] = 2 * x.numel() / t / 1e9
        results["card"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    dist.barrier()
    dist.destroy_process_group()
    return results


# ----------------------------------------------------------------- report
def report(res, args):
    copy = res["copy_GBps"]
    lines = [
        f"# Weight sync benchmark ({res['card']}, {res['date']}, torch {res['torch']}, triton {res['triton']})",
        "",
        f"Device copy (`torch.empty_like(x).copy_(x)`, 2 GiB, read+write): **{copy:.0f} GB/s**",
        "",
        "| model | params | tensors | a: bf16 raw bcast ms | a_ws: bf16 sender ms | b: naive ms | c_pt: ours per-tensor ms | c: ours grouped ms | c_keep ms | c/a | b/c | quant kernel ms | quant GB/s | % of copy | quantize_grouped() call ms | fp8 raw bcast ms | naive quant ms | torch-backend quant ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in args.models:
        r = res[kind]
        a, b, c = r["a_bf16_raw_s"], r.get("b_naive_s", float("nan")), r["c_grouped_s"]
        r["c_over_a"], r["b_over_c"] = c / a, b / c
        gbps = r.get("quant_prepared_GBps", float("nan"))
        r.setdefault("c_grouped_equals_per_tensor", None)
        r["quant_pct_of_copy"] = 100 * gbps / copy
        ms = lambda k: f"{1e3 * r[k]:.1f}" if k in r else "-"  # noqa: E731
        lines.append(
            f"| {kind} | {r['params'] / 1e9:.2f} B | {r['tensors']} | {ms('a_bf16_raw_s')} | {ms('a_bf16_sender_s')} | "
            f"{ms('b_naive_s')} | {ms('c_per_tensor_s')} | {ms('c_grouped_s')} | {ms('c_keep_s')} | {c / a:.2f} | "
            f"{b / c:.1f} | "
            f"{ms('quant_prepared_s')} | {gbps:.0f} | {r['quant_pct_of_copy']:.0f}% | {ms('quant_grouped_s')} | "
            f"{ms('fp8_raw_bcast_s')} | "
            f"{ms('naive_quant_only_s')} | {ms('quant_torch_backend_s')} |"
        )
    lines += ["", "Per model, one run: quantize = the sender's prepared grouped kernels over every weight (CUDA "
              "events, alone); wire = raw broadcast of the step's FP8 bytes; receive = c (end to end: quantize, "
              "wire and receive overlapped, until the receiver holds the step); validate = the receiver's value "
              "sentinels over the step; load = GPU stand-in (`_foreach_copy_` of every tensor into preallocated "
              "destinations); total = receive + validate + load; c_worker = c received as a vLLM worker "
              "receives it, with its per-bucket checks inline (manifests against the served checkpoint, "
              "remembered across steps, and the value sentinels per bucket).", "",
              "| model | tensors | quantize ms | wire ms | receive (c) ms | validate ms | load ms | total ms | "
              "a: bf16 ms | a_ws ms | c_worker ms | c/a | total/a | a_ws/a | c_worker/a |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in args.models:
        r = res[kind]
        a, c = r["a_bf16_raw_s"], r["c_grouped_s"]
        tot = c + r.get("validate_s", 0.0) + r.get("load_s", 0.0)
        r["total_s"], r["total_over_a"], r["a_ws_over_a"] = tot, tot / a, r["a_bf16_sender_s"] / a
        ms = lambda k: f"{1e3 * r[k]:.1f}" if k in r else "-"  # noqa: E731
        lines.append(f"| {kind} | {r['tensors']} | {ms('quant_prepared_s')} | {ms('fp8_raw_bcast_s')} | "
                     f"{ms('c_grouped_s')} | {ms('validate_s')} | {ms('load_s')} | {1e3 * tot:.1f} | "
                     f"{ms('a_bf16_raw_s')} | {ms('a_bf16_sender_s')} | {ms('c_worker_s')} | {c / a:.2f} | "
                     f"{tot / a:.2f} | {r['a_ws_over_a']:.2f} | {r['c_worker_s'] / a:.2f} |")
    if _variants(args):
        lines += ["", "Variants, each timed beside c run again right after it (same run, medians, ms): " + "; ".join(
            f"{k}: c {1e3 * res[k]['c_grouped_s']:.1f}, " + ", ".join(
                f"{v} {1e3 * res[k][v + '_s']:.1f} (c {1e3 * res[k][v + '_c_s']:.1f})" for v in _variants(args))
            for k in args.models)]
    if args.drift:
        lines += ["", "Drift (c again, 3x the iterations; medians ms, then every iteration): " + "; ".join(
            f"{k}: " + ", ".join(f"{v} {1e3 * res[k][v + '_s']:.1f} [{' '.join(f'{1e3 * t:.1f}' for t in res[k][v + '_runs'])}]"
                                 for v in ("c_gcoff", "c_drift")) for k in args.models)]
    lines += ["", f"bucket {args.bucket_mb or 'sender default'} MiB, TORCH_NCCL_HIGH_PRIORITY={int(args.nccl_high_priority)}",
              "", f"Medians of {args.iters} iterations after {0 if args.cpu_smoke else 1} warm-up; grouped == per-tensor bytes: "
              + ", ".join(f"{k}: {res[k]['c_grouped_equals_per_tensor']}" for k in args.models)
              + "; c_keep == c bytes: " + ", ".join(f"{k}: {res[k]['c_keep_equals_grouped']}" for k in args.models), ""]
    return "\n".join(lines)


def _variants(args) -> dict:
    """c variants timed side by side: name -> (first bucket bytes, launch graphs)."""
    from vllm_fp8_overlay.sync import grouped as G

    v = {}
    if args.study:
        v.update(c_ramp128=(128 << 20, True), c_ramp256=(256 << 20, True), c_noramp=(1 << 50, True))
    if args.study or args.graphs_ab:
        v["c_nograph"] = (G.RAMP_FIRST_BYTES, False)
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, gloo on CPU")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--checksum", default="auto", help="the sender's payload checksum for c (auto, sum64, crc32, none)")
    ap.add_argument("--moe-layers", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--bucket-mb", type=int, default=0,
                    help="WeightSender bucket size (default: the sender's, 1 GiB on CUDA, 256 MiB on CPU)")
    ap.add_argument("--nccl-high-priority", action="store_true", help="TORCH_NCCL_HIGH_PRIORITY=1 for the group")
    ap.add_argument("--quick", action="store_true", help="only a, a_ws, c and the fp8 broadcast")
    ap.add_argument("--study", action="store_true",
                    help="also time c with the bucket ramp starting at 128 and 256 MiB, and without it")
    ap.add_argument("--graphs-ab", action="store_true",
                    help="also time c with the sender's launch graphs off (bucketlaunch.LAUNCH_GRAPHS), beside c")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one c iteration (defaults) per rank (profile_<model>_rank<r>.txt in --out)")
    ap.add_argument("--trace", action="store_true",
                    help="also trace one c iteration per rank with torch.profiler (timeline_<model>_rank<r>.txt)")
    ap.add_argument("--drift", action="store_true",
                    help="also time c for 3x --iters more iterations with Python's collector off, then on")
    ap.add_argument("--host-timeline", action="store_true",
                    help="also time the host calls of one c step per rank, no profiler (host_<model>_rank<r>.txt)")
    args = ap.parse_args(argv)
    if not args.cpu_smoke and torch.cuda.device_count() < 2:
        sys.exit("needs 2 CUDA devices (or --cpu-smoke)")
    ports = [_free_port() for _ in range(1 + len(args.models))]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, ports, q)) for r in range(2)]
    for p in procs:
        p.start()
    status, res = q.get(timeout=3600)
    for p in procs:
        p.join(timeout=120)
    if status != "ok":
        for p in procs:
            if p.is_alive():
                p.kill()
        sys.exit(res)
    try:
        import triton  # noqa: F401  (version only)
    except ImportError:
        pass
    res["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["torch"] = torch.__version__
    res["triton"] = getattr(sys.modules.get("triton"), "__version__", "-")
    write_results(res, report(res, args), args.out)
    return res


def write_results(res: dict, md: str, out_dir: str) -> None:
    """``results.json`` and ``results.md`` under ``out_dir``, and the table on stdout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
