"""Every registered ``_mexit``, ``_liferegress`` and ``_mexit_liferegress`` architecture on a ViT / Eva parent at a
tiny size (timm's entry points accept depth, width and head overrides): the parent's output at full depth / keep rate 1
on the same weights, one threshold call, one keep-rate call, batch invariance, and a backward that reaches every
parameter. Hybrid parents (a CNN backbone as patch embedding: ``vision_transformer_hybrid``, ``vitamin``) keep their
backbone's width, so a seeded sample of them runs (``TIMM_EXITS_ALL_PARENTS=1``: every one)."""
import os
import random
import warnings

import pytest
import timm
import torch

import timm_exits  # noqa: F401  (registers the models)
from timm_exits.models._build import parent_build, twin_parents
from timm_exits.models.life_regress_vit import LifeRegressMixin
from timm_exits.models.mexit_liferegress import MultiExitLifeRegressMixin
from timm_exits.models.multi_exit_vit import MultiExitMixin

TINY = dict(depth=4, embed_dim=48, num_heads=2, num_classes=5)
HYBRID = set(timm.list_models(module=['vision_transformer_hybrid', 'vitamin']))
_PLAIN = [p for p in twin_parents('liferegress') if p != 'test_vit' and p not in HYBRID]  # the ViT / Eva parents
PARENTS = _PLAIN + sorted(HYBRID if os.environ.get('TIMM_EXITS_ALL_PARENTS') else random.Random(0).sample(
    sorted(HYBRID), 3))


def tiny_kwargs(parent: str) -> dict:
    """``TINY`` for ``parent``: 4 x 4 patches of its own size, arguments with one entry per block cut to the tiny
    depth, and plain multi-head attention (per-block key-value heads must divide the tiny head count)."""
    args = parent_build(parent, False, {})['kwargs']
    patch = args.get('patch_size', 16)
    patch = patch if isinstance(patch, int) else patch[0]
    kwargs = dict(TINY, img_size=4 * patch)
    if parent in HYBRID:  # the backbone strides 16 or 32 and sets the width (vitamin's tokens are its features)
        kwargs = dict(depth=TINY['depth'], num_classes=TINY['num_classes'], img_size=64)
    for key, value in args.items():
        if isinstance(value, (list, tuple)) and len(value) == args.get('depth', 12):
            kwargs[key] = type(value)(value[:TINY['depth']])
    if 'num_kv_heads' in args:
        kwargs['num_kv_heads'] = TINY['num_heads']  # (timm's create_model drops None arguments)
    return kwargs


def _tiny_pair(name: str, parent: str):
    torch.manual_seed(0)
    kwargs = tiny_kwargs(parent)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = timm.create_model(parent, **kwargs).eval()
        model = timm.create_model(name, **kwargs).eval()
    model.load_state_dict({**model.state_dict(), **ref.state_dict()})  # strict: the parent's weights, new parts kept
    return ref, model


def _check_backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    model(x).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'no gradient reached {missing}'


@pytest.mark.parametrize('parent', PARENTS)
def test_mexit_twin(parent: str) -> None:
    ref, model = _tiny_pair(f'{parent}_mexit', parent)
    assert isinstance(model, MultiExitMixin) and isinstance(model, type(ref))
    x = torch.randn(3, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        out = model.forward_dynamic(x, threshold=0.3)
        assert out.logits.shape == (3, 5) and set(out.exit_layer.tolist()) <= set(model.exit_layers)
        alone = model.forward_dynamic(x[1:2], threshold=0.3)
        assert alone.exit_layer.item() == out.exit_layer[1].item()
        torch.testing.assert_close(alone.logits, out.logits[1:2], rtol=1e-4, atol=1e-5)
    _check_backward(model, x)


@pytest.mark.parametrize('parent', PARENTS)
def test_liferegress_twin(parent: str) -> None:
    ref, model = _tiny_pair(f'{parent}_liferegress', parent)
    assert isinstance(model, LifeRegressMixin) and isinstance(model, type(ref))
    x = torch.randn(3, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x, keep_rate=1.), ref(x), rtol=0, atol=0)
        slim = model(x, keep_rate=.5)
        assert slim.shape == (3, 5) and torch.isfinite(slim).all()
        torch.testing.assert_close(model(x[1:2], keep_rate=.5), slim[1:2], rtol=1e-4, atol=1e-5)
    _check_backward(model, x)


@pytest.mark.parametrize('parent', PARENTS)
def test_mexit_liferegress_twin(parent: str) -> None:
    ref, model = _tiny_pair(f'{parent}_mexit_liferegress', parent)
    assert isinstance(model, MultiExitLifeRegressMixin) and isinstance(model, type(ref))
    x = torch.randn(3, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        out = model.forward_dynamic(x, threshold=0.3, keep_rate=.5)
        assert out.logits.shape == (3, 5) and set(out.exit_layer.tolist()) <= set(model.exit_layers)
        alone = model.forward_dynamic(x[1:2], threshold=0.3, keep_rate=.5)
        assert alone.exit_layer.item() == out.exit_layer[1].item()
        torch.testing.assert_close(alone.logits, out.logits[1:2], rtol=1e-4, atol=1e-5)
    _check_backward(model, x)
