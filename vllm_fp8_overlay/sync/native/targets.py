"""``WeightSyncClient`` targets that speak vLLM's native weight-transfer API.

The client drives its targets with the worker extension's method names
(``weight_sync_describe``, ``init_weight_receiver``, ``receive_weights``,
``close_weight_receiver``). These targets answer the same calls through
vLLM's own API instead (``init_weight_transfer_engine``,
``start_weight_update`` / ``update_weights`` / ``finish_weight_update``,
offline or over the dev-mode HTTP routes), so ``WeightSyncClient(...,
path="native")`` needs no worker extension in the servers, only
``WeightTransferConfig(backend="fp8")``.

Differences a caller sees: an update is received whole inside one
``update_weights`` call (the engine is busy for the transfer, as with
vLLM's ``nccl`` backend; there is no background receive and no polling),
and the per-worker report carries the outcome but not the timings (vLLM's
``update_weights`` returns nothing; the engine logs them).
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from dataclasses import asdict
from typing import Any

from .clients import LLMWeightSyncClient
from .info import Fp8InitInfo, Fp8UpdateInfo

__all__ = ["NativeLLMTarget", "NativeHTTPTarget"]


class _NativeTarget:
    """Translate the extension's calls into native ones (see module doc)."""

    name: str
    client: Any

    # to implement: the served model's path and the number of workers
    def served_model(self) -> str | None:
        raise NotImplementedError

    def num_workers(self) -> int:
        raise NotImplementedError

    def call(self, method: str, kwargs: dict[str, Any], timeout: float | None) -> list[Any]:
        handler = getattr(self, "_" + method, None)
        if handler is None:
            raise RuntimeError(f"{self.name}: {method} needs the worker extension; the native fp8 backend "
                               "has no such call")
        return handler(**kwargs)

    def _weight_sync_describe(self, checkpoint_dir: str | None = None) -> list[dict]:
        from ...formats import detect_layout
        from ..apply.load import vllm_version

        model = checkpoint_dir or self.served_model()
        layout, error = None, None
        try:
            found = detect_layout(str(model))
            layout = None if found is None else found.to_dict()
        except Exception as e:  # a quantization the sync cannot write
            error = f"{type(e).__name__}: {e}"
        return [{"checkpoint_dir": model, "layout": layout, "layout_error": error, "local_rank": i,
                 "vllm_version": vllm_version(), "path": "native"} for i in range(self.num_workers())]

    def _init_weight_receiver(self, host: str, port: int, world_size: int, rank_offset: int, backend: str = "auto",
                              timeout: float = 300.0, checkpoint_dir: str | None = None,
                              keep_step_buffers: bool = False, group_id: str | None = None,
                              takeover: bool = False, on_error: str = "raise") -> list[dict]:
        info = Fp8InitInfo(master_address=host, master_port=port, world_size=world_size, rank_offset=rank_offset,
                           transport=backend, timeout=timeout, group_id=group_id, takeover=takeover,
                           keep_receive_buffers=keep_step_buffers, checkpoint_dir=checkpoint_dir)
        try:
            self.client.init_weight_transfer_engine(asdict(info))
        except Exception as e:
            if on_error != "return":
                raise
            return [{"ok": False, "error": f"{type(e).__name__}: {e}"}] * self.num_workers()
        return [{"ok": True, "rank": rank_offset + i, "path": "native"} for i in range(self.num_workers())]

    def _receive_weights(self, step: int, mode: str = "auto", on_error: str = "raise", stream: bool = False,
                         max_wait_s: float | None = None, allow_non_increasing: bool = False,
                         group_id: str | None = None) -> list[dict]:
        info = Fp8UpdateInfo(step=step, mode=mode, allow_non_increasing=allow_non_increasing, group_id=group_id)
        try:
            self.client.start_weight_update()
            try:
                self.client.update_weights(asdict(info))
            except Exception:
                # 0.22-0.24 keep the update open after a failure (0.28+ closed
                # it and would refuse): close it without hiding the reason
                with contextlib.suppress(Exception):
                    self.client.finish_weight_update()
                raise
            self.client.finish_weight_update()
        except Exception as e:
            if on_error != "return":
                raise
            return [_failure(step, e)] * self.num_workers()
        return [{"ok": True, "step": step, "mode": mode, "path": "native"}] * self.num_workers()

    def _close_weight_receiver(self) -> list[bool]:
        shutdown = getattr(self.client, "shutdown_weight_transfer_engine", None)
        if callable(shutdown):
            shutdown()
        return [True] * self.num_workers()


class NativeLLMTarget(_NativeTarget):
    """A ``vllm.LLM`` in this process started with ``weight_transfer_config={"backend": "fp8"}``."""

    def __init__(self, llm: Any, name: str | None = None) -> None:
        self.llm = llm
        self.client = LLMWeightSyncClient(llm)
        self.name = name or f"LLM@{id(llm):x} (native)"

    def served_model(self) -> str | None:
        return self.client.served_model

    def num_workers(self) -> int:
        pc = self.llm.llm_engine.vllm_config.parallel_config
        return int(pc.world_size)

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())


class NativeHTTPTarget(_NativeTarget):
    """A ``vllm serve`` process with ``--weight-transfer-config '{"backend": "fp8"}'``
    and ``VLLM_SERVER_DEV_MODE=1`` (the routes exist only in dev mode)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, name: str | None = None,
                 timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.name = name or f"{self.base_url} (native)"
        self.client = self

    # the four control-plane calls (the routes of every release with the API)
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._request("/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._request("/start_weight_update", {})

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._request("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._request("/finish_weight_update", {} if weight_version is None else {"weight_version": weight_version})

    def served_model(self) -> str | None:
        data = (self._request("/v1/models", None) or {}).get("data") or [{}]
        return data[0].get("root") or data[0].get("id")

    def num_workers(self) -> int:
        info = self._request("/server_info?config_format=json", None) or {}
        cfg = info.get("vllm_config")
        pc = cfg.get("parallel_config") if isinstance(cfg, dict) else None
        if isinstance(pc, dict) and pc.get("world_size"):
            return int(pc["world_size"])
        return 1

    def reset_prefix_cache(self) -> bool:
        self._request("/reset_prefix_cache", {})
        return True

    def _request(self, path: str, body: dict | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method="GET" if body is None else "POST")
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:4000].decode(errors="replace")
            raise RuntimeError(f"{self.name}{path}: HTTP {e.code}: {detail}") from e
        return json.loads(raw) if raw else None


def _failure(step: int, e: BaseException) -> dict:
    """The extension's failure shape from a native error (vLLM passes the
    worker's message through; our engine's rejections say "model unchanged")."""
    text = f"{type(e).__name__}: {e}"
    # only a message that says so counts as "model unchanged"; anything else may be partial
    kind = "WeightUpdateRejected" if "model unchanged" in text else "WeightLoadFailed"
    return {"ok": False, "step": step, "error": text, "error_type": kind, "model_touched": kind == "WeightLoadFailed"}
