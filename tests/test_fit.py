"""Fitting the new parts on a frozen model (timm_exits.fit): frozen parts bit-identical, hand-computed losses, one
backbone pass per batch, the cache, resume, the written checkpoint through create_model / validate, DDP, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import timm
import timm_exits
from timm_exits import fit as fit_module
from timm_exits.fit import FitModule, distill_loss, uncertainty_target

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ['test_vit_mexit', 'test_vit_liferegress', 'test_vit_mexit_liferegress']


def _loader(n: int = 48, labels: bool = False, seed: int = 0, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g) if labels else torch.full((n,), -1)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), y), batch_size=batch_size, shuffle=True)


def _frozen(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(model.new_prefixes)}


@pytest.mark.parametrize('name', FAMILIES)
def test_backbone_and_final_head_come_out_bit_identical(name):
    model = timm.create_model(name, num_classes=10, exit_drop_rate=0.1) if 'mexit' in name else \
        timm.create_model(name, num_classes=10, drop_path_rate=0.1)
    before, new_before = _frozen(model), {k: v.clone() for k, v in model.state_dict().items()
                                          if k.startswith(model.new_prefixes)}
    rows = timm_exits.fit(model, _loader(labels=True), epochs=2, lr=1e-2, label_weight=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(
        before[k], after[k])]
    changed = {k.split('.')[0] for k, v in new_before.items() if not torch.equal(v, after[k])}
    assert changed == {p.rstrip('.') for p in model.new_prefixes}  # every new part trained
    assert len(rows) == 2 and all(math.isfinite(r['loss']) for r in rows)
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_distill_loss_by_hand():
    z = torch.tensor([[1., 0., -1.], [0.5, 0.5, 2.]])
    t = torch.tensor([[2., 0., 0.], [0., 1., 0.]])
    y = torch.tensor([1, -1])
    T = 2.
    p = [[math.exp(a / T) for a in row] for row in t.tolist()]
    p = [[a / sum(row) for a in row] for row in p]
    q = [[math.exp(a / T) for a in row] for row in z.tolist()]
    q = [[a / sum(row) for a in row] for row in q]
    kl = [T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)]
    ce0 = -math.log(math.exp(0.) / sum(math.exp(a) for a in (1., 0., -1.)))  # image 0, label 1; image 1 unlabelled
    got = distill_loss(z, t, T, y, 0.3)
    assert got.tolist() == pytest.approx([kl[0] + 0.3 * ce0, kl[1]], rel=1e-6)
    assert distill_loss(t, t, T).abs().max() < 1e-6  # the teacher itself: nothing to learn
    # eq. (4) with y the final answer: image 0's final answer is class 0
    u = uncertainty_target(z, t)
    s = z.softmax(-1)
    want = [math.tanh(abs(s[0, 0] - 1) + s[0, 1] + s[0, 2]), math.tanh(s[1, 0] + abs(s[1, 1] - 1) + s[1, 2])]
    assert u.tolist() == pytest.approx([float(w) for w in want], rel=1e-6)


def test_fit_module_loss_is_the_sum_over_exits():
    """The multi-exit loss: per image sum over intermediate exits of T^2 KL + label CE + (u_i - u~_i)^2, plus the final
    unit's (u_n - u~_n)^2, averaged over the batch; z_n from the same pass."""
    model = timm.create_model('test_vit_mexit', num_classes=10, exit_layers=(1, 2, 3)).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([3, -1, 0, -1])
    module = FitModule(model, temperature=3., label_weight=0.5, uncertainty_weight=2.)
    module.freeze()
    got = module(x, labels=y)
    with torch.no_grad():
        outs = model.forward_exits(x)
    final = outs[-1]
    want = torch.zeros(4)
    for layer, z in zip(model.exit_layers[:-1], outs[:-1]):
        kl = 9 * F.kl_div((z / 3).log_softmax(-1), (final / 3).softmax(-1), reduction='none').sum(-1)
        ce = torch.where(y >= 0, F.cross_entropy(z, y.clamp_min(0), reduction='none'), torch.zeros(4))
        u = torch.sigmoid(model.uncertainty[str(layer)](z).squeeze(-1))
        want += kl + 0.5 * ce + 2 * (u - uncertainty_target(z, final)) ** 2
    u_n = torch.sigmoid(model.uncertainty['4'](final).squeeze(-1))
    want += 2 * (u_n - uncertainty_target(final, final)) ** 2
    torch.testing.assert_close(got['loss'], want.mean(), rtol=1e-5, atol=1e-6)
    assert got['agree'].tolist() == [float((z.argmax(-1) == final.argmax(-1)).sum()) for z in outs[:-1]]


def _count_block_calls(model):
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_one_backbone_pass_per_batch_and_the_cache_skips_it():
    model = timm.create_model('test_vit_mexit', num_classes=10)
    calls = _count_block_calls(model)
    timm_exits.fit(model, _loader(48), epochs=2)
    assert len(calls) == 2 * 3  # 3 batches per epoch, one pass each serves every exit and the teacher
    model = timm.create_model('test_vit_mexit', num_classes=10)
    calls = _count_block_calls(model)
    rows = timm_exits.fit(model, _loader(48), epochs=3, cache=True)
    assert len(calls) == 3 and [r['cached'] for r in rows] == [False, True, True]


@pytest.mark.parametrize('head', ['linear', 'mlp'])
def test_cached_tokens_give_the_heads_logits(head):
    model = timm.create_model('test_vit_mexit', num_classes=10, exit_head=head, class_token=head == 'mlp',
                              global_pool='token' if head == 'mlp' else 'avg').eval()
    x = torch.randn(5, 3, 32, 32)
    module = FitModule(model)
    summaries, final = module.cache_entry(x)
    with torch.no_grad():
        outs = model.forward_exits(x)
        for i, h in enumerate(model.exits.values()):
            torch.testing.assert_close(fit_module._head_from_summary(h, summaries[i]), outs[i])
    torch.testing.assert_close(final, outs[-1])


def test_cache_is_refused_where_it_cannot_hold():
    with pytest.raises(ValueError, match=r"cache=True: exit heads \['vit'\] read every token"):
        timm_exits.fit(timm.create_model('test_vit_mexit', exit_head='vit'), _loader(), cache=True)
    with pytest.raises(ValueError, match='only for multi-exit models'):
        timm_exits.fit(timm.create_model('test_vit_mexit_liferegress'), _loader(), cache=True)


def test_nothing_to_fit_is_refused():
    with pytest.raises(ValueError, match='VisionTransformer has nothing to fit'):
        timm_exits.fit(timm.create_model('test_vit'), _loader())
    with pytest.raises(ValueError, match='nothing to fit: no intermediate exit'):
        timm_exits.fit(timm.create_model('test_vit_mexit', exit_layers=()), _loader())


def test_an_interrupted_fit_resumes_to_the_same_weights():
    def run(stop=None):
        torch.manual_seed(0)
        model = timm.create_model('test_vit_mexit_liferegress', num_classes=10)
        kept = []

        def on_epoch(state):
            kept.append(state)
            if stop is not None and state['epoch'] + 1 == stop:
                raise KeyboardInterrupt
        try:
            timm_exits.fit(model, _loader(), epochs=3, lr=1e-2, on_epoch=on_epoch)
        except KeyboardInterrupt:
            return model, kept[-1]
        return model, kept[-1]
    whole, _ = run()
    _, state = run(stop=1)
    torch.manual_seed(0)
    resumed = timm.create_model('test_vit_mexit_liferegress', num_classes=10)
    rows = timm_exits.fit(resumed, _loader(), epochs=3, lr=1e-2, state=state)
    assert [r['epoch'] for r in rows] == [1, 2, 3]
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- command line ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Digits as PNG files: a flat folder (no labels) to fit on, class folders to calibrate on, and bad folders."""
    from PIL import Image
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp('images')
    d = load_digits()
    for i in range(160):
        img = Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).resize((32, 32)).convert('RGB')
        if i < 80:
            (root / 'fit').mkdir(exist_ok=True)
            img.save(root / 'fit' / f'{i}.png')
        else:
            (root / 'calib' / str(d.target[i])).mkdir(parents=True, exist_ok=True)
            img.save(root / 'calib' / str(d.target[i]) / f'{i}.png')
    (root / 'empty').mkdir()
    (root / 'broken').mkdir()
    (root / 'broken' / 'a.png').write_bytes(b'not a png')
    return root


def _cli(module, argv, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and 'Traceback' not in '\n'.join(err)
    return err[-1]


FIT = ['--model', 'test_vit_mexit', '--model-kwargs', 'num_classes=10', '--epochs', '2', '--workers', '0',
       '--no-progress', '--batch-size', '32']


def test_fit_cli_writes_a_checkpoint_that_create_model_and_validate_read(folders, tmp_path, capsys):
    from timm_exits import validate
    out = tmp_path / 'run'
    fit_module.main(FIT + ['--data-dir', str(folders / 'fit'), '--output', str(out)])
    assert sorted(os.listdir(out)) == ['fit.json', 'last.pth.tar', 'log.jsonl', 'model.safetensors']
    summary = json.loads((out / 'fit.json').read_text())
    assert summary['images'] == 80 and summary['labelled'] is False and len(summary['epochs']) == 2
    model = timm.create_model('test_vit_mexit', num_classes=10, checkpoint_path=str(out / 'model.safetensors'))
    ref = timm.create_model('test_vit_mexit', num_classes=10)
    from safetensors.torch import load_file
    assert all(torch.equal(v, load_file(out / 'model.safetensors')[k]) for k, v in model.state_dict().items())
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    result = validate.main(['--checkpoint', str(out / 'model.safetensors'), '--dataset', 'digits', '--split', 'val',
                            '--workers', '0', '--no-progress', '--output', str(tmp_path / 'eval')])
    assert [e['layer'] for e in result['exits']] == [2, 3, 4]
    from timm_exits import hub
    folder, _ = hub.push(out / 'model.safetensors', 'test_vit_mexit', 'me/fitted', local_dir=tmp_path / 'hub',
                         upload=False, model_kwargs={'num_classes': 10})
    assert json.loads((folder / 'training_args.json').read_text())['fit']['epochs'] == 2
    # rerunning the finished command resumes: nothing trains again, the products are rewritten identically
    before = (out / 'model.safetensors').read_bytes()
    rows = fit_module.main(FIT + ['--data-dir', str(folders / 'fit'), '--output', str(out)])
    assert len(rows) == 2 and (out / 'model.safetensors').read_bytes() == before
    err = _cli(fit_module, FIT[:5] + ['3'] + FIT[6:] + ['--data-dir', str(folders / 'fit'), '--output', str(out)],
               capsys)
    assert err.startswith(f"error: --output '{out}' holds a fit with other arguments: epochs: 2 -> 3")


def test_calibrate_cli_records_the_choice(folders, tmp_path, capsys):
    from safetensors import safe_open
    out = tmp_path / 'run'
    fit_module.main(FIT + ['--data-dir', str(folders / 'fit'), '--output', str(out), '--cache', '--mean', '0.25'])
    cal_out = tmp_path / 'cal'
    result = timm_exits.calibrate.main(['--checkpoint', str(out / 'model.safetensors'), '--data-dir',
                                        str(folders / 'calib'), '--fit-dir', str(folders / 'fit'), '--epsilon', '0.4',
                                        '--delta', '0.2', '--output', str(cal_out), '--workers', '0', '--no-progress',
                                        '--risk', 'accuracy_drop'])
    assert sorted(os.listdir(cal_out)) == ['calibration.json', 'model.safetensors']
    assert json.loads((cal_out / 'calibration.json').read_text()) == result and result['n'] == 80
    with safe_open(str(cal_out / 'model.safetensors'), 'pt') as f:
        recorded = json.loads(f.metadata()['timm_exits'])
    assert recorded['calibration']['threshold'] == result['threshold'] and recorded['fit']['epochs'] == 2
    assert recorded['data_config']['mean'] == [0.25] * 3 == result['data_config']['mean']  # fit's flag, recorded
    loaded = timm.create_model('test_vit_mexit', num_classes=10,
                               checkpoint_path=str(cal_out / 'model.safetensors'))
    assert loaded.threshold == result['threshold']


@pytest.mark.parametrize('argv,message', [
    (['--data-dir', '{d}/empty'], "error: --data-dir: '{d}/empty' holds no image"),
    (['--data-dir', '{d}/broken'], 'error: --data-dir: {d}/broken/a.png is not a readable image'),
    (['--data-dir', '{d}/missing'], "error: --data-dir '{d}/missing' is not a folder"),
    (['--data-dir', '{d}/fit', '--model', 'test_vit'], 'error: VisionTransformer has nothing to fit'),
    (['--data-dir', '{d}/fit', '--lr', '-1'], 'error: --lr: must be a finite number > 0, got -1.0'),
    (['--data-dir', '{d}/fit', '--crop-mode', 'bogus'], "error: --crop-mode 'bogus' is not known; allowed: center"),
    (['--data-dir', '{d}/fit', '--img-size', '64'], 'error: input size (3, 64, 64) from the command line'),
    (['--data-dir', '{d}/fit', '--model-kwargs', 'exit_head=vit', '--cache'],
     "error: cache=True: exit heads ['vit'] read every token"),
])
def test_fit_cli_bad_input(folders, tmp_path, capsys, argv, message):
    argv = [a.replace('{d}', str(folders)) for a in argv]
    out = tmp_path / 'out'
    base = FIT[:]
    if '--model' in argv:
        base[1] = argv[argv.index('--model') + 1]
        argv = argv[:argv.index('--model')] + argv[argv.index('--model') + 2:]
    err = _cli(fit_module, base + argv + ['--output', str(out)], capsys)
    assert err.startswith(message.replace('{d}', str(folders))), err
    assert not out.exists() or not os.listdir(out)  # nothing half-written


@pytest.mark.parametrize('argv,message', [
    (['--epsilon', '0'], 'argument --epsilon: must be a number in (0, 1)'),
    (['--delta', '1.5'], 'argument --delta: must be a number in (0, 1)'),
    (['--data-dir', '{d}/fit', '--risk', 'accuracy_drop'], "error: --risk accuracy_drop needs labels: '{d}/fit' is "
                                                             'a flat folder'),
    (['--fit-dir', '{d}/calib/3'], "error: --data-dir '{d}/calib' and --fit-dir '{d}/calib/3' overlap"),
    (['--data-dir', '{d}/empty'], "error: --data-dir: '{d}/empty' holds no image"),
    (['--epsilon', '0.01'], 'error: no point can be certified with 80 images for epsilon=0.01, delta=0.2'),
])
def test_calibrate_cli_bad_input(folders, tmp_path, capsys, argv, message):
    ck = tmp_path / 'model.safetensors'
    model = timm.create_model('test_vit_mexit', num_classes=10)
    with torch.no_grad():
        for e in model.exits.values():  # exits that are sure and wrong: nothing certifies
            e.head.bias.copy_(torch.arange(10.) * 10)
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(ck), metadata={'timm_exits': json.dumps(
        {'model': 'test_vit_mexit', 'model_kwargs': {}, 'num_classes': 10})})
    base = {'--checkpoint': str(ck), '--data-dir': '{d}/calib', '--epsilon': '0.3', '--delta': '0.2'}
    pairs = dict(zip(argv[::2], argv[1::2]))
    args = [a for k, v in {**base, **pairs}.items() for a in (k, v.replace('{d}', str(folders)))]
    out = tmp_path / 'out'
    err = _cli(timm_exits.calibrate, args + ['--output', str(out), '--workers', '0', '--no-progress'], capsys)
    assert message.replace('{d}', str(folders)) in err, err
    assert not out.exists() or not os.listdir(out)  # nothing half-written


@pytest.mark.slow
def test_fit_ddp_two_cpu_processes(folders, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m',
         'timm_exits.fit'] + FIT + ['--device', 'cpu', '--data-dir', str(folders / 'fit'), '--output',
                                    str(tmp_path / 'ddp')],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / 'ddp' / 'fit.json').read_text())
    assert len(summary['epochs']) == 2
    model = timm.create_model('test_vit_mexit', num_classes=10,
                              checkpoint_path=str(tmp_path / 'ddp' / 'model.safetensors'))
    assert model.num_classes == 10


def test_calibrate_sharded_over_two_processes_equals_one(folders, tmp_path):
    """``torchrun`` calibration: each process reads every other image, the outputs are gathered in the set's order and
    the statistics run once; the choice, its figures and the written checkpoint equal one process's."""
    from safetensors import safe_open
    out = tmp_path / 'run'
    fit_module.main(FIT + ['--data-dir', str(folders / 'fit'), '--output', str(out), '--cache'])
    args = ['--checkpoint', str(out / 'model.safetensors'), '--data-dir', str(folders / 'calib'), '--epsilon', '0.3',
            '--delta', '0.2', '--workers', '0', '--no-progress', '--risk', 'accuracy_drop', '--batch-size', '16']
    one = timm_exits.calibrate.main(args + ['--output', str(tmp_path / 'one')])
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           '-m', 'timm_exits.calibrate'] + args + ['--device', 'cpu', '--output',
                                                                   str(tmp_path / 'two')],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / 'two' / 'calibration.json').read_text())
    assert one['processes'] == 1 and two.pop('processes') == 2 and one.pop('processes') == 1
    assert two == json.loads(json.dumps(one)) and one['n'] == 80 and one['certified_points'] > 0

    def recorded(folder):
        with safe_open(str(tmp_path / folder / 'model.safetensors'), 'pt') as f:
            return json.loads(f.metadata()['timm_exits'])['calibration']
    assert recorded('one') == recorded('two')


@pytest.mark.parametrize('seed', range(4))
def test_frozen_parts_fuzzed_over_layouts(seed):
    """Seeded fuzzing of the contract: random exit layout, head, criterion and family; after fitting, every frozen
    tensor is bit-identical and every new part moved."""
    import random
    rng = random.Random(seed)
    family = rng.choice(['test_vit_mexit', 'test_vit_mexit_liferegress'])
    heads = ['linear', 'mlp', 'vit'] + (['cnn_ignore', 'mixer'] if family == 'test_vit_mexit' else [])
    layers = tuple(sorted(rng.sample([1, 2, 3], rng.randint(1, 3))))
    kwargs = dict(num_classes=rng.choice([3, 10]), exit_layers=layers, exit_head=rng.choice(heads),
                  exit_criterion=rng.choice(['confidence', 'entropy', 'uncertainty']))
    if family.endswith('liferegress'):
        kwargs['exit_layers'] = tuple(v for v in layers if v != 1) or (2,)
    model = timm.create_model(family, **kwargs)
    before = _frozen(model)
    new_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(model.new_prefixes)}
    cache = kwargs['exit_head'] in ('linear', 'mlp') and family == 'test_vit_mexit' and rng.random() < 0.5
    timm_exits.fit(model, _loader(32, labels=rng.random() < 0.5), epochs=2, lr=1e-2, cache=cache,
                   label_weight=rng.choice([0., 0.5]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), kwargs
    moved = {k.split('.')[0] for k, v in new_before.items() if not torch.equal(v, after[k])}
    assert moved == {p.rstrip('.') for p in model.new_prefixes}, (kwargs, moved)


def test_agreement_is_logged_for_every_output_that_learns():
    """With slimming the final head's soft-weighted output learns too: its agreement is logged beside the exits'."""
    model = timm.create_model('test_vit_mexit_liferegress', num_classes=10, exit_layers=(2, 3))
    rows = timm_exits.fit(model, _loader(16), epochs=1)
    assert list(rows[0]['agreement']) == ['2', '3', 'final (soft-weighted)']
    assert all(0 <= v <= 1 for v in rows[0]['agreement'].values())
