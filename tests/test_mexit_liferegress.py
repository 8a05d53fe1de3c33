"""Early exit and patch slimming in one model: parent equality, batch invariance, costs, budgets, rotary parents,
bad arguments, train mode."""
import json
import math
import warnings

import pytest
import torch

import timm
from timm.models import VisionTransformer

import timm_exits
from timm_exits import MultiExitLifeRegressMixin, convert
from timm_exits.models._base import count_flops

from .conftest import spread_exit_heads

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., num_classes=10)
LIFE = dict(life_layer=1, prune_layers=(2, 3))
NEW = ('exits.', 'uncertainty.', 'life.')


def _model(**kwargs) -> MultiExitLifeRegressMixin:
    return timm.create_model('test_vit_mexit_liferegress', **kwargs).eval()


def _parent(model: torch.nn.Module) -> VisionTransformer:
    parent = VisionTransformer(**TINY).eval()
    parent.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(NEW)})
    return parent


def test_registered():
    names = set(timm.list_models('*_mexit_liferegress'))
    assert {'test_vit_mexit_liferegress', 'vit_base_patch16_224_mexit_liferegress',
            'deit_small_patch16_224_mexit_liferegress', 'eva02_tiny_patch14_224_mexit_liferegress'} <= names
    assert 'vit_base_patch16_224_mexit_liferegress.augreg_in21k' in timm.list_pretrained(
        'vit_base_patch16_224_mexit_liferegress*')
    assert timm_exits.FAMILIES['mexit_liferegress'] is MultiExitLifeRegressMixin


def test_defaults_equal_parent_exactly():
    model = _model()
    parent = _parent(model)
    assert model.keep_rate == 1. and model.threshold is None and model.budget is None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = parent(x)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(model(x, keep_rate=1.), ref, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_dynamic(x).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_exits(x)[-1], ref, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_features(x), parent.forward_features(x), rtol=0, atol=0)


def test_convert_keeps_the_parent():
    parent = VisionTransformer(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = parent(x)
        model = convert(parent, 'mexit_liferegress', **LIFE)
        assert isinstance(model, MultiExitLifeRegressMixin) and model.exit_layers == (2, 3, 4)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        assert model(x, keep_rate=.5).shape == ref.shape


@pytest.mark.parametrize('rate', [.9, .7, .5])
def test_full_depth_slimmed_equals_liferegress(rate):
    """No threshold, full depth: the same patches leave as in the LifeRegress model of the same weights."""
    model = _model()
    life = timm.create_model('test_vit_liferegress', keep_rate=rate).eval()
    life.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(('exits.', 'uncert'))})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x, keep_rate=rate)
        torch.testing.assert_close(out, life(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.forward_exits(x, keep_rate=rate)[-1], out, rtol=0, atol=1e-6)
        assert not torch.allclose(out, model(x), atol=1e-4), 'slimming should change the logits of a random model'


def test_exits_read_slimmed_tokens():
    """A budget at a fixed keep rate answers at one exit with that exit's logits on the slimmed tokens."""
    model = spread_exit_heads(_model(exit_layers=(1, 2, 3)))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        exits = model.forward_exits(x, keep_rate=.5)
        full = model.forward_exits(x, keep_rate=1.)
        for k, cost in enumerate(model.exit_costs_for(.5)):
            out = model.forward_dynamic(x, budget=cost, keep_rate=.5)
            assert (out.exit_layer == model.exit_layers[k]).all()
            torch.testing.assert_close(out.logits, exits[k], rtol=0, atol=1e-6)
        assert not torch.allclose(exits[2], full[2], atol=1e-4), 'the exit after block 3 reads fewer patches'


@pytest.mark.parametrize('rate', [1., .5])
def test_batch_invariance(rate):
    model = spread_exit_heads(_model(exit_layers=(1, 2, 3)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, 32, 32, generator=gen)
    with torch.no_grad():
        first = model.exit_scores(1, model.forward_exits(x, keep_rate=rate)[0])
        for threshold in torch.quantile(first, torch.tensor([.3, .6, .8])).tolist():
            full = model.forward_dynamic(x, threshold=threshold, keep_rate=rate)
            assert len(set(full.exit_layer.tolist())) > 1, 'thresholds should split this batch'
            alone = [model.forward_dynamic(x[i:i + 1], threshold=threshold, keep_rate=rate) for i in range(len(x))]
            assert torch.equal(full.exit_layer, torch.cat([a.exit_layer for a in alone]))
            torch.testing.assert_close(full.logits, torch.cat([a.logits for a in alone]), rtol=1e-4, atol=1e-5)
            assert torch.equal(full.cost, torch.cat([a.cost for a in alone]))
            # the cost of an image leaving at exit k is the threshold path at this keep rate
            costs = dict(zip(model.exit_layers, model.threshold_costs_for(rate)))
            assert all(math.isclose(c, costs[e], rel_tol=1e-6) for c, e in zip(full.cost.tolist(),
                                                                                 full.exit_layer.tolist()))


def test_costs_by_hand():
    """Keep rate 1: the multi-exit model's costs; lower keep rates: exits after the first prune layer cheaper, those
    up to it dearer by exactly the life module; the final exit at rho 0.5 summed piece by piece."""
    model = _model()
    mexit = timm.create_model('test_vit_mexit').eval()
    assert model.exit_costs_for(1.) == mexit.exit_costs and model.threshold_costs_for(1.) == mexit.threshold_costs
    assert model.exit_costs == mexit.exit_costs  # the default keep rate is 1
    full = mexit.full_flops
    life = count_flops(model.life, torch.zeros(1, 17, 32), 1, 0., 1.)[0] / full
    previous = model.exit_costs_for(1.)
    for rate in (.9, .7, .5):
        costs = model.exit_costs_for(rate)
        for layer, cost, before, at_one in zip(model.exit_layers, costs, previous, model.exit_costs_for(1.)):
            if layer <= model.prune_layers[0]:  # nothing dropped yet: the life module on top
                assert math.isclose(cost, at_one + life, rel_tol=1e-9)
            else:
                assert cost < before
        previous = costs
    assert model.token_schedule(.5) == (16, 16, 8, 4)
    blk, z = model.blocks[0], lambda n: torch.zeros(1, n + 1, 32)
    embed = count_flops(model._embed, torch.zeros(1, 3, 32, 32))[0]
    head = count_flops(lambda t: model.forward_head(model.norm(t)), z(4))[0]
    by_hand = embed + sum(count_flops(blk, z(n))[0] for n in (16, 16, 8, 4)) + life * full + head
    assert math.isclose(model.exit_costs_for(.5)[-1], by_hand / full, rel_tol=1e-9)
    assert math.isclose(model.flops_ratio(.5), by_hand / full, rel_tol=1e-9)


@pytest.mark.parametrize('with_threshold', [False, True])
def test_budget_is_a_ceiling(with_threshold):
    model = spread_exit_heads(_model(exit_layers=(1, 2, 3)))
    x = torch.randn(8, 3, 32, 32)
    threshold = .5 if with_threshold else None
    what = model.threshold_costs_for if with_threshold else model.exit_costs_for
    cheapest = min(what(model.min_keep_rate)[0], what(1.)[0])
    with torch.no_grad():
        for budget in torch.linspace(cheapest, 1., 7, dtype=torch.float64).tolist() + [.8, .95]:
            for rate in (None, .5):
                if rate is not None and what(rate)[0] > budget:
                    continue
                out = model.forward_dynamic(x, threshold=threshold, budget=budget, keep_rate=rate)
                assert out.cost.max().item() <= budget + 1e-6, (budget, rate)
            rate, stop = model.plan_budget(budget, threshold=with_threshold)
            k = model.exit_layers.index(stop)
            # the rule: the deepest exit that fits at a keep rate in [min_keep_rate, 1], then the largest rate there
            assert all(min(what(model.min_keep_rate)[j], what(1.)[j]) > budget + 1e-9
                       for j in range(k + 1, len(model.exit_layers)))
            assert what(rate)[k] <= budget + 1e-9 and rate >= model.min_keep_rate
            assert rate == 1. or what(min(rate + 1 / 256, 1.))[k] > budget + 1e-9


def test_budget_below_cheapest_names_it():
    model = _model()
    cheapest = min(model.exit_costs_for(.5)[0], model.exit_costs_for(1.)[0])
    with pytest.raises(ValueError, match=rf'budget=0.3 is below the cheapest option .* {cheapest:.4f} <= budget'):
        model(torch.randn(1, 3, 32, 32), budget=.3)
    with pytest.raises(ValueError, match=r'budget=0.3 is below the cheapest exit at keep_rate=0.9'):
        model.forward_dynamic(torch.randn(1, 3, 32, 32), budget=.3, keep_rate=.9)
    with pytest.raises(ValueError, match=r'budget=0.2 is below the cheapest option'):
        _model(budget=.2)


@pytest.mark.parametrize('kwargs, match', [
    (dict(exit_head='cnn_add'), r"exit_head \['cnn_add'\] reads the patch tokens at their grid positions"),
    (dict(exit_head='mixer'), r"exit_head \['mixer'\].*allowed with slimming: \['linear', 'mlp', 'vit'\]"),
    (dict(keep_rate=0.), r'keep_rate must be a number in \(0, 1\], got 0.0'),
    (dict(keep_rate=1.5), r'keep_rate must be a number in \(0, 1\], got 1.5'),
    (dict(train_keep_rate=1.), r'train_keep_rate must be a number in \(0, 1\), got 1.0'),
    (dict(min_keep_rate=0.), r'min_keep_rate must be a number in \(0, 1\], got 0.0'),
    (dict(prune_layers=(1,)), r'prune_layers must be strictly increasing block numbers in 2..3'),
    (dict(U=0.), r'U \(temperature of eq. 7\) must be a finite number > 0'),
])
def test_bad_arguments_at_creation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(**kwargs)


def test_bad_arguments_at_call():
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r'keep_rate must be a number in \(0, 1\] or None, got 0.0'):
        model(x, keep_rate=0.)
    with pytest.raises(ValueError, match=r'threshold must be a number in \[0, 1\] or None, got 2.0'):
        model.forward_dynamic(x, threshold=2.)
    with pytest.raises(ValueError, match=r'deadline_ms must be a finite number of milliseconds >= 0'):
        model.forward_dynamic(x, deadline_ms=-1)
    with pytest.raises(ValueError, match=r'keep_rate must be a number in \(0, 1\]'):
        model.exit_costs_for(0.)


def test_deadline_and_anytime():
    model = spread_exit_heads(_model(exit_layers=(1, 2, 3)))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        exits = model.forward_exits(x, keep_rate=.5)
        out = model.forward_dynamic(x, keep_rate=.5, deadline_ms=0)
        assert (out.exit_layer == 1).all()
        torch.testing.assert_close(out.logits, exits[0], rtol=0, atol=1e-6)
        steps = list(model.forward_anytime(x, keep_rate=.5))
        assert [s.exit_layer for s in steps] == list(model.exit_layers)
        for k, step in enumerate(steps):
            torch.testing.assert_close(step.logits, exits[k][step.rows], rtol=0, atol=1e-6)
            assert math.isclose(step.cost, model.threshold_costs_for(.5)[k])
        threshold = torch.quantile(model.exit_scores(1, exits[0]), .5).item()
        dynamic = model.forward_dynamic(x, threshold=threshold, keep_rate=.5)
        best = torch.empty_like(dynamic.logits)
        for step in model.forward_anytime(x, threshold=threshold, keep_rate=.5):
            best[step.rows] = step.logits
        torch.testing.assert_close(best, dynamic.logits, rtol=0, atol=1e-6)


def test_train_mode_backward_reaches_every_parameter():
    model = _model().train()
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    with torch.no_grad():  # the soft weights change the output: the final exit of the soft pass
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x)), rtol=0, atol=1e-6)
    torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient reached {missing}'
    assert model.life.proj.weight.grad.abs().sum() > 0
    assert all(model.exits[k].head.weight.grad.abs().sum() > 0 for k in model.exits)


def _tiny_eva(name: str, **kwargs):
    args = dict(img_size=56, depth=4, embed_dim=48, num_heads=2, num_classes=5, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return timm.create_model(name, **args).eval()


def test_rotary_parent_runs_slimmed():
    torch.manual_seed(0)
    parent = _tiny_eva('eva02_tiny_patch14_224')
    model = _tiny_eva('eva02_tiny_patch14_224_mexit_liferegress', **LIFE)
    model.load_state_dict({**model.state_dict(), **parent.state_dict()})
    life = _tiny_eva('eva02_tiny_patch14_224_liferegress', **LIFE)
    life.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(('exits.', 'uncert'))})
    assert model._count_flops()['counts'] == (16,) * 4
    x = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), parent(x), rtol=0, atol=0)
        slim = model(x, keep_rate=.5)
        torch.testing.assert_close(slim, life(x, keep_rate=.5), rtol=0, atol=1e-5)  # the kept patches' rope
        torch.testing.assert_close(model(x[2:3], keep_rate=.5), slim[2:3], rtol=1e-4, atol=1e-5)
        out = model.forward_dynamic(x, threshold=.2, keep_rate=.5)
        alone = model.forward_dynamic(x[3:4], threshold=.2, keep_rate=.5)
        assert alone.exit_layer.item() == out.exit_layer[3].item()
        torch.testing.assert_close(alone.logits, out.logits[3:4], rtol=1e-4, atol=1e-5)


def test_export_takes_the_slimmed_model(tmp_path):
    """The staged export serves every keep rate (tests/test_export.py checks the runtime against eager)."""
    pytest.importorskip('onnxscript')
    from timm_exits.export import export_onnx
    manifest = json.loads((export_onnx(_model(keep_rate=.7), tmp_path / 'x') / 'manifest.json').read_text())
    assert manifest['family'] == 'mexit_liferegress' and manifest['keep_rate'] == .7
    assert manifest['exit_costs'] == list(_model(keep_rate=.7).exit_costs_for(.7))


def test_torchscript_full_depth_at_keep_rate_one_and_refuses_slimming():
    model = timm.create_model('test_vit_mexit_liferegress').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=0)
    slim = torch.jit.script(timm.create_model('test_vit_mexit_liferegress', keep_rate=.5).eval())
    with pytest.raises(torch.jit.Error, match='runs full depth at keep rate 1 only'):
        slim(x)
