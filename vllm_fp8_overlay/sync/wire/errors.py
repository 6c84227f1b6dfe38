"""Errors raised on malformed or unexpected input from a peer.

Every decoder of :mod:`vllm_fp8_overlay.sync.wire` raises only these (never a
``KeyError``, ``TypeError``, ``OverflowError`` ...), so a caller can tell "the
peer sent something wrong" from a bug on its own side with one ``except``.
"""

from __future__ import annotations

__all__ = [
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


class WireError(ValueError):
    """Base class of every error raised on malformed or unexpected input."""


class BadMagicError(WireError):
    """The header does not start with the protocol's magic bytes."""


class VersionMismatchError(WireError):
    """The peer speaks a different protocol version."""


class HeaderError(WireError):
    """A header field is invalid (kind, flags, checksum algo, header crc...)."""


class ManifestError(WireError):
    """The manifest is not valid JSON or a field is invalid."""


class LimitExceededError(WireError):
    """A size cap of :class:`~.manifest.WireLimits` would be exceeded."""


class ChecksumError(WireError):
    """Manifest or payload bytes do not match their checksum or seal."""


class TruncatedStepError(WireError):
    """The end-of-step summary does not match what was received."""


class ProtocolError(WireError):
    """Messages arrived in an order the protocol does not allow."""


class StepAbortedError(WireError):
    """The sender aborted the step (its reason is in the message)."""


class ReceiverBrokenError(WireError):
    """The stream can no longer be trusted to be in sync; recreate the group."""
