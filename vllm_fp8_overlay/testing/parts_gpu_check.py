"""Two CUDA ranks check a step sent as a main stream plus two parts over NCCL.

Run by ``tests/test_rank_parts_gpu.py`` under ``torch.distributed.run``
(``--nproc_per_node 2``): rank 0 stands in for two trainer ranks on
``cuda:0`` with three ``WeightSender``s (the main group and two part groups:
three NCCL communicators), sending all three streams at once from three
threads as ``push_sharded(..., parts=)`` does on each rank; each part holds
half the experts and half the rows of a weight. Rank 1 is a worker on
``cuda:1`` receiving them with ``apply.steps.StepJob(parts=...)``. Per step
and layout, every tensor the worker would load (the rows put back
together) equals, bitwise, the torch backend's quantization of the whole
weights (no Triton code involved). A step whose main stream repeats an
expert of a part is rejected, and the next step arrives whole on every
group. Rank 1 writes a JSON report to ``--out`` (``--cpu``: gloo, to check
this script without GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

import torch
import torch.distributed as dist

E = 8


def layouts():
    from vllm_fp8_overlay.formats import FP8Layout

    return [FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv",
                      hidden_size=512),
            FP8Layout(method="compressed-tensors", strategy="channel", hidden_size=512)]


def weights(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.layers.0.self_attn.q_proj.weight": torch.randn(512, 512, generator=g),
           "model.layers.0.input_layernorm.weight": torch.rand(512, generator=g)}
    for e in range(E):
        out[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] = torch.randn(256, 512, generator=g)
        out[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = torch.randn(256, 512, generator=g)
        out[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = torch.randn(512, 256, generator=g)
    return {k: (v * 0.03).to(torch.bfloat16).to(device) for k, v in out.items()}


PARTS = 2  # part streams, as from two trainer ranks


def split(w: dict, repeat_expert: bool = False) -> tuple[dict, list[dict]]:
    """The main stream (what is not sharded: the norm), and two parts as two
    trainer ranks would send them: each its half of the experts and its
    half of the rows of q_proj (256 of 512: two whole 128-row blocks)."""
    main = {k: v for k, v in w.items() if k.endswith("norm.weight")}
    parts = [{} for _ in range(PARTS)]
    for k, v in w.items():
        if ".experts." in k:
            e = int(k.split(".experts.")[1].split(".")[0])
            parts[e * PARTS // E][k] = v
        elif not k.endswith("norm.weight"):
            for r, rows in enumerate(torch.chunk(v, PARTS)):
                parts[r][k] = rows
    if repeat_expert:  # expert 0's tensors in the main stream too
        main.update({k: v for k, v in w.items() if ".experts.0." in k})
    return main, parts


def reference(w: dict, layout) -> dict[str, torch.Tensor]:
    from vllm_fp8_overlay.formats import quantize_weights

    return dict(quantize_weights(iter(w.items()), layout, backend="torch"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def trainer(ports: list[int], device: torch.device, backend: str) -> None:
    from vllm_fp8_overlay.sync import WeightSender

    step = 0
    per = 1 + PARTS
    for k, layout in enumerate(layouts()):  # fresh groups (and ports) per layout
        txs = [WeightSender(layout, "127.0.0.1", ports[per * k + i], 2, backend=backend, device=device)
               for i in range(per)]
        for case in ("good", "good", "repeat", "good"):
            step += 1
            main, parts = split(weights(step, device), repeat_expert=case == "repeat")
            errors = []

            def send(tx, weights) -> None:
                try:
                    tx.send(weights, step)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=send, args=(tx, part)) for tx, part in zip(txs[1:], parts)]
            for th in threads:
                th.start()
            send(txs[0], main)
            for th in threads:
                th.join()
            if errors:
                raise errors[0]
        dist.barrier()
        for tx in txs:
            tx.close()
        dist.barrier()


def worker(ports: list[int], device: torch.device, backend: str) -> dict:
    from vllm_fp8_overlay.sync import WeightReceiver
    from vllm_fp8_overlay.sync.apply import steps
    from vllm_fp8_overlay.sync.apply.errors import WeightUpdateRejected
    from vllm_fp8_overlay.sync.apply.steps import Served, StepJob
    from vllm_fp8_overlay.sync.apply.validate import dtype_name, layout_key

    # the device machine has no vLLM: the load below is a stand-in, so let the
    # layerwise mode (checkpoint-format FP8 updates) pass its availability check
    steps.has_layerwise_reload = lambda: True

    report = {"steps": [], "mismatches": []}
    step = 0
    per = 1 + PARTS
    for k, layout in enumerate(layouts()):
        main_rx, *part_rx = [WeightReceiver("127.0.0.1", ports[per * k + i], 2, 1, backend=backend, device=device)
                             for i in range(per)]
        specs_of = reference(weights(0, device), layout)
        served = Served(dir="", specs={n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in specs_of.items()},
                        layout=layout_key(layout.to_dict())[0], layout_full=layout.to_dict(), layout_error=None,
                        param_specs={})
        for case in ("good", "good", "repeat", "good"):
            step += 1
            loaded: dict[str, torch.Tensor] = {}

            def load(mode, tensors, before_finalize=None):
                loaded.update({n: t.clone() for n, t in tensors})
                return {}

            job = StepJob(main_rx, step, "layerwise", served, load, parts=part_rx)
            try:
                result = job.collect(None)
                outcome = {"step": step, "layout": layout.strategy, "case": case, "ok": True,
                           "tensors": result["num_tensors"], "parts": result["parts"]}
            except WeightUpdateRejected as e:
                outcome = {"step": step, "layout": layout.strategy, "case": case, "ok": False, "error": str(e)}
            report["steps"].append(outcome)
            if outcome["ok"]:
                want = reference(weights(step, device), layout)
                if sorted(loaded) != sorted(want):
                    report["mismatches"].append(f"step {step}: names differ")
                for n, t in want.items():
                    got = loaded.get(n)
                    if got is None or got.dtype != t.dtype or not torch.equal(_bits(got), _bits(t)):
                        report["mismatches"].append(f"step {step} {layout.strategy}: {n}")
        dist.barrier()
        for rx in (main_rx, *part_rx):
            rx.close()
        dist.barrier()
    return report


def problems(report: dict) -> list[str]:
    """What is wrong with a report (the tests' expectations; empty: all good)."""
    out = list(report["mismatches"])
    cases = [(s["case"], s["ok"]) for s in report["steps"]]
    if cases != [("good", True), ("good", True), ("repeat", False), ("good", True)] * len(layouts()):
        out.append(f"outcomes {cases}")
    for s in report["steps"]:
        if s["ok"] and not (s["parts"] == PARTS and s["tensors"] == 2 * (1 + 3 * E) + 1):  # weight + scale; norm
            out.append(f"step {s['step']}: {s}")
        if not s["ok"] and "sent in two streams" not in s["error"]:
            out.append(f"step {s['step']}: {s['error']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU (to check this script without GPUs)")
    args = p.parse_args(argv)
    os.environ.setdefault("FP8_OVERLAY_BACKGROUND_RECEIVE", "1")  # parts in threads, as on current vLLM
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", rank)
    backend = "gloo" if args.cpu else "nccl"
    if not args.cpu:
        torch.cuda.set_device(device)
    from vllm_fp8_overlay.sync.transport import free_port

    box = [[free_port() for _ in range((1 + PARTS) * len(layouts()))] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if rank == 0:
        trainer(box[0], device, backend)
    else:
        Path(args.out).write_text(json.dumps(worker(box[0], device, backend), indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
