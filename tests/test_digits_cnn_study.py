"""Smoke test of ``benchmarks/digits_cnn_study.py``: its main with ``--quick`` (1 epoch each, a few digits) writes the
JSON with every field the README table reads (not the accuracies: one epoch on 16 images learns nothing)."""
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location('digits_cnn_study', ROOT / 'benchmarks' / 'digits_cnn_study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_field(tmp_path):
    study = _study()
    threads = torch.get_num_threads()
    try:
        summary = study.main(['--quick', '--seed', '3', '--json', str(tmp_path / 'study.json')])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / 'study.json').read_text())
    assert data['table'] == summary['table'] and data['quick'] is True and data['seed'] == 3
    assert data['epsilons'] == [0.01, 0.02, 0.05] and data['delta'] == 0.1
    assert (data['train_images'], data['calibration_images'], data['test_images']) == (16, 40, 40)
    assert set(data['models']) == {'resnet18', 'convnext_atto'}
    for name, r in data['models'].items():
        assert r['plain']['epochs'] == 1 and 0 <= r['plain']['test_accuracy'] <= 100
        assert r['plain']['seconds_per_epoch'] > 0
        n = len(r['exit_layers'])
        assert n >= 3 and len(r['exit_costs']) == len(r['threshold_costs']) == n and r['exit_costs'][-1] == 1.
        assert all(0 < a < b for a, b in zip(r['exit_costs'], r['exit_costs'][1:]))
        assert set(r['ways']) == {'fit', 'labels'}
        for way, w in r['ways'].items():
            assert w['epochs'] == 1 and len(w['seconds']) == 1 and w['seconds_per_epoch'] > 0 and len(w['log']) == 1
            assert w['backbone_identical'] is True and w['final_output_identical'] is True, (name, way)
            assert len(w['accuracy']) == n
            assert set(w['certified']) == {'0.01', '0.02', '0.05'}
            for eps, c in w['certified'].items():
                assert {'refused', 'threshold', 'mean_cost', 'accuracy', 'disagreement'} <= set(c)
                if not c['refused']:
                    assert 0 < c['mean_cost'] <= r['threshold_costs'][-1] and 0 <= c['disagreement'] <= 1
                    assert c['calibration_risk'] <= float(eps)
                    assert abs(sum(c['exit_shares']) - 1) < 1e-6
            assert name in data['table']
