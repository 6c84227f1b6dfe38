"""Features for vLLM's own APIs, version-gated like the patches.

The patches in :mod:`..patches` back-port upstream fixes and retire when
vLLM ships them. Adapters are features (our ``fp8`` backend in vLLM's
weight-transfer registries); they never retire, they serve the releases
whose API they were written against, check that API before touching it,
and stand aside with a reason on the others. They run on the same
machinery (:class:`~..overlay.Overlay`): one post-import hook each,
exact undo, ``status()``.
"""

from .native_engine import NativeFp8Engine
from .native_trainer import NativeFp8Trainer
from .native_worker_reload import NativeWorkerOwnsReload

ADAPTER_CLASSES = (NativeFp8Engine, NativeWorkerOwnsReload, NativeFp8Trainer)

__all__ = ["ADAPTER_CLASSES", "NativeFp8Engine", "NativeFp8Trainer", "NativeWorkerOwnsReload"]
