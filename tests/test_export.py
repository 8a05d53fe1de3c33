"""Staged ONNX export and the ONNX Runtime loop: same exits and logits as eager ``forward_dynamic``, static graphs equal
to eager, and every way an export folder can be wrong refused clearly."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
from timm_exits.export import export_onnx, main as export_main

from .conftest import spread_exit_heads

ort = pytest.importorskip('onnxruntime', reason='the deploy extra (onnx, onnxruntime, onnxscript) is not installed')
pytest.importorskip('onnxscript', reason='the deploy extra (onnx, onnxruntime, onnxscript) is not installed')
from timm_exits.runtime import ExitSession  # noqa: E402  (needs onnxruntime)


def _check_same(model, session, x, threshold, budget, **eager):
    ref = model.forward_dynamic(x, threshold=threshold, budget=budget, **eager)
    out = session(x, threshold=threshold, budget=budget)
    assert out.exit_layer.tolist() == ref.exit_layer.tolist(), (threshold, budget)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.cost, ref.cost.float(), atol=1e-6, rtol=0)
    return ref


@pytest.fixture(scope='module')
def random_export(tmp_path_factory):
    torch.manual_seed(0)
    model = spread_exit_heads(timm.create_model('test_vit_mexit')).eval()
    folder = export_onnx(model, tmp_path_factory.mktemp('onnx') / 'random', 'test_vit_mexit')
    return model, folder


@pytest.fixture(scope='module')
def digits_export(tmp_path_factory):
    """The tiny model trained a few epochs on scikit-learn's digits with MEViT's sandwich rule: real, spread scores."""
    from timm_exits.tasks import MEViTTask
    from timm_exits.data import DigitsDataset
    torch.manual_seed(0)
    model = timm.create_model('test_vit_mexit', exit_layers=(2, 3))
    data = DigitsDataset('train', 32)
    task = MEViTTask(model, num_sampled=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    task.train()
    for _ in range(3):
        for i in range(0, len(data), 64):
            loss = task(data.images[i:i + 64], data.targets[i:i + 64])['loss']
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    folder = export_onnx(model, tmp_path_factory.mktemp('onnx') / 'digits', 'test_vit_mexit')
    return model, folder, DigitsDataset('test', 32).images[:128]


@pytest.mark.parametrize('threshold', [None, 0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize('budget', [None, 0.8, 1.0])
def test_runtime_matches_eager_random(random_export, threshold, budget):
    model, folder = random_export
    session = ExitSession(folder)
    torch.manual_seed(1)  # another input than the export's example
    with torch.no_grad():
        _check_same(model, session, torch.randn(24, 3, 32, 32), threshold, budget)


def test_runtime_matches_eager_digits(digits_export):
    model, folder, images = digits_export
    session = ExitSession(folder)
    with torch.no_grad():
        scores = model.exit_scores(2, model.forward_exits(images)[0])
        threshold = float(scores.quantile(0.5))  # about half the images leave at the first exit
        ref = _check_same(model, session, images, threshold, None)
        assert 0 < int((ref.exit_layer == 2).sum()) < len(images)
        _check_same(model, session, images, threshold, 0.8)
        _check_same(model, session, images, None, 0.6)


def test_runtime_numpy_and_batch_invariance(random_export):
    model, folder = random_export
    session = ExitSession(folder)
    x = torch.randn(6, 3, 32, 32)
    batch = session(x.numpy(), threshold=0.6)
    assert isinstance(batch.logits, np.ndarray) and batch.exit_layer.dtype == np.int64
    for i in range(len(x)):
        one = session(x[i:i + 1].numpy(), threshold=0.6)
        assert one.exit_layer[0] == batch.exit_layer[i]
        np.testing.assert_allclose(one.logits[0], batch.logits[i], atol=1e-5)


def test_session_options_no_spinning_by_default(random_export):
    """Every graph of an ExitSession runs without thread-pool spinning (consecutive segments would steal each other's
    cores); a caller's own options are used as given, spinning included."""
    model, folder = random_export
    x = torch.randn(3, 3, 32, 32)

    def entry(sess, key):
        try:
            return sess.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # onnxruntime: the key was never set (spinning on, its default)
            return None

    session = ExitSession(folder)
    graphs = session.segments + session.heads
    assert len(graphs) == len(model.exit_layers) * 2
    for sess in graphs:
        assert entry(sess, 'session.intra_op.allow_spinning') == '0'
        assert entry(sess, 'session.inter_op.allow_spinning') == '0'
    own = ort.SessionOptions()
    own.intra_op_num_threads = 1
    own.add_session_config_entry('session.intra_op.allow_spinning', '1')
    mine = ExitSession(folder, session_options=own)
    for sess in mine.segments + mine.heads:
        options = sess.get_session_options()
        assert options.intra_op_num_threads == 1
        assert entry(sess, 'session.intra_op.allow_spinning') == '1'
        assert entry(sess, 'session.inter_op.allow_spinning') is None
    np.testing.assert_allclose(mine(x).logits, session(x).logits, atol=1e-5, rtol=0)
    _check_same(model, session, x, 0.5, None)


def test_manifest(random_export):
    model, folder = random_export
    manifest = json.loads((folder / 'manifest.json').read_text())
    assert manifest['mode'] == 'staged' and manifest['exit_layers'] == list(model.exit_layers)
    assert manifest['exit_costs'] == pytest.approx(list(model.exit_costs))
    assert manifest['threshold_costs'] == pytest.approx(list(model.threshold_costs))
    assert manifest['input_size'] == [3, 32, 32] and manifest['criterion'] == 'confidence'
    assert sorted(manifest['files']) == sorted(p.name for p in folder.iterdir() if p.name != 'manifest.json')
    assert [s['blocks'] for s in manifest['segments']] == [[1, 2], [3, 3], [4, 4]]


@pytest.mark.parametrize('name,kwargs,export_kwargs', [
    ('test_vit_liferegress', {}, dict(keep_rate=0.7)),
    ('test_vit_liferegress', {}, dict(budget=0.8)),
    ('test_vit_mexit', {}, dict(static=True, budget=0.8)),
    ('test_vit_mexit', {}, dict(static=True)),
])
def test_static_export_matches_eager(tmp_path, name, kwargs, export_kwargs):
    model = timm.create_model(name, **kwargs).eval()
    folder = export_onnx(model, tmp_path / 'static', name, **export_kwargs)
    session = ExitSession(folder)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        if name == 'test_vit_liferegress':
            ref = model(x, keep_rate=export_kwargs.get('keep_rate'), budget=export_kwargs.get('budget'))
        else:
            ref = model(x, budget=export_kwargs.get('budget'))
    out = session(x)
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match='static'):
        session(x, threshold=0.5)


def test_export_refuses(tmp_path):
    model = timm.create_model('test_vit_mexit').eval()
    with pytest.raises(ValueError, match='--budget fixes the exit of a --static graph'):
        export_onnx(model, tmp_path / 'a', budget=0.8)
    with pytest.raises(ValueError, match='--keep-rate applies to LifeRegress'):
        export_onnx(model, tmp_path / 'a', static=True, keep_rate=0.7)
    with pytest.raises(ValueError, match='multi-exit or LifeRegress'):
        export_onnx(timm.create_model('vit_tiny_patch16_224', depth=1), tmp_path / 'a')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('')
    with pytest.raises(FileExistsError, match='not empty'):
        export_onnx(model, tmp_path / 'full')


def test_killed_export_leaves_nothing(tmp_path, monkeypatch):
    import timm_exits.export as ex
    real, calls = ex._export_graph, []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt('killed')
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, '_export_graph', dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(timm.create_model('test_vit_mexit').eval(), tmp_path / 'out')
    assert list(tmp_path.iterdir()) == []


def test_session_refuses_bad_folders(random_export, digits_export, tmp_path):
    _, folder = random_export
    session = ExitSession(folder)
    with pytest.raises(ValueError, match=r'x must be images of shape \(B, 3, 32, 32\)'):
        session(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match='x must hold floating-point images'):
        session(np.zeros((2, 3, 32, 32), np.int64))
    for bad in (1.5, -0.1, float('nan')):
        with pytest.raises(ValueError, match=r'threshold must be a number in \[0, 1\]'):
            session(np.zeros((1, 3, 32, 32), np.float32), threshold=bad)
    with pytest.raises(ValueError, match='budget=0.1 is below the cheapest exit'):
        session(np.zeros((1, 3, 32, 32), np.float32), budget=0.1)

    with pytest.raises(FileNotFoundError, match='no manifest.json'):
        ExitSession(tmp_path)
    broken = tmp_path / 'missing'
    shutil.copytree(folder, broken)
    (broken / 'segment_2.onnx').unlink()
    with pytest.raises(FileNotFoundError, match='segment_2.onnx listed in manifest.json is missing'):
        ExitSession(broken)
    old = tmp_path / 'old'
    shutil.copytree(folder, old)
    manifest = json.loads((old / 'manifest.json').read_text())
    (old / 'manifest.json').write_text(json.dumps({**manifest, 'format': 99}))
    with pytest.raises(ValueError, match='export format 99 is not supported'):
        ExitSession(old)
    other = digits_export[1]  # same architecture, another export
    mixed = tmp_path / 'mixed'
    shutil.copytree(folder, mixed)
    shutil.copyfile(other / 'exit_3.onnx', mixed / 'exit_3.onnx')
    manifest = json.loads((mixed / 'manifest.json').read_text())
    manifest['files']['exit_3.onnx']['bytes'] = (mixed / 'exit_3.onnx').stat().st_size
    (mixed / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match='exit_3.onnx belongs to another export'):
        ExitSession(mixed)


def test_cli(tmp_path, capsys):
    from safetensors.torch import save_file
    model = spread_exit_heads(timm.create_model('test_vit_mexit', exit_layers=(2,))).eval()
    ckpt = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    out = tmp_path / 'export'
    assert export_main(['--model', 'test_vit_mexit', '--model-kwargs', 'exit_layers=(2,)', '--checkpoint', str(ckpt),
                        '--output', str(out)]) == 0
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        _check_same(model, ExitSession(out), x, 0.6, None)
    for argv, message in [
        (['--model', 'no_such_model', '--output', str(tmp_path / 'n')], 'Unknown model'),
        (['--model', 'test_vit_mexit', '--output', str(out)], 'exists and is not empty'),
        (['--model', 'test_vit_mexit', '--output', str(tmp_path / 'm'), '--checkpoint', str(tmp_path / 'nope')],
         'does not exist'),
    ]:
        with pytest.raises(SystemExit) as e:
            export_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1, err


@pytest.mark.parametrize('parent', ['eva02_tiny_patch14_224', 'vit_base_patch16_siglip_224'])
def test_staged_export_of_other_parents(tmp_path, parent):
    """Rotary (Eva: the position embedding is a constant of every segment) and no-[CLS] parents stage as ViTs do."""
    import warnings
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = timm.create_model(f'{parent}_mexit', depth=4, embed_dim=48, num_heads=2, num_classes=5,
                                  img_size=56 if 'patch14' in parent else 64)
    model = spread_exit_heads(model).eval()
    session = ExitSession(export_onnx(model, tmp_path / 'onnx', f'{parent}_mexit'))
    with torch.no_grad():
        x = torch.randn(6, 3, *model.patch_embed.img_size)
        for threshold, budget in [(None, None), (0.5, None), (0.5, 0.9)]:
            _check_same(model, session, x, threshold, budget)


SLIM_PARENTS = [
    ('test_vit_mexit_liferegress', {}, 0.5),
    ('test_vit_mexit_liferegress', dict(exit_criterion='entropy'), 0.7),
    ('eva02_tiny_patch14_224_mexit_liferegress', dict(img_size=28, patch_size=7, depth=5, embed_dim=32, num_heads=2,
                                                      num_classes=10, exit_layers=(2, 3, 4), rope_type='mixed'), 0.4),
]


def _clear_threshold(scores: torch.Tensor, q: float) -> float:
    """A threshold near the q-quantile of ``scores`` halfway across the widest gap there, so that no image's decision
    hangs on float rounding (ONNX Runtime and eager differ by ~1e-6)."""
    s = scores.sort().values
    k = int(q * (len(s) - 1))
    k = max(range(max(k - 3, 0), min(k + 3, len(s) - 1)), key=lambda i: float(s[i + 1] - s[i]))
    return float(s[k] + s[k + 1]) / 2


@pytest.mark.parametrize('name,kwargs,rate', SLIM_PARENTS, ids=['vit-0.5', 'vit-entropy-0.7', 'eva-mixed-0.4'])
def test_runtime_matches_eager_exits_and_slimming(tmp_path, name, kwargs, rate):
    """The staged export of a model with exits and slimming at a keep rate: the runtime takes the eager exits with the
    eager logits (within 1e-4), thresholds and budgets (which pick the exit at that keep rate), a rotary parent's
    kept patches with their own rows."""
    torch.manual_seed(0)
    model = spread_exit_heads(timm.create_model(name, keep_rate=rate, **kwargs)).eval()
    session = ExitSession(export_onnx(model, tmp_path / 'slim'))
    assert session.manifest['keep_rate'] == rate and session.manifest['family'] == 'mexit_liferegress'
    torch.manual_seed(1)
    x = torch.randn(20, 3, *model.patch_embed.img_size)
    layers = set()
    with torch.no_grad():
        scores = model.exit_scores(model.exit_layers[0], model.forward_exits(x)[0])
        for threshold in (None, _clear_threshold(scores, 0.5), _clear_threshold(scores, 0.8)):
            for budget in (None, model.exit_costs_for(rate)[1], 1.):
                ref = _check_same(model, session, x, threshold, budget, keep_rate=rate)  # the budget picks the exit
                layers |= set(ref.exit_layer.tolist())
    assert len(layers) > 1  # the images really split between exits


def test_static_graph_of_exits_and_slimming(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('test_vit_mexit_liferegress').eval()
    session = ExitSession(export_onnx(model, tmp_path / 'static', static=True, keep_rate=0.6, budget=0.8))
    rate, layer = model.plan_budget(0.8, keep_rate=0.6)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_dynamic(x, budget=0.8, keep_rate=0.6)
    out = session(x)
    assert out.exit_layer.tolist() == [layer] * 3 and session.manifest['keep_rate'] == rate
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
