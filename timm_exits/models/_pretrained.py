""" Published weights of the named models: their pretrained cfgs and the error when the Hub has none yet.

What the model families need when they register and build: ``published_cfg`` gives a named model the cfg of weights
published as ``{org}/{name}`` on the Hugging Face Hub (``org`` from ``$TIMM_EXITS_HUB_ORG``, read when the cfg is made,
default ``timm-exits``) with its training recipe as a note, and ``explain_missing_weights`` turns a pretrained load of
such weights that are not on the Hub into ``MissingWeightsError`` naming the repo and the recipe. Publishing itself
(``python -m timm_exits.hub push``) lives in ``timm_exits.hub``, which builds on this module.
"""
import functools
import os
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn
from huggingface_hub.errors import (
    EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
)
from safetensors import SafetensorError

import timm
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg

__all__ = [
    'DEFAULT_HUB_ORG', 'HUB_ORG_ENV', 'MissingWeightsError', 'RECIPE_NOTE', 'WEIGHTS_NAME', 'explain_missing_weights',
    'hub_org', 'published_cfg', 'published_models', 'recipe_of',
]

HUB_ORG_ENV = 'TIMM_EXITS_HUB_ORG'
DEFAULT_HUB_ORG = 'timm-exits'
WEIGHTS_NAME = 'model.safetensors'
RECIPE_NOTE = 'recipe: '
_NOT_FOUND = (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, OfflineModeIsEnabled)


class MissingWeightsError(RuntimeError):
    """A named model's Hub repo holds no weights (yet); the message names the repo and the recipe producing them."""


def hub_org() -> str:
    """Hub organisation of the named models: ``$TIMM_EXITS_HUB_ORG``, default ``timm-exits``."""
    return os.environ.get(HUB_ORG_ENV) or DEFAULT_HUB_ORG


def published_cfg(cfg_fn: Callable[..., Dict[str, Any]], name: str, recipe: str, **kwargs: Any) -> Dict[str, Any]:
    """Pretrained cfg of weights published as ``{hub_org()}/{name}`` (its model.safetensors), the training command
    ``recipe`` kept as a note (the marker ``explain_missing_weights`` looks for)."""
    hub = dict(hf_hub_id=f'{hub_org()}/{name}', hf_hub_filename=WEIGHTS_NAME, notes=(RECIPE_NOTE + recipe,))
    return cfg_fn(**hub, **kwargs)


def recipe_of(cfg: Any) -> Optional[str]:
    """The recipe note of a pretrained cfg (dict or ``PretrainedCfg``), None for cfgs of unpublished weights."""
    notes = cfg.get('notes') if isinstance(cfg, dict) else getattr(cfg, 'notes', None)
    return next((n[len(RECIPE_NOTE):] for n in notes or () if n.startswith(RECIPE_NOTE)), None)


def published_models() -> List[str]:
    """Every registered ``name`` / ``name.tag`` whose weights are published by this package (a recipe note)."""
    return [name for name in timm.list_pretrained() if recipe_of(get_pretrained_cfg(name))]


def _weights_location(cfg: Any) -> str:
    if cfg.source == 'local-dir' or (cfg.file and not cfg.hf_hub_id):
        return f'{cfg.file}'
    if cfg.hf_hub_id:
        return f"Hugging Face Hub repo '{cfg.hf_hub_id}' ({cfg.hf_hub_filename or WEIGHTS_NAME})"
    return f'{cfg.url}'


def _missing_reason(error: Exception, filename: str) -> str:
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return 'not in the local cache, and the Hub is unreachable or HF_HUB_OFFLINE is set'
    if isinstance(error, RevisionNotFoundError):
        return 'the revision does not exist'
    if isinstance(error, RepositoryNotFoundError):
        return 'the repo does not exist yet (or is private)'
    return f'the repo has no {filename} yet'


def explain_missing_weights(create_fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Wrap a family's ``_create_*``: a pretrained load of published weights that are not on the Hub raises
    ``MissingWeightsError`` with the repo and the recipe (never a bare 404 or a random init), and an unreadable
    safetensors file raises a ValueError naming where it came from."""

    @functools.wraps(create_fn)
    def create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        try:
            return create_fn(variant, pretrained, **kwargs)
        except (*_NOT_FOUND, SafetensorError) as e:
            if not pretrained:
                raise
            cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
            name = f'{variant}.{cfg.tag}' if cfg.tag else variant
            if isinstance(e, SafetensorError):
                raise ValueError(
                    f'{name}: the weights at {_weights_location(cfg)} are not a valid safetensors file ({e}). Remove '
                    f'the cached copy (`hf cache rm` or delete it under HF_HUB_CACHE) and publish the checkpoint again.'
                ) from e
            recipe = recipe_of(cfg)
            if recipe is None or not cfg.hf_hub_id:
                raise
            raise MissingWeightsError(
                f"{name}: no pretrained weights at Hugging Face Hub repo '{cfg.hf_hub_id}' "
                f"({_missing_reason(e, cfg.hf_hub_filename or WEIGHTS_NAME)}). Train them with\n    {recipe}\n"
                f'and publish them with\n    python -m timm_exits.hub push CHECKPOINT --model {name} '
                f'--repo {cfg.hf_hub_id}\n'
                f'Set {HUB_ORG_ENV} before importing timm_exits to load from another organisation, or use '
                f'pretrained=False for a random init.'
            ) from e

    return create
