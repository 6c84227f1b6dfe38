"""Trainer-side driver of the weight sync into running vLLM servers.

One :class:`WeightSyncClient` owns the :class:`~.sender.WeightSender` (rank 0)
and talks to every vLLM server through ``collective_rpc`` -- in-process
``vllm.LLM`` objects directly, ``vllm serve`` processes over HTTP
(``POST /collective_rpc``, a route vLLM exposes only with
``VLLM_SERVER_DEV_MODE=1``). Every server must run with
``--worker-extension-cls vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension``.

::

    from vllm_fp8_overlay.sync.client import attach_llm, WeightSyncClient

    client = attach_llm(llm, host="127.0.0.1")     # layout="auto", a free port
    # or: WeightSyncClient(["http://10.0.0.7:8000", "http://10.0.0.8:8000"], host=..., port=...)
    for step in range(n):
        train_one_step(model)
        report = client.push(model.state_dict(), step)   # raises if any worker failed
    client.close()

``push`` asks every worker to start receiving (from helper threads), runs
``WeightSender.send`` in the calling thread, and polls the workers until all
answered. A worker receives in a background thread, so each poll holds the
server's engine at most ``max_block_s`` (default 0.1 s) and the client then
leaves it alone for ``poll_interval_s`` (default 0.1 s): generation goes on
while a slow or frozen trainer's step is in flight (streamed steps excepted:
they load while receiving). ``push`` raises :class:`WeightSyncFailed` listing
each worker's error if any failed, and resets every server's prefix cache
after every attempt, failed ones included (cached KV blocks were computed
with other weights).

Ownership: the client names its group with a random id; a server already
owned by another live trainer refuses to join unless ``takeover=True``,
which tells that trainer (its next push raises ``OwnershipLost``). Steps
must increase unless ``push(..., allow_non_increasing=True)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from .aliases import per_expert, tied_aliases
from .sender import SendStats, WeightSender
from .targets import HTTPTarget, LLMTarget, _target
from .transport import assign_rank_offsets, free_port

__all__ = [
    "EXTENSION",
    "WeightSyncClient",
    "WeightSyncFailed",
    "LLMTarget",
    "HTTPTarget",
    "StepReport",
    "attach_llm",
    "attach_servers",
]

#: value for ``worker_extension_cls`` / ``--worker-extension-cls``
EXTENSION = "vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension"


class WeightSyncFailed(RuntimeError):
    """At least one worker failed a step (its message says whether its model
    was left unchanged or may be partially updated)."""

    def __init__(self, message: str, results: list[Any] | None = None):
        super().__init__(message)
        self.results = results or []


# --------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------


@dataclass
class StepReport:
    step: int
    send: SendStats
    workers: list[dict]  # one result dict per worker, in target order
    wall_s: float
    reset_prefix_cache_s: float = 0.0
    targets: list[str] = field(default_factory=list)
    prefix_cache_reset: list[bool] = field(default_factory=list)  # per target: did the reset succeed
    canary: dict | None = None  # sync.canary report (cost_ms, max_deviation, ...) when push ran one
    dropped_aliases: list[str] = field(default_factory=list)  # tied aliases not sent (sync.aliases)

    def stage_times(self) -> dict[str, float]:
        """Slowest worker per stage, plus the trainer's quantize/transfer."""
        w = self.workers or [{}]
        return {
            "quantize_s": self.send.quantize_s,
            "transfer_s": self.send.transfer_s,
            "send_total_s": self.send.total_s,
            "receive_s": max(r.get("receive_s", 0.0) for r in w),
            "validate_s": max(r.get("validate_s", 0.0) for r in w),
            "load_s": max(r.get("load_s", 0.0) for r in w),
            "wall_s": self.wall_s,
        }

    def to_dict(self) -> dict:
        return {"step": self.step, "send": self.send.to_dict(), "workers": self.workers,
                "wall_s": self.wall_s, "targets": self.targets, "canary": self.canary,
                "dropped_aliases": self.dropped_aliases, **self.stage_times()}


class WeightSyncClient:
    """Trainer side of the sync into one or more vLLM servers.

    Args:
        targets: ``vllm.LLM`` objects, ``http://host:port`` URLs of
            ``vllm serve`` processes, or :class:`LLMTarget` / :class:`HTTPTarget`.
        layout: ``"auto"`` (ask the servers what they serve: the FP8 layout of
            their checkpoint, or ``None`` for BF16), an ``FP8Layout``, its dict,
            or ``None`` (send tensors as given).
        host, port: address of the sync group's TCPStore, hosted here; must be
            reachable from every vLLM worker (see ``docs/multinode.md``).
            ``port=None`` (default): a port that is free on ``host`` now
            (:func:`~.transport.free_port`); the one used is ``self.port``.
        backend, bucket_bytes, device, timeout: as for ``WeightSender``.
        mode: load mode passed to the workers (``"auto"``, ``"layerwise"``,
            ``"load_weights"``, ``"kernel"``).
        stream: workers load buckets as they arrive instead of receiving and
            validating the whole step first (``receive_weights(stream=True)``:
            less memory, but an error after the first bucket leaves the model
            partially updated and is reported as such). Default ``False``.
        keep_receive_buffers: workers keep their receive buffers and tensor
            views from one step to the next (``WeightReceiver(keep_step_buffers=True)``):
            for a 10B MoE model on 2x H200 this halved the step (95 -> 47 ms),
            at the price of a step's worth of memory held on every worker
            between updates. Default ``False``.
        checkpoint_dir: what the servers validate against, if their model
            directory is not local to them.
        reset_prefix_cache: reset each server's prefix cache after every
            update attempt.
        takeover: replace the receivers of another trainer that still owns
            the servers (it is told); without it such servers refuse.
        max_block_s: longest time one poll may hold a server's engine while a
            step is in flight (workers receive in the background).
        path: ``"extension"`` (the servers run ``--worker-extension-cls``
            :data:`EXTENSION`) or ``"native"`` (they run vLLM's weight-transfer
            API with ``WeightTransferConfig(backend="fp8")``, vLLM >= 0.22.1; an
            update then holds the engine while it arrives, and worker reports
            carry the outcome without timings).
        poll_interval_s: pause between polls, during which the engine serves.

    Construction joins every worker and the sender into one group (bounded by
    ``timeout``).
    """

    def __init__(
        self,
        targets: Sequence[Any] | Any,
        *,
        layout: Any = "auto",
        host: str = "127.0.0.1",
        port: int | None = None,
        backend: str = "auto",
        bucket_bytes: int | None = None,
        device: Any = None,
        timeout: float = 300.0,
        mode: str = "auto",
        stream: bool = False,
        keep_receive_buffers: bool = False,
        checkpoint_dir: str | None = None,
        reset_prefix_cache: bool = True,
        takeover: bool = False,
        max_block_s: float = 0.1,
        poll_interval_s: float = 0.1,
        path: str = "extension",
    ) -> None:
        if not isinstance(targets, (list, tuple)):
            targets = [targets]
        self.targets = [_target(t, path) for t in targets]
        if not self.targets:
            raise ValueError("no targets")
        self.timeout = float(timeout)
        self.mode = mode
        self.stream = stream
        self.reset_prefix_cache = reset_prefix_cache
        self.max_block_s = float(max_block_s)
        self.poll_interval_s = float(poll_interval_s)
        self.group_id = os.urandom(16).hex()
        self.host = host
        self.port = port = int(port) if port is not None else free_port(host)
        self._pool = cf.ThreadPoolExecutor(max_workers=max(2, len(self.targets)), thread_name_prefix="weight-sync-rpc")
        self.sender: WeightSender | None = None
        self._closed = False

        # 1. what each server serves (quick, blocking)
        descs = self._call_all("weight_sync_describe", {"checkpoint_dir": checkpoint_dir})
        self.descriptions = descs
        workers = [len(d) for d in descs]
        if any(n == 0 for n in workers):
            raise RuntimeError("a target reported no workers")
        for t, d in zip(self.targets, descs):
            # each worker joins as rank offset + its local rank: they must be 0..n-1
            ranks = sorted(int(w.get("local_rank", -1)) for w in d)
            if ranks != list(range(len(d))):
                raise RuntimeError(f"{t.name}: its {len(d)} workers report local ranks {ranks}, not 0..{len(d) - 1}; "
                                   "rank offsets cannot be assigned (a data-parallel engine counts every replica)")
        layouts = [d[0].get("layout") for d in descs]
        if layout == "auto":
            for t, d in zip(self.targets, descs):
                if d[0].get("layout_error"):
                    raise RuntimeError(f"{t.name}: cannot write its checkpoint format: {d[0]['layout_error']}")
            keys = [json.dumps(_strip(lay), sort_keys=True) for lay in layouts]
            if len(set(keys)) != 1:
                raise RuntimeError(f"targets serve different layouts: {dict(zip([t.name for t in self.targets], layouts))}")
            layout = layouts[0]
        if isinstance(layout, Mapping):
            from ..formats import FP8Layout

            layout = FP8Layout.from_dict(layout)
        self.layout = layout
        offsets, world_size = assign_rank_offsets(workers)
        self.world_size = world_size
        self.offsets = offsets

        # 2. workers join (blocking RPCs, in threads), then the sender joins here
        futs = [
            self._pool.submit(t.call, "init_weight_receiver", {
                "host": host, "port": int(port), "world_size": world_size, "rank_offset": off,
                "backend": backend, "timeout": self.timeout, "checkpoint_dir": checkpoint_dir,
                "keep_step_buffers": keep_receive_buffers, "group_id": self.group_id, "takeover": takeover,
                "on_error": "return",
            }, self.timeout + 60)
            for t, off in zip(self.targets, offsets)
        ]
        box: dict[str, Any] = {}

        def build() -> None:
            try:
                box["sender"] = WeightSender(layout, host, int(port), world_size, backend=backend,
                                             bucket_bytes=bucket_bytes, device=device, timeout=self.timeout,
                                             group_id=self.group_id)
            except BaseException as e:  # noqa: BLE001 - reported below
                box["error"] = e

        th = threading.Thread(target=build, name="weight-sync-join", daemon=True)
        th.start()
        deadline = time.monotonic() + self.timeout + 30
        while th.is_alive() and time.monotonic() < deadline:
            th.join(0.2)
            failed = self._init_failures(futs)
            if failed:
                self._pool.shutdown(wait=False, cancel_futures=True)
                raise WeightSyncFailed("init_weight_receiver failed: " + "; ".join(failed))
        if th.is_alive():
            raise TimeoutError(f"weight-sync group did not form within {self.timeout + 30:.0f}s")
        if "error" in box:
            cf.wait(futs, timeout=10)  # the workers' own reasons say more than the handshake's
            failed = self._init_failures(futs)
            raise WeightSyncFailed("could not form the weight-sync group: " + "; ".join(failed or [str(box["error"])])) \
                from box["error"]
        self.sender = box["sender"]
        self.workers = self._gather(futs, "init_weight_receiver")

    def _init_failures(self, futs: list[cf.Future]) -> list[str]:
        out = []
        for t, f in zip(self.targets, futs):
            if not f.done():
                continue
            if f.exception() is not None:
                out.append(f"{t.name}: {f.exception()}")
                continue
            for i, r in enumerate(f.result()):
                if isinstance(r, dict) and r.get("ok") is False:
                    out.append(f"{t.name} worker {i}: {r.get('error')}")
        return out

    # ------------------------------------------------------------------ API

    def push(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], step: int,
             mode: str | None = None, stream: bool | None = None, allow_non_increasing: bool = False,
             canary: Any = None, rank_parts: bool = False) -> StepReport:
        """Send one step to every worker and wait until all of them loaded it
        (``mode`` / ``stream``: this step only, default the client's).
        ``step`` must be larger than the last step the workers loaded unless
        ``allow_non_increasing``.

        Raises :class:`WeightSyncFailed` if any worker rejected or failed the
        step (after all workers answered), or the sender's own error. Every
        server's prefix cache is reset afterwards either way. ``canary``: a
        ``sync.canary.Canary`` run after a successful load (``CanaryFailed``
        if an engine's logprobs leave its bound; its report in ``.canary``).
        ``rank_parts``: the trainer's ranks also send parts of this step
        themselves (:class:`~.rank_parts.RankParts`; set by
        ``push_sharded(..., parts=)``).
        """
        if self._closed or self.sender is None:
            raise RuntimeError("client is closed")
        t0 = time.perf_counter()
        aliases = tied_aliases(self)  # lm_head.weight of a tied model: dropped, after checking it is the embedding
        weights = aliases.filter(weights)
        if self.layout is None:  # BF16 target: fused experts split here (the FP8 quantizer splits them itself)
            weights = per_expert(weights)
        kw = {"step": int(step), "mode": mode or self.mode, "on_error": "return",
              "stream": self.stream if stream is None else stream, "max_wait_s": self.max_block_s,
              "allow_non_increasing": bool(allow_non_increasing), "group_id": self.group_id}
        if rank_parts:
            kw["rank_parts"] = True
        futs = [self._pool.submit(self._run_step, t, kw) for t in self.targets]
        send_error: BaseException | None = None
        stats = None
        try:
            try:
                stats = self.sender.send(weights, step)
            except BaseException as e:  # noqa: BLE001 - workers got an ABORT; collect them first
                send_error = e
            try:
                results = self._gather(futs, "receive_weights")
            except Exception as e:
                if send_error is not None:
                    raise send_error from e
                raise
            if send_error is not None:
                raise send_error
        finally:
            reset = self._reset_prefix_caches()
        failed = [(t.name, i, r) for t, rs in zip(self.targets, results) for i, r in enumerate(rs)
                  if not (isinstance(r, dict) and r.get("ok"))]
        flat = [r for rs in results for r in rs]
        if failed:
            lines = [f"{name} worker {i}: {r.get('error') if isinstance(r, dict) else r}" for name, i, r in failed]
            touched = any(isinstance(r, dict) and r.get("model_touched") for _, _, r in failed)
            head = (f"step {step} failed on {len(failed)} of {len(flat)} worker(s); "
                    + ("SOME MODELS MAY BE PARTIALLY UPDATED" if touched else "failed workers left their model unchanged"))
            raise WeightSyncFailed(head + ":\n  " + "\n  ".join(lines), flat)
        t1 = time.perf_counter()
        rep = StepReport(step=int(step), send=stats, workers=flat, wall_s=t1 - t0 - reset[1],
                         reset_prefix_cache_s=reset[1], targets=[t.name for t in self.targets],
                         prefix_cache_reset=reset[0], dropped_aliases=list(aliases.dropped))
        if canary is not None:
            rep.canary = canary.run(self, step)
        return rep

    def status(self) -> list[list[dict]]:
        """``weight_sync_status()`` of every worker, per target."""
        return self._call_all("weight_sync_status", {})

    def digests(self) -> list[list[dict]]:
        """``weight_sync_digest()`` of every worker, per target."""
        return self._call_all("weight_sync_digest", {})

    def close(self) -> None:
        """Close the workers' receivers and the sender (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            futs = [self._pool.submit(t.call, "close_weight_receiver", {}, 60) for t in self.targets]
            cf.wait(futs, timeout=90)
        finally:
            if self.sender is not None:
                self.sender.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "WeightSyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _run_step(self, t: Any, kw: dict) -> list[Any]:
        """One target's side of a step: start it, then poll until every
        worker answered (each call holds the engine at most ``max_block_s``)."""
        res = t.call("receive_weights", kw, self.timeout + 60)
        deadline = time.monotonic() + self.timeout + 60
        poll = {"step": kw["step"], "max_wait_s": self.max_block_s, "on_error": "return", "group_id": self.group_id}
        while any(isinstance(r, dict) and r.get("pending") for r in res):
            if time.monotonic() > deadline:
                return [{"ok": False, "step": kw["step"], "error": f"step still arriving after {self.timeout + 60:.0f}s",
                         "error_type": "WeightUpdateRejected", "model_touched": False} if r.get("pending") else r
                        for r in res]
            time.sleep(self.poll_interval_s)
            res = t.call("weight_sync_wait", poll, self.timeout + 60)
        return res

    def _reset_prefix_caches(self) -> tuple[list[bool], float]:
        t0 = time.perf_counter()
        ok: list[bool] = []
        if self.reset_prefix_cache:
            for t in self.targets:
                try:
                    ok.append(bool(t.reset_prefix_cache()))
                except Exception:  # a dead server must not hide the step's own outcome
                    ok.append(False)
        return ok, time.perf_counter() - t0

    def _call_all(self, method: str, kwargs: dict) -> list[list[Any]]:
        futs = [self._pool.submit(t.call, method, kwargs, self.timeout) for t in self.targets]
        return self._gather(futs, method)

    def _gather(self, futs: list[cf.Future], method: str) -> list[list[Any]]:
        done, pending = cf.wait(futs, timeout=self.timeout + 90)
        errors = []
        for t, f in zip(self.targets, futs):
            if f in pending:
                errors.append(f"{t.name}: {method} did not return within {self.timeout + 90:.0f}s")
            elif f.exception() is not None:
                errors.append(f"{t.name}: {method} failed: {f.exception()}")
        if errors:
            raise WeightSyncFailed("; ".join(errors))
        return [f.result() for f in futs]


def _strip(layout: Any) -> Any:
    if not layout:
        return None
    return {k: v for k, v in layout.items() if k not in ("kv_cache_scheme",)}


def attach_llm(llm: Any, **kw: Any) -> WeightSyncClient:
    """:class:`WeightSyncClient` for one (or a list of) in-process ``vllm.LLM``."""
    return WeightSyncClient(llm if isinstance(llm, (list, tuple)) else [llm], **kw)


def attach_servers(urls: Sequence[str] | str, *, api_key: str | None = None, **kw: Any) -> WeightSyncClient:
    """:class:`WeightSyncClient` for ``vllm serve`` processes (dev mode) by URL."""
    if isinstance(urls, str):
        urls = [urls]
    return WeightSyncClient([HTTPTarget(u, api_key=api_key) for u in urls], **kw)
