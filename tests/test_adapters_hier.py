"""Feature-map adapters of the hierarchical timm families (MaxxVit, ByobNet, NFNet, ConvNeXt, CSPNet, ResNetV2,
MetaFormer, Swin, ...): every registered architecture of their timm modules is built on a served (or refused) class,
and on a seeded sample of small architectures the adapter's chain ``_tail(units(_embed(x)))`` gives the parent's
logits bit for bit and the same rows for a sub-batch. ``TIMM_EXITS_ALL_PARENTS=1`` checks every architecture."""
import importlib
import os
import random
import warnings
from typing import Any, Dict, List, Tuple, Union

import pytest
import timm
import torch
from timm.models._registry import _model_to_module

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.models._build import parent_build

SWIN_TINY = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))
HIERA_TINY = dict(embed_dim=32, num_heads=1, stages=(1, 2, 2, 1))
# adapter module -> small architectures to sample the equality check from (2 per adapter of the seven largest
# families, 1 for the others, by default)
# (an entry with keyword arguments for the entry point shrinks a big architecture)
SMALL: Dict[Tuple[str, str], List[Union[str, Tuple[str, Dict[str, Any]]]]] = {
    ('maxxvit', 'MaxxVitAdapter'): ['test_coatnet', 'test_maxvit', 'coatnet_pico_rw_224',
                                    ('maxvit_rmlp_pico_rw_256', dict(depths=(1, 1, 1, 1)))],
    ('byobnet', 'ByobNetAdapter'): ['test_byobnet', 'mobilevit_xxs', 'mobilevitv2_050', 'resnet32ts', 'repvgg_a0',
                                    'botnet26t_256', 'lambda_resnet26t'],
    ('nfnet', 'NormFreeNetAdapter'): ['test_nfnet', 'nf_regnet_b0', 'nf_resnet26'],
    ('convnext', 'ConvNeXtAdapter'): ['test_convnext', 'test_convnext2', 'test_convnext3', 'convnext_atto',
                                      'convnext_atto_ols'],
    ('cspnet', 'CspNetAdapter'): ['cs3darknet_s', 'cs3darknet_focus_s', 'darknet17'],
    ('resnetv2', 'ResNetV2Adapter'): ['resnetv2_18', 'resnetv2_18d'],
    ('metaformer', 'MetaFormerAdapter'): ['poolformer_s12', 'poolformerv2_s12', 'caformer_s18'],
    ('swin_transformer', 'SwinTransformerAdapter'): [('swin_tiny_patch4_window7_224', SWIN_TINY),
                                                    ('swin_s3_tiny_224', SWIN_TINY)],
    ('swin_transformer_v2', 'SwinTransformerV2Adapter'): [('swinv2_tiny_window8_256', SWIN_TINY)],
    ('swin_transformer_v2_cr', 'SwinTransformerV2CrAdapter'): [('swinv2_cr_tiny_224', SWIN_TINY),
                                                                ('swinv2_cr_tiny_ns_224', SWIN_TINY)],
    ('focalnet', 'FocalNetAdapter'): ['focalnet_tiny_srf'],
    ('mambaout', 'MambaOutAdapter'): ['test_mambaout', 'mambaout_femto'],
    ('davit', 'DaVitAdapter'): [
        ('davit_tiny', dict(embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)))],
    ('fastvit', 'FastVitAdapter'): ['fastvit_t8', 'fastvit_sa12'],
    ('inception_next', 'MetaNeXtAdapter'): [('inception_next_atto', dict(depths=(1, 1, 2, 1)))],
    ('edgenext', 'EdgeNeXtAdapter'): [('edgenext_xx_small', dict(depths=(1, 1, 2, 1)))],
    ('gcvit', 'GlobalContextVitAdapter'): ['gcvit_xxtiny'],
    ('hiera', 'HieraAdapter'): [('hiera_tiny_224', HIERA_TINY), ('hiera_small_abswin_256', HIERA_TINY)],
    ('tiny_vit', 'TinyVitAdapter'): ['tiny_vit_5m_224'],
    ('efficientformer', 'EfficientFormerAdapter'): ['efficientformer_l1'],
    ('efficientformer_v2', 'EfficientFormerV2Adapter'): ['efficientformerv2_s0', 'efficientformerv2_s1'],
    ('efficientvit_mit', 'EfficientVitAdapter'): ['efficientvit_b0', 'efficientvit_l1'],
    ('rdnet', 'RDNetAdapter'): ['rdnet_tiny'],
    ('nextvit', 'NextViTAdapter'): ['nextvit_small'],
    ('iformer', 'IFormerAdapter'): ['iformer_t', 'iformer_s'],
    ('lowformer', 'LowFormerAdapter'): ['lowformer_b0', 'lowformer_e1'],
    ('mvitv2', 'MultiScaleVitAdapter'): ['mvitv2_tiny', 'mvitv2_small_cls'],
    ('cpubone', 'CPUBoneAdapter'): ['cpubone_nano', 'cpubone_s0', 'cpubone_t0'],
    ('shvit', 'SHViTAdapter'): ['shvit_s1', 'shvit_s2'],
    ('swiftformer', 'SwiftFormerAdapter'): ['swiftformer_xs', 'swiftformer_s'],
    ('csatv2', 'CSATv2Adapter'): ['csatv2'],
    ('hieradet_sam2', 'HieraDetAdapter'): [('hieradet_small', HIERA_TINY)],
}
REFUSED_MODULES = ('efficientvim',)  # timm modules whose classes are all refused (module-level REFUSED, no adapter)
ADAPTERS = {key: getattr(importlib.import_module(f'timm_exits.models.adapters.{key[0]}'), key[1]) for key in SMALL}
REFUSED: Dict[str, str] = {}
for _module in {key[0] for key in SMALL} | set(REFUSED_MODULES):
    REFUSED.update(getattr(importlib.import_module(f'timm_exits.models.adapters.{_module}'), 'REFUSED', {}))
TIMM_MODULES = sorted({m for a in ADAPTERS.values() for m in a.timm_modules} | set(REFUSED_MODULES))
BIG = ('maxxvit', 'byobnet', 'nfnet', 'convnext', 'cspnet', 'resnetv2', 'metaformer')
ALL = os.environ.get('TIMM_EXITS_ALL_PARENTS') == '1'


def _archs(adapter: type) -> List[str]:
    return sorted(a for a, m in _model_to_module.items() if m in adapter.timm_modules)


def _sample() -> list:
    rng = random.Random(0)
    listed = set(timm.list_models()) if ALL else set()
    pairs = []
    for key, small in SMALL.items():
        entries = [(a, {}) for a in _archs(ADAPTERS[key]) if a in listed] if ALL else [
            (e, {}) if isinstance(e, str) else e for e in small]
        count = 2 if key[0] in BIG else 1
        picked = entries if ALL else sorted(rng.sample(entries, min(count, len(entries))), key=lambda e: e[0])
        pairs += [pytest.param(key[1], a, kw, id=f'{key[1]}-{a}') for a, kw in picked]
    return pairs


@pytest.mark.parametrize('module', TIMM_MODULES)
def test_every_architecture_is_served(module: str) -> None:
    archs = sorted(a for a, m in _model_to_module.items() if m == module)
    assert archs, f'{module}: no registered architecture'
    served = tuple(c for a in ADAPTERS.values() if module in a.timm_modules for c in a.parent_classes)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        classes = {a: parent_build(a, False, {})['model_cls'] for a in archs}
    unserved = {a: c.__name__ for a, c in classes.items() if not issubclass(c, served) and c.__name__ not in REFUSED}
    assert not unserved, unserved


def _chain(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    state, _ = model._embed(x)
    for unit in model._units():
        state = model._apply_block(unit, state, None, None)
    return model.forward_head(model._tail(state))


def _build(arch: str, extra: Dict[str, Any], size: int = 64) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The parent at ``size`` px where its entry point takes ``img_size`` or it runs there, else at its own size."""
    errors = []
    for kwargs, px in (({'img_size': size}, size), ({}, size), ({}, None)):
        torch.manual_seed(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                model = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs, **extra).eval()
            px = px or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
            x = torch.randn(4, 3, px, px)
            with torch.no_grad():
                model(x[:1])
            return model, x
        except Exception as e:  # noqa: BLE001  (try the next way to build it)
            errors.append(f'{kwargs} at {px}: {type(e).__name__}: {e}')
    raise RuntimeError(f'{arch}: ' + '; '.join(errors))


@pytest.mark.parametrize('adapter_name,arch,extra', _sample())
def test_adapter_chain_equals_parent(adapter_name: str, arch: str, extra: Dict[str, Any]) -> None:
    adapter = next(a for a in ADAPTERS.values() if a.__name__ == adapter_name)
    model, x = _build(arch, extra)
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


@pytest.mark.parametrize('arch', ['swin_tiny_patch4_window7_224', 'swinv2_tiny_window8_256', 'swinv2_cr_tiny_224'])
def test_swin_dynamic_size(arch: str) -> None:
    """A Swin made with ``dynamic_img_size=True`` is not fixed size, and its chain holds at another size."""
    model, _ = _build(arch, dict(SWIN_TINY, dynamic_img_size=True))
    adapter = next(a for a in ADAPTERS.values() if issubclass(type(model), a.parent_classes))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x))
        model.__class__ = type('T', (adapter, type(model)), {})
        assert model.fixed_input_size is False
        torch.testing.assert_close(_chain(model, x), ref, rtol=0, atol=0)
