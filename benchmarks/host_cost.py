"""Host (CPU) cost per step of the receiver's manifest handling, no GPU needed.

For the synthetic dense and MoE checkpoints of ``bench_sync.py``, builds the
wire manifests the FP8 path sends (fp8 weight + scale per quantized matrix,
256 MiB buckets) and times what ``WeightReceiver`` does with them per bucket on
the host: ``decode_bucket_manifest`` (JSON parse + per-entry validation) and
``tensors_from_buffer`` (one view per entry) on a first step. (Later steps,
with manifests cached and buffers kept, are measured end to end by
``bench_sync.py``'s ``c_keep`` column.) This is a floor for the
end-to-end time of models with many small tensors, whatever the sender does.

Then what a vLLM worker checks on the host before it loads a step
(``apply/steps.py``): each bucket's manifest against the served checkpoint
and the model's parameters (``BucketChecks.check_manifest``, mode auto) and
the whole step's names, dtypes and shapes, on the first step and on later
steps that bring the same manifests (decoded through one manifest cache, as
a receiver does).

    python benchmarks/host_cost.py
"""

from __future__ import annotations

import statistics
import sys
import time
import zlib
from math import prod
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sync import BUCKET, LAYOUT, model_specs  # noqa: E402
from vllm_fp8_overlay.sync import wire  # noqa: E402
from vllm_fp8_overlay.sync.wire import ALIGNMENT, Header, MessageKind, TensorEntry  # noqa: E402


def _al(n):
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def buckets(specs):
    out, cur, end = [], [], 0
    for name, shape in specs:
        if LAYOUT.is_quantized(name):
            r, c = shape
            q = TensorEntry(name, torch.float8_e4m3fn, tuple(shape), 0, r * c)
            sh = (-(-r // 128), -(-c // 128))
            s = TensorEntry(LAYOUT.scale_key(name), torch.float32, sh, 0, sh[0] * sh[1] * 4)
            ents = [q, s]
        else:
            ents = [TensorEntry(name, torch.bfloat16, tuple(shape), 0, 2 * prod(shape))]
        need = sum(_al(e.nbytes) for e in ents)
        if cur and _al(end) + need > BUCKET:
            out.append((cur, end))
            cur, end = [], 0
        for e in ents:
            off = _al(end) if cur else 0
            cur.append(TensorEntry(e.name, e.dtype, e.shape, off, e.nbytes))
            end = off + e.nbytes
    if cur:
        out.append((cur, end))
    return out


def main():
    layout = LAYOUT.to_dict()
    buf = torch.empty(BUCKET, dtype=torch.uint8)
    for kind in ("dense", "moe"):
        bs = buckets(model_specs(kind, False, 16))
        msgs = []
        for i, (ents, end) in enumerate(bs):
            m = wire.encode_manifest(ents, layout)
            h = Header(kind=MessageKind.BUCKET, step=1, index=i, flags=0, manifest_len=len(m), payload_len=end,
                       checksum_algo=0, payload_checksum=0, manifest_crc32=zlib.crc32(m))
            msgs.append((h, m))
        n = sum(len(e) for e, _ in bs)
        ts_dec, ts_view = [], []
        for _ in range(3):
            td = tv = 0.0
            for h, m in msgs:
                t0 = time.perf_counter()
                man = wire.decode_bucket_manifest(h, m, wire.DEFAULT_LIMITS)
                t1 = time.perf_counter()
                wire.tensors_from_buffer(buf[: h.payload_len], man)
                t2 = time.perf_counter()
                td += t1 - t0
                tv += t2 - t1
            ts_dec.append(td)
            ts_view.append(tv)
        dec, view = statistics.median(ts_dec), statistics.median(ts_view)
        print(f"{kind}: {len(bs)} buckets, {n} entries: receiver decode {dec * 1e3:.1f} ms + views "
              f"{view * 1e3:.1f} ms per step ({(dec + view) / n * 1e6:.1f} us/entry) [first step]")


def worker_checks(kinds=("dense", "moe", "qwen3-30b-a3b"), steps: int = 6) -> None:
    from vllm_fp8_overlay.sync.apply.validate import (BucketChecks, PassedManifests, dtype_name, layout_key,
                                                      spec_problems, tensor_specs)

    layout = LAYOUT.to_dict()
    want = layout_key(layout)[0]
    for kind in kinds:
        bs = buckets(model_specs(kind, False, 16))
        raw = [(Header(kind=MessageKind.BUCKET, step=1, index=i, flags=0, manifest_len=len(m), payload_len=end,
                       checksum_algo=0, payload_checksum=0, manifest_crc32=zlib.crc32(m)), m)
               for i, (ents, end) in enumerate(bs) for m in [wire.encode_manifest(ents, layout)]]
        cache = wire.ManifestCache()
        served = {e.name: (dtype_name(e.dtype), tuple(e.shape)) for ents, _ in bs for e in ents}
        params = {n.replace(".weight", ".w"): sp for n, sp in served.items()}  # another reference, as in mode auto
        metas = [(e.name, torch.empty(e.shape, dtype=e.dtype, device="meta")) for ents, _ in bs for e in ents]
        passed = PassedManifests()
        ts = []
        for _ in range(steps):
            mans = [wire.decode_bucket_manifest(h, m, wire.DEFAULT_LIMITS, cache) for h, m in raw]
            t0 = time.perf_counter()
            checks = BucketChecks([(served, "the served checkpoint", want), (params, "the parameters", None)],
                                  passed=passed)
            assert all(checks.check_manifest(m) == [] for m in mans)
            if not (checks.matched_only(served, len(mans)) and len(metas) == len(served)):
                assert spec_problems(tensor_specs(metas), served, what="x") == []
            ts.append(time.perf_counter() - t0)
        print(f"{kind}: {len(bs)} buckets, {len(metas)} entries: worker checks {ts[0] * 1e3:.1f} ms on the "
              f"first step, {statistics.median(ts[1:]) * 1e3:.1f} ms on later steps (median of {steps - 1})")


if __name__ == "__main__":
    main()
    worker_checks()
