"""timm-exits: multi-exit and patch-slimming Vision Transformers as ordinary timm models.

``import timm_exits`` registers every model with timm, so ``timm.create_model('vit_base_patch16_224_mexit')`` works.
``timm_exits.fit(model, loader)`` fits the new parts on a frozen model by distillation and ``timm_exits.calibrate(model,
loader, epsilon=, delta=)`` chooses a threshold / keep rate with a guarantee (both modules load on first use).
"""
from .losses import attach_exit_losses, mevit_exit_loss, uncertainty_target
from .models import (
    EXIT_CRITERIA, EXIT_HEADS, MAP_EXIT_HEADS, TOKEN_EXIT_HEADS, AnytimeStep, ExitHead, ExitOutput,
    MultiExitVisionTransformer, UntrainedWeightsWarning, create_exit_head,
)
from .models import LifeRegression, LifeRegressVisionTransformer
from .models import FAMILIES, LifeRegressEva, LifeRegressMixin, MultiExitEva, MultiExitMixin, convert
from .models import MultiExitLifeRegressEva, MultiExitLifeRegressMixin, MultiExitLifeRegressVisionTransformer
from .hub import MissingWeightsError, published_models, push

__version__ = '0.1.0'


def __getattr__(name: str):
    """``timm_exits.fit``, ``timm_exits.calibrate`` and ``timm_exits.infer``: callable modules, imported on first use
    (they import the data and evaluation layers, which registering the models does not need)."""
    if name in ('fit', 'calibrate', 'infer'):
        import importlib
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
