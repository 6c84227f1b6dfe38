"""What a :class:`~.receiver.WeightReceiver` hands out, and what it tracks
while a step arrives (which step, which bucket comes next, what was
received, what checks found)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .wire import BucketManifest, EndOfStep, Header, ManifestError, ProtocolError, WireError

__all__ = ["Bucket", "ReceivedStep", "StepRejectedError", "OnBucket", "ManifestCheck", "PayloadCheck",
           "DeferredProblems"]


class StepRejectedError(WireError):
    """The caller's checks rejected buckets of the step. Every byte of the
    step was received (the group is in sync) and nothing was handed out."""

    def __init__(self, step: int | None, problems: list[str]) -> None:
        self.step = step
        self.problems = list(problems)
        super().__init__(f"step {step} rejected: " + " | ".join(problems))


@dataclass
class Bucket:
    """One received bucket: validated manifest plus zero-copy tensor views."""

    manifest: BucketManifest
    tensors: list[tuple[str, torch.Tensor]]
    payload: torch.Tensor  # the uint8 buffer the views alias

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def index(self) -> int:
        return self.manifest.index

    @property
    def last(self) -> bool:
        return self.manifest.last


@dataclass
class ReceivedStep:
    """Everything of one step, as returned by :meth:`WeightReceiver.receive_all`."""

    step: int
    layout: dict | None
    tensors: list[tuple[str, torch.Tensor]]
    summary: EndOfStep
    manifests: list[BucketManifest] = field(default_factory=list)

    @property
    def layouts(self) -> list[dict | None]:
        """The layout of every bucket (a step must not mix them)."""
        return [m.layout for m in self.manifests]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)


OnBucket = Callable[[list[tuple[str, torch.Tensor]], BucketManifest], None]
ManifestCheck = Callable[[BucketManifest], list[str]]
PayloadCheck = Callable[[Bucket], list[str]]


class DeferredProblems:
    """A payload check's verdict read at the end of the step, not per bucket.

    ``receive_all`` hands nothing out before the step's END, so a check may
    return this instead of its problems: the receiver then goes on with the
    next bucket without waiting for the check (on CUDA: without a host sync
    per bucket) and calls ``resolve()`` once the step ended, rejecting the
    step if it returns problems. Only ``receive_all`` accepts it."""

    __slots__ = ("resolve",)

    def __init__(self, resolve: Callable[[], list[str]]) -> None:
        self.resolve = resolve


class _Fatal(Exception):
    """Internal: the stream position is unknown; wraps the error to re-raise."""


class _StepState:
    def __init__(self, expected_step: int | None) -> None:
        self.expected_step = expected_step
        self.step: int | None = None
        self.next_index = 0  # buckets received
        self.announced = 0  # buckets whose control was read
        self.saw_last = False
        self.voided = 0  # 1 + index of a bucket the trainer voided (its ABORT follows)
        self.num_tensors = 0
        self.num_bytes = 0
        self.names: set[str] = set()
        self.problems: list[str] = []
        self.deferred: list[DeferredProblems] = []  # payload verdicts read at the end of the step
        self.ended = False

    def check_step(self, header: Header) -> None:
        """A message of another step inside this one means the END of this
        step never came: fatal. A first message of an unexpected step is not
        (the whole of that step is drained)."""
        if self.step is None:
            self.step = header.step
            if self.expected_step is not None and header.step != self.expected_step:
                raise ProtocolError(f"expected step {self.expected_step}, sender sent step {header.step}")
        elif header.step != self.step:
            raise _Fatal(ProtocolError(
                f"message of step {header.step} inside step {self.step}: the end of step {self.step} is missing"))

    def check_order(self, header: Header) -> None:
        """Called once per bucket control, in wire order."""
        if self.saw_last:
            raise ProtocolError(f"bucket {header.index} after the last bucket of step {self.step}")
        if header.index != self.announced:
            raise ProtocolError(f"expected bucket {self.announced}, got {header.index}")
        self.announced += 1
        self.saw_last = header.last

    def account(self, names: frozenset[str], nbytes: int, ntensors: int) -> None:
        """Called once per received bucket, in order."""
        self.next_index += 1
        self.num_bytes += nbytes
        self.num_tensors += ntensors
        if not self.names.isdisjoint(names):
            dup = sorted(self.names & names)[0]
            self.names |= names
            raise ManifestError(f"tensor {dup!r} sent twice in step {self.step}")
        self.names |= names
