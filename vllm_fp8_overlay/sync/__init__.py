"""Trainer -> vLLM weight sync core (no vLLM import).

* :class:`WeightSender` (trainer, rank 0): quantize, pack into buckets, broadcast.
* :class:`WeightReceiver` (each vLLM worker, ranks >= 1): receive, validate, decode.
* :mod:`.wire`: the binary wire format, safe to decode from an untrusted peer.
* :mod:`.transport`: a private gloo/NCCL broadcast group and its handshake.
* :mod:`.values`: value sentinels (NaN/Inf, scales > 0) both sides enforce.
* :mod:`.client` / :mod:`.worker_extension`: the trainer's driver and the
  vLLM side (loading lives in :mod:`.apply`).
"""

from .receiver import Bucket, ReceivedStep, StepRejectedError, WeightReceiver
from .sender import DEFAULT_BUCKET_BYTES, SendStats, WeightSender
from .transport import BroadcastGroup, GroupRefused, OwnershipLost, TransportError, assign_rank_offsets
from .wire import (
    PROTOCOL_VERSION,
    BadMagicError,
    BucketManifest,
    ChecksumError,
    EndOfStep,
    HeaderError,
    LimitExceededError,
    ManifestError,
    ProtocolError,
    ReceiverBrokenError,
    StepAbortedError,
    TensorEntry,
    TruncatedStepError,
    VersionMismatchError,
    WireError,
    WireLimits,
)

__all__ = [
    "WeightSender",
    "SendStats",
    "DEFAULT_BUCKET_BYTES",
    "WeightReceiver",
    "Bucket",
    "ReceivedStep",
    "StepRejectedError",
    "BroadcastGroup",
    "TransportError",
    "GroupRefused",
    "OwnershipLost",
    "assign_rank_offsets",
    "PROTOCOL_VERSION",
    "WireLimits",
    "BucketManifest",
    "TensorEntry",
    "EndOfStep",
    "WireError",
    "BadMagicError",
    "VersionMismatchError",
    "HeaderError",
    "ManifestError",
    "LimitExceededError",
    "ChecksumError",
    "TruncatedStepError",
    "ProtocolError",
    "StepAbortedError",
    "ReceiverBrokenError",
]
