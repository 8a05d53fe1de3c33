""" Parent adapters of the CNN group: every registered architecture of their timm modules is served (or refused with
a reason), and for a seeded sample the adapter's stem, units and tail give the parent's own output bit for bit.

``TIMM_EXITS_ALL_PARENTS=1`` checks every architecture instead of the sample.
"""
import functools
import importlib
import inspect
import os
import random
import re
import warnings
from typing import Dict, List, Tuple, Type

import pytest
import torch
import timm
from timm.models._registry import _model_to_module

from timm_exits.models._build import parent_build
from timm_exits.models.adapters._base import FeatureMapAdapter
from timm_exits.models.adapters.resnet import ResNetAdapter

# adapter module -> the timm modules of this group it serves (None: the adapter's own timm_modules)
_MODULES: Dict[str, Tuple[str, ...]] = {
    'efficientnet': None,
    'mobilenetv3': None,
    'regnet': None,
    'senet': None,
    'dla': None,
    'dpn': None,
    'densenet': None,
    'vgg': None,
    'vovnet': None,
    'ghostnet': None,
    'rexnet': None,
    'hgnet': None,
    'repghost': None,
    'repvit': None,
    'fasternet': None,
    'starnet': None,
    'selecsls': None,
    'xception_aligned': None,
    'tresnet': None,
    'lcnetv2': None,
    'mobilenetv5': None,
    'cspnext': None,
    'efficientvit_msra': None,
    'hrnet': None,
    'cpubone': None,
    'inception_v3': None,
    'inception_v4': None,
    'inception_resnet_v2': None,
    'xception': None,
    'convmixer': None,
    'csatv2': None,
    'shvit': None,
    'swiftformer': None,
    'visformer': None,
    'sequencer': None,
    'nasnet': ('nasnet', 'pnasnet'),  # refused only
}
# adapters of other modules this group checks on more timm modules
_SHARED: List[Tuple[Type[FeatureMapAdapter], Tuple[str, ...]]] = [(ResNetAdapter, ('resnest', 'res2net', 'sknet'))]
# archs that do not run at 64 px (input size to use) and small-size kwargs of the entry points
_SIZE: Dict[str, int] = {
    **{a: 128 for a, m in _model_to_module.items() if m in ('inception_v3', 'inception_v4', 'inception_resnet_v2')},
    **{a: 64 for a in timm.list_models('visformer*')},
}
_KWARGS: Dict[str, dict] = {
    **{a: {'channel_multiplier': 0.25} for a in ('mobilenetv5_base', 'mobilenetv5_300m')},
    **{a: {'mlp_ratio': 0.0625} for a in timm.list_models('vgg*')},  # a 256-wide ConvMlp, not 4096
    **{a: {'img_size': 64} for a in timm.list_models('visformer*')},
}
_SMALL = re.compile(r'test_|_0[0-9]{2}|_b0|lite0|tiny|small|nano|pico|femto|micro|_xs|_t$|_s$|_a$|_m0|_m1|18|21|34')
_ALL = os.environ.get('TIMM_EXITS_ALL_PARENTS') == '1'


def _cases() -> Tuple[List[Tuple[Type[FeatureMapAdapter], Tuple[str, ...]]], Dict[str, str]]:
    cases, refused = list(_SHARED), {}
    for name, modules in _MODULES.items():
        mod = importlib.import_module(f'timm_exits.models.adapters.{name}')
        refused.update(getattr(mod, 'REFUSED', {}))
        if not any(inspect.isclass(getattr(mod, n)) for n in mod.__all__):
            cases.append((FeatureMapAdapter, modules))  # parent_classes (): every arch must be refused
        for adapter in (getattr(mod, n) for n in mod.__all__):
            if inspect.isclass(adapter) and issubclass(adapter, FeatureMapAdapter):
                cases.append((adapter, modules or adapter.timm_modules))
    return cases, refused


CASES, REFUSED = _cases()


def _archs(modules: Tuple[str, ...]) -> List[str]:
    return sorted(a for a, m in _model_to_module.items() if m in modules)


@functools.lru_cache(maxsize=None)
def _model_cls(arch: str) -> type:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return parent_build(arch, False, {})['model_cls']


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Small models on a shared machine: one thread is faster than contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('modules', sorted({m for _, ms in CASES for m in ms}))
def test_every_arch_has_an_adapter(modules):
    """Every registered architecture of the module builds a class an adapter serves, or one REFUSED names."""
    archs = _archs((modules,))
    assert archs
    for arch in archs:
        cls = _model_cls(arch)
        served = [a for a, ms in CASES if modules in ms and issubclass(cls, a.parent_classes)]
        assert served or cls.__name__ in REFUSED, f'{arch}: {cls.__name__} has no adapter'


def _sample() -> List[Tuple[Type[FeatureMapAdapter], str]]:
    rng, out = random.Random(0), []
    for adapter, modules in CASES:
        archs = [a for a in _archs(modules) if issubclass(_model_cls(a), adapter.parent_classes)]
        if _ALL:
            out += [(adapter, a) for a in archs]
            continue
        small = [a for a in archs if _SMALL.search(a)] or archs
        out += [(adapter, a) for a in rng.sample(small, min(2, len(small)))]
    return out


def chain(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """forward_head of the tail of the units of the stem, as a mechanism runs the parent."""
    state = model._embed(x)[0]
    for unit in model._units():
        state = model._apply_block(unit, state, None, None)
    return model.forward_head(model._tail(state))


def check_parent(adapter: Type[FeatureMapAdapter], arch: str) -> int:
    """Build ``arch`` small and random, check the adapter chain against the parent; the number of units."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = timm.create_model(arch, pretrained=False, num_classes=5, **_KWARGS.get(arch, {})).eval()
    model.__class__ = type('T', (adapter, type(model)), {})
    size = _SIZE.get(arch, 64)
    if adapter.fixed_input_size and arch not in _SIZE:
        size = model.pretrained_cfg['input_size'][-1]
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x))
        got = chain(model, x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        scale = max(1., got.abs().max().item())  # random deep parents can reach large logits: float noise scales
        torch.testing.assert_close(chain(model, x[1:3]), got[1:3], rtol=1e-5, atol=1e-5 * scale)
    return len(model._units())


@pytest.mark.parametrize('adapter,arch', _sample(), ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_adapter_chain_is_the_parent(adapter, arch):
    assert check_parent(adapter, arch) >= 2
