"""Adapters of the token-passing timm classes besides ViT and Eva: every registered architecture of their modules
builds a served (or refused) class, and the adapter chain equals ``forward_head(forward_features(x))`` bit for bit
on a seeded sample (``TIMM_EXITS_ALL_PARENTS=1``: on every architecture), per image on a sub-batch too."""
import fnmatch
import os
import random
import warnings
from typing import Any, Dict, List, Tuple

import pytest
import timm
import torch
from timm.models._registry import _model_to_module
from timm.models.vision_transformer import VisionTransformer

from timm_exits.models._build import parent_build
from timm_exits.models.adapters.beit import BeitAdapter
from timm_exits.models.adapters.cait import CaitAdapter
from timm_exits.models.adapters.coat import CoaTAdapter
from timm_exits.models.adapters.convit import ConVitAdapter
from timm_exits.models.adapters.levit import LevitAdapter
from timm_exits.models.adapters.mlp_mixer import MlpMixerAdapter
from timm_exits.models.adapters.naflexvit import NaFlexVitAdapter
from timm_exits.models.adapters.nest import NestAdapter
from timm_exits.models.adapters.pit import PitAdapter
from timm_exits.models.adapters.pvt_v2 import PvtV2Adapter
from timm_exits.models.adapters.refused_tokens import REFUSED
from timm_exits.models.adapters.sequencer import Sequencer2dAdapter
from timm_exits.models.adapters.twins import TwinsAdapter
from timm_exits.models.adapters.vision_transformer_relpos import VisionTransformerRelPosAdapter
from timm_exits.models.adapters.vision_transformer_sam import VisionTransformerSAMAdapter
from timm_exits.models.adapters.visformer import VisformerAdapter
from timm_exits.models.adapters.volo import VoloAdapter
from timm_exits.models.adapters.xcit import XcitAdapter

# adapter: (small build kwargs, input size, name patterns of the cheap architectures the default sample draws from)
SPECS: Dict[type, Tuple[Dict[str, Any], int, Tuple[str, ...]]] = {
    XcitAdapter: (dict(depth=2), 64, ('xcit_nano*', 'xcit_tiny_12_p16*')),
    MlpMixerAdapter: (dict(img_size=64), 64, ('mixer_s*', 'gmixer_12*', 'gmlp_ti*', 'resmlp_12*')),
    CaitAdapter: (dict(depth=2, img_size=64), 64, ('*',)),
    LevitAdapter: (dict(img_size=64), 64, ('levit_128s', 'levit_conv_128s', 'levit_128', 'levit_conv_128')),
    VisionTransformerRelPosAdapter: (dict(depth=2, img_size=64), 64, ('*',)),
    BeitAdapter: (dict(depth=2, img_size=64), 64, ('*',)),
    NaFlexVitAdapter: (dict(depth=2), 64, ('*',)),  # built at its own size, run at 64: any size
    VisionTransformerSAMAdapter: (dict(depth=3, img_size=64), 96, ('samvit_base*',)),  # block 2: global attention
    VoloAdapter: (dict(img_size=64), 64, ('volo_d1_224', 'volo_d2_224')),
    PitAdapter: (dict(img_size=64), 64, ('pit_ti*',)),
    ConVitAdapter: (dict(depth=3, local_up_to_layer=2, img_size=64), 64, ('convit_tiny', 'convit_small')),
    Sequencer2dAdapter: (dict(), 64, ('sequencer2d_s',)),
    TwinsAdapter: (dict(), 64, ('twins_pcpvt_small', 'twins_svt_small')),
    PvtV2Adapter: (dict(), 64, ('pvt_v2_b0', 'pvt_v2_b1')),
    NestAdapter: (dict(img_size=64), 64, ('*tiny*',)),
    CoaTAdapter: (dict(img_size=64), 64, ('coat_lite_tiny', 'coat_lite_mini')),
    VisformerAdapter: (dict(img_size=64), 64, ('visformer_tiny',)),
}
# timm modules whose classes are refused (REFUSED) or built on timm's VisionTransformer (VitAdapter's to serve)
REFUSED_MODULES = ('crossvit', 'tnt', 'qwen3_vit', 'gemma4_vit', 'deepseek_vit')
VIT_MODULES = ('vision_transformer_hybrid', 'vitamin')
CUT = [a for a in sorted(_model_to_module) if _model_to_module[a] == 'coat' and not a.startswith('coat_lite')]


def _archs(modules: Tuple[str, ...]) -> List[str]:
    return sorted(a for a, m in _model_to_module.items() if m in modules)


def _model_cls(arch: str) -> type:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return parent_build(arch, False, {})['model_cls']


def _served(adapter: type) -> List[str]:
    return [a for a in _archs(adapter.timm_modules) if a not in CUT]


def _sample() -> List[Tuple[type, str]]:
    if os.environ.get('TIMM_EXITS_ALL_PARENTS') == '1':
        return [(adapter, arch) for adapter in SPECS for arch in _served(adapter)]
    rng = random.Random(0)
    sample = []
    for adapter, (_, _, patterns) in SPECS.items():
        cheap = [a for a in _served(adapter) if any(fnmatch.fnmatch(a, p) for p in patterns)]
        sample += [(adapter, arch) for arch in rng.sample(cheap, min(2, len(cheap)))]
    return sample


def _chain(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    state = model._embed(x)[0]
    for unit in model._units():
        state = model._apply_block(unit, state, None, None)
    return model.forward_head(model._tail(state))


def _adapted(adapter: type, arch: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs).eval()
    model.__class__ = type('T', (adapter, type(model)), {})
    return model


def test_every_architecture_builds_a_served_or_refused_class():
    for adapter in SPECS:
        for arch in _archs(adapter.timm_modules):
            assert issubclass(_model_cls(arch), adapter.parent_classes), arch
    for arch in _archs(REFUSED_MODULES):
        assert _model_cls(arch).__name__ in REFUSED, arch
    for arch in _archs(VIT_MODULES):  # vit_*_resnet*d: the ResNet backbone is built, the ViT recorded
        cls = _model_cls(arch)
        assert issubclass(cls, VisionTransformer), (arch, cls)


@pytest.mark.parametrize('adapter,arch', _sample(), ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_chain_equals_the_parent_bit_for_bit(adapter, arch):
    kwargs, size, _ = SPECS[adapter]
    model = _adapted(adapter, arch, kwargs)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x))
        out = _chain(model, x)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(_chain(model, x[1:3]), out[1:3], rtol=0, atol=1e-5)
    assert len(model._units()) >= 2


def test_coat_with_parallel_blocks_is_refused():
    model = _adapted(CoaTAdapter, 'coat_tiny', dict(img_size=64))
    with pytest.raises(ValueError, match='parallel blocks'):
        model._embed(torch.randn(1, 3, 64, 64))
