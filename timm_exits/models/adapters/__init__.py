""" One adapter per parent model class; ``adapted_class`` puts a mechanism on a parent class through its adapter.

Supporting another timm model class means one new adapter module (see ``_base.ParentAdapter``) added to ``ADAPTERS``.
"""
import sys
from typing import Dict, List, Tuple, Type

from ._base import ParentAdapter
from .eva import EvaAdapter
from .vit import VitAdapter

__all__ = [
    'ADAPTERS', 'EvaAdapter', 'ParentAdapter', 'VitAdapter', 'adapted_class', 'adapter_for', 'parent_modules',
    'register_adapted', 'supported_parents',
]

ADAPTERS: List[Type[ParentAdapter]] = [VitAdapter, EvaAdapter]
_CLASSES: Dict[Tuple[type, type], type] = {}


def supported_parents() -> List[str]:
    """Names of the timm classes the adapters serve (their subclasses too)."""
    return [c.__name__ for a in ADAPTERS for c in a.parent_classes]


def adapter_for(parent_cls: type) -> Type[ParentAdapter]:
    """The adapter of ``parent_cls`` (a subclass of a served class), else a ValueError naming what is supported."""
    for adapter in ADAPTERS:
        if issubclass(parent_cls, adapter.parent_classes):
            return adapter
    raise ValueError(
        f'{parent_cls.__module__}.{parent_cls.__name__} is not a parent timm-exits supports: exits and life slimming '
        f'apply to subclasses of {supported_parents()} (one adapter per class, timm_exits.models.adapters)')


def parent_modules() -> Tuple[str, ...]:
    """timm modules whose registered architectures get ``_mexit`` / ``_liferegress`` twins."""
    return tuple(m for a in ADAPTERS for m in a.timm_modules)


def adapted_class(mechanism: type, parent_cls: type) -> type:
    """``class <Mechanism><Parent>(mechanism, adapter, parent_cls)``, made once and kept in the mechanism's module
    (so it pickles), unless a written class was registered for the pair (``register_adapted``)."""
    key = (mechanism, parent_cls)
    if key not in _CLASSES:
        adapter = adapter_for(parent_cls)
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
