"""Let the ``fp8`` engine own the layerwise reload on vLLM 0.22-0.24.

Why: on 0.22-0.24 the worker, not the engine, starts the layerwise reload
in ``start_weight_update`` (which moves every layer's weights to the meta
device) and finalizes it in ``finish_weight_update``. Our engine validates
a whole update before touching the model; with the reload already started,
a rejected update would leave the model on meta until the trainer calls
finish. From 0.28 the engine owns both calls, as here.

How: when the worker's engine is ours, ``Worker.init_weight_transfer_engine``
first gives the engine the worker's configs (the 0.22-0.24 engine base class
gets only the parallel config and the model, and our engine reads the served
checkpoint from the model config), and ``Worker.start_weight_update`` tells
it the requested format and runs with ``is_checkpoint_format=False``
(nothing to prepare, nothing to finalize); ``Worker.update_weights`` hands
the update info to the engine's own ``update_weights``, which receives,
validates and loads through the same core as the worker extension. (The
worker's own body would enter ``torch.device(self.device)``, which is
``None`` on 0.22's CPU worker -- a TypeError for every backend there -- and
dispatch on sparse-update fields that are not ours.) Other engines are
untouched.

Serves: 0.22.1 up to (not including) 0.28.0, where the engine owns the
reload.
"""

from __future__ import annotations

import sys

import wrapt
from packaging.specifiers import SpecifierSet

from . import _base
from ._base import Adapter

WORKER = "vllm.v1.worker.gpu_worker"


class NativeWorkerOwnsReload(Adapter):
    id = "native-worker-owns-reload"
    title = "the fp8 engine starts and finishes its own layerwise reload (0.22-0.24 workers)"
    serves = SpecifierSet(">=0.22.1,<0.28.0")
    unavailable = "from 0.28 the engine owns start/finish_weight_update; before 0.22.1 no fp8 engine"
    trigger_module = WORKER
    targets = (WORKER + ".Worker.init_weight_transfer_engine", WORKER + ".Worker.start_weight_update",
               WORKER + ".Worker.update_weights")

    def check(self) -> None:
        import inspect

        worker = getattr(sys.modules[WORKER], "Worker", None)
        fn = getattr(worker, "start_weight_update", None)
        if fn is None or "is_checkpoint_format" not in inspect.signature(fn).parameters:
            raise _base.TargetMismatch("Worker.start_weight_update(is_checkpoint_format) is gone")
        for name in ("init_weight_transfer_engine", "update_weights"):
            if not callable(getattr(worker, name, None)):
                raise _base.TargetMismatch(f"Worker.{name} is gone")

    def apply(self) -> None:
        from vllm_fp8_overlay.sync.native.info import BACKEND

        def ours(worker):
            engine = getattr(worker, "weight_transfer_engine", None)
            return engine if getattr(getattr(engine, "config", None), "backend", None) == BACKEND else None

        def bind_then_init(wrapped, instance, args, kwargs):
            engine = ours(instance)
            if engine is not None:
                engine.bind_worker(instance)
            return wrapped(*args, **kwargs)

        def hand_reload_to_fp8_engine(wrapped, instance, args, kwargs):
            engine = ours(instance)
            if engine is None:
                return wrapped(*args, **kwargs)
            fmt = args[0] if args else kwargs.get("is_checkpoint_format", True)
            engine.bind_worker(instance, checkpoint_format=fmt)
            return wrapped(is_checkpoint_format=False)

        def update_through_engine(wrapped, instance, args, kwargs):
            engine = ours(instance)
            if engine is None:
                return wrapped(*args, **kwargs)
            if not getattr(instance, "_weight_update_active", False):
                raise RuntimeError("start_weight_update must be called before update_weights.")
            engine.update_weights(args[0] if args else kwargs["update_info"])

        wrappers = {"init_weight_transfer_engine": bind_then_init, "start_weight_update": hand_reload_to_fp8_engine,
                    "update_weights": update_through_engine}
        worker = sys.modules[WORKER].Worker
        self._worker = worker
        self._originals = {name: worker.__dict__[name] for name in wrappers}
        for name, wrapper in wrappers.items():
            wrapt.wrap_function_wrapper(worker, name, wrapper)

    def revert_extra(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            for name, fn in self._originals.items():
                setattr(worker, name, fn)
            self._worker = None
