"""Sharded trainers: a real 2-process FSDP2 trainer (CPU, gloo) as the source.

``sharded_stream`` walks an FSDP2 state dict (``DTensor``, ``Shard(0)``)
tensor by tensor on every rank. What it yields, after the sender's
quantization, must be bitwise what quantizing the unsharded weights gives,
for the three FP8 layouts; and weights whose scales depend on their own rows
only (channel; block when the shards are whole 128-row blocks) must be
quantized on each rank's rows and gathered as FP8, never whole in BF16.

The trainer runs under ``torch.distributed.run`` (two processes), as a
training job would (:mod:`vllm_fp8_overlay.testing.fsdp_trainer`).

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_sources.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_fp8_overlay.formats import FP8Layout
from vllm_fp8_overlay.testing import tiny_models as tm

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "compressed-tensors/channel": FP8Layout(method="compressed-tensors", strategy="channel", ignore=("lm_head",)),
    "fp8/block": FP8Layout(method="fp8", strategy="block", block_size=(128, 128), scale_name="weight_scale_inv",
                           ignore=("lm_head",)),
    "fp8/tensor": FP8Layout(method="fp8", strategy="tensor", ignore=("lm_head",)),
}


def run_trainer(args: list[str], out: Path, nproc: int = 2, timeout: float = 600) -> dict:
    from vllm_fp8_overlay.sync.transport import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()),
           "-m", "vllm_fp8_overlay.testing.fsdp_trainer", *args, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    # 2 layers, hidden 256, intermediate 512, 4 heads / 2 KV heads of 64: k/v_proj have
    # 128 rows, i.e. 64 per rank -- not whole 128-row blocks
    base = tm.make_llama(root / "llama")
    layouts = json.dumps([lay.to_dict() for lay in LAYOUTS.values()])
    return run_trainer(["check", "--model", str(base), "--layouts", layouts], root / "out.json")


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_sharded_stream_equals_unsharded_quantization(streamed, key):
    """Every tensor the sender would send from the FSDP2 shards is bitwise
    what quantize_weights gives on the full weights (names, dtypes, shapes, bits)."""
    r = streamed[key]
    assert r["mismatches"] == [], r["mismatches"]


def test_row_local_scales_are_quantized_on_the_shards(streamed):
    """Channel: all 14 linear weights quantized on each rank's rows (none
    gathered in BF16); block: the 10 whose shards are whole 128-row blocks
    (q/o/gate/up/down), k/v (64 rows per rank) gathered; per-tensor scales
    (one amax over the whole tensor): all gathered."""
    ch, bl, te = streamed["compressed-tensors/channel"], streamed["fp8/block"], streamed["fp8/tensor"]
    unquantized = 7  # embed_tokens, lm_head, 2x2 layer norms, final norm
    assert (ch["local_quantized"], ch["gathered"]) == (14, unquantized)
    assert (bl["local_quantized"], bl["gathered"]) == (10, unquantized + 4)
    assert (te["local_quantized"], te["gathered"]) == (0, unquantized + 14)


def test_gathers_go_in_windows(streamed):
    """The whole tiny model fits one window: one collective per step, not one
    or two per tensor; a 1-byte window gathers tensor by tensor and gives the
    same bytes (checked in ``mismatches``, prefix ``window=1``)."""
    for key in LAYOUTS:
        r = streamed[key]
        n = r["local_quantized"] + r["gathered"]
        assert r["collectives"] == 1, (key, r)
        assert r["collectives_window_1"] == n, (key, r)



def test_one_sender_gathers_into_it_alone(streamed):
    """With one sending rank the windows are gathered into it alone: it
    yields every tensor (bitwise the unsharded quantization: ``mismatches``,
    prefix ``dst=``), the other rank yields nothing and holds no window of
    full tensors, and both take part in the same collectives."""
    for key in LAYOUTS:
        r = streamed[key]
        other, dst = r["into_one_rank"]
        assert other == {"yielded": 0, "max_gathered_bytes": 0, "collectives": dst["collectives"]}, (key, r)
        assert dst["yielded"] == r["local_quantized"] + r["gathered"], (key, r)
        assert 0 < dst["max_gathered_bytes"] == r["max_gathered_bytes"], (key, r)


def test_push_sharded_ranks_agree_or_all_refuse(tmp_path):
    """Which ranks send is settled by all of them together: clients serving
    different layouts, or no client at all, raise the same error on every
    rank (none left waiting in a gather); when one rank's push fails mid-step
    that rank still joins every remaining gather, so the other rank finishes
    its step, and the failing rank raises its push's own error; every rank
    with a client sends."""
    base = tm.make_llama(tmp_path / "llama")
    per_rank = run_trainer(["agree", "--model", str(base)], tmp_path / "agree.json")["per_rank"]
    r0, r1 = per_rank
    for case in ("layouts_differ", "no_client"):
        assert "error" in r0[case] and r0[case]["error"] == r1[case]["error"], (case, r0[case], r1[case])
    assert "serve different layouts" in r0["layouts_differ"]["error"]
    assert "no trainer rank passed a client" in r0["no_client"]["error"]
    fails = r1["one_rank_fails"]
    assert fails["error"] == "RuntimeError: push failed after 3 tensors", fails
    assert r0["one_rank_fails"] == {"result": None, "collectives": r0["both_send"]["collectives"]}, r0
    assert fails["collectives"] == r0["both_send"]["collectives"] > 3, (fails, r0["both_send"])
    assert r0["both_send"]["result"] == r1["both_send"]["result"] == "pushed"
