"""benchmarks/bulk_infer.py in --quick mode without Ray: the twin's checkpoint sends about half the images to the first
exit, both candidates answer every image, the JSON carries the ratios the README reports. No timing is asserted."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bulk_infer.py'
pytest.importorskip('pyarrow', reason='bulk inference writes Parquet (pyarrow)')


def _module():
    spec = importlib.util.spec_from_file_location('bulk_infer', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_fields(tmp_path, capsys):
    out = tmp_path / 'bulk.json'
    result = _module().main(['--quick', '--no-ray', '--output', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result['images_per_s']) == {'parent', 'twin'} and 'ray_vs_local' not in result
    parent, twin = result['summaries']['parent'], result['summaries']['twin']
    assert parent['answered'] == twin['answered'] == 48 and parent['unreadable'] == 0
    assert parent['per_exit'] == {'12': 48} and parent['mean_cost'] == 1.0
    first = str(result['exit_layers'][0])
    assert abs(twin['per_exit'][first] - 24) <= 2  # the calibrated threshold: the median first-exit score
    assert result['flops_bound'] == pytest.approx(1 / twin['mean_cost']) and 1 < result['flops_bound'] < 2
    assert result['efficiency'] == pytest.approx(result['speedup'] / result['flops_bound'])
    assert result['steady_efficiency'] == pytest.approx(result['steady_speedup'] / result['flops_bound'])
    assert len(result['seconds']['twin']) == 1 and result['steady_images_per_s']['twin'] > 0
    printed = capsys.readouterr().out
    assert '| whole command | 48 |' in printed and '| images only | 48 |' in printed
