"""``benchmarks/digits_count_study.py --quick``: the trained and the label-free fitted exit sets on one backbone and
their certified thresholds. Checks the fields the README tables read and that every reported figure (per-exit MAE,
test violation rate, error growth, mean cost, MAE at the certified point) equals its recomputation from the saved
per-image values; not the figures themselves (one epoch on 128 canvases learns little)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location('digits_count_study', ROOT / 'benchmarks' / 'digits_count_study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _floats(text: str) -> np.ndarray:
    """The saved float32 values (one line, exact) as float64, as the library computes with them."""
    return np.array(text.split(), dtype=np.float32).astype(np.float64)


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    study = _study()
    out, docs = tmp_path_factory.mktemp('run'), tmp_path_factory.mktemp('docs')
    threads = torch.get_num_threads()
    try:
        returned = study.main(['--quick', '--output', str(out), '--docs', str(docs), '--no-resume'])
    finally:
        torch.set_num_threads(threads)
    return study, returned, json.loads((docs / 'digits_count_exit_sets.json').read_text())


def test_fields_and_round_trip(quick_run):
    study, returned, data = quick_run
    assert returned['exit_sets'] == data  # the returned result is what was written
    assert data['quick'] is True and data['epochs'] == data['fit_epochs'] == 1
    assert data['sizes'] == study.QUICK_SIZES and data['tolerance'] == 0.5 and data['delta'] == 0.1
    assert data['command'].startswith('python benchmarks/digits_count_study.py --quick --output ')
    assert len(data['seeds']) == 1 and data['seeds'][0]['seed'] == 0
    assert study.DigitsCountDataset.sizes == {'train': 3000, 'val': 1000, 'test': 1000}  # restored after --quick
    points = [(c, r, e) for c, _, _ in study.CRITERIA for r in study.RISKS for e in study.EPSILONS]
    for name in study.EXIT_SETS:
        got = data['seeds'][0]['sets'][name]['points']
        assert [(p['criterion'], p['risk'], p['epsilon']) for p in got] == points
        assert [(p['criterion'], p['risk'], p['epsilon']) for p in data['summary'][name]['points']] == points
    table = study.exit_sets_markdown(data)
    assert table.count('\n| trained |') == table.count('\n| fitted |') == len(points)


def test_same_backbone_same_final_count(quick_run):
    _, _, data = quick_run
    seed = data['seeds'][0]
    trained, fitted = seed['sets']['trained'], seed['sets']['fitted']
    assert trained['test_values'][-1] == fitted['test_values'][-1]  # fit leaves the backbone and final head alone
    assert trained['exits'][-1]['mae'] == fitted['exits'][-1]['mae']
    assert trained['test_values'][0] != fitted['test_values'][0]  # the early exits are not the same ones
    assert len(seed['fit_log']) == 1 and set(seed['fit_log'][0]['deviation']) == {'2', '3', '4', '5'}


def test_figures_recomputed_from_per_image_values(quick_run):
    _, _, data = quick_run
    seed, tol = data['seeds'][0], data['tolerance']
    target = _floats(seed['test_target'])
    checked = 0
    for name, s in seed['sets'].items():
        values = np.stack([_floats(v) for v in s['test_values']])  # (E, N)
        num_exits, n = values.shape
        assert n == len(target) == 120 and num_exits == len(s['exits'])
        for e, row in zip(values, s['exits']):
            assert row['mae'] == pytest.approx(np.abs(e - target).mean(), abs=1e-12)
            assert row['rmse'] == pytest.approx(np.sqrt(((e - target) ** 2).mean()), abs=1e-12)
        for p in s['points']:
            if 'refused' in p:
                continue
            first = np.array([int(c) for c in p['exit']])
            assert len(first) == n and first.max() < num_exits
            if p['threshold'] is None:
                assert (first == num_exits - 1).all()
            early, full = values[first, np.arange(n)], values[-1]
            assert p['test_violation'] == pytest.approx(np.mean(np.abs(early - full) > tol), abs=1e-12)
            growth = np.abs(early - target) - np.abs(full - target) > tol
            assert p['test_error_growth'] == pytest.approx(growth.mean(), abs=1e-12)
            assert p['test_mae'] == pytest.approx(np.abs(early - target).mean(), abs=1e-12)
            assert p['test_mean_cost'] == pytest.approx(np.asarray(p['costs'])[first].mean(), abs=1e-12)
            assert 0 < p['val_mean_cost'] <= max(p['costs']) and p['p_value'] <= data['delta']
            assert p['val_risk'] <= p['epsilon'] or p['threshold'] is None
            checked += 1
        summary = data['summary'][name]
        for p, q in zip(s['points'], summary['points']):  # one seed: the summary's mean is the seed's value
            assert q['refused'] == ('refused' in p)
            if 'refused' not in p:
                assert q['thresholds'] == [p['threshold']] and q['test_violation'][0] == p['test_violation']
    assert checked > 0
