"""Calibration with a guarantee: p-values against hand computation, fixed-sequence testing, the guarantee over random
splits of fixed outputs (and the choose-on-the-split rule violating it), every family, the recorded default, the CLI."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom
from torch.utils.data import DataLoader, TensorDataset

import timm
import timm_exits
from timm_exits import calibrate as cal
from timm_exits.evaluation import select_threshold
from timm_exits.models._checkpoint import METADATA_KEY

from .conftest import spread_exit_heads

pytest.importorskip('mapie')


def _hand_hb(k: int, n: int, eps: float) -> float:
    """LTT's Hoeffding-Bentkus p-value for a 0/1 loss, written out: min(exp(-n h1(min(r, eps), eps)), P(Bin(n, eps)
    <= k)), h1(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b))."""
    r = min(k / n, eps)
    h1 = (r * math.log(r / eps) if r > 0 else 0.) + (1 - r) * math.log((1 - r) / (1 - eps))
    return min(math.exp(-n * h1), float(binom.cdf(k, n, eps)))


@pytest.mark.parametrize('n,eps', [(100, 0.05), (1000, 0.01), (359, 0.2), (7, 0.5)])
def test_hb_p_values_match_the_formula(n, eps):
    ks = list(range(0, n + 1, max(1, n // 40)))
    got = cal.hb_p_values(ks, n, eps)
    want = [_hand_hb(k, n, eps) for k in ks]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)
    assert got[0] == pytest.approx((1 - eps) ** n)  # no loss at all: (1 - eps)^n


def test_hb_counts_k_not_k_plus_one():
    """7 / 100 * 100 is 7.000000000000001 in floats: the Bentkus term must still be P(Bin(100, eps) <= 7)."""
    assert cal.hb_p_values([7], 100, 0.1)[0] == pytest.approx(min(_hand_hb(7, 100, 0.1), binom.cdf(7, 100, 0.1)))
    assert cal.hb_p_values([7], 100, 0.1)[0] < binom.cdf(8, 100, 0.1)


def test_fixed_sequence_stops_at_the_first_non_rejection():
    assert cal.fixed_sequence_test([0.01, 0.04, 0.2, 0.001], 0.05) == 2
    assert cal.fixed_sequence_test([0.06, 0.001], 0.05) == 0
    assert cal.fixed_sequence_test([0.001] * 5, 0.05) == 5


def test_images_needed():
    assert cal.images_needed(0.01, 0.05) == math.ceil(math.log(0.05) / math.log(0.99)) == 299
    assert cal.images_needed(0.05, 0.1, 0.05) is None
    n = cal.images_needed(0.05, 0.05, 0.02)
    assert cal.hb_p_values([math.ceil(n * 0.02)], n, 0.05)[0] <= 0.05 < cal.hb_p_values([math.ceil(n * 0.02 / 2)],
                                                                                        n // 2, 0.05)[0]


@pytest.mark.parametrize('name,value', [('epsilon', 0), ('epsilon', 1), ('delta', -0.1), ('delta', float('nan')),
                                        ('epsilon', True)])
def test_levels_outside_the_open_interval_are_refused(name, value):
    with pytest.raises(ValueError, match=f'{name} must be a number in \\(0, 1\\)'):
        cal.ltt(torch.zeros(2, 10, dtype=torch.bool), **{'epsilon': 0.1, 'delta': 0.1, name: value})


# --- the guarantee over random splits -------------------------------------------------------------------------------

def _fixed_outputs(n: int = 20000, exits: int = 4, classes: int = 10, seed: int = 0):
    """Fixed outputs of a multi-exit model on n images: each exit's confidence and answer, the final one last. An
    exit's answer differs from the final one with a probability that falls with its confidence, and the final answer is
    right 90 % of the time."""
    g = torch.Generator().manual_seed(seed)
    final = torch.randint(0, classes, (n,), generator=g)
    ease = torch.rand(n, generator=g)
    scores, preds = [], []
    for e in range(exits - 1):
        s = (0.1 + 0.9 * ease ** (1.5 - 0.3 * e) + 0.08 * torch.randn(n, generator=g)).clamp(0.1, 1.)
        wrong = torch.rand(n, generator=g) < 0.9 * (1 - s) ** 1.5
        scores.append(s)
        preds.append(torch.where(wrong, (final + 1 + torch.randint(0, classes - 1, (n,), generator=g)) % classes,
                                 final))
    scores.append(torch.ones(n))
    preds.append(final)
    labels = torch.where(torch.rand(n, generator=g) < 0.9, final, (final + 1) % classes)
    return {'family': 'mexit', 'labels': labels, 'keep_rates': [1.], 'preds': [torch.stack(preds)],
            'scores': [torch.stack(scores)]}


def test_the_guarantee_holds_over_200_random_splits_and_choosing_on_the_split_does_not():
    """Over 200 random calibration (1000 images) / test (19000) splits of fixed outputs, LTT's threshold has a test
    disagreement above epsilon in at most delta of the splits (with binomial slack), while the choose-on-the-split
    rule (the cheapest threshold whose calibration accuracy is within epsilon of the full model's: validate's
    ``--target-drop``) exceeds it far more often."""
    out = _fixed_outputs()
    eps, delta, n_cal, splits = 0.05, 0.1, 1000, 200
    grid = cal.threshold_grid('confidence')
    costs = [0.3, 0.55, 0.8, 1.0]
    losses, mean_costs = cal.point_losses(out, [(None, t) for t in grid], costs=lambda r, t: costs)
    n = losses.shape[1]
    g = torch.Generator().manual_seed(1)
    ltt_bad = naive_bad = 0
    ltt_costs = []
    for _ in range(splits):
        perm = torch.randperm(n, generator=g)
        c, t = perm[:n_cal], perm[n_cal:]
        certified, _ = cal.ltt(losses[:, c], eps, delta)
        calib_rates = losses[:, c].float().mean(1)
        if certified:
            j = min(range(certified), key=lambda i: float(mean_costs[i]))
            ltt_bad += bool(losses[j, t].float().mean() > eps)
            ltt_costs.append(float(mean_costs[j]))
        rows = [{'threshold': th, 'accuracy': 100 * (1 - float(r)), 'mean_cost': float(m)}
                for th, r, m in zip(grid, calib_rates, mean_costs)]
        chosen = select_threshold(rows, 100., max_drop=100 * eps)['threshold']
        naive_bad += bool(losses[grid.index(chosen), t].float().mean() > eps)
    slack = binom.ppf(0.999, splits, delta)  # what a delta-rate coin would reach once in a thousand runs
    assert len(ltt_costs) == splits  # 1000 images certify this epsilon every time
    assert ltt_bad <= slack, (ltt_bad, slack)
    assert naive_bad > slack and naive_bad >= 3 * max(ltt_bad, 1), (naive_bad, ltt_bad)
    assert np.mean(ltt_costs) < 0.9  # and it does save: the certified threshold is not full depth


def test_accuracy_drop_risk_bounds_the_drop_and_needs_labels():
    out = _fixed_outputs(2000)
    losses, _ = cal.point_losses(out, [(None, 0.5)], risk='accuracy_drop')
    preds, labels = out['preds'][0], out['labels']
    first = cal._first_exit(out['scores'][0], 0.5, True)
    answer = preds[first, torch.arange(2000)]
    drop = float((preds[-1] == labels).float().mean() - (answer == labels).float().mean())
    assert float(losses.float().mean()) >= drop
    out['labels'][3] = -1
    with pytest.raises(ValueError, match="risk='accuracy_drop' needs a label for every image; 1 of 2000"):
        cal.point_losses(out, [(None, 0.5)], risk='accuracy_drop')


def test_refusal_names_the_images_needed():
    out = _fixed_outputs(100)
    model = spread_exit_heads(timm.create_model('test_vit_mexit', num_classes=10, exit_layers=(1, 2, 3))).eval()
    with pytest.raises(cal.CalibrationError, match=r'no point can be certified with 100 images for epsilon=0.01, '
                                                   r'delta=0.05 .* at least 299 images are needed'):
        cal.calibrate_outputs(model, out, 0.01, 0.05)


# --- every family, recorded default ------------------------------------------------------------------------------

def _loader(n: int = 96, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.full((n,), -1)), batch_size=32)


@pytest.mark.parametrize('name,knobs', [('test_vit_mexit', ('threshold',)), ('test_vit_liferegress', ('keep_rate',)),
                                        ('test_vit_mexit_liferegress', ('keep_rate', 'threshold'))])
def test_every_family_is_calibrated_and_the_choice_becomes_the_default(name, knobs):
    model = spread_exit_heads(timm.create_model(name, num_classes=10)).eval()
    x = torch.randn(8, 3, 32, 32)
    result = timm_exits.calibrate(model, _loader(), epsilon=0.3, delta=0.2)
    assert result['n'] == 96 and result['epsilon'] == 0.3 and result['delta'] == 0.2
    assert 0 <= result['empirical_risk'] <= 0.3 and 0 < result['mean_cost'] <= 1.
    assert model.calibration == result
    chosen = {k: result[k] for k in knobs}
    assert any(v is not None and v != 1. for v in chosen.values()), result  # it found something cheaper
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, **chosen), rtol=0, atol=0)
    for k, v in chosen.items():
        assert getattr(model, k) == v


def test_calibrated_checkpoint_round_trip(tmp_path):
    """create_model(checkpoint_path=) of a calibrated file: the calibrated threshold is the eval-mode default."""
    from safetensors.torch import save_file
    model = spread_exit_heads(timm.create_model('test_vit_mexit', num_classes=10)).eval()
    src = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(src), metadata={METADATA_KEY: json.dumps(
        {'model': 'test_vit_mexit', 'model_kwargs': {}, 'num_classes': 10, 'format': 1})})
    result = timm_exits.calibrate(model, _loader(), epsilon=0.3, delta=0.2, apply=False)
    assert model.threshold is None and not hasattr(model, 'calibration')
    cal.write_calibrated(str(src), result, str(tmp_path / 'calibrated.safetensors'), 'test_vit_mexit')
    loaded = timm.create_model('test_vit_mexit', num_classes=10,
                               checkpoint_path=str(tmp_path / 'calibrated.safetensors')).eval()
    assert loaded.threshold == result['threshold'] and loaded.calibration == result
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x, threshold=result['threshold']), rtol=0, atol=0)
        loaded.train()
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)  # train mode ignores the default


def test_a_calibration_for_another_family_is_refused():
    from timm_exits.models._checkpoint import apply_calibration
    with pytest.raises(ValueError, match='chose threshold=0.5, but .* has no exits'):
        apply_calibration(timm.create_model('test_vit_liferegress'), {'threshold': 0.5})
    with pytest.raises(ValueError, match="calibration's keep_rate=0 is not allowed"):
        apply_calibration(timm.create_model('test_vit_liferegress'), {'keep_rate': 0})


def test_grids_and_path_are_ordered_from_the_safest_point():
    conf, ent = cal.threshold_grid('confidence'), cal.threshold_grid('entropy')
    assert conf[0] == 1. and conf[-1] == 0. and conf == sorted(conf, reverse=True)
    assert ent[0] == 0. and ent == sorted(ent)
    path = cal.pair_path([1., 0.9, 0.8], conf)
    assert path[0] == (1., 1.) and path[-1][0] == 0.8
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(path, path[1:]))
    model = timm.create_model('test_vit_liferegress')
    rates = cal.keep_rate_grid(model)
    assert rates[0] == 1. and len({model.token_schedule(r) for r in rates}) == len(rates)


def test_the_calibration_is_recorded_where_users_meet_it(tmp_path):
    """A calibrated checkpoint: validate's eval.json, the model card and config of hub push, the ONNX manifest (whose
    runtime then uses the calibrated threshold by default)."""
    from safetensors.torch import save_file
    from timm_exits import hub, validate
    from timm_exits.export import main as export_main
    from timm_exits.runtime import ExitSession
    model = spread_exit_heads(timm.create_model('test_vit_mexit', num_classes=10, exit_layers=(2,))).eval()
    meta = {'model': 'test_vit_mexit', 'model_kwargs': {'exit_layers': [2]}, 'num_classes': 10, 'format': 1}
    save_file(model.state_dict(), str(tmp_path / 'plain.safetensors'), metadata={METADATA_KEY: json.dumps(meta)})
    result = timm_exits.calibrate(model, _loader(), epsilon=0.3, delta=0.2, apply=False)
    ck = tmp_path / 'model.safetensors'
    cal.write_calibrated(str(tmp_path / 'plain.safetensors'), result, str(ck), 'test_vit_mexit')
    evaluation = validate.main(['--checkpoint', str(ck), '--dataset', 'digits', '--split', 'val', '--workers', '0',
                                '--no-progress', '--output', str(tmp_path / 'eval')])
    assert evaluation['calibration'] == result
    assert json.loads((tmp_path / 'eval' / 'eval.json').read_text())['calibration'] == result
    folder, _ = hub.push(ck, 'test_vit_mexit', 'me/tiny', local_dir=tmp_path / 'hub', upload=False,
                         model_kwargs={'exit_layers': (2,)})
    card = (folder / 'README.md').read_text()
    assert f'threshold {result["threshold"]:g}' in card and 'epsilon = 0.3' in card and '1 - delta = 0.8' in card
    assert f'| 0.3 | 0.2 | 96 | {result["empirical_risk"]:.4f} | {result["mean_cost"]:.3f} |' in card
    assert json.loads((folder / 'config.json').read_text())['model_args']['threshold'] == result['threshold']
    assert export_main(['--model', 'test_vit_mexit', '--model-kwargs', 'exit_layers=(2,)', 'num_classes=10',
                        '--checkpoint', str(ck), '--output', str(tmp_path / 'onnx')]) == 0
    manifest = json.loads((tmp_path / 'onnx' / 'manifest.json').read_text())
    assert manifest['calibration'] == result and manifest['default_threshold'] == result['threshold']
    assert ExitSession(tmp_path / 'onnx').threshold == result['threshold']


def test_a_training_checkpoint_is_calibrated_into_safetensors(tmp_path):
    """A recipe's last.pth.tar (its 'recipe' records model, kwargs, classes): the calibrated copy is safetensors with
    the model, kwargs and classes it needs, and loads with the choice as the default."""
    model = spread_exit_heads(timm.create_model('test_vit_mexit', num_classes=10, exit_criterion='entropy')).eval()
    recipe = {'model': 'test_vit_mexit', 'model_kwargs': {'exit_criterion': 'entropy'}, 'num_classes': 10}
    torch.save({'state_dict': model.state_dict(), 'recipe': recipe}, tmp_path / 'last.pth.tar')
    result = timm_exits.calibrate(model, _loader(), epsilon=0.3, delta=0.2, apply=False)
    assert result['criterion'] == 'entropy'
    cal.write_calibrated(str(tmp_path / 'last.pth.tar'), result, str(tmp_path / 'c.safetensors'), 'test_vit_mexit')
    loaded, recorded, name = cal.load_model(str(tmp_path / 'c.safetensors'))
    assert name == 'test_vit_mexit' and recorded['model_kwargs'] == {'exit_criterion': 'entropy'}
    assert loaded.exit_criterion == 'entropy' and loaded.threshold == result['threshold'] and loaded.num_classes == 10


@pytest.mark.parametrize('seed', range(5))
def test_ltt_fuzzed_against_a_hand_loop(seed):
    """Seeded fuzzing: random loss tables, epsilon and delta; LTT's certified prefix equals a loop over the grid that
    computes each p-value by the formula and stops at the first above delta."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 400, (1,), generator=g))
    points = int(torch.randint(1, 30, (1,), generator=g))
    eps = float(torch.empty(1).uniform_(0.01, 0.5, generator=g))
    delta = float(torch.empty(1).uniform_(0.01, 0.3, generator=g))
    rates = torch.linspace(0, 2 * eps, points)  # risk grows along the grid, as toward cheaper points
    losses = torch.rand(points, n, generator=g) < rates[:, None]
    certified, p = cal.ltt(losses, eps, delta)
    want = 0
    for k in losses.sum(1).tolist():
        if _hand_hb(int(k), n, eps) > delta:
            break
        want += 1
    assert certified == want
    np.testing.assert_allclose(p, [_hand_hb(int(k), n, eps) for k in losses.sum(1).tolist()], rtol=1e-9, atol=1e-300)


# --- regression: a tolerance in target units ------------------------------------------------------------------------

def _regression_outputs(n: int = 20000, exits: int = 4, seed: int = 0):
    """Fixed outputs of a regression multi-exit model (one count per image): each exit's value strays from the final
    one by a noise that shrinks with depth and with the image's ease; its predicted scale follows that noise."""
    g = torch.Generator().manual_seed(seed)
    final = 5 * torch.rand(n, 1, generator=g)
    ease = torch.rand(n, 1, generator=g)
    values, scales = [], []
    for e in range(exits - 1):
        spread = (1.2 - ease) * (exits - 1 - e) / (exits - 1)
        values.append(final + spread * torch.randn(n, 1, generator=g))
        scales.append(spread * (0.8 + 0.4 * torch.rand(n, 1, generator=g)))
    values.append(final)
    scales.append(torch.full((n, 1), 0.01))
    labels = final + 0.3 * torch.randn(n, 1, generator=g)
    return {'family': 'mexit', 'task': 'regression', 'labels': labels, 'keep_rates': [1.],
            'values': [torch.stack(values)], 'scales': [torch.stack(scales)]}


@pytest.mark.parametrize('criterion,risk', [('patience', 'disagreement'), ('uncertainty', 'error_growth')])
def test_the_regression_guarantee_holds_over_200_random_splits(criterion, risk):
    """As for classification: over 200 random calibration (1000) / test (19000) splits, the certified threshold (target
    units) lets more than epsilon of the test images stray beyond the tolerance in at most delta of the splits."""
    out = _regression_outputs()
    eps, delta, n_cal, splits = 0.05, 0.1, 1000, 200
    grid = cal.threshold_grid(criterion, 'regression')
    costs = [0.3, 0.55, 0.8, 1.0]
    losses, image_costs = cal.point_table(out, [(None, t) for t in grid], criterion, risk, lambda r, t: costs,
                                          tolerance=(0.5, 0.))
    n = losses.shape[1]
    g = torch.Generator().manual_seed(2)
    bad, chosen_costs = 0, []
    for _ in range(splits):
        perm = torch.randperm(n, generator=g)
        c, t = perm[:n_cal], perm[n_cal:]
        found = cal.search(losses[:, c], image_costs[:, c], [('thresholds', list(range(len(grid))))], [], eps, delta)
        assert found['certified'] == list(range(found['tests'][0]['certified']))  # a prefix of the path
        mean = image_costs[:, c].mean(1)
        j = min(found['certified'], key=lambda i: (float(mean[i]), -i))
        bad += bool(losses[j, t].float().mean() > eps)
        chosen_costs.append(float(image_costs[j, t].mean()))
    assert bad <= binom.ppf(0.999, splits, delta), bad
    assert np.mean(chosen_costs) < 0.9  # it saves: not full depth


def test_regression_losses_by_hand():
    """disagreement: some output further than tolerance + tolerance_rel * |full| from the full value; error_growth:
    the absolute error grows by more than that."""
    values = torch.tensor([[[1.0, 0.], [2.0, 0.], [10.0, 0.]], [[1.4, 0.], [2.6, 0.], [10.9, 0.]]])  # (E=2, N=3, K=2)
    out = {'family': 'mexit', 'task': 'regression', 'keep_rates': [1.], 'values': [values],
           'scales': [torch.zeros_like(values)], 'labels': torch.tensor([[1.2, 0.], [2.0, 0.], [11.0, 0.]])}
    at_first = [(None, 1e9)]  # every image leaves at the first exit (patience counts from the second: use scales)
    losses, _ = cal.point_losses(out, at_first, 'uncertainty', 'disagreement', tolerance=(0.5, 0.))
    assert losses[0].tolist() == [False, True, True]  # |1 - 1.4|, |2 - 2.6|, |10 - 10.9| against 0.5
    losses, _ = cal.point_losses(out, at_first, 'uncertainty', 'disagreement', tolerance=(0.5, 0.037))
    assert losses[0].tolist() == [False, True, False]  # 0.6 > 0.5 + 0.037 * 2.6; 0.9 <= 0.5 + 0.037 * 10.9
    losses, _ = cal.point_losses(out, at_first, 'uncertainty', 'error_growth', tolerance=(0.3, 0.))
    assert losses[0].tolist() == [False, False, True]  # growth 0.2 - 0.2, 0 - 0.6, 1 - 0.1 against 0.3
    losses, _ = cal.point_losses(out, [(None, None)], 'uncertainty', 'error_growth', tolerance=(0., 0.))
    assert not losses.any()  # full depth never differs from itself


@pytest.mark.parametrize('criterion', ['patience', 'uncertainty'])
def test_slimmed_regression_outputs_decide_as_forward_dynamic(criterion):
    """The values and scales collected at each keep rate give, for every (keep rate, threshold), each image's
    forward_dynamic answer."""
    from timm_exits.evaluation import regression_exit_choice
    model = spread_exit_heads(timm.create_model('test_vit_mexit_liferegress', task='regression', num_classes=2,
                                                exit_layers=(1, 2, 3), exit_criterion=criterion), 5.).eval()
    x = torch.randn(12, 3, 32, 32)
    out = cal.collect_calibration_outputs(model, DataLoader(TensorDataset(x, torch.zeros(12, 2)), batch_size=5),
                                          keep_rates=[1., 0.7])
    assert out['task'] == 'regression' and out['values'][1].shape == (4, 12, 2)
    for i, rate in enumerate(out['keep_rates']):
        scales = out['scales'][i][:-1].amax(-1) if criterion == 'uncertainty' else (
            out['values'][i][1:] - out['values'][i][:-1]).abs().amax(-1)
        for t in torch.quantile(scales.flatten(), torch.tensor([0.2, 0.5, 0.8])).tolist():
            first = regression_exit_choice(out['values'][i], out['scales'][i], criterion, t, model.exit_patience)
            with torch.no_grad():
                want = model.forward_dynamic(x, threshold=t, keep_rate=rate)
            torch.testing.assert_close(out['values'][i][first, torch.arange(12)], want.logits, rtol=1e-5, atol=1e-5)
            assert (torch.tensor(model.exit_layers)[first] == want.exit_layer).all()


def _regression_model(criterion: str = 'patience') -> torch.nn.Module:
    return spread_exit_heads(timm.create_model('test_vit_mexit', task='regression', num_classes=1,
                                               exit_layers=(1, 2, 3), exit_criterion=criterion), 5.).eval()


def _count_loader(n: int = 96, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), 3 * torch.rand(n, generator=g)),
                      batch_size=32)


@pytest.mark.parametrize('name,criterion', [('test_vit_mexit', 'patience'), ('test_vit_mexit', 'uncertainty'),
                                            ('test_vit_mexit_liferegress', 'patience')])
def test_regression_models_are_calibrated_and_the_choice_becomes_the_default(name, criterion):
    model = spread_exit_heads(timm.create_model(name, task='regression', num_classes=1, exit_layers=(1, 2, 3),
                                                exit_criterion=criterion), 5.).eval()
    result = timm_exits.calibrate(model, _count_loader(), epsilon=0.3, delta=0.2, tolerance=0.5,
                                  keep_rates=[1., 0.8] if 'liferegress' in name else None)
    assert result['task'] == 'regression' and result['tolerance'] == 0.5 and result['tolerance_rel'] == 0.
    assert result['criterion'] == criterion and (result.get('exit_patience') == 1) == (criterion == 'patience')
    assert result['threshold'] is not None and 0 <= result['empirical_risk'] <= 0.3 and result['mean_cost'] < 1.
    assert model.calibration == result and model.threshold == result['threshold']
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        kwargs = {'keep_rate': result['keep_rate']} if 'liferegress' in name else {}
        torch.testing.assert_close(model(x), model(x, threshold=result['threshold'], **kwargs), rtol=0, atol=0)


def test_the_regression_calibration_is_recorded_where_users_meet_it(tmp_path):
    """A calibrated regression checkpoint: its threshold (target units, may exceed 1) is the loaded model's default,
    eval.json repeats it, the card states the tolerance, the ONNX manifest carries it."""
    from safetensors.torch import save_file
    from timm_exits import hub
    from timm_exits.evaluation import evaluate
    from timm_exits.export import main as export_main
    from timm_exits.runtime import ExitSession
    model = _regression_model()
    kwargs = {'exit_layers': [1, 2, 3], 'task': 'regression', 'exit_criterion': 'patience'}
    meta = {'model': 'test_vit_mexit', 'model_kwargs': kwargs, 'num_classes': 1, 'format': 1}
    save_file(model.state_dict(), str(tmp_path / 'plain.safetensors'), metadata={METADATA_KEY: json.dumps(meta)})
    result = timm_exits.calibrate(model, _count_loader(), epsilon=0.3, delta=0.2, tolerance=3.,
                                  thresholds=[0., 0.5, 2., 5., 20.], apply=False)
    assert result['threshold'] > 1  # target units
    ck = tmp_path / 'model.safetensors'
    cal.write_calibrated(str(tmp_path / 'plain.safetensors'), result, str(ck), 'test_vit_mexit')
    loaded = timm.create_model('test_vit_mexit', num_classes=1, checkpoint_path=str(ck), **kwargs).eval()
    assert loaded.threshold == result['threshold'] and loaded.calibration == result
    evaluation = evaluate(loaded, _count_loader(32, 1), torch.device('cpu'), 'test_vit_mexit', 'counts')
    assert evaluation['calibration'] == result
    folder, _ = hub.push(ck, 'test_vit_mexit', 'me/counter', local_dir=tmp_path / 'hub', upload=False,
                         model_kwargs=dict(kwargs, num_classes=1))
    card = (folder / 'README.md').read_text()
    assert f'threshold {result["threshold"]:g}' in card
    assert "images whose early value differs from the full model's by more than 3 (target units)" in card
    assert 'epsilon = 0.3' in card
    assert export_main(['--model', 'test_vit_mexit', '--model-kwargs', 'exit_layers=(1,2,3)', 'task=regression',
                        'num_classes=1', '--checkpoint', str(ck), '--output', str(tmp_path / 'onnx')]) == 0
    manifest = json.loads((tmp_path / 'onnx' / 'manifest.json').read_text())
    assert manifest['calibration'] == result and manifest['default_threshold'] == result['threshold']
    assert ExitSession(tmp_path / 'onnx').threshold == result['threshold']


@pytest.mark.parametrize('kwargs,message', [
    ({}, "tolerance is required for a task='regression' model"),
    ({'tolerance': -1.}, r'tolerance must be a finite number >= 0 \(target units\), got -1.0'),
    ({'tolerance': float('nan')}, 'tolerance must be a finite number >= 0 .* got nan'),
    ({'tolerance_rel': True}, 'tolerance_rel must be a finite number >= 0 .* got True'),
    ({'tolerance': 1., 'risk': 'accuracy_drop'}, r"risk='accuracy_drop' is not a risk of task='regression' models \(a "
                                                 r"risk of task='classification' models\); allowed: \['disagreement', "
                                                 r"'error_growth'\]"),
])
def test_bad_regression_input_is_refused_before_the_data_is_read(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm_exits.calibrate(_regression_model(), None, epsilon=0.1, delta=0.1, **kwargs)


@pytest.mark.parametrize('kwargs,message', [
    ({'tolerance': 0.5}, "tolerance / tolerance_rel are for task='regression' models"),
    ({'risk': 'error_growth'}, r"risk='error_growth' is not a risk of task='classification' models \(a risk of "
                               r"task='regression' models\); allowed: \['disagreement', 'accuracy_drop'\]"),
    ({'order': 'random'}, r"order='random' is not known; allowed: \['fixed', 'learned'\]"),
])
def test_regression_arguments_on_a_classifier_are_refused(kwargs, message):
    model = timm.create_model('test_vit_mexit', num_classes=10)
    with pytest.raises(ValueError, match=message):
        timm_exits.calibrate(model, None, epsilon=0.1, delta=0.1, **kwargs)


def test_cli_names_the_bad_tolerance_and_calibrates_a_counter(tmp_path, capsys):
    from safetensors.torch import save_file
    model = _regression_model()
    meta = {'model': 'test_vit_mexit', 'num_classes': 1, 'format': 1,
            'model_kwargs': {'exit_layers': [1, 2, 3], 'task': 'regression'}}
    save_file(model.state_dict(), str(tmp_path / 'm.safetensors'), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(SystemExit) as e:
        cal.main(['--checkpoint', str(tmp_path / 'm.safetensors'), '--dataset', 'digits', '--split', 'val',
                  '--epsilon', '0.1', '--delta', '0.1', '--tolerance', '-2', '--output', str(tmp_path / 'out')])
    assert e.value.code == 2
    assert 'error: --tolerance must be a finite number >= 0 (target units), got -2.0' in capsys.readouterr().err
    result = cal.main(['--checkpoint', str(tmp_path / 'm.safetensors'), '--dataset', 'digits_count', '--split', 'val',
                       '--epsilon', '0.2', '--delta', '0.1', '--tolerance', '1', '--risk', 'error_growth', '--workers',
                       '0', '--no-progress', '--output', str(tmp_path / 'out')])
    record = json.loads((tmp_path / 'out' / 'calibration.json').read_text())
    assert record['risk'] == 'error_growth' and record['tolerance'] == 1. and record['n'] == 1000
    loaded, _, _ = cal.load_model(str(tmp_path / 'out' / 'model.safetensors'))
    assert loaded.task == 'regression' and loaded.threshold == result['threshold'] == record['threshold']


# --- exits + slimming: the order of testing chosen by the data -------------------------------------------------------

def _combined_outputs(n: int = 6000, slim_harm=(0., 0.04, 0.08, 0.15), seed: int = 0):
    """Fixed outputs of an exits + slimming model at keep rates 1, 0.9, 0.8, 0.7: the exits of ``_fixed_outputs``,
    slimming changing the final answer of a share ``slim_harm`` of the images (0.9 alone already disagrees on 4 %, as
    when slimming is poorly fitted); an exit that agreed with the full answer agrees with the slimmed one."""
    base = _fixed_outputs(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    full = base['preds'][0][-1]
    preds = []
    for q in slim_harm:
        wrong = torch.rand(n, generator=g) < q
        final = torch.where(wrong, (full + 1 + torch.randint(0, 9, (n,), generator=g)) % 10, full)
        p = torch.where(base['preds'][0] == full, final, base['preds'][0])
        p[-1] = final
        preds.append(p)
    return dict(base, family='mexit_liferegress', task='classification', keep_rates=[1., 0.9, 0.8, 0.7], preds=preds,
                scores=[base['scores'][0]] * len(slim_harm))


def _combined_costs(rate, t):
    """Exit costs shrinking with the keep rate; with a threshold each exit head passed costs 0.02 more."""
    base = torch.tensor([0.3, 0.55, 0.8, 1.0], dtype=torch.float64) * (0.3 + 0.7 * (1. if rate is None else rate))
    return base + (0.02 * torch.arange(1, 5) if t is not None else 0.)


def test_the_learned_order_keeps_the_guarantee_and_is_never_dearer_than_a_fixed_path():
    """Exits + slimming over 200 random calibration (1000) / test (5000) splits: the point certified with the order
    learned on a split of the calibration images (plus the fixed paths, Bonferroni) exceeds epsilon on the test images
    in at most delta of the splits; it is never dearer than what each fixed path certifies alone at its share of delta
    on the same images; and where slimming alone already costs risk it is much cheaper than the fixed pair path at the
    full delta (the path a fixed order would test)."""
    from types import SimpleNamespace
    out = _combined_outputs()
    eps, delta, n_cal, splits = 0.05, 0.1, 1000, 200
    model = SimpleNamespace(exit_criterion='confidence', task='classification')
    grid = cal.threshold_grid('confidence')[::4]
    fixed, candidates = cal._paths(model, 'mexit_liferegress', out, grid, None)
    assert [name for name, _ in fixed] == ['pair path', 'thresholds at keep rate 1']
    points = list(dict.fromkeys(pt for _, path in fixed + candidates for pt in path))
    index = {pt: j for j, pt in enumerate(points)}
    fixed = [(name, [index[pt] for pt in path]) for name, path in fixed]
    candidates = [(name, [index[pt] for pt in path]) for name, path in candidates]
    losses, costs = cal.point_table(out, points, costs=_combined_costs)
    n = losses.shape[1]
    g = torch.Generator().manual_seed(3)
    bad, learned_costs, pair_costs = 0, [], []
    for split in range(splits):
        perm = torch.randperm(n, generator=g)
        c, t = perm[:n_cal], perm[n_cal:]
        found = cal.search(losses[:, c], costs[:, c], fixed, candidates, eps, delta, 'learned', seed=split)
        assert found['order'] == 'learned' and math.isclose(sum(x['delta'] for x in found['tests']), delta)
        mean = costs[:, c].mean(1)
        j = min(found['certified'], key=lambda i: (float(mean[i]), -i))
        bad += bool(losses[j, t].float().mean() > eps)
        learned_costs.append(float(mean[j]))
        for (name, path), test in zip(fixed, found['tests']):
            k, _ = cal.ltt(losses[path][:, c], eps, test['delta'])  # the fixed path alone at its share
            if k:
                assert float(mean[j]) <= float(mean[path[:k]].min()) + 1e-12, (split, name)
        k, _ = cal.ltt(losses[fixed[0][1]][:, c], eps, delta)  # the pair path alone at the full delta
        pair_costs.append(float(mean[fixed[0][1][:k]].min()))
    assert bad <= binom.ppf(0.999, splits, delta), bad
    assert np.mean(learned_costs) < np.mean(pair_costs) - 0.1, (np.mean(learned_costs), np.mean(pair_costs))


def test_order_is_recorded_and_fixed_keeps_the_single_path():
    model = spread_exit_heads(timm.create_model('test_vit_mexit_liferegress', num_classes=10)).eval()
    outputs = cal.collect_calibration_outputs(model, _loader(), keep_rates=[1., 0.8, 0.6])
    learned = cal.calibrate_outputs(model, outputs, 0.3, 0.2)
    assert learned['order'] == 'learned' and learned['learn_share'] == cal.LEARN_SHARE
    assert [x['path'] for x in learned['tests']][:2] == ['pair path', 'thresholds at keep rate 1']
    assert learned['tests'][2]['path'].startswith('learned: ') and learned['tests'][2]['n'] == 96 - round(0.3 * 96)
    fixed = cal.calibrate_outputs(model, outputs, 0.3, 0.2, order='fixed')
    assert fixed['order'] == 'fixed' and [x['path'] for x in fixed['tests']] == ['pair path']
    assert fixed['tests'][0]['delta'] == 0.2 and 'learn_share' not in fixed
    mexit = spread_exit_heads(timm.create_model('test_vit_mexit', num_classes=10)).eval()
    one = cal.calibrate_outputs(mexit, cal.collect_calibration_outputs(mexit, _loader()), 0.3, 0.2, order='learned')
    assert one['order'] == 'fixed'  # one path: nothing to learn, the full delta on it


def test_gathered_outputs_follow_the_sets_order(monkeypatch):
    """``gather_outputs`` (each torchrun process's shard): rows land at their places in the whole set, whatever
    process read them, so a seeded split of the learned order sees the same table as one process; shards that
    repeat or miss an image are refused."""
    from timm_exits import calibrate as cal
    n, k = 7, 3
    full = {'family': 'mexit', 'task': 'classification', 'keep_rates': [1.], 'labels': torch.arange(n) * 10,
            'preds': [torch.arange(k * n).reshape(k, n)], 'scores': [torch.rand(k, n)]}
    shards = [[0, 3, 6], [1, 4], [2, 5]]

    def shard(idx):
        i = torch.tensor(idx)
        return {**full, 'labels': full['labels'][i], 'preds': [full['preds'][0][:, i]],
                'scores': [full['scores'][0][:, i]]}

    def fake_gather(parts, mine, shards=shards):
        for j, idx in enumerate(shards):
            ref = shard(idx)
            parts[j] = (torch.tensor(idx), {key: ref[key] for key in mine[1]})
    monkeypatch.setattr(cal.dist, 'get_world_size', lambda: len(shards))
    monkeypatch.setattr(cal.dist, 'all_gather_object', fake_gather)
    merged = cal.gather_outputs(shard(shards[1]), shards[1])
    assert torch.equal(merged['labels'], full['labels']) and torch.equal(merged['preds'][0], full['preds'][0])
    assert torch.equal(merged['scores'][0], full['scores'][0]) and merged['keep_rates'] == [1.]
    monkeypatch.setattr(cal.dist, 'all_gather_object', lambda p, m: fake_gather(p, m, [[0, 3, 6], [1, 4], [2, 4]]))
    with pytest.raises(ValueError, match='do not cover the set once'):
        cal.gather_outputs(shard(shards[0]), shards[0])
    with pytest.raises(ValueError, match='needs the index of its images'):
        cal.gather_outputs(shard(shards[0]), None)
