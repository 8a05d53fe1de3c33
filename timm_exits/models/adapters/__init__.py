""" One adapter per parent model class; ``adapted_class`` puts a mechanism on a parent class through its adapter.

Supporting another timm model class means one new adapter module (see ``_base.ParentAdapter``) added to ``ADAPTERS``.
"""
import importlib
import sys

import torch.nn as nn
from typing import Dict, List, Sequence, Tuple, Type

from ._base import FeatureMapAdapter, ParentAdapter, eval_mode
from .eva import EvaAdapter
from .resnet import ResNetAdapter
from .vit import VitAdapter

# one module per timm model class (or module); each holds its adapter class(es) and may list REFUSED classes
_MODULES = (
    'vit', 'eva', 'resnet', 'beit', 'byobnet', 'cait', 'coat', 'convit', 'convmixer', 'convnext', 'cpubone', 'csatv2',
    'cspnet', 'cspnext', 'davit', 'densenet', 'dla', 'dpn', 'edgenext', 'efficientformer', 'efficientformer_v2',
    'efficientnet', 'efficientvim', 'efficientvit_mit', 'efficientvit_msra', 'fasternet', 'fastvit', 'focalnet',
    'gcvit', 'ghostnet', 'hgnet', 'hiera', 'hieradet_sam2', 'hrnet', 'iformer', 'inception_next', 'inception_resnet_v2',
    'inception_v3', 'inception_v4', 'lcnetv2', 'levit', 'lowformer', 'mambaout', 'maxxvit', 'metaformer', 'mlp_mixer',
    'mobilenetv3', 'mobilenetv5', 'mvitv2', 'naflexvit', 'nasnet', 'nest', 'nextvit', 'nfnet', 'pit', 'pvt_v2', 'rdnet',
    'refused_tokens', 'regnet', 'repghost', 'repvit', 'resnetv2', 'rexnet', 'selecsls', 'senet', 'sequencer', 'shvit',
    'starnet', 'swiftformer', 'swin_transformer', 'swin_transformer_v2', 'swin_transformer_v2_cr', 'tiny_vit',
    'tresnet', 'twins', 'vgg', 'visformer', 'vision_transformer_relpos', 'vision_transformer_sam', 'volo', 'vovnet',
    'xception', 'xception_aligned', 'xcit'
)

__all__ = [
    'ADAPTERS', 'EvaAdapter', 'FeatureMapAdapter', 'ParentAdapter', 'ResNetAdapter', 'VitAdapter', 'adapted_class',
    'adapter_for', 'any_input_size', 'eval_mode', 'input_shape', 'parent_modules', 'register_adapted',
    'supported_parents',
]

ADAPTERS: List[Type[ParentAdapter]] = []
REFUSED: Dict[str, str] = {}  # timm classes no adapter serves, with the reason
for _name in _MODULES:
    _module = importlib.import_module(f'{__name__}.{_name}')
    ADAPTERS += [v for v in vars(_module).values() if isinstance(v, type) and issubclass(v, ParentAdapter)
                 and v.parent_classes and v.__module__ == _module.__name__]
    REFUSED.update(getattr(_module, 'REFUSED', {}))
# what each family needs of a parent's state: life slimming drops patch tokens, so it needs a ViT's tokens
FAMILY_STATES = {'mexit': ('tokens', 'map'), 'liferegress': ('tokens',), 'mexit_liferegress': ('tokens',)}
_CLASSES: Dict[Tuple[type, type], type] = {}


def supported_parents(states: Sequence[str] = ('tokens', 'map')) -> List[str]:
    """Names of the timm classes the adapters serve (their subclasses too), those whose blocks pass ``states``."""
    return [c.__name__ for a in ADAPTERS if a.state_kind in states for c in a.parent_classes]


def adapter_for(parent_cls: type, states: Sequence[str] = ('tokens', 'map'),
                what: str = 'exits') -> Type[ParentAdapter]:
    """The adapter of ``parent_cls`` (a subclass of a served class) whose blocks pass one of ``states``, else a
    ValueError naming the reason and what is supported for ``what``."""
    for adapter in ADAPTERS:
        if issubclass(parent_cls, adapter.parent_classes):
            if adapter.state_kind in states:
                return adapter
            raise ValueError(
                f'{parent_cls.__name__} passes a {adapter.state_kind} between its blocks, and {what} needs ViT patch '
                f'tokens to drop; {what} applies to subclasses of {supported_parents(states)}')
    why = REFUSED.get(parent_cls.__name__)
    raise ValueError(
        f'{parent_cls.__module__}.{parent_cls.__name__} is not a parent timm-exits supports'
        f'{f" ({why})" if why else ""}: {what} applies to subclasses of {supported_parents(states)} (one adapter per '
        f'class, timm_exits.models.adapters)')


def parent_modules(family: str = 'mexit') -> Tuple[str, ...]:
    """timm modules whose registered architectures get ``<parent>_<family>`` twins."""
    return tuple(m for a in ADAPTERS if a.state_kind in FAMILY_STATES[family] for m in a.timm_modules)


def adapted_class(mechanism: type, parent_cls: type) -> type:
    """``class <Mechanism><Parent>(mechanism, adapter, parent_cls)``, made once and kept in the mechanism's module
    (so it pickles), unless a written class was registered for the pair (``register_adapted``)."""
    key = (mechanism, parent_cls)
    if key not in _CLASSES:
        family = getattr(mechanism, 'family', 'mexit')
        adapter = adapter_for(parent_cls, FAMILY_STATES[family], f'the {family} family')
        name = mechanism.__name__.replace('Mixin', '') + parent_cls.__name__
        _CLASSES[key] = type(name, (mechanism, adapter, parent_cls), {'__module__': mechanism.__module__})
        setattr(sys.modules[mechanism.__module__], name, _CLASSES[key])
    return _CLASSES[key]


def register_adapted(cls: type) -> type:
    """Class decorator: ``cls(mechanism, adapter, parent)``, written out, is what ``adapted_class`` returns for
    (mechanism, parent)."""
    mechanism, adapter, parent = cls.__bases__
    if adapter is not adapter_for(parent):
        raise TypeError(
            f'{cls.__name__}: {parent.__name__} takes {adapter_for(parent).__name__}, not {adapter.__name__}')
    _CLASSES[(mechanism, parent)] = cls
    return cls


def input_shape(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) a model is built for: a family model's own, a plain timm ViT's patch embedding's, else its pretrained
    cfg's input size (a CNN takes other sizes too: ``any_input_size``)."""
    if hasattr(model, 'input_shape'):
        return tuple(model.input_shape)
    embed = getattr(model, 'patch_embed', None)
    if embed is not None and hasattr(embed, 'img_size') and hasattr(getattr(embed, 'proj', None), 'in_channels'):
        return (embed.proj.in_channels, *embed.img_size)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(cfg.get('input_size') or (3, 224, 224))


def any_input_size(model: nn.Module) -> bool:
    """Whether ``model`` runs images of any size (a ViT with ``dynamic_img_size``, a CNN without fixed windows)."""
    embed = getattr(model, 'patch_embed', None)
    if getattr(model, 'state_kind', 'tokens') == 'tokens' and embed is not None and hasattr(embed, 'img_size'):
        return bool(getattr(embed, 'dynamic_img_size', False) or getattr(model, 'dynamic_img_size', False))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return not (getattr(model, 'fixed_input_size', False) or cfg.get('fixed_input_size', False))
