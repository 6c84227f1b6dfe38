"""How :class:`~.client.WeightSyncClient` reaches one vLLM server: a
``vllm.LLM`` in this process (:class:`LLMTarget`) or a ``vllm serve`` process
over HTTP (:class:`HTTPTarget`), each through ``collective_rpc`` into the
worker extension; or, with ``path="native"``, vLLM's weight-transfer API
(:mod:`.native.targets`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["HTTPTarget", "LLMTarget"]


class LLMTarget:
    """A ``vllm.LLM`` object in this process (its engine may run in a subprocess)."""

    def __init__(self, llm: Any, name: str | None = None) -> None:
        self.llm = llm
        self.name = name or f"LLM@{id(llm):x}"

    def call(self, method: str, kwargs: dict[str, Any], timeout: float | None) -> list[Any]:
        return list(self.llm.collective_rpc(method, timeout=timeout, kwargs=kwargs))

    def reset_prefix_cache(self) -> bool:
        fn = getattr(self.llm, "reset_prefix_cache", None)
        return bool(fn()) if callable(fn) else False


class HTTPTarget:
    """A ``vllm serve`` process started with ``VLLM_SERVER_DEV_MODE=1``."""

    def __init__(self, base_url: str, *, api_key: str | None = None, name: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.name = name or self.base_url

    def _post(self, path: str, body: dict | None, timeout: float | None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(self.base_url + path, data=data, method="POST")
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:2000].decode(errors="replace")
            hint = ""
            if e.code == 404:
                hint = (" (is the server running with VLLM_SERVER_DEV_MODE=1? /collective_rpc and "
                        "/reset_prefix_cache exist only in dev mode)")
            raise RuntimeError(f"{self.name}{path}: HTTP {e.code}: {detail}{hint}") from e
        if not raw:
            return None
        return json.loads(raw)

    def call(self, method: str, kwargs: dict[str, Any], timeout: float | None) -> list[Any]:
        body: dict[str, Any] = {"method": method, "kwargs": kwargs}
        if timeout is not None:
            body["timeout"] = timeout
        out = self._post("/collective_rpc", body, None if timeout is None else timeout + 30)
        if not isinstance(out, dict) or "results" not in out:
            raise RuntimeError(f"{self.name}: unexpected /collective_rpc response {out!r}")
        return list(out["results"])

    def reset_prefix_cache(self) -> bool:
        self._post("/reset_prefix_cache", None, 60)
        return True


def _target(t: Any, path: str = "extension") -> Any:
    """``path="native"``: the server runs vLLM's weight-transfer API with our
    ``fp8`` backend instead of the worker extension (see :mod:`.native.targets`)."""
    if path not in ("extension", "native"):
        raise ValueError(f"path must be 'extension' or 'native', not {path!r}")
    if not isinstance(t, (str, LLMTarget, HTTPTarget)) and hasattr(t, "call"):
        return t  # a target object already
    if path == "native":
        from .native.targets import NativeHTTPTarget, NativeLLMTarget

        if isinstance(t, str):
            return NativeHTTPTarget(t)
        if hasattr(t, "init_weight_transfer_engine"):
            return NativeLLMTarget(t)
        raise TypeError(f"not a vLLM target with the weight-transfer API: {t!r}")
    if isinstance(t, (LLMTarget, HTTPTarget)):
        return t
    if isinstance(t, str):
        return HTTPTarget(t)
    if hasattr(t, "collective_rpc"):
        return LLMTarget(t)
    raise TypeError(f"not a vLLM target: {t!r} (an LLM, an http:// URL, LLMTarget or HTTPTarget)")
