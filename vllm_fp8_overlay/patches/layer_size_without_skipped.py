"""Count a layer's expected reload size without the tensors reload skips.

Why: in vLLM 0.16-0.18 ``get_layer_size`` counts every parameter and buffer,
including ``SKIP_TENSORS`` (the expert maps of expert-parallel MoE layers)
that reload never loads. Such a layer never reaches its expected size, is
processed only at finalize, and buffers all its expert weights until then,
until the GPU runs out of memory on large MoE models.

How: the layer size excludes the names in the reload module's
``SKIP_TENSORS``, read at call time (so names other patches add count too).

Upstream: vllm-project/vllm#37334, first released in 0.19.0.
Remove when: the oldest supported vLLM is >= 0.19.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..overlay import Patch
from . import _reload


class LayerSizeWithoutSkipped(Patch):
    id = "layer-size-without-skipped"
    title = "a layer's expected reload size excludes SKIP_TENSORS (expert maps)"
    serves = SpecifierSet(">=0.16.0,<0.19.0")
    fixed_in = Version("0.19.0")
    upstream = "vllm-project/vllm#37334"
    not_needed_before = "vLLM < 0.16 has no layerwise reload"
    trigger_module = _reload.PACKAGE
    targets = (_reload.UTILS + ".get_layer_size",)

    def check(self) -> None:
        utils = _reload.module(_reload.UTILS)
        _reload.require_attrs(utils, "get_layer_size", "get_layer_tensors")
        _reload.require_params(utils.get_layer_size, ("layer",))
        _reload.require_attrs(_reload.module(_reload.META), "SKIP_TENSORS")

    def apply(self) -> None:
        utils = _reload.module(_reload.UTILS)
        meta = _reload.module(_reload.META)

        def size_without_skipped(wrapped, instance, args, kwargs):
            layer = args[0] if args else kwargs["layer"]
            return sum(
                tensor.numel()
                for name, tensor in utils.get_layer_tensors(layer).items()
                if name not in meta.SKIP_TENSORS
            )

        self.wrap(_reload.UTILS, "get_layer_size", size_without_skipped)
