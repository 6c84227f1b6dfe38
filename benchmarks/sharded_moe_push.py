"""A 2-rank FSDP2 trainer pushing a MoE into an expert-parallel vLLM engine (CPU):
gathered and broadcast vs sent by the ranks that hold it (rank parts).

One command::

    eval "$(python tools/vllm_env.py env 0.32.0 .nox/matrix-vllm-0-32-0)"
    .nox/matrix-vllm-0-32-0/bin/python benchmarks/sharded_moe_push.py --out benchmarks/results/sharded_moe_push

It builds a tiny BF16 Qwen3-MoE (2 layers, ``--experts`` per layer, hidden
256, expert intermediate 128), serves it with ``vllm serve`` at TP = 2 with
expert parallelism (CPU MoE kernels behind the test shim
``testing/ep_shim.py``), and runs the 2-rank FSDP2 trainer
(``testing/fsdp_trainer.py``) twice against the same engine, ``--steps``
steps each, alternating:

* ``gathered``: ``push_sharded`` without parts: every weight gathered into
  rank 0 and broadcast to both workers;
* ``parts``: ``push_sharded(..., parts=RankParts(...))``: rank r sends EP
  worker r the experts it holds and both workers its rows of the other
  weights; nothing is gathered.

Per step: each rank's ``push_sharded`` wall time (from a barrier), the bytes
each worker received, its receive and load times. Medians over steps 2..
(the first allocates). After the last step each worker's parameters equal a
cold load of the last checkpoint (digest). Writes ``results.json`` and
``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="steps per path")
    p.add_argument("--rounds", type=int, default=2, help="trainer runs per path, alternating")
    return p


def _trainer(base: Path, url: str, ckpts: list[Path], first: int, out: Path, parts: bool) -> dict:
    from vllm_fp8_overlay.sync.transport import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vllm_fp8_overlay.testing.fsdp_trainer", "push", "--model", str(base), "--url", url,
           "--steps", *map(str, ckpts), "--first-step", str(first), "--out", str(out)]
    r = subprocess.run(cmd + (["--rank-parts"] if parts else []), capture_output=True, text=True, cwd=REPO,
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-6000:])
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from vllm_fp8_overlay.demo import write_serving_checkpoint
    from vllm_fp8_overlay.testing import harness
    from vllm_fp8_overlay.testing import tiny_models as tm
    from vllm_fp8_overlay.testing.ep_shim import EXTENSION as EP_EXTENSION
    from vllm_fp8_overlay.testing.serve import rpc, vllm_serve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sharded_moe_push_"))
    base = tm.make_qwen3_moe(work / "trainer_w0", num_experts=args.experts)
    config = tm.load_config(base)
    ws = [tm.load_checkpoint(base)]
    n = args.steps * args.rounds * 2
    for k in range(1, n + 1):
        ws.append(tm.perturb_state_dict(ws[-1], seed=700 + k, scale=0.05))
    ckpts = [base] + [tm.save_checkpoint(work / f"trainer_w{k}", ws[k], config) for k in range(1, n + 1)]
    served0 = write_serving_checkpoint(work / "bf16_w0", ws[0], config, None)
    served_last = write_serving_checkpoint(work / "bf16_last", ws[-1], config, None)
    ep = ["--tensor-parallel-size", "2", "--enable-expert-parallel", "--distributed-executor-backend", "mp",
          "--worker-extension-cls", EP_EXTENSION]
    rows: list[dict] = []
    step = 1
    with vllm_serve(served0, out / "engine.log", args=ep, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as url:
        for rnd in range(args.rounds):
            for path in ("gathered", "parts"):
                batch = ckpts[step:step + args.steps]
                got = _trainer(base, url, batch, step, work / f"{path}_{rnd}.json", path == "parts")
                for k, rep in enumerate(got["reports"]):
                    other = got["reports_per_rank"][1][k]
                    rows.append({"path": path, "round": rnd, "step_in_run": k, "step": rep["step"],
                                 "push_s": [rep["push_s"], other["push_s"]], "worker_bytes": rep["worker_bytes"],
                                 "worker_receive_s": rep["worker_receive_s"], "worker_load_s": rep["worker_load_s"],
                                 "gathered": [rep["gathered"], other["gathered"]],
                                 "peak_rss_bytes_per_rank": got["peak_rss_bytes_per_rank"]})
                step += args.steps
        warm = [w["digest"] for w in rpc(url, "weight_sync_digest")]
        cold = [c["digest"] for c in rpc(url, "weight_sync_cold_digest", model_dir=str(served_last))]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "vllm": harness.vllm_version_tuple(), "machine": f"{platform.machine()}, {platform.processor() or '?'}",
            "experts": args.experts, "steps": args.steps, "rounds": args.rounds, "warm_equals_cold": warm == cold}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "results.md").write_text(render(meta, rows))
    print(render(meta, rows))
    return 0 if warm == cold else 1


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def render(meta: dict, rows: list[dict]) -> str:
    lines = [f"# FSDP2 trainer (2 ranks) into a TP = 2 + EP engine, {meta['experts']} experts ({meta['date']})", "",
             f"vLLM {'.'.join(map(str, meta['vllm']))} CPU; {meta['steps']} steps per run, {meta['rounds']} runs per "
             f"path, alternating; medians over every run's steps 2..; after the last step both workers' "
             f"parameters equal a cold load: {meta['warm_equals_cold']}.", "",
             "| path | push ms (rank 0 / 1) | bytes received per worker | worker receive ms | worker load ms | "
             "tensors gathered per rank | peak RSS per rank (MB) |", "|---|---|---|---|---|---|---|"]
    for path in ("gathered", "parts"):
        rs = [r for r in rows if r["path"] == path and r["step_in_run"] > 0]
        if not rs:
            continue
        push = [_med([r["push_s"][i] * 1e3 for r in rs]) for i in (0, 1)]
        by = sorted({b for r in rs for b in r["worker_bytes"]})
        rec = _med([max(r["worker_receive_s"]) * 1e3 for r in rs])
        load = _med([max(r["worker_load_s"]) * 1e3 for r in rs])
        gath = rs[-1]["gathered"]
        rss = [round(b / 2**20) for b in rs[-1]["peak_rss_bytes_per_rank"]]
        lines.append(f"| {path} | {push[0]:.0f} / {push[1]:.0f} | {', '.join(f'{b:,}' for b in by)} | {rec:.0f} | "
                     f"{load:.0f} | {gath[0]} / {gath[1]} | {rss[0]} / {rss[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
