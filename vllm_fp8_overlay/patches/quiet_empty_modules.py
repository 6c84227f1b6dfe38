"""Quiet "Failed to load weights" for modules that own no loadable tensors.

Why: vLLM 0.19 finalizes a layerwise reload with a bare ``else`` that warns
"<Class>: Failed to load weights" for every module that received nothing,
including containers and activations that own no tensors at all
(``ModuleList``, MLP blocks, ``SiluAndMul``, ``LogitsProcessor`` ...): a
two-layer Llama logs 14 such lines per reload, which drowns the real ones.

How: before vLLM's ``finalize_layerwise_processing`` runs, the patch settles
the modules it would warn about although their expected load size is zero
(puts their kernel tensors back and resets their reload state, which is what
vLLM does after the warning). vLLM then skips them. Modules that own loadable
tensors and received none still warn, as in 0.20.

Upstream: vllm-project/vllm#38574, first released in 0.20.0.
Remove when: the oldest supported vLLM is >= 0.20.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..overlay import Patch
from . import _reload


class QuietEmptyModules(Patch):
    id = "quiet-empty-modules"
    title = "no 'Failed to load weights' warning for modules with nothing to load"
    serves = SpecifierSet(">=0.19.0,<0.20.0")
    fixed_in = Version("0.20.0")
    upstream = "vllm-project/vllm#38574"
    not_needed_before = "vLLM < 0.19 does not warn in finalize"
    trigger_module = _reload.PACKAGE
    targets = (_reload.LAYERWISE + ".finalize_layerwise_processing",)

    def check(self) -> None:
        layerwise = _reload.module(_reload.LAYERWISE)
        _reload.require_attrs(
            layerwise,
            "finalize_layerwise_processing",
            "get_layerwise_info",
            "_place_kernel_tensors",
            "Attention",
            "MLAAttention",
        )
        func = layerwise.finalize_layerwise_processing
        _reload.require_params(func, ("model", "model_config"))
        _reload.require_const(func, "%s: Failed to load weights")
        info_cls = _reload.module(_reload.TYPES).LayerReloadingInfo
        _reload.require_attrs(info_cls, "can_load", "reset")

    def apply(self) -> None:
        layerwise = _reload.module(_reload.LAYERWISE)
        attention_types = (layerwise.Attention, layerwise.MLAAttention)

        def settle_empty_modules(wrapped, instance, args, kwargs):
            model = args[0] if args else kwargs["model"]
            for layer in model.modules():
                if isinstance(layer, attention_types):
                    continue
                info = layerwise.get_layerwise_info(layer)
                reloading = info.kernel_tensors is not None
                if info.can_load() and reloading and info.load_numel <= 0 and info.load_numel_total == 0:
                    layerwise._place_kernel_tensors(layer, info)
                    info.reset()
            return wrapped(*args, **kwargs)

        self.wrap(_reload.LAYERWISE, "finalize_layerwise_processing", settle_empty_modules)
