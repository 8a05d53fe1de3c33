"""The HTTP load generator (``timm_exits.serving.http_load``) against a local Ray Serve on 127.0.0.1: the parent and
its early-exit twin, one and two replicas, every request answered through the proxy, ratios to the parent with as
many replicas in the same round (timings themselves are not asserted); bad arguments are refused before Ray starts."""
import json

import pytest

pytest.importorskip('ray.serve', reason='the serve extra (ray[serve]) is not installed')
from timm_exits.serving.http_load import CONFIGS, main  # noqa: E402

pytestmark = pytest.mark.slow


def test_http_load_runs_bounded(tmp_path, capsys):
    out = tmp_path / 'http.json'
    assert main(['--model', 'test_vit', '--img-size', '32', '--num-classes', '10', '--requests', '6', '--rounds', '1',
                 '--loads', '0.5', '--report-load', '0.5', '--max-seconds', '10', '--max-batch-size', '4',
                 '--replicas', '1', '2', '--concurrency', '8', '--output', str(out)]) == 0
    result = json.loads(out.read_text())
    runs = result['runs']
    assert sorted((r['config'], r['replicas'], str(r['load'])) for r in runs) == sorted(
        (c, n, str(load)) for c, _ in CONFIGS for n in (1, 2) for load in (None, 0.5))
    assert all(r['answered'] == r['submitted'] == 6 for r in runs)
    assert result['torch_threads'] == {'1': max(1, result['cpu_count']), '2': max(1, result['cpu_count'] // 2)}
    for n in ('1', '2'):
        for load in ('saturation', '0.5'):
            summary = result['summary'][n][load]
            assert summary['parent']['throughput_ratio'] == 1. and summary['parent']['mean_cost'] == 1.
            assert summary['early']['mean_cost'] < 1.  # the twin's threshold sends about half to the first exit
    printed = capsys.readouterr().out
    assert '1 replica (HTTP)' in printed and '2 replicas (HTTP)' in printed


@pytest.mark.parametrize('args,message', [
    (['--replicas', '0'], '--replicas must be distinct counts >= 1'),
    (['--replicas', '1', '1'], '--replicas must be distinct counts >= 1'),
    (['--concurrency', '0'], '--concurrency must be >= 1'),
    (['--loads', '0.5', '--report-load', '0.7'], '--report-load 0.7 must be one of --loads'),
])
def test_bad_arguments_are_refused(args, message, capsys):
    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err
