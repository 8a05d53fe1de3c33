"""Model families; importing this package registers every model with timm."""
from typing import Any

import torch.nn as nn

from .exit_heads import EXIT_HEADS, MAP_EXIT_HEADS, TOKEN_EXIT_HEADS, ExitHead, create_exit_head
from .multi_exit_vit import (
    EXIT_CRITERIA, AnytimeStep, ExitOutput, MultiExitEva, MultiExitMixin, MultiExitVisionTransformer,
)
from ._base import UntrainedWeightsWarning
from .life_regress_vit import LifeRegression, LifeRegressEva, LifeRegressMixin, LifeRegressVisionTransformer
from .mexit_liferegress import (
    MultiExitLifeRegressEva, MultiExitLifeRegressMixin, MultiExitLifeRegressVisionTransformer,
)
from .adapters import adapted_class, any_input_size, input_shape

FAMILIES = {'mexit': MultiExitMixin, 'liferegress': LifeRegressMixin, 'mexit_liferegress': MultiExitLifeRegressMixin}


def convert(model: nn.Module, family: str, **kwargs: Any) -> nn.Module:
    """Turn a built timm model (any weights, any arguments) into a ``family`` model in place: 'mexit' (early exits,
    ``MultiExitMixin`` arguments), 'liferegress' (patch slimming, ``LifeRegressMixin`` arguments) or
    'mexit_liferegress' (both, ``MultiExitLifeRegressMixin`` arguments). Its weights are
    kept and the new parts are initialised (untrained); at full depth / keep rate 1 its output is unchanged.

    Returns:
        ``model`` itself, now of class ``<Family><ParentClass>``.
    """
    if family not in FAMILIES:
        raise ValueError(f'family must be one of {sorted(FAMILIES)}, got {family!r}')
    if isinstance(model, tuple(FAMILIES.values())):
        raise ValueError(f'model is already a {type(model).__name__}; convert a plain timm model')
    cls = adapted_class(FAMILIES[family], type(model))  # an unsupported class: ValueError naming what is supported
    parent_cls = model.__class__
    model.__class__ = cls
    try:
        model._init_mechanism(**kwargs)
    except BaseException:
        model.__class__ = parent_cls  # a bad argument leaves the model as it was
        raise
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    if cfg.get('architecture'):
        cfg['architecture'] = f"{cfg['architecture']}_{family}"
    model.pretrained_cfg = model.default_cfg = cfg
    return model
