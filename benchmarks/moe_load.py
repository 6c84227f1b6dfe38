"""Load time of one update into real vLLM (CPU) against the MoE's expert count.

One command::

    eval "$(python tools/vllm_env.py env 0.32.0 .nox/matrix-vllm-0-32-0)"
    .nox/matrix-vllm-0-32-0/bin/python benchmarks/moe_load.py --out benchmarks/results/moe_load

For each expert count (default 8, 32, 128) it builds a tiny BF16
Qwen3-MoE (2 layers, hidden 128, expert intermediate 64), and for each load
path starts one vLLM engine with the weight-sync extension and pushes
``--steps`` updates through ``WeightSyncClient`` (gloo):

* ``loader``: ``FP8_OVERLAY_DIRECT_EXPERTS=0``: every tensor goes through
  vLLM's layerwise reload and its per-tensor weight loaders;
* ``direct``: the default: the experts are written straight into the fused
  expert parameters, one prepack per layer (``sync/apply/experts.py``);
* ``ep-all`` / ``ep-own`` (``--paths ep-all,ep-own``): a TP = 2 engine with
  expert parallelism (CPU MoE kernels behind the test shim,
  ``testing/ep_shim.py``), every expert tensor given to vLLM's loader, or
  only the worker's own (the default: ``sync/apply/ep_experts.py``); the
  cold check compares parameters only.

Per step it records the worker's ``load_s`` (the load call only: receive
and validation are separate) and ``receive_s`` / ``validate_s``, and the
trainer's push wall time. The table reports the median over steps 2.. (the
first step allocates the receiver's buffers). After the last step each
engine is compared with a freshly started engine on an offline checkpoint of
the same weights: every parameter bitwise, greedy tokens and per-token
logprobs exactly (``harness.assert_warm_equals_cold``).

Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: load path -> (the worker's switch, its value, expert parallel?)
PATHS = {"loader": ("FP8_OVERLAY_DIRECT_EXPERTS", "0", False), "direct": ("FP8_OVERLAY_DIRECT_EXPERTS", "1", False),
         "ep-all": ("FP8_OVERLAY_SKIP_OTHER_RANKS_EXPERTS", "0", True),
         "ep-own": ("FP8_OVERLAY_SKIP_OTHER_RANKS_EXPERTS", "1", True)}
#: the path each is compared with
BASELINE = {"loader": "loader", "direct": "loader", "ep-all": "ep-all", "ep-own": "ep-all"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (results.json, results.md)")
    p.add_argument("--experts", default="8,32,128", help="experts per layer, comma-separated")
    p.add_argument("--steps", type=int, default=4, help="updates per engine")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--moe-intermediate", type=int, default=64)
    p.add_argument("--paths", default="loader,direct", help="load paths to run, comma-separated "
                   "(loader, direct, ep-all, ep-own)")
    p.add_argument("--no-cold-check", action="store_true", help="skip the warm == cold comparison")
    return p


def _say(msg: str) -> None:
    print(f"[moe_load] {msg}", flush=True)


def run_engine(base: Path, work: Path, path: str, steps: int, cold_check: bool) -> dict:
    """One engine on ``base`` with load path ``path``: ``steps`` pushes, then warm == cold."""
    from vllm_fp8_overlay.demo import free_port, write_serving_checkpoint
    from vllm_fp8_overlay.demo_report import push_row
    from vllm_fp8_overlay.sync.client import WeightSyncClient
    from vllm_fp8_overlay.testing import harness
    from vllm_fp8_overlay.testing import tiny_models as tm

    switch, value, ep = PATHS[path]
    os.environ[switch] = value  # read by the worker, inherited at engine start
    config = tm.load_config(base)
    w = tm.load_checkpoint(base)
    if ep:  # TP = 2 with expert parallelism, the CPU MoE kernels behind the test shim (testing/ep_shim.py)
        from vllm_fp8_overlay.testing.ep_shim import EXTENSION as EP_EXTENSION

        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
        llm = harness.start_sync_engine(base, tensor_parallel_size=2, enable_expert_parallel=True,
                                        distributed_executor_backend="mp", worker_extension_cls=EP_EXTENSION)
    else:
        llm = harness.start_sync_engine(base)
    rows = []
    try:
        with WeightSyncClient([llm], host="127.0.0.1", port=free_port(), timeout=600) as client:
            for i in range(1, steps + 1):
                w = tm.perturb_state_dict(w, seed=500 + i, scale=0.05)
                rep = client.push(w, step=i)
                rows.append({**push_row(rep), "direct_expert_tensors": rep.workers[0].get("direct_expert_tensors"),
                             "other_ranks_expert_tensors": rep.workers[0].get("other_ranks_expert_tensors"),
                             "worker_load_s": [x.get("load_s") for x in rep.workers]})
                _say(f"  {path} step {i}: load {rows[-1]['load_s'] * 1e3:.1f} ms, "
                     f"push {rows[-1]['push_s'] * 1e3:.0f} ms")
        equal = None
        if cold_check:
            ckpt = write_serving_checkpoint(work / f"cold_{path}", w, config, None)
            # EP: parameters only (a fresh engine for outputs would be TP = 1, whose sums differ in
            # rounding; tests/test_sync_sharded_vllm.py (c) compares EP outputs with a fresh EP engine)
            harness.assert_warm_equals_cold(llm, ckpt, f"{base.name} {path} after {steps} updates", outputs=not ep)
            equal = True
    finally:
        harness.stop_sync_engine(llm)
    later = rows[1:] or rows
    med = {k: statistics.median(r[k] for r in later) for k in ("load_s", "receive_s", "validate_s", "push_s")}
    return {"path": path, "tensors": rows[0]["tensors"], "bytes": rows[0]["bytes"], "rows": rows,
            "direct_expert_tensors": rows[-1]["direct_expert_tensors"],
            "other_ranks_expert_tensors": rows[-1]["other_ranks_expert_tensors"],
            "median": med, "warm_eq_cold": equal}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import torch

    from vllm_fp8_overlay.testing import harness
    from vllm_fp8_overlay.testing import tiny_models as tm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moe_load_"))
    results = []
    for n in [int(x) for x in args.experts.split(",")]:
        base = tm.make_qwen3_moe(work / f"experts{n}", layers=args.layers, num_experts=n, hidden=args.hidden,
                                 moe_intermediate=args.moe_intermediate)
        for path in args.paths.split(","):
            _say(f"{n} experts, {path}")
            t = time.perf_counter()
            r = run_engine(base, work / f"experts{n}", path, args.steps, not args.no_cold_check)
            r.update(experts=n, wall_s=time.perf_counter() - t)
            results.append(r)
    meta = {"date": datetime.date.today().isoformat(), "vllm": harness.vllm_version(), "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "model": {"layers": args.layers, "hidden": args.hidden, "moe_intermediate": args.moe_intermediate},
            "steps": args.steps}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "results.md").write_text(render(meta, results))
    print(render(meta, results))
    return 0


def render(meta: dict, results: list[dict]) -> str:
    lines = [f"vLLM {meta['vllm']} (CPU), torch {meta['torch']}, {meta['cpus']} CPUs, {meta['date']}; Qwen3-MoE "
             f"{meta['model']['layers']} layers, hidden {meta['model']['hidden']}, expert intermediate "
             f"{meta['model']['moe_intermediate']}, BF16; medians of steps 2-{meta['steps']}.", "",
             "| experts | tensors | path | written directly | left out (other ranks') | load ms | load us / tensor "
             "| receive ms | validate ms | push ms | load vs its baseline | warm == cold |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["experts"], r["path"]): r["median"]["load_s"] for r in results}
    for r in results:
        m = r["median"]
        b = base.get((r["experts"], BASELINE[r["path"]]))
        ratio = m["load_s"] / b if b else float("nan")
        eq = {True: "yes", None: "-"}.get(r["warm_eq_cold"], "no")
        lines.append(f"| {r['experts']} | {r['tensors']} | {r['path']} | {r['direct_expert_tensors']} | "
                     f"{r.get('other_ranks_expert_tensors')} | "
                     f"{m['load_s'] * 1e3:.1f} | "
                     f"{m['load_s'] / r['tensors'] * 1e6:.0f} | {m['receive_s'] * 1e3:.1f} | "
                     f"{m['validate_s'] * 1e3:.1f} | {m['push_s'] * 1e3:.0f} | {ratio:.2f} | {eq} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
