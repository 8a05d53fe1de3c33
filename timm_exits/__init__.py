"""timm-exits: multi-exit and patch-slimming Vision Transformers as ordinary timm models.

``import timm_exits`` registers every model with timm, so ``timm.create_model('vit_base_patch16_224_mexit')`` works.
"""
from .losses import attach_exit_losses, mevit_exit_loss, uncertainty_target
from .models import (
    EXIT_CRITERIA, EXIT_HEADS, AnytimeStep, ExitHead, ExitOutput, MultiExitVisionTransformer,
    UntrainedWeightsWarning, create_exit_head,
)
from .models import LifeRegression, LifeRegressVisionTransformer
from .models import FAMILIES, LifeRegressEva, LifeRegressMixin, MultiExitEva, MultiExitMixin, convert
from .models import MultiExitLifeRegressEva, MultiExitLifeRegressMixin, MultiExitLifeRegressVisionTransformer
from .hub import MissingWeightsError, published_models, push

__version__ = '0.1.0'
