"""Regression exits (TransCrowd-style counting, 001_*.txt): the parent's answer at full depth, every exit head, the
criteria (budget, PABEE's patience, the predicted scale) against hand-run decisions, batch invariance, the budget
ceiling, a seeded fuzz over parents, heads, criteria, thresholds and budgets, and the errors."""
import random
import warnings

import pytest
import timm
import torch

import timm_exits  # noqa: F401  (registers the models)
from timm_exits import EXIT_HEADS, TOKEN_EXIT_HEADS
from timm_exits.models._build import twin_parents
from timm_exits.models.walker import PatienceCriterion, ScaleCriterion

from .test_every_parent import tiny_kwargs

# TransCrowd's two variants (token, GAP), no class token (SigLIP), registers, rotary Eva, DeiT at 384 (the seed's)
PARENTS = ['vit_base_patch16_384', 'vit_medium_patch16_gap_256', 'vit_base_patch16_siglip_224',
           'vit_small_patch14_reg4_dinov2', 'eva02_tiny_patch14_224', 'deit_base_patch16_384']
PARENTS += random.Random(0).sample(sorted(set(twin_parents('liferegress')) - set(PARENTS) - {'test_vit'}), 3)
POOLED = ('linear', 'mlp', 'vit')


def _pair(name: str, parent: str, **extra):
    torch.manual_seed(0)
    kwargs = dict(tiny_kwargs(parent), num_classes=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = timm.create_model(parent, **kwargs).eval()
        model = timm.create_model(name, task='regression', **kwargs, **extra).eval()
    model.load_state_dict({**model.state_dict(), **ref.state_dict()})
    return ref, _spread(model)


def _spread(model, scale: float = 10.):
    """Untrained heads answer near 0 alike: spread values and scales so thresholds split batches."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(('exits.', 'uncertainty.')) and p.ndim == 2:
                p.mul_(scale)
    return model


def _walk_by_hand(model, x, threshold, stop=None):
    """Exit and value of each image from the whole batch's exits, the criterion applied exit by exit."""
    with torch.no_grad():
        values, scales = model.forward_exits_with_scale(x)
    stop = stop or model.depth
    layers = [k for k in model.exit_layers if k <= stop]
    exit_at, out = [], []
    for b in range(x.shape[0]):
        count, prev, taken = 0, None, len(layers) - 1
        for i, layer in enumerate(layers[:-1]):
            v = values[i][b]
            if model.exit_criterion == 'patience':
                count = count + 1 if prev is not None and (v - prev).abs().max() <= threshold else 0
                prev = v
                leave = count >= model.exit_patience
            else:
                leave = scales[i][b].max() <= threshold
            if leave:
                taken = i
                break
        exit_at.append(layers[taken])
        out.append(values[taken][b])
    return torch.tensor(exit_at), torch.stack(out)


@pytest.mark.parametrize('family', ['mexit', 'mexit_liferegress'])
@pytest.mark.parametrize('parent', PARENTS)
def test_full_depth_equals_parent_and_walk_is_per_image(parent, family):
    ref, model = _pair(f'{parent}_{family}', parent)
    assert model.task == 'regression' and model.exit_criterion == 'patience'
    x = torch.randn(6, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        for criterion, tau in (('patience', .5), ('uncertainty', 2.)):
            model.set_exit_criterion(criterion)
            out = model.forward_dynamic(x, threshold=tau)
            assert out.logits.shape == (6, 1)
            for b in (0, 3):
                alone = model.forward_dynamic(x[b:b + 1], threshold=tau)
                assert alone.exit_layer.item() == out.exit_layer[b].item()
                torch.testing.assert_close(alone.logits, out.logits[b:b + 1], rtol=1e-4, atol=1e-4)
    model.train()  # train mode: the plain train-mode output, no classification loss hooked into its backward
    torch.manual_seed(1)  # the same draws for both calls (DINOv3's rotary embedding jitters its coordinates in training)
    y = model(x)
    assert 'AttachExitLosses' not in y.grad_fn.name()
    torch.manual_seed(1)
    torch.testing.assert_close(y, model.forward_head(model.forward_features(x)), rtol=0, atol=0)


@pytest.mark.parametrize('head', sorted(TOKEN_EXIT_HEADS))
def test_every_exit_head_predicts_values_and_criteria_match_hand_run(head):
    torch.manual_seed(0)
    model = _spread(timm.create_model('test_vit_mexit', task='regression', num_classes=2, exit_head=head,
                                      exit_layers=(1, 2, 3), exit_patience=1)).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        outs = model.forward_exits(x)
        values, scales = model.forward_exits_with_scale(x)
    assert [o.shape for o in outs] == [(16, 2)] * 4 and all((s > 0).all() for s in scales)
    for o, v in zip(outs, values):
        torch.testing.assert_close(o, v, rtol=0, atol=0)  # features then the head: bit for bit the exit's output
    for criterion, taus in (('patience', (0., .3, 1., 3.)), ('uncertainty', (.5, 1., 2., 50.))):
        model.set_exit_criterion(criterion)
        split = set()
        for tau in taus:
            with torch.no_grad():
                out = model.forward_dynamic(x, threshold=tau)
            exit_at, val = _walk_by_hand(model, x, tau)
            assert out.exit_layer.tolist() == exit_at.tolist(), (criterion, tau)
            torch.testing.assert_close(out.logits, val, rtol=1e-5, atol=1e-5)
            split |= set(out.exit_layer.tolist())
        assert len(split) > 1, (criterion, head)  # the thresholds do send images to different exits


def test_avg_pool_parent_exits_read_the_patch_mean():
    """TransCrowd's GAP variant: the final head averages the patches, so the exits do too."""
    gap = timm.create_model('test_vit_mexit', task='regression', num_classes=1, global_pool='avg')
    tok = timm.create_model('test_vit_mexit', task='regression', num_classes=1)
    assert {h.pool for h in gap.exits.values()} == {'avg'} and {h.pool for h in tok.exits.values()} == {'token'}
    cls = timm.create_model('test_vit_mexit', num_classes=1, global_pool='avg')  # classification unchanged
    assert {h.pool for h in cls.exits.values()} == {'token'}


def test_patience_counts_consecutive_agreement():
    crit = PatienceCriterion(2)
    state = crit.initial_state(3, torch.device('cpu'))
    seq = torch.tensor([[0., 0., 0.], [.1, 1., .1], [.15, 1.05, 2.], [.2, 1.1, 2.05]])
    leaves = []
    for v in seq:
        leave, state = crit.decide(v[:, None], None, .12, state)
        leaves.append(leave.tolist())
    # image 0 agrees at exits 2 and 3 (count 2: leaves at exit 3); image 1 jumps at exit 2, agrees at 3 and 4;
    # image 2 agrees at 2, jumps at 3 (reset), agrees at 4: count 1
    assert leaves == [[False] * 3, [False] * 3, [True, False, False], [True, True, False]]
    assert state[:, -1].tolist() == [3., 2., 1.] and state[:, 0].tolist() == seq[-1].tolist()
    assert ScaleCriterion().scores(torch.zeros(2, 2), torch.tensor([[.25, .5], [.75, .25]])).tolist() == [.5, .75]


@pytest.mark.parametrize('seed', range(6))
def test_fuzz_budget_ceiling_batch_invariance(seed):
    rng = random.Random(seed)
    family = rng.choice(['test_vit_mexit', 'test_vit_mexit_liferegress'])
    heads = POOLED if family.endswith('liferegress') else sorted(TOKEN_EXIT_HEADS)
    torch.manual_seed(seed)
    model = _spread(timm.create_model(
        family, task='regression', num_classes=rng.choice([1, 3]), exit_layers=(1, 2, 3),
        exit_head=[rng.choice(heads) for _ in range(3)], exit_criterion=rng.choice(['patience', 'uncertainty']),
        exit_patience=rng.choice([1, 2]), global_pool=rng.choice(['token', 'avg']))).eval()
    x = torch.randn(10, 3, 32, 32)
    kw = dict(keep_rate=rng.choice([None, .5])) if family.endswith('liferegress') else {}
    cheapest = min(model.exit_costs)
    for _ in range(4):
        tau = rng.choice([None, 0., rng.uniform(0, 3), 100.])
        budget = rng.choice([None, rng.uniform(cheapest, 1.), 1.])
        with torch.no_grad():
            out = model.forward_dynamic(x, threshold=tau, budget=budget, **kw)
            if budget is not None:
                assert (out.cost <= budget + 1e-9).all(), (seed, tau, budget)
            for b in rng.sample(range(10), 2):
                alone = model.forward_dynamic(x[b:b + 1], threshold=tau, budget=budget, **kw)
                assert alone.exit_layer.item() == out.exit_layer[b].item(), (seed, tau, budget)
                torch.testing.assert_close(alone.logits, out.logits[b:b + 1], rtol=1e-4, atol=1e-4)
            if budget is not None and tau is None and not kw.get('keep_rate'):  # the seed's rule: deepest that fits
                fits = [k for k, c in zip(model.exit_layers, model.exit_costs) if c <= budget + 1e-9]
                assert set(out.exit_layer.tolist()) == {fits[-1]}
                torch.testing.assert_close(out.logits, model.forward_exits(x)[model.exit_layers.index(fits[-1])])


def test_anytime_and_deadline_for_regression():
    model = _spread(timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_layers=(1, 2, 3))).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        exits = model.forward_exits(x)
        steps = list(model.forward_anytime(x))
        assert [s.exit_layer for s in steps] == list(model.exit_layers)
        for s, ref in zip(steps, exits):
            torch.testing.assert_close(s.logits, ref[s.rows], rtol=1e-5, atol=1e-5)
        late = model.forward_dynamic(x, deadline_ms=0.)  # past at once: every image answers at the first exit
        assert set(late.exit_layer.tolist()) == {1}
        walked = list(model.forward_anytime(x, threshold=.5))
        assert sum(int(s.exited.sum()) for s in walked) == 8


def test_regression_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"exit_criterion='confidence' is not a criterion of task='regression' .*"
                                         r"softmax.*allowed: \['patience', 'uncertainty'\]"):
        timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_criterion='confidence')
    with pytest.raises(ValueError, match=r"exit_criterion='patience' is not a criterion of task='classification'"):
        timm.create_model('test_vit_mexit', exit_criterion='patience')
    with pytest.raises(ValueError, match=r"task must be one of \['classification', 'regression'\], got 'count'"):
        timm.create_model('test_vit_mexit', task='count')
    with pytest.raises(ValueError, match='exit_patience must be an integer >= 1'):
        timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_patience=0)
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=1).eval()
    for bad in (-1., float('nan'), float('inf'), 'x'):
        with pytest.raises(ValueError, match='threshold must be a finite number >= 0 in target units'):
            model.forward_dynamic(torch.randn(1, 3, 32, 32), threshold=bad)
    assert model.forward_dynamic(torch.randn(1, 3, 32, 32), threshold=5.).logits.shape == (1, 1)  # > 1 is fine
    with pytest.raises(ValueError, match="forward_exits_with_scale needs task='regression'"):
        timm.create_model('test_vit_mexit').forward_exits_with_scale(torch.randn(1, 3, 32, 32))
    assert timm.create_model('test_vit_mexit', num_classes=1).task == 'classification'  # never inferred


def test_scale_costs_counted_and_convert():
    base = timm.create_model('test_vit_mexit', task='regression', num_classes=1)
    learned = timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_criterion='uncertainty')
    learned.load_state_dict(base.state_dict())
    full = base.full_flops
    assert learned.full_flops == full
    for k in range(3):  # the scale unit, Linear(32, 1): 2 * 32 FLOPs at each intermediate head on the way
        assert round((learned.threshold_costs[k] - base.threshold_costs[k]) * full) == 64 * (k + 1 if k < 2 else 2)
    parent = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=1).eval()
    model = timm_exits.convert(parent, 'mexit', task='regression').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), parent(x), rtol=0, atol=0)
    assert model.task == 'regression'


def test_evaluation_simulation_matches_forward_dynamic():
    from torch.utils.data import TensorDataset, DataLoader
    from timm_exits.evaluation import collect_regression_outputs, evaluate, regression_threshold_table
    model = _spread(timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_layers=(1, 2, 3),
                                      exit_head='mlp')).eval()
    x, y = torch.randn(24, 3, 32, 32), torch.rand(24) * 4
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    outputs = collect_regression_outputs(model, loader, torch.device('cpu'))
    assert outputs['values'].shape == (4, 24, 1) and outputs['target'].shape == (24, 1)
    for criterion, taus in (('patience', (0., .5, 2.)), ('uncertainty', (.5, 2., 20.))):
        model.set_exit_criterion(criterion)
        rows = regression_threshold_table(outputs, model.threshold_costs, criterion, taus, model.exit_patience)
        for tau, row in zip(taus, rows):
            with torch.no_grad():
                out = model.forward_dynamic(x, threshold=tau)
            err = (out.logits.squeeze(-1).double() - y.double())
            assert row['mae'] == pytest.approx(float(err.abs().mean()), rel=1e-5)
            assert row['rmse'] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-5)
            assert row['mean_cost'] == pytest.approx(float(out.cost.double().mean()), rel=1e-5)
    model.set_exit_criterion('patience')
    result = evaluate(model, loader, torch.device('cpu'), 'm', 'd')
    maes = [e['mae'] for e in result['exits']]
    assert [e['practical'] for e in result['exits']] == [i == 0 or m < min(maes[:i]) for i, m in enumerate(maes)]
    with torch.no_grad():
        final = model(x).squeeze(-1)
    assert maes[-1] == pytest.approx(float((final - y).abs().mean()), rel=1e-5)
    assert set(result['thresholds']) == {'patience', 'uncertainty'} and result['budgeted_batch']['patience']
    assert all(r['mean_cost'] <= r['mean_budget'] + 1e-9 for r in result['budgeted_batch']['uncertainty'])
    assert model.exit_criterion == 'patience'  # the sweep left the model's criterion as it was
