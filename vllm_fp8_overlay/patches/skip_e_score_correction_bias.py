"""Leave the router's shared ``e_score_correction_bias`` out of layerwise reload.

Why: in DeepSeek-V3 / GLM-4.5-MoE / Moonlight style models the noaux_tc
router gate and ``FusedMoE`` share one ``e_score_correction_bias`` parameter.
vLLM 0.16-0.19 give each module its own meta copy during a layerwise reload.
The checkpoint fills only the gate's copy, so the MoE layer never reaches its
expected size: it is processed only at finalize, with all its expert weights
buffered until then, and its own copy of the bias, never loaded, is
materialized from uninitialized memory and copied into the tensor the router
uses. After reloading identical weights the bias holds garbage and routing
changes. A correctness fix, not only a memory one.

How: treat the bias like vLLM's expert maps. The name joins the reload
module's ``SKIP_TENSORS`` (not moved to meta, not rebuilt, not counted in the
layer size), and the layerwise weight-loader wrapping is peeled off it, so the
checkpoint value is copied straight into the live shared tensor.
On 0.16-0.18 the layer size still counts skipped tensors; this patch then
needs ``layer-size-without-skipped``.

Upstream: vllm-project/vllm#38746, first released in 0.20.0.
Remove when: the oldest supported vLLM is >= 0.20.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..overlay import Patch, TargetMismatch
from . import _reload

SKIPPED_NAME = "e_score_correction_bias"


class SkipEScoreCorrectionBias(Patch):
    id = "skip-e-score-correction-bias"
    title = "shared e_score_correction_bias is not rebuilt, wrapped or counted during reload"
    serves = SpecifierSet(">=0.16.0,<0.20.0")
    fixed_in = Version("0.20.0")
    upstream = "vllm-project/vllm#38746"
    not_needed_before = "vLLM < 0.16 has no layerwise reload"
    trigger_module = _reload.PACKAGE
    # Loader wrapping happens in initialize_online_processing from 0.19 on,
    # inline in initialize_layerwise_reload before; the patch wraps whichever
    # the release has.
    targets = (
        _reload.META + ".SKIP_TENSORS",
        _reload.LAYERWISE + ".initialize_online_processing",
        _reload.LAYERWISE + ".initialize_layerwise_reload",
    )
    requires = ("layer-size-without-skipped",)

    def __init__(self) -> None:
        super().__init__()
        self._added_to_skip = False

    def _entry_point(self):
        """The function that wraps weight loaders in this release."""
        layerwise = _reload.module(_reload.LAYERWISE)
        if hasattr(layerwise, "initialize_online_processing"):
            return "initialize_online_processing", ("layer",)
        return "initialize_layerwise_reload", ("model",)

    def check(self) -> None:
        meta = _reload.module(_reload.META)
        skip = getattr(meta, "SKIP_TENSORS", None)
        if not isinstance(skip, set) or "_expert_map" not in skip:
            raise TargetMismatch(f"{_reload.META}.SKIP_TENSORS is not the expected set of expert maps")
        layerwise = _reload.module(_reload.LAYERWISE)
        name, params = self._entry_point()
        _reload.require_attrs(layerwise, name, "make_online_process_loader")
        _reload.require_params(getattr(layerwise, name), params)

    def apply(self) -> None:
        meta = _reload.module(_reload.META)
        if SKIPPED_NAME not in meta.SKIP_TENSORS:
            meta.SKIP_TENSORS.add(SKIPPED_NAME)
            self._added_to_skip = True

        def leave_bias_unwrapped(wrapped, instance, args, kwargs):
            root = args[0] if args else next(iter(kwargs.values()))
            owned = _own_loader_flags(root)
            result = wrapped(*args, **kwargs)
            for tensor, had_own_loader in owned:
                loader = _reload.original_loader(getattr(tensor, "weight_loader", None))
                if had_own_loader:
                    tensor.weight_loader = loader
                elif "weight_loader" in tensor.__dict__:
                    del tensor.weight_loader
            return result

        name, _ = self._entry_point()
        self.wrap(_reload.LAYERWISE, name, leave_bias_unwrapped)

    def revert_extra(self) -> None:
        if self._added_to_skip:
            meta = _reload.module(_reload.META)
            meta.SKIP_TENSORS.discard(SKIPPED_NAME)
            self._added_to_skip = False


def _own_loader_flags(root):
    """(tensor, had its own weight_loader) for each skipped bias under ``root``."""
    seen: dict[int, tuple[object, bool]] = {}
    for module in root.modules():
        for store in (module._parameters, module._buffers):
            tensor = store.get(SKIPPED_NAME)
            if tensor is not None and id(tensor) not in seen:
                loader = tensor.__dict__.get("weight_loader")
                seen[id(tensor)] = (tensor, loader is not None and getattr(loader, "__name__", "") != "online_process_loader")
    return list(seen.values())
