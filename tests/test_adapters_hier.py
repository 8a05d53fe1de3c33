"""Feature-map adapters of the hierarchical timm families (MaxxVit, ByobNet, NFNet, ConvNeXt, CSPNet, ResNetV2,
MetaFormer, Swin, ...): every registered architecture of their timm modules is built on a served (or refused) class,
and on a seeded sample of small architectures the adapter's chain ``_tail(units(_embed(x)))`` gives the parent's
logits bit for bit and the same rows for a sub-batch. ``TIMM_EXITS_ALL_PARENTS=1`` checks every architecture."""
import importlib
import os
import random
import warnings
from typing import Dict, List, Tuple

import pytest
import timm
import torch
from timm.models._registry import _model_to_module

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.models._build import parent_build

# adapter module -> small architectures to sample the equality check from (2 per adapter by default)
SMALL: Dict[Tuple[str, str], List[str]] = {
    ('maxxvit', 'MaxxVitAdapter'): ['test_coatnet', 'test_maxvit', 'coatnet_pico_rw_224', 'maxvit_rmlp_pico_rw_256'],
    ('byobnet', 'ByobNetAdapter'): ['test_byobnet', 'mobilevit_xxs', 'mobilevitv2_050', 'resnet32ts', 'repvgg_a0',
                                    'botnet26t_256', 'lambda_resnet26t'],
    ('nfnet', 'NormFreeNetAdapter'): ['test_nfnet', 'nf_regnet_b0', 'nf_resnet26'],
    ('convnext', 'ConvNeXtAdapter'): ['test_convnext', 'test_convnext2', 'test_convnext3', 'convnext_atto',
                                      'convnext_atto_ols'],
    ('cspnet', 'CspNetAdapter'): ['cs3darknet_s', 'cs3darknet_focus_s', 'darknet17', 'darknet21'],
    ('resnetv2', 'ResNetV2Adapter'): ['resnetv2_18', 'resnetv2_18d'],
    ('metaformer', 'MetaFormerAdapter'): ['poolformer_s12', 'poolformerv2_s12', 'caformer_s18'],
    ('swin_transformer', 'SwinTransformerAdapter'): ['swin_tiny_patch4_window7_224', 'swin_s3_tiny_224'],
    ('swin_transformer_v2', 'SwinTransformerV2Adapter'): ['swinv2_tiny_window8_256', 'swinv2_tiny_window16_256'],
    ('swin_transformer_v2_cr', 'SwinTransformerV2CrAdapter'): ['swinv2_cr_tiny_224', 'swinv2_cr_tiny_ns_224'],
}
ADAPTERS = {key: getattr(importlib.import_module(f'timm_exits.models.adapters.{key[0]}'), key[1]) for key in SMALL}
REFUSED: Dict[str, str] = {}
for _module in {key[0] for key in SMALL}:
    REFUSED.update(getattr(importlib.import_module(f'timm_exits.models.adapters.{_module}'), 'REFUSED', {}))
ALL = os.environ.get('TIMM_EXITS_ALL_PARENTS') == '1'


def _archs(adapter: type) -> List[str]:
    return sorted(a for a, m in _model_to_module.items() if m in adapter.timm_modules)


def _sample() -> List[Tuple[str, str]]:
    rng = random.Random(0)
    pairs = []
    for key, small in SMALL.items():
        archs = [a for a in _archs(ADAPTERS[key]) if a in timm.list_models()] if ALL else small
        pairs += [(key[1], a) for a in (archs if ALL else sorted(rng.sample(archs, min(2, len(archs)))))]
    return pairs


@pytest.mark.parametrize('key', list(SMALL), ids=[k[1] for k in SMALL])
def test_every_architecture_is_served(key: Tuple[str, str]) -> None:
    adapter = ADAPTERS[key]
    archs = _archs(adapter)
    assert archs, f'{key}: no registered architecture'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        classes = {a: parent_build(a, False, {})['model_cls'] for a in archs}
    unserved = {a: c.__name__ for a, c in classes.items()
                if not issubclass(c, adapter.parent_classes) and c.__name__ not in REFUSED}
    assert not unserved, unserved


def _chain(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    state, _ = model._embed(x)
    for unit in model._units():
        state = model._apply_block(unit, state, None, None)
    return model.forward_head(model._tail(state))


def _build(arch: str, size: int = 64) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The parent at ``size`` px where its entry point takes ``img_size`` or it runs there, else at its own size."""
    errors = []
    for kwargs, px in (({'img_size': size}, size), ({}, size), ({}, None)):
        torch.manual_seed(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                model = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs).eval()
            px = px or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
            x = torch.randn(4, 3, px, px)
            with torch.no_grad():
                model(x[:1])
            return model, x
        except Exception as e:  # noqa: BLE001  (try the next way to build it)
            errors.append(f'{kwargs} at {px}: {type(e).__name__}: {e}')
    raise RuntimeError(f'{arch}: ' + '; '.join(errors))


@pytest.mark.parametrize('adapter_name,arch', _sample())
def test_adapter_chain_equals_parent(adapter_name: str, arch: str) -> None:
    adapter = next(a for a in ADAPTERS.values() if a.__name__ == adapter_name)
    model, x = _build(arch)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x))
        model.__class__ = type('T', (adapter, type(model)), {})
        assert len(model._units()) > 1 and isinstance(model.fixed_input_size, bool)
        torch.testing.assert_close(_chain(model, x), ref, rtol=0, atol=0)
        # per-image independence; in float64 where float32 kernels chosen for another batch size differ by more
        try:
            torch.testing.assert_close(_chain(model, x[1:3]), ref[1:3], rtol=0, atol=1e-5)
        except AssertionError:
            model.double()
            full = _chain(model, x.double())
            torch.testing.assert_close(_chain(model, x.double()[1:3]), full[1:3], rtol=0, atol=1e-9)
