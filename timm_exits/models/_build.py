""" Building a family model on any timm parent: the parent's own build, with the family's class put in.

``timm.create_model('<parent>_mexit')`` calls timm's entry point of ``<parent>`` with ``build_model_with_cfg`` replaced
by a recorder for the length of the call: nothing is built there, and the recorded build (the parent's model class,
its arguments merged with the caller's, its checkpoint filter, its feature cfg) is then run with the family's class
(``adapted_class``) and the family's pretrained cfg. So every parent keeps its own weights conversion (npz, CLIP, EVA,
DeiT-III layer scale) and its own arguments, whatever they are.
"""
import inspect
import os
import sys
import threading
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch.nn as nn
from timm.models import (
    build_model_with_cfg, generate_default_cfgs, list_models, model_entrypoint, register_model, resolve_pretrained_cfg,
)
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn as vit_checkpoint_filter_fn

from ._base import check_weights_reachable, new_parts_filter, parent_cfgs, pop_kwargs
from .adapters import adapted_class, parent_modules

__all__ = ['build_family', 'parent_build', 'register_twins']

_SIGNATURE = inspect.signature(build_model_with_cfg)
_LOCK = threading.Lock()


class _Recorded(Exception):
    """Raised by the recorder to stop the parent's entry point at its ``build_model_with_cfg`` call."""


_RECORDING: Dict[str, str] = {}  # the module whose build_model_with_cfg call is recorded ('': the first; under _LOCK)


def _recorder(*args: Any, **kwargs: Any) -> nn.Module:
    """Stops the entry point's own call; a model it builds first in another module (a hybrid's ResNet backbone made
    by ``create_model``) is built for real."""
    if _RECORDING['module'] and sys._getframe(1).f_globals.get('__name__') != _RECORDING['module']:
        return build_model_with_cfg(*args, **kwargs)
    raise _Recorded(args, kwargs)


def parent_build(parent: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments timm's entry point of ``parent`` passes to ``build_model_with_cfg`` for ``kwargs`` (bound to its
    signature: ``model_cls``, ``kwargs``, ``pretrained_filter_fn``, ...), without building anything."""
    entry = model_entrypoint(parent)
    with _LOCK:  # timm calls build_model_with_cfg by its module-level name: swap it in every timm model module
        modules = [m for n, m in list(sys.modules.items())
                   if n.startswith('timm.models') and getattr(m, 'build_model_with_cfg', None) is build_model_with_cfg]
        for m in modules:
            m.build_model_with_cfg = _recorder
        # an entry point that builds in its own module is recorded there (a deprecated name's alias builds elsewhere)
        _RECORDING['module'] = entry.__module__ if sys.modules.get(entry.__module__) in modules else ''
        try:
            entry(pretrained=pretrained, **kwargs)
        except _Recorded as recorded:
            args, kw = recorded.args
        else:
            args = None
        finally:
            for m in modules:
                m.build_model_with_cfg = build_model_with_cfg
    if args is None:
        raise RuntimeError(f'timm entry point {parent!r} built its model without build_model_with_cfg; its family '
                           f'twin cannot be made (timm_exits.convert works on the built model)')
    bound = _SIGNATURE.bind(*args, **kw)
    return dict(bound.arguments)


def build_family(
        mechanism: type,
        variant: str,
        pretrained: bool = False,
        parent: Optional[str] = None,
        classifier_fn: Optional[Callable[[Dict[str, Any]], Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """Model ``variant`` of ``mechanism`` on timm architecture ``parent`` (None: a ``VisionTransformer`` of
    ``kwargs``), loading pretrained weights strictly through ``new_parts_filter`` over the parent's own filter.

    Args:
        classifier_fn: The model's classifier module names from its final arguments (the pretrained cfg's
            ``classifier``, so that a checkpoint for other classes drops every classifier).
    """
    if parent is None:  # what timm's _create_vision_transformer passes
        feature_cfg = dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter')
        build = dict(_SIGNATURE.bind(VisionTransformer, variant, pretrained, feature_cfg=feature_cfg,
                                     pretrained_filter_fn=vit_checkpoint_filter_fn, **kwargs).arguments)
    else:
        build = parent_build(parent, pretrained, kwargs)
    model_kwargs = build.pop('kwargs', {})
    if kwargs.get('features_only') and not _adaptable(mechanism, build['model_cls']):
        return _parent_features(mechanism, variant, pretrained, build, model_kwargs)
    build['model_cls'] = adapted_class(mechanism, build['model_cls'])
    overlay = dict(build.get('pretrained_cfg_overlay') or {})
    maps = build['model_cls'].state_kind == 'map'
    if classifier_fn is not None and not maps:  # a feature-map parent keeps its own classifier's name
        overlay.setdefault('classifier', classifier_fn(model_kwargs))  # also checks the layout, before building
    build['pretrained_cfg_overlay'] = overlay
    if maps and model_kwargs.get('exit_input_size') is None:  # exits sized at the input the weights expect
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=build.get('pretrained_cfg'), pretrained_cfg_overlay=overlay)
        size = model_kwargs.get('img_size') or (cfg.input_size if cfg else (3, 224, 224))
        model_kwargs['exit_input_size'] = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    file = overlay.get('file')
    if pretrained and file and not os.path.isfile(file):
        raise FileNotFoundError(f'pretrained_cfg_overlay file={file!r} does not exist')
    if pretrained:  # offline and not cached: a clear error now, not a minute of retries
        check_weights_reachable(variant, pretrained_cfg=build.get('pretrained_cfg'), pretrained_cfg_overlay=overlay)
    build.update(variant=variant, pretrained=pretrained,
                 pretrained_filter_fn=partial(new_parts_filter, parent_filter=build.get('pretrained_filter_fn')))
    return build_model_with_cfg(**build, **model_kwargs)


def _adaptable(mechanism: type, parent_cls: type) -> bool:
    try:
        adapted_class(mechanism, parent_cls)
    except ValueError:
        return False
    return True


def _parent_features(
        mechanism: type,
        variant: str,
        pretrained: bool,
        build: Dict[str, Any],
        model_kwargs: Dict[str, Any],
) -> nn.Module:
    """``features_only=True`` on a parent whose entry point builds a dedicated feature-extractor class instead
    (EfficientNet's ``EfficientNetFeatures``, MobileNetV3's ``MobileNetV3Features``, ...): that class, as the parent
    builds it. A feature extractor has no classifier, and the exits are classifiers, so like the head they are not
    part of it (a twin wrapped by timm's ``FeatureListNet`` drops them the same way): the backbone is the twin's, its
    feature maps the parent's. The mechanism's own arguments are dropped; a twin checkpoint's exit parameters are
    dropped from the load."""
    pop_kwargs(mechanism, model_kwargs)
    parent_filter = build.get('pretrained_filter_fn')
    prefixes = tuple(getattr(mechanism, 'new_prefixes', ()))

    def features_filter(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        state_dict = state_dict.get('model', state_dict)
        state_dict = state_dict.get('state_dict', state_dict)
        state_dict = {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}
        return parent_filter(state_dict, model) if parent_filter is not None else state_dict

    if pretrained:
        check_weights_reachable(variant, pretrained_cfg=build.get('pretrained_cfg'),
                                pretrained_cfg_overlay=build.get('pretrained_cfg_overlay'))
    build.update(variant=variant, pretrained=pretrained, pretrained_filter_fn=features_filter)
    return build_model_with_cfg(**build, **model_kwargs)


def twin_parents(family: str = 'mexit') -> Tuple[str, ...]:
    """Every timm architecture built on a class an adapter of ``family``'s parents serves
    (``adapters.parent_modules``)."""
    return tuple(list_models(module=list(parent_modules(family))))


def register_twins(
        module: str,
        suffix: str,
        create_fn: Callable[..., nn.Module],
        cfg_fn: Callable[..., Dict[str, Any]],
        doc: str,
        **overrides: Any,
) -> Dict[str, Any]:
    """Register ``<parent>_<suffix>`` in ``module`` for every parent in ``twin_parents()`` not defined there yet,
    every pretrained tag of the parent mirrored (same weights and preprocessing, ``cfg_fn`` defaults under them).

    Returns:
        The new default cfgs (already added to the module's ``default_cfgs``).
    """
    mod = sys.modules[module]
    names = {p: f'{p}_{suffix}' for p in twin_parents(suffix) if not hasattr(mod, f'{p}_{suffix}')}
    cfgs = generate_default_cfgs(
        {k: v for p, n in names.items() for k, v in parent_cfgs(p, n, cfg_fn, **overrides).items()})
    mod.default_cfgs.update(cfgs)
    for parent, name in names.items():
        def entry(pretrained: bool = False, _parent: str = parent, _name: str = name, **kwargs: Any) -> nn.Module:
            return create_fn(_name, pretrained, parent=_parent, **kwargs)
        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = module
        entry.__doc__ = doc.format(parent=parent)
        setattr(mod, name, entry)
        register_model(entry)
    return cfgs
