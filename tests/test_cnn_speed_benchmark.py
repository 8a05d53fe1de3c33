"""benchmarks/cnn_speed.py in --quick mode on a tiny CNN: the table and JSON carry every field, the full-depth model
gives the parent's logits exactly, the budget sends every image to the middle exit, and a model without a multi-exit
twin is skipped. No timing is asserted."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'cnn_speed.py'


def _module():
    spec = importlib.util.spec_from_file_location('cnn_speed', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_fields(tmp_path, capsys):
    bench = _module()
    out = tmp_path / 'cnn_speed.json'
    result = bench.main(['--quick', '--models', 'resnet10t', 'no_such_parent', '--rounds', '2',
                         '--output', str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    config = result['config']
    assert config['img_size'] == 64 and config['rounds'] == 2 and config['models'] == ['resnet10t', 'no_such_parent']
    assert list(result['skipped']) == ['no_such_parent'] and 'skipping no_such_parent' in printed
    (row,) = result['results']
    assert row['model'] == 'resnet10t' and row['input_shape'] == [3, 64, 64]
    assert row['full_max_abs_diff'] == 0.0
    assert row['forced_all_at_mid_exit'] and row['exit_vs_trunc_max_abs_diff'] == 0.0
    k = row['mid_exit']
    assert k in row['exit_layers'][:-1] and row['budget'] == row['exit_costs'][row['exit_layers'].index(k)]
    for key in ('parent', 'trunc', 'exit', 'full'):
        assert len(row['times_ms'][key]) == 2 and row['ms'][key] > 0
    assert set(row['ms_mixed']) == {'parent', 'mixed', 'oracle'}
    assert row['oracle_max_abs_diff'] < 1e-4  # the time ideal computes the same answers
    mixed = row['mixed']
    assert 0 < mixed['mean_cost'] <= 1 and mixed['ideal_speedup'] == 1 / mixed['mean_cost']
    assert abs(sum(mixed['exit_fractions'].values()) - 1) < 1e-9
    for key in ('exit_vs_trunc', 'mixed_efficiency', 'mixed_vs_oracle', 'full_vs_parent', 'exit_speedup',
                'trunc_speedup'):
        assert row[key] > 0
    table = result['table']
    assert table in printed
    head, rule, line = table.split('\n')[:3]
    assert head == '| ' + ' | '.join(bench.TABLE_HEAD) + ' |'
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert len(cells) == len(bench.TABLE_HEAD) and cells[0] == 'resnet10t' and cells[-1] == '0'
    assert 'skipped no_such_parent' in table
