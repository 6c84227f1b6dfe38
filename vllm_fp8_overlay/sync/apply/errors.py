"""What a weight update can end in, as the vLLM side reports it.

Every failure of ``receive_weights`` is one of two kinds, because that is
what the caller must act on: :class:`WeightUpdateRejected` (nothing was
loaded: the model is bitwise what it was, serving may go on) or
:class:`WeightLoadFailed` (loading had started: the model may be partially
updated, send a complete good step or restart). Transport, protocol and
validation errors are mapped onto these with their original type named in
the message and in ``cause``.
"""

from __future__ import annotations

__all__ = ["WeightSyncError", "WeightUpdateRejected", "WeightLoadFailed", "WeightSyncOwnershipError"]


class WeightSyncError(RuntimeError):
    """Base class of the extension's errors."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class WeightUpdateRejected(WeightSyncError):
    """The update was not loaded; the model was not touched."""


class WeightLoadFailed(WeightSyncError):
    """Loading failed part-way: the model may be partially updated."""


class WeightSyncOwnershipError(WeightSyncError):
    """Another trainer owns this worker's receiver (see ``takeover``)."""
