"""Bulk inference (``timm_exits.infer``): rows equal the model's own per-image exits, an unreadable image gets a row
that says why, a killed run resumes without losing or repeating a row, outputs are never overwritten silently, the
three kinds of input give the same rows, and Ray Data on a local Ray gives the rows of the in-process run."""
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
import timm_exits
from timm_exits.data import build_transform, resolve_data_cfg
from timm_exits.infer import SETTINGS, main as infer_main

from .conftest import spread_exit_heads

pq = pytest.importorskip('pyarrow.parquet', reason='bulk inference writes Parquet (pyarrow)')
ROOT = Path(timm_exits.__file__).parent.parent
THRESHOLD = 0.8
N_GOOD = 21


def _save(model, path, extra=None):
    from safetensors.torch import save_file
    meta = {'model': 'test_vit_mexit', 'model_kwargs': {}, **(extra or {})}
    save_file(model.state_dict(), str(path), metadata={'timm_exits': json.dumps(meta)})
    return str(path)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp('infer')
    torch.manual_seed(0)
    model = spread_exit_heads(timm.create_model('test_vit_mexit')).eval()
    checkpoint = _save(model, root / 'model.safetensors')
    calibrated = _save(model, root / 'calibrated.safetensors', {'calibration': {'threshold': 0.99}})
    images = root / 'images'
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):  # nested and flat, other sizes than the model's
        folder = images / ('sub' if i % 3 == 0 else '')
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(folder / f'img{i:02d}.png')
    (images / 'broken.png').write_bytes(b'not an image at all')
    return model, checkpoint, calibrated, images, root


def _read(path):
    return pq.read_table(path).to_pylist()


def _assert_same_rows(got, want, ignore=()):
    """Equal rows; probabilities and values within 1e-5 (a batch of other images may round them differently)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        close = ('probabilities', 'values', *ignore)
        assert {k: v for k, v in a.items() if k not in close} == {k: v for k, v in b.items() if k not in close}
        for key in ('probabilities', 'values'):
            if a.get(key) is not None or b.get(key) is not None:
                np.testing.assert_allclose(a[key], b[key], atol=1e-5)


def _reference(model, images, paths, threshold):
    """Top-5 classes, exit layer and cost of each path from the model's own forward_dynamic."""
    from PIL import Image
    transform = build_transform(model, False, data_config=resolve_data_cfg(model))
    x = torch.stack([transform(Image.open(images / p).convert('RGB')) for p in paths])
    with torch.no_grad():
        out = model.forward_dynamic(x, threshold=threshold)
    probs, idx = out.logits.softmax(-1).topk(5)
    return {p: (idx[i].tolist(), probs[i], int(out.exit_layer[i]), float(out.cost[i])) for i, p in enumerate(paths)}


def test_rows_match_the_model(setup, tmp_path):
    model, checkpoint, _, images, _ = setup
    summary = timm_exits.infer(checkpoint, images, tmp_path / 'out.parquet', threshold=THRESHOLD, batch_size=4,
                               part_size=5, progress=False)
    rows = _read(tmp_path / 'out.parquet')
    assert [r['index'] for r in rows] == list(range(N_GOOD + 1))
    bad = [r for r in rows if r['error']]
    assert [r['path'] for r in bad] == ['broken.png'] and 'not a readable image' in bad[0]['error']
    assert bad[0]['exit_layer'] is None and bad[0]['indices'] is None
    good = [r for r in rows if not r['error']]
    ref = _reference(model, images, [r['path'] for r in good], THRESHOLD)
    for r in good:
        indices, probs, exit_layer, cost = ref[r['path']]
        assert r['indices'] == indices and r['labels'] == [str(i) for i in indices]
        np.testing.assert_allclose(r['probabilities'], probs.numpy(), atol=1e-5)
        assert r['exit_layer'] == exit_layer and r['cost'] == pytest.approx(cost, abs=1e-6)
    exits = [r['exit_layer'] for r in good]
    assert len(set(exits)) > 1, 'the threshold should split the images over several exits'
    assert summary['per_exit'] == {str(k): exits.count(k) for k in sorted(set(exits))}
    assert summary['unreadable'] == 1 and summary['answered'] == N_GOOD
    assert summary['mean_cost'] == pytest.approx(np.mean([r['cost'] for r in good]), rel=1e-6)
    assert not (tmp_path / 'out.parquet.parts').exists()
    meta = json.loads(pq.read_schema(tmp_path / 'out.parquet').metadata[b'timm_exits'])
    assert meta['summary'] == {k: summary[k] for k in meta['summary']} and meta['settings']['threshold'] == THRESHOLD


def test_calibrated_point_is_the_default(setup, tmp_path):
    _, checkpoint, calibrated, images, _ = setup
    default = timm_exits.infer(calibrated, images, tmp_path / 'a.parquet', progress=False)
    explicit = timm_exits.infer(checkpoint, images, tmp_path / 'b.parquet', threshold=0.99, progress=False)
    full = timm_exits.infer(checkpoint, images, tmp_path / 'c.parquet', progress=False)
    _assert_same_rows(_read(tmp_path / 'a.parquet'), _read(tmp_path / 'b.parquet'))
    assert default['per_exit'] == explicit['per_exit'] != full['per_exit']
    budget = timm_exits.infer(calibrated, images, tmp_path / 'd.parquet', budget=0.6, threshold=0., progress=False)
    assert budget['mean_cost'] <= 0.6 + 1e-6


class _Killed(Exception):
    pass


def test_killed_run_resumes_without_loss_or_repeat(setup, tmp_path):
    _, checkpoint, _, images, _ = setup
    out = tmp_path / 'out.parquet'
    kwargs = dict(threshold=THRESHOLD, batch_size=3, part_size=4, progress=False)
    reference = timm_exits.infer(checkpoint, images, tmp_path / 'ref.parquet', **kwargs)
    written = []

    def kill_after_two(k):
        written.append(k)
        if len(written) == 2:
            raise _Killed()

    with pytest.raises(_Killed):
        timm_exits.infer(checkpoint, images, out, on_part=kill_after_two, **kwargs)
    parts = out.with_name('out.parquet.parts')
    assert sorted(p.name for p in parts.iterdir()) == ['part-00000.parquet', 'part-00001.parquet', SETTINGS]
    assert not out.exists()
    with pytest.raises(ValueError, match='other settings .*threshold.*--overwrite'):
        timm_exits.infer(checkpoint, images, out, **{**kwargs, 'threshold': 0.9})
    again = []
    summary = timm_exits.infer(checkpoint, images, out, on_part=again.append, **kwargs)
    assert summary['resumed_parts'] == 2 and again == [2, 3, 4, 5]  # 22 images in parts of 4: the 4 missing ones
    _assert_same_rows(_read(out), _read(tmp_path / 'ref.parquet'))
    run_keys = ('output', 'resumed_parts', 'computed', 'images_per_s')
    assert summary['computed'] == N_GOOD + 1 - 8 and reference['computed'] == N_GOOD + 1
    assert {k: v for k, v in summary.items() if k not in run_keys} == \
        {k: v for k, v in reference.items() if k not in run_keys}


def test_existing_output_refused_or_overwritten(setup, tmp_path):
    _, checkpoint, _, images, _ = setup
    out = tmp_path / 'out.parquet'
    out.write_bytes(b'someone else\'s file')
    with pytest.raises(ValueError, match='exists; pass --overwrite'):
        timm_exits.infer(checkpoint, images, out, progress=False)
    assert out.read_bytes() == b'someone else\'s file'
    timm_exits.infer(checkpoint, images, out, overwrite=True, progress=False)
    assert len(_read(out)) == N_GOOD + 1
    with pytest.raises(ValueError, match='exists; pass --overwrite'):  # a finished run is not run again silently
        timm_exits.infer(checkpoint, images, out, progress=False)


def test_list_and_tables_give_the_same_rows(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    _, checkpoint, _, images, _ = setup
    threads = torch.get_num_threads()
    timm_exits.infer(checkpoint, images, tmp_path / 'folder.parquet', threshold=THRESHOLD, progress=False,
                     torch_threads=threads + 1)
    assert torch.get_num_threads() == threads  # the run's threads, then the caller's again
    rows = _read(tmp_path / 'folder.parquet')
    paths = [str(images / r['path']) for r in rows]
    (tmp_path / 'list.txt').write_text('# images\n' + '\n'.join(paths) + '\n\n')
    pq.write_table(pa.table({'id': list(range(len(paths))), 'file': paths}), tmp_path / 'paths.parquet')
    pcsv.write_csv(pa.table({'file': paths}), tmp_path / 'paths.csv')
    for source, column in (('list.txt', 'path'), ('paths.parquet', 'file'), ('paths.csv', 'file')):
        out = tmp_path / f'{source}.parquet'
        timm_exits.infer(checkpoint, tmp_path / source, out, threshold=THRESHOLD, path_column=column, progress=False)
        got = _read(out)
        assert [r['path'] for r in got] == paths, source
        _assert_same_rows(got, rows, ignore=('path', 'error'))
    with pytest.raises(ValueError, match="--path-column 'path' is not a column .*'id', 'file'"):
        timm_exits.infer(checkpoint, tmp_path / 'paths.parquet', tmp_path / 'x.parquet', progress=False)


def test_regression_model_writes_values(tmp_path, setup):
    _, _, _, images, _ = setup
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=2).eval()
    from safetensors.torch import save_file
    meta = {'model': 'test_vit_mexit', 'model_kwargs': {'task': 'regression'}, 'num_classes': 2}
    save_file(model.state_dict(), str(tmp_path / 'r.safetensors'), metadata={'timm_exits': json.dumps(meta)})
    timm_exits.infer(tmp_path / 'r.safetensors', images, tmp_path / 'r.parquet', progress=False)
    rows = [r for r in _read(tmp_path / 'r.parquet') if not r['error']]
    assert 'indices' not in rows[0] and all(len(r['values']) == 2 for r in rows)
    from PIL import Image
    transform = build_transform(model, False, data_config=resolve_data_cfg(model))
    with torch.no_grad():
        ref = model.forward_dynamic(transform(Image.open(images / rows[0]['path']).convert('RGB'))[None])
    np.testing.assert_allclose(rows[0]['values'], ref.logits[0].numpy(), atol=1e-5)
    # a counter of crops (the counting protocol its checkpoint records) is refused: one model input per image
    meta['data_config'] = {'counting': {'crop': 32, 'resize': [96, 64]}}
    save_file(model.state_dict(), str(tmp_path / 'c.safetensors'), metadata={'timm_exits': json.dumps(meta)})
    with pytest.raises(ValueError, match='it counts crops'):
        timm_exits.infer(tmp_path / 'c.safetensors', images, tmp_path / 'c.parquet', progress=False)
    assert not (tmp_path / 'c.parquet').exists()


@pytest.mark.parametrize('argv, message', [
    (['--data-dir', '{d}/empty'], "error: --data-dir '{d}/empty' holds no image"),
    (['--data-dir', '{d}/nowhere'], "error: --data-dir '{d}/nowhere' is neither a folder"),
    (['--checkpoint', '{d}/missing.safetensors'], 'error: --checkpoint: checkpoint {d}/missing.safetensors does not'),
    (['--keep-rate', '0.5'], 'error: --keep-rate applies to a model with patch slimming; test_vit_mexit has none'),
    (['--budget', '0.01'], 'error: budget=0.01 is below the cheapest exit'),
    (['--threshold', '-1'], 'argument --threshold: must be a finite number >= 0, got -1'),
    (['--part-size', '0'], 'argument --part-size: must be an integer >= 1, got 0'),
    (['--ray-address', '127.0.0.1:{port}'], "error: --ray-address '127.0.0.1:{port}' does not answer"),
])
def test_cli_errors(setup, tmp_path, capsys, argv, message):
    _, checkpoint, _, images, _ = setup
    (tmp_path / 'empty').mkdir()
    with socket.socket() as s:  # a port nothing listens at
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    base = {'--checkpoint': checkpoint, '--data-dir': str(images), '--output': str(tmp_path / 'out.parquet')}
    given = [a.format(d=tmp_path, port=port) for a in argv]
    for flag, value in base.items():
        if flag not in given:
            given += [flag, value]
    with pytest.raises(SystemExit) as e:
        infer_main(given + ['--no-progress', '--workers', '0'])
    assert e.value.code == 2
    assert message.format(d=tmp_path, port=port) in capsys.readouterr().err
    assert not (tmp_path / 'out.parquet').exists() and not (tmp_path / 'out.parquet.parts').exists()


def test_cli_run(setup, tmp_path, caplog):
    _, checkpoint, _, images, _ = setup
    import logging
    caplog.set_level(logging.INFO)
    out = str(tmp_path / 'o.parquet')
    summary = infer_main(['--checkpoint', checkpoint, '--data-dir', str(images), '--output', out,
                          '--threshold', str(THRESHOLD), '--top-k', '2', '--no-progress'])
    rows = _read(tmp_path / 'o.parquet')
    assert all(len(r['indices']) == 2 for r in rows if not r['error'])
    assert f'{summary["answered"]} answered, 1 unreadable; mean cost' in caplog.text


@pytest.mark.slow
def test_ray_data_gives_the_in_process_rows(setup, tmp_path):
    ray = pytest.importorskip('ray', reason='the ray extra (ray[data]) is not installed')
    pytest.importorskip('ray.data', reason='the ray extra (ray[data]) is not installed')
    _, checkpoint, _, images, _ = setup
    kwargs = dict(threshold=THRESHOLD, batch_size=4, part_size=6, progress=False)
    local = timm_exits.infer(checkpoint, images, tmp_path / 'local.parquet', **kwargs)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace='timm_exits_tests',
             _node_ip_address='127.0.0.1', runtime_env={'env_vars': {'PYTHONPATH': str(ROOT)}})
    try:
        killed = []

        def kill_after_one(k):
            killed.append(k)
            raise RuntimeError('killed')

        with pytest.raises(RuntimeError, match='killed'):
            timm_exits.infer(checkpoint, images, tmp_path / 'ray.parquet', ray=True, ray_actors=2,
                             on_part=kill_after_one, **kwargs)
        summary = timm_exits.infer(checkpoint, images, tmp_path / 'ray.parquet', ray=True, ray_actors=2, **kwargs)
    finally:
        ray.shutdown()
    assert summary['resumed_parts'] == 1
    _assert_same_rows(_read(tmp_path / 'ray.parquet'), _read(tmp_path / 'local.parquet'))
    assert summary['per_exit'] == local['per_exit']
