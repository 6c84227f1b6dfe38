"""The back-ported vLLM fixes, one module each. Order matters only for
``requires``: a patch is applied after the patches it needs."""

from .layer_size_without_skipped import LayerSizeWithoutSkipped
from .quiet_empty_modules import QuietEmptyModules
from .skip_e_score_correction_bias import SkipEScoreCorrectionBias

PATCH_CLASSES = (LayerSizeWithoutSkipped, SkipEScoreCorrectionBias, QuietEmptyModules)

__all__ = ["PATCH_CLASSES", "LayerSizeWithoutSkipped", "QuietEmptyModules", "SkipEScoreCorrectionBias"]
