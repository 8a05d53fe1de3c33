"""benchmarks/earlyon_compare.py --quick: both parents carry the same weights, the exits sit after the same blocks,
half of the images leave at the first exit; earlyon's side runs when it is installed and is skipped cleanly when not
(no timing asserted)."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'earlyon_compare.py'


def _module():
    spec = importlib.util.spec_from_file_location('earlyon_compare', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_timm_side(row):
    assert row['backbone_max_abs_diff'] == 0.  # torchvision's twin got timm's weights
    assert row['easy_fraction'] == .5
    first = row['exit_units'][0]
    assert set(row['timm_exits_exit_layers']) == {first, 8}  # resnet18: easy at the first exit, hard at full depth
    for key in ('b4', 'b1'):
        assert row[key]['timm_exits_speedup'] > 0 and set(row[key]['ms']) >= {'tv_parent', 'timm_parent', 'timm_exits'}


def test_quick_without_earlyon(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'earlyon', None)  # import earlyon -> ImportError
    rows = _module().main(['--quick'])
    assert 'earlyon is not installed' in capsys.readouterr().out
    _check_timm_side(rows[0])
    assert 'earlyon_speedup' not in rows[0]['b4'] and 'same_exits_b1' not in rows[0]


def test_quick_with_earlyon():
    pytest.importorskip('earlyon')
    rows = _module().main(['--quick'])
    row = rows[0]
    _check_timm_side(row)
    assert row['same_exits_b1']  # same images leave at the same exits in both libraries
    assert row['logits_max_abs_diff_b1'] < 1e-4
    assert row['earlyon_batched_exit_taken'] == -1  # a half-easy batch never leaves together
    assert row['b4']['earlyon_speedup'] > 0 and row['b1']['earlyon_speedup'] > 0
