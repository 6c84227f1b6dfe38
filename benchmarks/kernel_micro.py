"""Kernel micro-benchmark: where does the FP8 block-quantization time go?

One GPU, one run. For a 4096x14336 bf16 matrix and for the 224 quantized
matrices of a 7B dense model (32 Llama layers), times with CUDA events (warm,
median) the device copy and the current kernels with one suspect toggled at
a time, counts Triton compilations during the timed calls,
checks bitwise equality with the torch backend and runs the exhaustive check
of the exact reciprocal+FMA division.

    python benchmarks/kernel_micro.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_fp8_overlay.formats import quantize as R  # noqa: E402
from vllm_fp8_overlay.kernels import triton_fp8 as K  # noqa: E402
from vllm_fp8_overlay.kernels.exhaustive import exhaustive_check  # noqa: E402

BLK = (128, 128)


def n_compiled(fn) -> int:
    try:
        return sum(len(v[0]) for v in fn.device_caches.values())
    except Exception:
        return -1


def bench(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts, hs = [], []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        h0 = time.perf_counter()
        fn()
        hs.append(time.perf_counter() - h0)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts), statistics.median(hs)


def dense_shapes():
    H, I, KV = 4096, 14336, 1024
    return [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)] * 32


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="micro_out")
    ap.add_argument("--iters", type=int, default=7)
    args = ap.parse_args(argv)
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    res = {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "rows": rows}

    def record(case, variant, t, host, n_el, n_sc, comp=None, note=""):
        moved = 3 * n_el + 4 * n_sc
        rows.append(dict(case=case, variant=variant, ms=1e3 * t, host_ms=1e3 * host, GBps=moved / t / 1e9,
                         compiles_during_timing=comp, note=note))
        print(f"{case:8s} {variant:44s} {1e3 * t:9.3f} ms  host {1e3 * host:8.3f} ms  {moved / t / 1e9:7.0f} GB/s"
              f"  compiles={comp} {note}", flush=True)

    g = torch.Generator(device=dev).manual_seed(0)
    cases = {}
    A = (torch.randn(4096, 14336, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    cases["single"] = [A]
    shapes = dense_shapes()
    total = sum(r * c for r, c in shapes)
    flat = torch.empty(total, dtype=torch.bfloat16, device=dev)
    for o in range(0, total, 1 << 28):
        n = min(1 << 28, total - o)
        flat[o : o + n] = (torch.randn(n, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    G, o = [], 0
    for r, c in shapes:
        G.append(flat[o : o + r * c].view(r, c))
        o += r * c
    cases["7B(224)"] = G

    for case, ws in cases.items():
        n_el = sum(w.numel() for w in ws)
        n_sc = sum(-(-w.shape[0] // 128) * -(-w.shape[1] // 128) for w in ws)
        qo, so, e = [], [], 0
        for w in ws:
            qo.append(e)
            e += (w.numel() + 63) // 64 * 64
        for w in ws:
            so.append(e)
            e += 4 * (-(-w.shape[0] // 128) * -(-w.shape[1] // 128)) + 64
        out = torch.empty(e, dtype=torch.uint8, device=dev)
        iters = args.iters if case != "single" else 3 * args.iters
        # device copy of the same bytes (read 2 B + write 2 B per element)
        src = flat[:n_el] if case != "single" else A.view(-1)
        dst = torch.empty_like(src)
        t, h = bench(lambda: dst.copy_(src), iters)
        rows.append(dict(case=case, variant="device copy (bf16 -> bf16)", ms=1e3 * t, host_ms=1e3 * h,
                         GBps=4 * n_el / t / 1e9, compiles_during_timing=None, note="4 B/elem moved"))
        print(f"{case:8s} {'device copy':44s} {1e3 * t:9.3f} ms  {4 * n_el / t / 1e9:7.0f} GB/s", flush=True)
        res[f"copy_GBps_{case}"] = 4 * n_el / t / 1e9
        del dst

        def timed(variant, fn, kern, note=""):
            fn()
            torch.cuda.synchronize()
            c0 = n_compiled(kern)
            t, h = bench(fn, iters)
            record(case, variant, t, h, n_el, n_sc, n_compiled(kern) - c0, note)

        # --- current kernels and one-suspect variants
        def cur(**kw):
            def f():
                K.quantize_grouped(ws, "hf", "block", BLK, out=out, q_offsets=qo, s_offsets=so, amax="any",
                                   views=False) if not kw else _variant(**kw)
            return f

        s_base = out[: out.numel() // 4 * 4].view(torch.float32)
        so4 = [x // 4 for x in so]

        def _variant(cache=True, num_warps=None, **v):
            K._quantize_into(ws, "hf", "block", BLK, out, s_base, qo, so4, "auto", cache=cache,
                             num_warps=num_warps, **v)

        timed(f"default: shape groups, division-free exact quotient (num_warps={K.BIG_TILE_WARPS[K.DIV_FAST]})", cur(),
              K._tile_kernel)
        timed("default + DIV=div_rn (hardware-exact division)", cur(DIV=K.DIV_RN), K._tile_kernel)
        timed("default + DIV=recip+2 FMA corrections (= default for bf16)", cur(DIV=K.DIV_FAST), K._tile_kernel)
        timed("now + DIV=x*(1/s) (inexact, cost reference)", cur(DIV=K.DIV_MUL), K._tile_kernel)
        timed("now + atomic_max per tile (1 addr/tensor)", cur(ATOMIC=True), K._tile_kernel)
        timed("now + int64 intra-tile offsets", cur(IDX64=True), K._tile_kernel)
        timed("now + table rebuilt + H2D every call", cur(cache=False), K._tile_kernel)
        timed("now + num_warps=4", cur(num_warps=4), K._tile_kernel)
        timed("now + num_warps=8", cur(num_warps=8), K._tile_kernel)
        timed("now + num_warps=16", cur(num_warps=16), K._tile_kernel)
        timed("now + DIV=div_rn + num_warps=4", cur(DIV=K.DIV_RN, num_warps=4), K._tile_kernel)
        timed("now + DIV=div_rn + num_warps=8", cur(DIV=K.DIV_RN, num_warps=8), K._tile_kernel)
        timed("default again (last row: warm)", cur(), K._tile_kernel)
        timed("now + atomics + int64 (~before, grouped by shape)", cur(ATOMIC=True, IDX64=True),
              K._tile_kernel)
        # bitwise check of the production path vs the torch backend
        qs, ss, am = K.quantize_grouped(ws, "hf", "block", BLK, out=out, q_offsets=qo, s_offsets=so)
        bad = 0
        for i, w in enumerate(ws[:8] if case != "single" else ws):
            q, s, a = R._torch_blockwise(w, "hf", BLK)
            bad += int(not (torch.equal(q.view(torch.uint8), qs[i].view(torch.uint8)) and torch.equal(s, ss[i])
                            and float(a) == float(am[i])))
        res[f"bitwise_mismatching_tensors_{case}"] = bad
        print(f"{case}: tensors differing from the torch backend: {bad}", flush=True)
        del out

    # every (amax, x) pair of the 16-bit dtypes: production kernel vs torch reference
    for dt, rc in ((torch.bfloat16, "hf"), (torch.bfloat16, "ct"), (torch.float16, "hf")):
        t0 = time.perf_counter()
        nq, ns, n = exhaustive_check(dt, rc)
        res[f"exhaustive_{dt}_{rc}"] = {"fp8_bytes_differing": nq, "scales_differing": ns, "elements": n}
        print(f"exhaustive check {dt} {rc}: {nq} fp8 bytes, {ns} scales differ of {n} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    res["plan_cache"] = dict(K._stats)
    (out_dir / "kernel_micro.json").write_text(json.dumps(res, indent=2))
    md = [f"# kernel micro-benchmark ({res['card']}, torch {res['torch']}, triton {res['triton']})", "",
          "| case | variant | ms | host ms | GB/s (3 B/elem) | compiles while timed |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['variant']} | {r['ms']:.3f} | {r['host_ms']:.3f} | {r['GBps']:.0f} | "
                  f"{r['compiles_during_timing']} |")
    (out_dir / "kernel_micro.md").write_text("\n".join(md) + "\n")
    return res


if __name__ == "__main__":
    main()
