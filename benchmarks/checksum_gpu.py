"""Cost of the payload checksums on a GPU, side by side with a device copy.

For payloads of 64 MiB, 256 MiB (the default bucket) and 1 GiB on one CUDA
device, times (CUDA events, median of ``--iters``):

* ``copy``: ``dst.copy_(src)``, the device's copy bandwidth (read + write);
* ``sum64``: :func:`vllm_fp8_overlay.sync.wire.sum64`, the CUDA default, one
  reduction reading every byte once, plus the scalar back to the host;
* ``crc32``: the CPU algorithm on a CUDA payload (device-to-host copy, then
  zlib), what a full check cost before ``sum64``.

It also checks that the GPU's ``sum64`` equals the CPU's on the same bytes.

    python benchmarks/checksum_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_fp8_overlay.sync import wire  # noqa: E402


def _time(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="checksum_out")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for mib in (64, 256, 1024):
        n = mib << 20
        src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_s = _time(lambda: dst.copy_(src), a.iters)
        sum_s = _time(lambda: wire.sum64(src), a.iters)
        crc_s = _time(lambda: wire.payload_checksum(src, wire.ChecksumAlgo.CRC32), max(3, a.iters // 5))
        same = wire.sum64(src) == wire.sum64(src.cpu())
        row = {"MiB": mib, "copy_ms": copy_s * 1e3, "sum64_ms": sum_s * 1e3, "crc32_host_ms": crc_s * 1e3,
               "copy_GBps": 2 * n / copy_s / 1e9, "sum64_GBps": n / sum_s / 1e9,
               "sum64_over_copy": sum_s / copy_s, "gpu_equals_cpu": same}
        rows.append(row)
        print(f"{mib:5d} MiB: copy {row['copy_ms']:.3f} ms ({row['copy_GBps']:.0f} GB/s r+w), "
              f"sum64 {row['sum64_ms']:.3f} ms ({row['sum64_GBps']:.0f} GB/s read, "
              f"{row['sum64_over_copy']:.2f}x copy), crc32 via host {row['crc32_host_ms']:.1f} ms; "
              f"gpu == cpu: {same}", flush=True)
        del src, dst
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checksum_gpu.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=2))
    return 0 if all(r["gpu_equals_cpu"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
