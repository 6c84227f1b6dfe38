#!/usr/bin/env bash
# What waits for a machine with two CUDA GPUs, as one command per part, each
# well inside ten minutes, writing under OUT (default: ./two_gpu_out):
#
#   benchmarks/two_gpu_runs.sh tests    # the GPU tests: kernels, sources and rank parts over NCCL
#   benchmarks/two_gpu_runs.sh sync 1   # bench_sync.py, dense then MoE (10B and the 30B-A3B shape),
#   benchmarks/two_gpu_runs.sh sync 2   # --quick --iters 15 --host-timeline --drift: one run per call
#   benchmarks/two_gpu_runs.sh sharded  # bench_sharded.py --iters 5 (gathered, into rank 0, sharded)
#
# ``tests`` decides two gates: when tests/test_rank_parts_gpu.py and
# tests/test_sources_gpu.py pass, "nccl" joins rank_parts.PARTS_BACKENDS and
# sources.GATHER_INTO_ONE_BACKENDS. ``sync`` gives the c/a ratios that
# BENCHMARKS.md reports per model (targets: dense <= 0.55, MoE <= 0.6).
# Where pytest is not installed, wheels in .whl/ are installed first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-two_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L | tee "$OUT/gpus.txt"
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$n" -ge 2 ] || { echo "needs 2 CUDA GPUs, found $n"; exit 2; }

case "${1:-}" in
tests)
    python3 -m pytest -q -p no:cacheprovider -ra tests/test_kernels_gpu.py tests/test_sources_gpu.py \
        tests/test_rank_parts_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
    ;;
sync)
    run=${2:-1}
    for models in dense "moe qwen3-30b-a3b"; do
        tag=$(echo "$models" | tr ' ' '+')
        python3 benchmarks/bench_sync.py --quick --iters 15 --models $models --host-timeline --drift \
            --out "$OUT/sync-$tag-$run" 2>&1 | tail -5
    done
    for f in "$OUT"/sync-*/results.md; do echo "== $f"; sed -n '/^| model | params/,/^$/p' "$f"; done
    ;;
sharded)
    python3 benchmarks/bench_sharded.py --iters 5 --out "$OUT/sharded" 2>&1 | tail -20
    ;;
*)
    echo "usage: $0 tests | sync RUN | sharded"; exit 2
    ;;
esac
