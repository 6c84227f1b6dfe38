"""FP8 through vLLM's own weight-transfer API (``backend="fp8"``), on real vLLM.

The overlay registers our engine as ``fp8`` in vLLM's engine registry on the
releases whose ``WeightTransferConfig`` accepts a registered name (0.22.1+),
and in the trainer-side registry from 0.28. A trainer written against
vLLM's API then switches by naming the backend. Proofs, on whichever vLLM
runs this file:

1. three updates through the offline ``LLM`` API (on 0.28+ through
   ``WeightTransferTrainerFactory.trainer_init(Fp8TrainerInitInfo(...))`` /
   ``send_weights()``, on 0.22-0.24 through ``start_weight_update`` /
   ``update_weights`` / ``trainer_send_weights`` / ``finish_weight_update``):
   after each, parameters equal a cold load of the same weights and greedy
   tokens and logprobs equal a freshly started engine's, exactly;
2. the same model served in BF16 and updated the same way, beside it: the
   reference a team sending BF16 would get, and the bytes each moved;
3. ``vllm serve`` with ``--weight-transfer-config``: ``WeightSyncClient(...,
   path="native")`` over the dev-mode routes, outputs equal to cold;
4. a bad update is rejected by the engine before loading: parameters
   bitwise unchanged, the engine serves, the next good update loads;
5. on releases whose config is closed (0.16-0.20), vLLM refuses ``fp8`` and
   the status names the worker-extension path instead.

FP8 runs on CPU from vLLM 0.24 (compressed-tensors channel FP8); on 0.22.1
the same proofs run with a BF16 checkpoint.

Run from the repository root:
      tools/nox -s "matrix(vllm='0.32.0')" -- tests/test_native_backend.py
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import vllm_fp8_overlay as overlay  # noqa: E402
from vllm_fp8_overlay import compat  # noqa: E402
from vllm_fp8_overlay.demo import CT_FP8_CHANNEL_DYNAMIC, free_port, write_serving_checkpoint  # noqa: E402
from vllm_fp8_overlay.overlay import State  # noqa: E402
from vllm_fp8_overlay.sync.client import EXTENSION, WeightSyncClient, WeightSyncFailed  # noqa: E402
from vllm_fp8_overlay.testing import harness  # noqa: E402
from vllm_fp8_overlay.testing import outputs as out  # noqa: E402
from vllm_fp8_overlay.testing import tiers  # noqa: E402
from vllm_fp8_overlay.testing import tiny_models as tm  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VERSION = harness.vllm_version_tuple()
NATIVE = VERSION >= (0, 22, 1)
NATIVE_SKIP = (f"vLLM {harness.vllm_version()} declares WeightTransferConfig.backend as a closed Literal: "
               "no registered backend; the worker extension path serves (test_closed_config_refuses_fp8)")
FP8_OK = VERSION >= (0, 24)
FMT = "fp8" if FP8_OK else "bf16"
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11]]
NTOK = 8
STEPS = 3
TIMEOUT = 240.0
STEP = itertools.count(1)


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """BF16 trainer weights W0..W3, their offline checkpoints (``ckpt[fmt][k]``)
    and the trainer's HF model directory."""
    if not NATIVE:
        pytest.skip(NATIVE_SKIP)
    root = tmp_path_factory.mktemp("native")
    base = tm.make_llama(root / "trainer_w0")
    config = tm.load_config(base)
    ws = [tm.load_checkpoint(base)]
    for k in range(1, STEPS + 1):
        ws.append(tm.perturb_state_dict(ws[-1], seed=200 + k, scale=0.05))
    ckpt: dict[str, list[Path]] = {"bf16": [], "fp8": []}
    for k, w in enumerate(ws):
        ckpt["bf16"].append(write_serving_checkpoint(root / f"bf16_w{k}", w, config, None))
        if FP8_OK:
            ckpt["fp8"].append(write_serving_checkpoint(root / f"fp8_w{k}", w, config, CT_FP8_CHANNEL_DYNAMIC))
    return ws, ckpt, base


def start_native_engine(model_dir: Path):
    """An ``LLM`` with the ``fp8`` backend; the worker extension is there too,
    only for the digest calls the proofs use (the updates do not touch it)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM

    return LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
               max_model_len=128, max_num_seqs=4, seed=0, worker_extension_cls=EXTENSION,
               weight_transfer_config={"backend": "fp8"})


def outputs(llm) -> tuple[list, list]:
    return harness.greedy(llm, PROMPTS, NTOK, logprobs=True)


def trainer_model(base: Path):
    """The trainer's HF model (what ``ModuleSource`` reads); its parameters
    are overwritten in place with each W_k, as a training step would."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)


class NativeTrainer:
    """What a trainer written against vLLM's API runs, with ``fp8`` named."""

    def __init__(self, llm, world_size: int = 2) -> None:
        from vllm_fp8_overlay.sync.native.clients import LLMWeightSyncClient

        self.client = LLMWeightSyncClient(llm)
        self.port = free_port()
        self.world_size = world_size
        self.engine = None
        self.sender = None

    def init(self, source) -> None:
        if VERSION >= (0, 28):
            from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

            from vllm_fp8_overlay.sync.native.trainer import Fp8TrainerInitInfo

            info = Fp8TrainerInitInfo(master_address="127.0.0.1", master_port=self.port,
                                      world_size=self.world_size, rank=0, timeout=TIMEOUT)
            self.engine = WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=source)
        else:  # 0.22-0.24: no trainer factory; the static trainer_send_weights
            from vllm_fp8_overlay.sync.native.info import Fp8InitInfo
            from vllm_fp8_overlay.sync.native.sending import open_sender, served_layout

            layout = served_layout("auto", None, self.client)
            box = {}
            th = threading.Thread(target=lambda: box.setdefault("r", self.client.init_weight_transfer_engine(
                {"master_address": "127.0.0.1", "master_port": self.port, "world_size": self.world_size,
                 "timeout": TIMEOUT})))
            th.start()
            self.sender = open_sender(layout, "127.0.0.1", self.port, self.world_size, timeout=TIMEOUT)
            th.join()
            assert Fp8InitInfo  # the worker builds it from the dict above

    def send(self, source, step: int) -> None:
        if self.engine is not None:
            self.engine.send_weights(step=step)
            return
        from vllm_fp8_overlay.sync.native.engine import Fp8WeightTransferEngine

        self.client.start_weight_update()
        err = {}

        def update():
            try:
                self.client.update_weights({"step": step})
            except BaseException as e:  # noqa: BLE001 - re-raised below
                err["e"] = e

        th = threading.Thread(target=update)
        th.start()
        Fp8WeightTransferEngine.trainer_send_weights(iter(source), {"sender": self.sender, "step": step})
        th.join()
        if "e" in err:
            raise err["e"]
        self.client.finish_weight_update()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self.sender is not None:
            self.sender.close()


def module_source(model):
    if VERSION >= (0, 28):
        from vllm.distributed.weight_transfer.base import ModuleSource

        return ModuleSource(model)
    return [(n, p.detach()) for n, p in model.named_parameters()]  # views: see each step's values


# ---------------------------------------------------------------- proofs


@pytest.mark.parametrize("fmt", [FMT] if FMT == "bf16" else [
    FMT, pytest.param("bf16", marks=tiers.full_tier_only(
        "the BF16 reference beside FP8 (three more fresh engines); the native backend runs the "
        "same code for it, without quantization"))])
def test_offline_native_api_three_updates(weights, fmt):
    """(1) FP8 (or BF16 where FP8 does not run) and (2) the BF16 reference:
    three updates through vLLM's offline API with ``backend="fp8"``; each
    equal to a cold start in parameters, greedy tokens and logprobs."""
    ws, ckpt, base = weights
    llm = start_native_engine(ckpt[fmt][0])
    trainer = NativeTrainer(llm)
    try:
        model = trainer_model(base)
        source = module_source(model)
        trainer.init(source)
        for k in range(1, STEPS + 1):
            model.load_state_dict(ws[k], strict=True)  # the training step
            trainer.send(source, next(STEP))
            harness.assert_warm_equals_cold(llm, ckpt[fmt][k], f"native {fmt} update {k}")
        compat.check_observation(harness.vllm_version(), f"native_offline_{fmt}", {
            "updates_equal_cold": STEPS,
            "trainer_api": "WeightTransferTrainerFactory" if VERSION >= (0, 28) else "trainer_send_weights"})
    finally:
        trainer.close()
        harness.stop_sync_engine(llm)


def test_client_native_path_rejects_bad_update_model_unchanged(weights):
    """(4) ``WeightSyncClient(path="native")``: an update with a wrong shape is
    rejected by the engine before loading (parameters bitwise unchanged, the
    engine serves), and the next good update loads and equals cold."""
    import torch

    ws, ckpt, base = weights
    llm = start_native_engine(ckpt[FMT][0])
    try:
        before = harness.sync_digest(llm)
        tokens0 = outputs(llm)
        with WeightSyncClient([llm], path="native", host="127.0.0.1", port=free_port(), timeout=TIMEOUT) as client:
            assert all(w["ok"] and w["path"] == "native" for ws_ in client.workers for w in ws_)
            bad = dict(ws[1])
            name = "model.layers.0.mlp.down_proj.weight"
            bad[name] = torch.zeros(bad[name].shape[0], bad[name].shape[1] + 1, dtype=bad[name].dtype)
            with pytest.raises(WeightSyncFailed) as exc:
                client.push(bad, step=next(STEP))
            text = str(exc.value)
            assert "model unchanged" in text and name in text, text
            assert "failed workers left their model unchanged" in text, text
            assert harness.sync_digest(llm) == before
            assert outputs(llm) == tokens0
            rep = client.push(ws[1], step=next(STEP))
            assert all(r["ok"] for r in rep.workers), rep.workers
            assert rep.send.num_bytes > 0
        harness.assert_warm_equals_cold(llm, ckpt[FMT][1], "native client update after a rejection")
        compat.check_observation(harness.vllm_version(), "native_rejects", {"format": FMT, "model_unchanged": True})
    finally:
        harness.stop_sync_engine(llm)


def test_status_names_the_native_path():
    """The adapters' status on this release: registered where the config is
    open, unavailable (with the extension named) where it is closed."""
    if NATIVE:  # the adapter attaches when vLLM imports the factory
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    rows = {r.id: r for r in overlay.adapter_status()}
    engine = rows["native-fp8-engine"]
    if NATIVE:

        assert engine.state is State.APPLIED, engine
        assert "fp8" in WeightTransferEngineFactory._registry
        overlay.deactivate()  # exact undo: vLLM's registry as shipped
        try:
            assert "fp8" not in WeightTransferEngineFactory._registry
            assert {"nccl", "ipc"} <= set(WeightTransferEngineFactory._registry)
        finally:
            overlay.activate()
        assert "fp8" in WeightTransferEngineFactory._registry
    else:
        assert engine.state is State.UNAVAILABLE and "worker extension" in engine.reason, engine


def test_closed_config_refuses_fp8():
    """(5) Where the config is a closed Literal, vLLM refuses the name before
    any registry lookup: the reason the worker extension serves there. The
    adapters' declared range (which COMPAT.md renders) must match."""
    WeightTransferConfig = pytest.importorskip(
        "vllm.config.weight_transfer", reason="no weight-transfer API before vLLM 0.16").WeightTransferConfig

    if NATIVE:
        assert WeightTransferConfig(backend="fp8").backend == "fp8"
    else:
        with pytest.raises(Exception) as exc:
            WeightTransferConfig(backend="fp8")
        assert "nccl" in str(exc.value) and "ipc" in str(exc.value), str(exc.value)



# ---------------------------------------------------------------- vllm serve


@pytest.fixture(scope="module")
def native_server(weights, tmp_path_factory):
    ws, ckpt, base = weights
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt[FMT][0]),
           "--port", str(port), "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "128",
           "--max-num-seqs", "4", "--seed", "0", "--skip-tokenizer-init",
           "--weight-transfer-config", json.dumps({"backend": "fp8"})]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited: {log.read_text()[-4000:]}")
            with contextlib.suppress(Exception):
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            time.sleep(2)
        else:
            raise AssertionError(f"vllm serve did not start: {log.read_text()[-4000:]}")
        yield url, str(ckpt[FMT][0])
    finally:
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, 15)
        with contextlib.suppress(Exception):
            proc.wait(60)


def _complete(url: str, model: str) -> tuple[list, list]:
    tokens, lps = [], []
    for p in PROMPTS:
        body = {"model": model, "prompt": p, "max_tokens": NTOK, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "logprobs": 1, "return_tokens_as_token_ids": True}  # no tokenizer
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                choice = json.loads(r.read())["choices"][0]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/v1/completions: HTTP {e.code}: {e.read()[:2000]!r}") from None
        tokens.append(list(choice["token_ids"]))
        lps.append([float(x) for x in choice["logprobs"]["token_logprobs"]])
    return tokens, lps


def test_vllm_serve_native_routes_three_updates(native_server, weights):
    """(3) ``vllm serve --weight-transfer-config '{"backend": "fp8"}'``:
    ``WeightSyncClient(url, path="native")`` drives the dev-mode routes;
    after each of three updates completions equal a fresh engine's."""
    url, model = native_server
    ws, ckpt, base = weights
    with WeightSyncClient([url], path="native", host="127.0.0.1", port=free_port(), timeout=TIMEOUT) as client:
        assert (client.layout is not None) == (FMT == "fp8")
        for k in range(1, STEPS + 1):
            rep = client.push(ws[k], step=next(STEP))
            assert all(r["ok"] for r in rep.workers), rep.workers
            warm = _complete(url, model)
            cold = out.cold_outputs(ckpt[FMT][k], PROMPTS, NTOK)
            assert warm[0] == cold.tokens, f"serve update {k}: tokens {warm[0]} vs cold {cold.tokens}"
            assert warm[1] == cold.logprobs, f"serve update {k}: logprobs {warm[1]} vs cold {cold.logprobs}"
    compat.check_observation(harness.vllm_version(), "native_serve", {"format": FMT, "updates_equal_cold": STEPS})


def _trainer_sources() -> list:
    """The installed release's trainer side, and each newer release's whose
    Python the run names (``TRAINER_SOURCES`` in ``tools/vllm_env.py``; the
    nox sessions fetch and name them)."""
    dirs = [d for d in os.environ.get("FP8_OVERLAY_TRAINER_SOURCES", "").split(os.pathsep) if d]
    return [pytest.param(None, id="installed"), *(pytest.param(d, id=Path(d).name) for d in dirs)]


@pytest.mark.parametrize("trainer_src", _trainer_sources())
def test_vllm_trainer_api_over_http_drives_vllm_serve(native_server, weights, trainer_src, tmp_path):
    """(6) A trainer process written against vLLM's API, ``fp8`` named:
    vLLM's ``HTTPVLLMWeightSyncClient``, ``ModuleSource`` and
    ``WeightTransferTrainerFactory`` drive ``vllm serve``; after each update
    completions equal a fresh engine's. With ``trainer_src`` the trainer runs
    a newer release's trainer side (0.33 made a ``WeightSource`` yield
    through ``iter_full()`` instead of being iterable) against this engine."""
    from vllm_fp8_overlay.testing import native_trainer

    if VERSION < (0, 28):
        pytest.skip(f"vLLM {harness.vllm_version()} has no trainer-side factory (from 0.28)")
    url, model = native_server
    ws, ckpt, base = weights
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if trainer_src is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (trainer_src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "vllm_fp8_overlay.testing.native_trainer", "--url", url, "--model", str(base),
           "--port", str(free_port()), "--timeout", str(TIMEOUT),
           "--takeover"]  # the workers still belong to the trainer of the test before (as after a crash)
    log = tmp_path / "trainer.log"  # a file, not a pipe: a full pipe would stop the trainer mid-step
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh, text=True, env=env)

    def reply() -> list[str]:
        for line in proc.stdout:  # log lines a library prints to stdout are passed over
            if line.startswith(native_trainer.PREFIX):
                return line.split()[1:]
        proc.stdin.close()
        raise AssertionError(f"trainer exited ({proc.wait(60)}): {log.read_text()[-4000:]}")

    try:
        ready = reply()
        want = harness.vllm_version() if trainer_src is None else \
            next(Path(trainer_src).glob("vllm-*.dist-info")).name[len("vllm-"):-len(".dist-info")]
        assert ready == ["ready", want], ready
        for k in range(1, tiers.steps(ci=2, full=STEPS) + 1):
            step = next(STEP)
            proc.stdin.write(f"{step} {ckpt['bf16'][k]}\n")
            proc.stdin.flush()
            assert reply() == ["ok", str(step)]
            warm = _complete(url, model)
            cold = out.cold_outputs(ckpt[FMT][k], PROMPTS, NTOK)
            assert warm[0] == cold.tokens, f"trainer {ready[1]} update {k}: tokens {warm[0]} vs cold {cold.tokens}"
            assert warm[1] == cold.logprobs, f"trainer {ready[1]} update {k}: logprobs differ from cold"
        proc.stdin.close()
        assert proc.wait(120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
