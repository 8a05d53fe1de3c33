"""Fitting regression exits without labels (timm_exits.fit on task='regression' models): frozen parts bit-identical,
losses against hand-computed values, the cache, resume, the command line (checkpoint read by validate), DDP, the
options that do not apply refused."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import timm
import timm_exits
from timm_exits import fit as fit_module
from timm_exits.fit import FitModule, regression_distill_loss

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ['test_vit_mexit', 'test_vit_mexit_liferegress']


def _model(name: str = 'test_vit_mexit', seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault('exit_layers', (2, 3))
    return timm.create_model(name, task='regression', num_classes=1, **kwargs)


def _loader(n: int = 32, labels: str = 'none', seed: int = 0, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = {'none': torch.full((n,), -1), 'nan': torch.full((n,), math.nan),
         'some': torch.where(torch.arange(n) % 2 == 0, torch.rand(n, generator=g) * 5, torch.tensor(math.nan))}[labels]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


@pytest.mark.parametrize('name', FAMILIES)
@pytest.mark.parametrize('loss', ['l1', 'huber'])
def test_backbone_and_final_head_come_out_bit_identical(name, loss):
    model = _model(name, exit_drop_rate=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = timm_exits.fit(model, _loader(labels='some'), epochs=2, lr=1e-2, label_weight=0.5, loss=loss)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith(model.new_prefixes) for k in moved), sorted(moved)
    parts = {'.'.join(k.split('.')[:2]) for k in moved}
    # without slimming the final scale unit has nothing to learn (its error against the final value is 0): untouched
    want = {'exits.2', 'exits.3', 'uncertainty.2', 'uncertainty.3'} | (
        {'life.norm', 'life.proj', 'uncertainty.4'} if 'liferegress' in name else set())
    assert parts == want
    assert len(rows) == 2 and all(math.isfinite(r['loss']) for r in rows)
    labels = ['2', '3'] + (['final (soft-weighted)'] if 'liferegress' in name else [])
    assert list(rows[-1]['deviation']) == labels and 'agreement' not in rows[-1]
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_regression_distill_loss_by_hand():
    v = torch.tensor([[1., 0.], [3., 2.5], [0., 0.]])
    t = torch.tensor([[1.5, 0.], [0., 2.], [1., -4.]])
    y = torch.tensor([[2., 1.], [math.nan, 0.], [0., 0.]])  # image 1 has no label (a NaN)
    assert regression_distill_loss(v, t, 'l1').tolist() == pytest.approx([.25, 1.75, 2.5])
    assert regression_distill_loss(v, t, 'mse').tolist() == pytest.approx([.125, 4.625, 8.5])
    # Huber, delta 1: d^2 / 2 below 1, |d| - 1/2 above
    assert regression_distill_loss(v, t, 'huber').tolist() == pytest.approx([.0625, (2.5 + .125) / 2, (.5 + 3.5) / 2])
    got = regression_distill_loss(v, t, 'l1', y, .5)
    assert got.tolist() == pytest.approx([.25 + .5 * 1., 1.75, 2.5])
    one = regression_distill_loss(v[:, :1], t[:, :1], 'l1', torch.tensor([0., math.nan, 2.]), 2.)
    assert one.tolist() == pytest.approx([.5 + 2 * 1., 3., 1. + 2 * 2.])  # (B,) labels of a one-output model
    assert regression_distill_loss(t, t, 'huber').abs().max() == 0  # the teacher itself: nothing to learn
    with pytest.raises(ValueError, match=r"loss must be one of \['l1', 'huber', 'mse'\], got 'l2'"):
        regression_distill_loss(v, t, 'l2')
    with pytest.raises(ValueError, match=r'labels must be \(B,\) for one output or \(B, 2\), got \(3,\)'):
        regression_distill_loss(v, t, 'l1', torch.zeros(3), 1.)


@pytest.mark.parametrize('loss', ['l1', 'huber', 'mse'])
def test_fit_module_loss_by_hand(loss):
    """Per image: sum over intermediate exits of loss(v_i, v_n) + w_l loss(v_i, y) (labelled images) + w_u NLL(v_n |
    v_i, s_i), Laplace with l1, Gaussian with huber and mse; averaged over the batch."""
    model = _model(exit_layers=(1, 2, 3)).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1.5, math.nan, -2., math.nan])
    module = FitModule(model, label_weight=.5, uncertainty_weight=2., loss=loss)
    module.freeze()
    got = module(x, labels=y)
    with torch.no_grad():
        values, scales = model.forward_exits_with_scale(x)
    final = values[-1][:, 0].tolist()
    want, deviation = [0.] * 4, []

    def dist(a, b):
        d = abs(a - b)
        return d if loss == 'l1' else d * d if loss == 'mse' else (d * d / 2 if d < 1 else d - .5)
    for v, s in zip(values[:-1], scales[:-1]):
        v, s = v[:, 0].tolist(), s[:, 0].tolist()
        for i in range(4):
            want[i] += dist(v[i], final[i]) + (.5 * dist(v[i], y[i].item()) if not math.isnan(y[i]) else 0.)
            e = abs(final[i] - v[i])
            nll = math.log(2 * s[i]) + e / s[i] if loss == 'l1' else \
                math.log(s[i]) + e * e / (2 * s[i] ** 2) + .5 * math.log(2 * math.pi)
            want[i] += 2. * nll
        deviation.append(sum(abs(a - b) for a, b in zip(v, final)))
    assert got['loss'].item() == pytest.approx(sum(want) / 4, rel=1e-5)
    assert got['agree'].tolist() == pytest.approx(deviation, rel=1e-5)


def test_the_cache_gives_the_loss_of_the_images_and_skips_the_backbone():
    model = _model(exit_head='mlp', class_token=True, global_pool='token').eval()
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([1., math.nan, 2., 0., math.nan])
    module = FitModule(model, label_weight=.3)
    module.freeze()
    summaries, final = module.cache_entry(x)
    cached, direct = module(labels=y, summaries=summaries, final=final), module(x, labels=y)
    torch.testing.assert_close(cached['loss'], direct['loss'])
    torch.testing.assert_close(cached['agree'], direct['agree'])
    model = _model()
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    rows = timm_exits.fit(model, _loader(48), epochs=3, cache=True)
    assert len(calls) == 3 and [r['cached'] for r in rows] == [False, True, True]


def test_an_interrupted_fit_resumes_to_the_same_weights():
    def run(stop=None, state=None):
        model, kept = _model('test_vit_mexit_liferegress'), []

        def on_epoch(st):
            kept.append(st)
            if stop is not None and st['epoch'] + 1 == stop:
                raise KeyboardInterrupt
        try:
            rows = timm_exits.fit(model, _loader(16, batch_size=8), epochs=3, lr=1e-2, loss='huber', on_epoch=on_epoch,
                                  state=state)
        except KeyboardInterrupt:
            rows = None
        return model, kept[-1], rows
    whole = run()[0]
    state = run(stop=1)[1]
    resumed, _, rows = run(state=state)
    assert [r['epoch'] for r in rows] == [1, 2, 3]
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_options_of_the_other_task_are_refused():
    with pytest.raises(ValueError, match=r'temperature applies to classification .* by loss \(l1, huber, mse\), got '
                                         r'temperature=2.0'):
        timm_exits.fit(_model(), _loader(), temperature=2.)
    with pytest.raises(ValueError, match=r"loss must be one of \['l1', 'huber', 'mse'\], got 'l2'"):
        timm_exits.fit(_model(), _loader(), loss='l2')
    with pytest.raises(ValueError, match=r"loss applies to regression models .* got loss='l1'"):
        timm_exits.fit(timm.create_model('test_vit_mexit', num_classes=10), _loader(), loss='l1')


# --- command line ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """A flat folder of digits PNGs (no labels) and a counting set (``counts.csv``) of 24 images."""
    from PIL import Image
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp('count')
    d = load_digits()
    (root / 'flat').mkdir()
    images = root / 'set' / 'train' / 'images'
    images.mkdir(parents=True)
    rows = ['image,count']
    for i in range(48):
        img = Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).resize((32, 32)).convert('RGB')
        if i < 24:
            img.save(root / 'flat' / f'{i}.png')
        else:
            img.save(images / f'{i}.png')
            rows.append(f'{i}.png,{d.target[i]}')
    (root / 'set' / 'train' / 'counts.csv').write_text('\n'.join(rows) + '\n')
    return root


FIT = ['--model', 'test_vit_mexit', '--model-kwargs', 'task=regression', 'num_classes=1', 'exit_layers=(2,3)',
       '--epochs', '2', '--workers', '0', '--no-progress', '--batch-size', '16']


def _cli(module, argv, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and 'Traceback' not in '\n'.join(err)
    return err[-1]


def test_fit_cli_on_a_regression_model(folders, tmp_path, capsys):
    from safetensors import safe_open
    from timm_exits import validate
    out = tmp_path / 'run'
    argv = FIT + ['--dataset', 'counting', '--data-dir', str(folders / 'set'), '--split', 'train', '--label-weight',
                  '0.5', '--loss', 'huber', '--output', str(out)]
    rows = fit_module.main(argv)
    assert sorted(os.listdir(out)) == ['fit.json', 'last.pth.tar', 'log.jsonl', 'model.safetensors']
    summary = json.loads((out / 'fit.json').read_text())
    assert summary['images'] == 24 and summary['args']['loss'] == 'huber' and summary['args']['temperature'] is None
    assert list(rows[-1]['deviation']) == ['2', '3']
    with safe_open(str(out / 'model.safetensors'), 'pt') as f:
        recorded = json.loads(f.metadata()['timm_exits'])
    assert recorded['model_kwargs']['task'] == 'regression' and recorded['fit']['label_weight'] == .5
    result = validate.main(['--checkpoint', str(out / 'model.safetensors'), '--dataset', 'counting', '--data-dir',
                            str(folders / 'set'), '--split', 'train', '--workers', '0', '--no-progress', '--output',
                            str(tmp_path / 'eval')])
    assert [e['layer'] for e in result['exits']] == [2, 3, 4] and all('mae' in e for e in result['exits'])
    # the finished command resumes: nothing trains again, the weights are rewritten identically
    before = (out / 'model.safetensors').read_bytes()
    assert len(fit_module.main(argv)) == 2 and (out / 'model.safetensors').read_bytes() == before
    err = _cli(fit_module, [a if a != 'huber' else 'l1' for a in argv], capsys)
    assert err.startswith(f"error: --output '{out}' holds a fit with other arguments: loss: 'huber' -> 'l1'"), err
    # a flat folder: no labels, the same command
    rows = fit_module.main(FIT + ['--data-dir', str(folders / 'flat'), '--output', str(tmp_path / 'flat')])
    assert json.loads((tmp_path / 'flat' / 'fit.json').read_text())['labelled'] is False and len(rows) == 2


@pytest.mark.parametrize('argv,message', [
    (FIT + ['--temperature', '3'], 'error: --temperature applies to classification (the KL between class '
                                   "distributions); a regression model's exits learn the final value by --loss"),
    (['--model', 'test_vit_mexit', '--model-kwargs', 'num_classes=10', '--loss', 'l1'],
     "error: --loss applies to regression models (task='regression')"),
    (FIT + ['--loss', 'l2'], "argument --loss: invalid choice: 'l2'"),
    (FIT + ['--dataset', 'digits', '--split', 'train', '--label-weight', '1'],
     'error: --label-weight 1: the labels of --dataset digits are class indices; a regression model needs values'),
])
def test_fit_cli_refuses_the_other_tasks_options(folders, tmp_path, capsys, argv, message):
    out = tmp_path / 'out'
    err = _cli(fit_module, argv + ['--data-dir', str(folders / 'flat'), '--output', str(out), '--no-progress',
                                   '--workers', '0'], capsys)
    assert message in err, err
    assert not out.exists() or not os.listdir(out)


@pytest.mark.slow
def test_fit_ddp_two_cpu_processes(folders, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m',
         'timm_exits.fit'] + FIT + ['--device', 'cpu', '--dataset', 'counting', '--data-dir', str(folders / 'set'),
                                    '--split', 'train', '--label-weight', '1', '--output', str(tmp_path / 'ddp')],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / 'ddp' / 'fit.json').read_text())
    assert len(summary['epochs']) == 2 and list(summary['epochs'][-1]['deviation']) == ['2', '3']
    ref = _model(exit_layers=(2, 3))
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_layers=(2, 3),
                              checkpoint_path=str(tmp_path / 'ddp' / 'model.safetensors'))
    fitted, start = model.state_dict(), ref.state_dict()
    assert not torch.equal(fitted['exits.2.head.weight'], start['exits.2.head.weight'])
    assert torch.equal(fitted['uncertainty.4.weight'], start['uncertainty.4.weight'])  # untouched, as without DDP
