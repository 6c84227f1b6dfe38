"""End-to-end weight sync into real vLLM (CPU, gloo): warm == cold.

A trainer in this process sends BF16 weights (quantized by the sender when the
target is FP8) through ``WeightSyncClient`` -> ``WeightSender`` -> gloo ->
``WeightSyncExtension`` in vLLM's worker process -> layerwise reload. After
every step the engine must equal a cold start on an offline checkpoint of the
same weights, in parameters and in outputs.

How "cold" is obtained (engine starts take 10-70 s on this 2-core machine, so
they are kept few):

* parameters: ``weight_sync_cold_digest(dir)`` builds a second model in the
  served worker with vLLM's own ``get_model()`` -- the function a cold start
  runs -- from the offline checkpoint ``dir`` and hashes it. Each test first
  checks that this reproduces a genuinely fresh engine: on the checkpoint the
  engine was started from, it must equal the engine's own digest.
* outputs: greedy tokens and per-token logprobs of three prompts must equal,
  exactly, those of an engine freshly started on ``dir``
  (``harness.assert_warm_equals_cold`` -> ``testing.outputs``; one fresh
  engine per checkpoint, cached for the session: W1..W3 per format). Equal
  parameters alone can hide stale derived state (a tied head's packed copy,
  CPU-prepacked MoE experts: ``sync/apply/derived.py``).
* The FP8 fan-out test also starts a second fresh engine on W3 and compares
  the warm engine with it directly.

Proofs: (1) FP8 W1..W3 (>= 0.24, where CT FP8 runs on CPU), (2) fan-out to two
engines, (3) BF16 target, (4) the same BF16 proof on whichever vLLM runs this
file (e.g. 0.19.1 with the overlay active), (5) ``vllm serve`` over HTTP,
(6) rejected updates leave the model bitwise unchanged.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_sync_e2e.py
      tools/nox -s "matrix(vllm='0.19.1')" -- tests/test_sync_e2e.py
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, free_port, write_serving_checkpoint  # noqa: E402
from vllm_fp8_overlay.sync.client import EXTENSION, WeightSyncClient, WeightSyncFailed  # noqa: E402
from vllm_fp8_overlay.testing import harness  # noqa: E402
from vllm_fp8_overlay.testing import tiers  # noqa: E402
from vllm_fp8_overlay.testing import outputs as out  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VERSION = harness.vllm_version_tuple()
FP8_OK = VERSION >= (0, 24)
FP8_SKIP = (f"compressed-tensors FP8 does not run on vLLM {harness.vllm_version()} CPU "
            "(loads and generates on vllm-cpu >= 0.24 only)")
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11]]
NTOK = 8
STEPS = 3  # W0 (served at start) .. W3
TIMEOUT = 240.0
#: step numbers must increase on every engine (the receiver rejects others):
#: one counter for the module, whatever order or subset of tests runs
STEP = itertools.count(1)


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """BF16 trainer weights W0..W4 and offline serving checkpoints of each
    (``ckpt[fmt][k]``, fmt in fp8/bf16)."""
    root = tmp_path_factory.mktemp("sync_e2e")
    base = tm.make_llama(root / "trainer_w0")
    config = tm.load_config(base)
    ws = [tm.load_checkpoint(base)]
    for k in range(1, STEPS + 1):
        ws.append(tm.perturb_state_dict(ws[-1], seed=100 + k, scale=0.05))
    ckpt: dict[str, list[Path]] = {"bf16": [], "fp8": []}
    for k, w in enumerate(ws):
        ckpt["bf16"].append(write_serving_checkpoint(root / f"bf16_w{k}", w, config, None))
        if FP8_OK:
            ckpt["fp8"].append(write_serving_checkpoint(root / f"fp8_w{k}", w, config, CT_FP8_CHANNEL_DYNAMIC))
    return ws, ckpt


start_engine = harness.start_sync_engine
stop_engine = harness.stop_sync_engine
digest = harness.sync_digest
cold_digest = harness.sync_cold_digest
assert_warm_equals_cold = harness.assert_warm_equals_cold


def greedy(llm) -> list[list[int]]:
    return harness.greedy(llm, PROMPTS, NTOK)


def client_for(engines, **kw) -> WeightSyncClient:
    return WeightSyncClient(list(engines), host="127.0.0.1", port=free_port(), timeout=TIMEOUT, **kw)


def sync_steps(client, engines, ws, ckpts, steps, label) -> list[list[list[int]]]:
    """Push W_k for k in steps (as the next step numbers); after each, every
    engine must equal cold(W_k): parameters, and tokens + logprobs of a fresh engine."""
    tokens = []
    for k in steps:
        step = next(STEP)
        rep = client.push(ws[k], step=step)
        assert all(r["ok"] and r["step"] == step for r in rep.workers), rep.workers
        for i, llm in enumerate(engines):
            assert_warm_equals_cold(llm, ckpts[k], f"{label} engine {i} step {k}")
        toks = [greedy(llm) for llm in engines]
        assert all(t == toks[0] for t in toks), f"{label} step {k}: engines disagree {toks}"
        tokens.append(toks[0])
    return tokens


def check_cold_method(llm, model_dir: Path) -> None:
    """The in-worker cold load reproduces this freshly started engine."""
    assert digest(llm) == cold_digest(llm, model_dir), (
        "weight_sync_cold_digest does not reproduce a fresh engine start; differing: "
        f"{harness.warm_cold_diff(llm, model_dir)}")


# ---------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def bf16_engine(weights):
    _, ckpt = weights
    llm = start_engine(ckpt["bf16"][0])
    yield llm
    stop_engine(llm)


@pytest.fixture(scope="module")
def fp8_engine(weights):
    if not FP8_OK:
        pytest.skip(FP8_SKIP)
    _, ckpt = weights
    llm = start_engine(ckpt["fp8"][0])
    yield llm
    stop_engine(llm)


# ---------------------------------------------------------------- proofs


def test_fp8_warm_equals_cold_three_steps(fp8_engine, weights):
    """(1) CT channel FP8 target: W1, W2, W3 from BF16, quantized by the sender."""
    ws, ckpt = weights
    check_cold_method(fp8_engine, ckpt["fp8"][0])
    t0 = greedy(fp8_engine)
    with client_for([fp8_engine]) as client:
        assert client.layout is not None and client.layout.strategy == "channel"
        toks = sync_steps(client, [fp8_engine], ws, ckpt["fp8"], [1, 2, 3], "fp8")
        st = client.status()[0][0]
    assert [t0] + toks != [t0] * 4, "greedy tokens never changed: updates had no effect?"
    assert st["steps_loaded"] >= 3 and st["last"]["mode"] == "layerwise" and st["last_error"] is None, st
    assert st["served_layout"]["strategy"] == "channel"


def test_fp8_fanout_two_engines_and_fresh_cold_start(fp8_engine, weights):
    """(2) one broadcast, two engines (subprocess engine cores). Engine B is a
    genuinely fresh start on the offline FP8 checkpoint of W3: the warm
    engine A, updated to W3, must equal it bitwise and in tokens and logprobs
    (and B must decode exactly what the cached fresh engine on W3 decoded)."""
    ws, ckpt = weights
    a = fp8_engine
    b = start_engine(ckpt["fp8"][3])
    try:
        check_cold_method(b, ckpt["fp8"][3])
        fresh_digest, fresh = digest(b), out.greedy_outputs(b)
        out.assert_outputs_equal(fresh, out.cold_outputs(ckpt["fp8"][3]), "two fresh engines on W3")
        with client_for([a, b]) as client:
            assert client.world_size == 3
            client.push(ws[3], step=next(STEP))  # A: -> W3; B: W3 -> W3 (identical weights again)
            assert digest(a) == fresh_digest, "warm A != fresh cold-started engine on W3"
            assert digest(b) == fresh_digest, "B changed after reloading identical weights"
            out.assert_outputs_equal(out.greedy_outputs(a), fresh, "warm A on W3 vs fresh B")
            out.assert_outputs_equal(out.greedy_outputs(b), fresh, "B after reloading W3")
            sync_steps(client, [a, b], ws, ckpt["fp8"], [1, 2], "fan-out")
    finally:
        stop_engine(b)


def test_bf16_warm_equals_cold_three_steps(bf16_engine, weights):
    """(3)/(4) BF16 target (no quantization); on every installed vLLM >= 0.16."""
    ws, ckpt = weights
    check_cold_method(bf16_engine, ckpt["bf16"][0])
    t0 = greedy(bf16_engine)
    with client_for([bf16_engine]) as client:
        assert client.layout is None
        ks = [1, 2, 3] if tiers.FULL else [1, 2]  # CI: one fresh engine less
        toks = sync_steps(client, [bf16_engine], ws, ckpt["bf16"], ks, "bf16")
        st = client.status()[0][0]
    assert any(t != t0 for t in toks), "greedy tokens never changed: updates had no effect?"
    assert st["vllm_version"] == harness.vllm_version()
    assert st["overlay_active"] and st["overlay_plugin_loaded"], st
    if (0, 16) <= VERSION < (0, 20):
        applied = [p["id"] for p in st["overlay"] if p["state"] == "applied"]
        assert applied, f"overlay patches should be applied on {harness.vllm_version()}: {st['overlay']}"


def test_rejected_updates_leave_model_unchanged(bf16_engine, weights):
    """(6) wrong shape, unknown name, missing tensor, wrong dtype: each raises a
    clear error naming the tensor and leaves every parameter bitwise as it was;
    the group stays usable and a good step still lands."""
    ws, ckpt = weights
    w = ws[2]
    shape_name = "model.layers.1.mlp.down_proj.weight"
    cases = {
        "shape": ({**w, shape_name: w[shape_name][:, :-8].contiguous()}, shape_name),
        "unknown": ({**w, "model.layers.0.mlp.extra_proj.weight": w[shape_name]}, "extra_proj"),
        "missing": ({k: v for k, v in w.items() if k != "model.norm.weight"}, "model.norm.weight"),
        "dtype": ({**w, "model.norm.weight": w["model.norm.weight"].float()}, "model.norm.weight"),
    }
    with client_for([bf16_engine]) as client:
        good = next(STEP)
        client.push(ws[1], step=good)
        before = digest(bf16_engine)
        for i, (case, (bad, name)) in enumerate(cases.items()):
            with pytest.raises(WeightSyncFailed, match=name) as ei:
                client.push(bad, step=next(STEP))
            msg = str(ei.value)
            assert "unchanged" in msg and "rejected" in msg, msg
            assert digest(bf16_engine) == before, f"{case}: model changed by a rejected update"
        st = client.status()[0][0]
        assert st["last_step"] == good and "rejected" in st["last_error"]
        sync_steps(client, [bf16_engine], ws, ckpt["bf16"], [2], "after rejects")


def test_fp8_scheme_mismatch_rejected(fp8_engine, weights):
    """(6) unquantized BF16 tensors sent to the FP8 server (layout=None)."""
    ws, _ = weights
    before = digest(fp8_engine)
    with client_for([fp8_engine], layout=None) as client:
        with pytest.raises(WeightSyncFailed, match="scheme mismatch"):
            client.push(ws[2], step=next(STEP))
    assert digest(fp8_engine) == before


# ---------------------------------------------------------------- vllm serve


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    """``vllm serve`` in a subprocess (dev mode, worker extension); the overlay
    reaches it only through the ``vllm.general_plugins`` entry point of the
    installed package metadata plus this checkout on PYTHONPATH."""
    from importlib.metadata import entry_points

    if not any(e.name == "vllm_fp8_overlay" for e in entry_points(group="vllm.general_plugins")):
        pytest.skip("vllm-fp8-overlay is not pip-installed in this venv (no plugin entry point)")
    _, ckpt = weights
    fmt = "fp8" if FP8_OK else "bf16"
    port = free_port()
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # the OpenAI server module `vllm serve` runs (the `vllm` console script
    # itself asks for the "vllm" distribution's version, absent for vllm-cpu)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt[fmt][0]),
           "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--dtype", "bfloat16",
           "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "4", "--seed", "0",
           "--worker-extension-cls", EXTENSION]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after 600s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield url, fmt, ckpt[fmt]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _complete(url: str, model: str) -> out.Outputs:
    """Greedy tokens and logprobs of all prompts in one request (one batch, as
    the fresh reference engine decodes them)."""
    r = _post(url + "/v1/completions", {"model": model, "prompt": PROMPTS, "max_tokens": NTOK, "temperature": 0,
                                        "ignore_eos": True, "return_token_ids": True, "logprobs": 0,
                                        # logprobs without a tokenizer (--skip-tokenizer-init)
                                        "return_tokens_as_token_ids": True})
    choices = sorted(r["choices"], key=lambda c: c["index"])
    return out.Outputs([list(c["token_ids"]) for c in choices],
                       [[float(x) for x in c["logprobs"]["token_logprobs"]] for c in choices])


def _rpc(url: str, method: str, **kwargs) -> list:
    return _post(url + "/collective_rpc", {"method": method, "kwargs": kwargs}, timeout=300)["results"]


def test_vllm_serve_http_update(server, weights):
    """(5) client over HTTP updates a ``vllm serve`` process; completions then
    come from the new weights (parameters equal a cold load of W1; tokens and
    logprobs equal a fresh engine's on W1), and the overlay was loaded in the
    worker through the plugin entry point."""
    url, fmt, ckpts = server
    ws, _ = weights
    st = _rpc(url, "weight_sync_status")[0]
    assert st["overlay_plugin_loaded"] and st["overlay_active"], st
    assert st["vllm_version"] == harness.vllm_version()
    model = str(ckpts[0])
    tokens0 = _complete(url, model)
    from vllm_fp8_overlay.sync.client import attach_servers

    with attach_servers(url, host="127.0.0.1", port=free_port(), timeout=TIMEOUT) as client:
        assert (client.layout is not None) == (fmt == "fp8")
        rep = client.push(ws[1], step=1)
        from vllm_fp8_overlay.testing.harness import has_layerwise_reload

        # releases without the reload module (< 0.16) load with load_weights
        expected_mode = "layerwise" if has_layerwise_reload() else "load_weights"
        assert rep.workers[0]["ok"] and rep.workers[0]["mode"] == expected_mode
    warm = _rpc(url, "weight_sync_digest")[0]["digest"]
    cold = _rpc(url, "weight_sync_cold_digest", model_dir=str(ckpts[1]))[0]["digest"]
    assert warm == cold, "served model after the HTTP update != cold load of W1"
    tokens1 = _complete(url, model)
    assert tokens1.tokens != tokens0.tokens, "completions did not change after the update"
    out.assert_outputs_equal(tokens1, out.cold_outputs(ckpts[1], PROMPTS, NTOK), "vllm serve after the HTTP update")
    st = _rpc(url, "weight_sync_status")[0]
    assert st["last_step"] == 1 and st["last"]["num_bytes"] > 0
