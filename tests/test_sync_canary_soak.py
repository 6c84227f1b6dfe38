"""Canary false alarms and cost over many pushes, families and formats; the
HTTP path on a real ``vllm serve``.

For each tiny family (untied Llama, Qwen3 and Phi-3 with its fused
projections, tied Qwen2) and each served format (FP8 compressed-tensors
channel where vLLM CPU runs it, >= 0.24; BF16), one engine takes
``FP8_OVERLAY_CANARY_PUSHES`` (default 25) pushes of slightly perturbed
weights (each step adds 2% of every tensor's spread, cumulatively), each
checked by the canary against the trainer's float32 forward with the
derived bound. Every push is correct, so any ``CanaryFailed`` is a false
alarm and fails the test. The per-push cost and the largest deviation in
units of the predicted sigma are printed (``-s``) and, with
``FP8_OVERLAY_CANARY_OUT=<file>``, written as JSON (docs/sync.md quotes a
run).

Not part of the fast tier: marked ``soak`` and skipped unless
``FP8_OVERLAY_SOAK=1`` (the ``matrix`` sessions set it)::

    FP8_OVERLAY_SOAK=1 tools/nox -s "matrix(vllm='0.32.0')" -- -m soak -s tests/test_sync_canary_soak.py
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, free_port, write_serving_checkpoint  # noqa: E402
from vllm_fp8_overlay.sync.canary import Canary, CanaryFailed, hf_reference  # noqa: E402
from vllm_fp8_overlay.sync.client import WeightSyncClient, attach_servers  # noqa: E402
from vllm_fp8_overlay.testing import families, harness  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402
from vllm_fp8_overlay.testing.canary_faults import FAULT_EXTENSION  # noqa: E402
from vllm_fp8_overlay.testing.serve import vllm_serve  # noqa: E402

pytestmark = [
    pytest.mark.soak, pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FP8_OVERLAY_SOAK") != "1", reason="soak test: set FP8_OVERLAY_SOAK=1"),
]

PUSHES = int(os.environ.get("FP8_OVERLAY_CANARY_PUSHES", "25"))
FP8_OK = harness.vllm_version_tuple() >= (0, 24)
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11]]
CASES = [(f, fmt) for f in ("llama", "qwen3", "phi3", "qwen2-tied") for fmt in ("fp8", "bf16")]
RESULTS: dict[str, dict] = {}


def _checkpoints(root: Path, family: str, fmt: str) -> tuple[Path, Path, dict]:
    src = families.make_family(family, root / "bf16")
    w0 = tm.load_checkpoint(src)
    served = write_serving_checkpoint(root / fmt, w0, tm.load_config(src),
                                      CT_FP8_CHANNEL_DYNAMIC if fmt == "fp8" else None)
    return src, served, w0


def _reference(src: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(src)).float().eval()


def _hold(ref, w) -> None:
    missing, unexpected = ref.load_state_dict({k: v.float() for k, v in w.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)


def _summary(reps: list[dict], n_sigma: float) -> dict:
    costs = [r["cost_ms"] for r in reps]
    z = [x * n_sigma for r in reps for x in r["ratios"]]
    return {"pushes": len(reps), "comparisons": len(z), "first_ms": round(costs[0], 1),
            "median_ms": round(statistics.median(costs[1:]), 1),
            "p90_ms": round(sorted(costs[1:])[int(0.9 * (len(costs) - 2))], 1),
            "engine_median_ms": round(statistics.median(r["engine_ms"] for r in reps[1:]), 1),
            "reference_median_ms": round(statistics.median(r["reference_ms"] for r in reps[1:]), 1),
            "max_z": round(max(z), 2), "median_z": round(statistics.median(z), 3),
            "max_deviation": round(max(r["max_deviation"] for r in reps), 4),
            "false_alarms": 0}


def _write_out() -> None:
    out = os.environ.get("FP8_OVERLAY_CANARY_OUT")
    if out:
        Path(out).write_text(json.dumps({"vllm": harness.vllm_version(), "pushes": PUSHES, **RESULTS}, indent=1))


@pytest.mark.parametrize("family, fmt", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_canary_no_false_alarm_over_many_pushes(tmp_path, family, fmt):
    if fmt == "fp8" and not FP8_OK:
        pytest.skip(f"compressed-tensors FP8 does not run on vLLM {harness.vllm_version()} CPU")
    src, served, w0 = _checkpoints(tmp_path, family, fmt)
    llm = harness.start_sync_engine(served)
    ref = _reference(src)
    canary = Canary(PROMPTS, hf_reference(ref), max_tokens=4)
    reps, w = [], w0
    try:
        with WeightSyncClient([llm], host="127.0.0.1", port=free_port(), timeout=240) as client:
            for step in range(1, PUSHES + 1):
                w = tm.perturb_state_dict(w, seed=step, scale=0.02)
                _hold(ref, w)
                try:
                    reps.append(client.push(w, step, canary=canary).canary)
                except CanaryFailed as e:
                    pytest.fail(f"false alarm at push {step} of {family} {fmt}: {e}")
    finally:
        harness.stop_sync_engine(llm)
    s = _summary(reps, canary.n_sigma)
    assert s["max_z"] > 0 and s["comparisons"] >= PUSHES * 12 * 5, s  # the canary measured something
    RESULTS[f"{family}-{fmt}"] = s
    print(f"\ncanary {family} {fmt}: {s}")
    _write_out()


@pytest.fixture
def server(tmp_path):
    """``vllm serve`` (dev mode, the canary fault extension) on the tiny Llama."""
    fmt = "fp8" if FP8_OK else "bf16"
    src, served, w0 = _checkpoints(tmp_path, "llama", fmt)
    with vllm_serve(served, tmp_path / "server.log", args=["--worker-extension-cls", FAULT_EXTENSION],
                    start_timeout=600) as url:
        yield url, fmt, src, w0


def test_canary_over_http(server):
    """The same canary against ``vllm serve`` through /v1/completions: no
    false alarm over the pushes; a NaN scale planted after the load (the
    server then cannot write its JSON answer: HTTP 400) is located to a
    prompt and position and fails the canary."""
    url, fmt, src, w0 = server
    ref = _reference(src)
    canary = Canary(PROMPTS, hf_reference(ref), max_tokens=4)
    reps, w = [], w0
    n = max(5, PUSHES // 5)
    with attach_servers(url, host="127.0.0.1", port=free_port(), timeout=240) as client:
        for step in range(1, n + 1):
            w = tm.perturb_state_dict(w, seed=step, scale=0.02)
            _hold(ref, w)
            reps.append(client.push(w, step, canary=canary).canary)
        s = _summary(reps, canary.n_sigma)
        RESULTS[f"http-llama-{fmt}"] = s
        print(f"\ncanary over HTTP, llama {fmt}: {s}")
        _write_out()
        if fmt != "fp8":
            pytest.skip("BF16 server (FP8 needs vLLM >= 0.24 on CPU): no weight_scale for the NaN case")
        client.targets[0]._post("/collective_rpc", {"method": "canary_fault_nan_scale", "kwargs": {
            "module": "model.layers.0.self_attn.o_proj", "row": 1}}, 60)
        with pytest.raises(CanaryFailed, match=r"prompt 0 \[1, 5, 9, 33, 100\] position 0 token \d+: "
                                               r"expected logprob -?\d+\.\d+, got nan .*not finite"):
            canary.run(client, n)
