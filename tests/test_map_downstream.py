"""Every downstream tool on feature-map (CNN) twins: fit (frozen backbone and BatchNorm statistics bit-identical, the
cache of what SDN / pool-linear heads read), calibrate, the validate CLI on fit's checkpoint, the SDN IC-only recipe,
the serving scheduler, torch.compile, and a Hub round trip. ``resnet18_mexit`` at 32 px, digits, 10 classes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import timm
import timm_exits
from timm_exits import fit as fit_module
from timm_exits.data import DigitsDataset
from timm_exits.fit import FitModule

ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 32)
KW = dict(num_classes=10, exit_input_size=SIZE)


@pytest.fixture(scope='module', autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _digits(split: str, n: int) -> DigitsDataset:
    ds = DigitsDataset(split, 32)
    ds.images, ds.targets = ds.images[:n], ds.targets[:n]
    return ds


def _teacher(name: str = 'resnet18_mexit', **kwargs) -> torch.nn.Module:
    """A CNN twin whose final head answers confidently (a stand-in for pretrained weights: a random head is near
    uniform, its argmax noise)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **{**KW, **kwargs})
    with torch.no_grad():
        model.get_classifier().weight.mul_(30)
    return model


def _agreement(model, images) -> list:
    model.eval()
    with torch.no_grad():
        outs = model.forward_exits(images)
    return [float((z.argmax(-1) == outs[-1].argmax(-1)).float().mean()) for z in outs[:-1]]


def _frozen_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(model.new_prefixes)}


# --- 1. fit ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,cache', [('resnet18_mexit', True), ('mobilenetv3_small_050_mexit', False)])
def test_fit_trains_the_exits_and_leaves_backbone_and_batchnorm_statistics_alone(name, cache):
    """MobileNetV3's BatchNorm is timm's BatchNormAct2d (a module with children): its statistics must not move."""
    model = _teacher(name)
    assert any(k.endswith('num_batches_tracked') for k in _frozen_state(model))
    val = _digits('val', 64).images
    before_agree = _agreement(model, val)
    frozen = _frozen_state(model)
    new = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(model.new_prefixes)}
    loader = DataLoader(_digits('train', 96), batch_size=24, shuffle=True)
    rows = timm_exits.fit(model, loader, epochs=4, lr=1e-2, cache=cache)
    after = model.state_dict()
    assert [k for k in frozen if not torch.equal(frozen[k], after[k])] == []  # weights, running_*, num_batches_*
    assert {k.split('.')[0] for k, v in new.items() if not torch.equal(v, after[k])} == {'exits', 'uncertainty'}
    assert rows[-1]['loss'] < rows[0]['loss'] and [r['cached'] for r in rows] == [False] + [cache] * 3
    after_agree = _agreement(model, val)
    assert np.mean(after_agree) > np.mean(before_agree) + 0.2, (before_agree, after_agree)


@pytest.mark.parametrize('head', ['sdn', 'pool_linear'])
def test_fit_cache_keeps_what_feature_map_heads_read(head):
    """The cache keeps each head's parameter-free reading (SDN: max and average pooling side by side; pool-linear: the
    global average): the heads' logits from it equal theirs on the map, and alpha still trains."""
    model = _teacher(exit_head=head).eval()
    x = _digits('val', 6).images
    readings, final = FitModule(model).cache_entry(x)
    with torch.no_grad():
        outs = model.forward_exits(x)
    assert len(readings) == len(model.exits) and len({r.shape[1] for r in readings}) > 1  # widths differ by block
    for h, r, z in zip(model.exits.values(), readings, outs):
        torch.testing.assert_close(fit_module._head_from_summary(h, r), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, outs[-1], rtol=0, atol=0)
    if head == 'sdn':
        alpha = model.exits[str(model.exit_layers[0])].alpha.clone()
        timm_exits.fit(model, DataLoader(_digits('train', 32), batch_size=16), epochs=2, lr=1e-2, cache=True)
        assert not torch.equal(alpha, model.exits[str(model.exit_layers[0])].alpha)


# --- fitted checkpoint through the CLI: validate, calibrate, serving, compile, hub -------------------------------------

@pytest.fixture(scope='module')
def fitted(tmp_path_factory):
    """``python -m timm_exits.fit`` on 64 digit PNGs from a plain resnet18 checkpoint (its head spread)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp('cnn')
    d = load_digits()
    for i in range(64 + 60):  # 64 unlabelled images to fit on, 60 in class folders to evaluate on
        folder = root / 'fit' if i < 64 else root / 'val' / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).resize(SIZE).convert('RGB').save(
            folder / f'{i}.png')
    torch.manual_seed(0)
    plain = timm.create_model('resnet18', num_classes=10)
    with torch.no_grad():
        plain.fc.weight.mul_(30)
    save_file(plain.state_dict(), str(root / 'resnet18.safetensors'))
    fit_module.main(['--model', 'resnet18_mexit', '--checkpoint', str(root / 'resnet18.safetensors'),
                     '--model-kwargs', 'num_classes=10', 'exit_input_size=(32,32)', '--data-dir', str(root / 'fit'),
                     '--output', str(root / 'run'), '--epochs', '3', '--lr', '1e-2', '--cache', '--workers', '0',
                     '--no-progress', '--batch-size', '32'])
    ck = root / 'run' / 'model.safetensors'
    model = timm.create_model('resnet18_mexit', **KW, checkpoint_path=str(ck)).eval()
    return dict(root=root, ck=ck, model=model, plain=plain.eval())


def test_fit_checkpoint_records_the_layout_and_loads_bit_identical_backbone(fitted):
    from safetensors import safe_open
    with safe_open(str(fitted['ck']), 'pt') as f:
        meta = json.loads(f.metadata()['timm_exits'])
    assert meta['model'] == 'resnet18_mexit' and meta['model_kwargs']['exit_input_size'] == [32, 32]
    assert meta['model_kwargs']['exit_head'] == 'sdn'
    model, plain = fitted['model'], fitted['plain']
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())
    x = _digits('val', 8).images
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r'trained with exit_input_size=\[32, 32\]'):
        timm.create_model('resnet18_mexit', num_classes=10, exit_head='pool_linear', exit_layers=model.exit_layers[:-1],
                          checkpoint_path=str(fitted['ck']))


def test_validate_cli_on_a_cnn_checkpoint(fitted, tmp_path):
    from timm_exits import validate
    result = validate.main(['--checkpoint', str(fitted['ck']), '--dataset', 'folder', '--data-dir',
                            str(fitted['root']), '--split', 'val', '--workers', '0', '--no-progress', '--batch-size',
                            '64', '--output', str(tmp_path / 'eval')])
    model = fitted['model']
    assert [e['layer'] for e in result['exits']] == list(model.exit_layers)
    assert result['exits'][-1]['cost'] == 1.0 and result['num_images'] == 60
    assert [e['cost'] for e in result['exits']] == pytest.approx(list(model.exit_costs), rel=1e-6)
    assert json.loads((tmp_path / 'eval' / 'eval.json').read_text())['exits'] == result['exits']


def test_calibrate_a_fitted_cnn(fitted):
    model = timm.create_model('resnet18_mexit', **KW, checkpoint_path=str(fitted['ck'])).eval()
    loader = DataLoader(_digits('test', 150), batch_size=75)
    result = timm_exits.calibrate(model, loader, epsilon=0.2, delta=0.1)
    assert result['n'] == 150 and result['threshold'] is not None and result['mean_cost'] < 1.
    assert result['empirical_risk'] <= 0.2 and model.threshold == result['threshold']
    x = _digits('val', 16).images
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, threshold=result['threshold']), rtol=0, atol=0)


# --- 4. SDN's IC-only recipe -------------------------------------------------------------------------------------------

def _recipe():
    import importlib.util
    spec = importlib.util.spec_from_file_location('recipe_sdn_ic_only', ROOT / 'train_recipes' / 'sdn_ic_only.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RECIPE


def test_sdn_ic_only_schedule_is_adam_1e3_times_01_at_15():
    from timm_exits.train import _build_scheduler, build_optimizer
    stage = _recipe().stages[0]
    assert (stage.task, stage.epochs, stage.opt, stage.lr) == ('classifier_wise', 25, 'adam', 1e-3)
    model = timm.create_model('resnet18_mexit', **KW)
    optimizer = build_optimizer(model, stage)
    assert type(optimizer).__name__ == 'Adam'
    scheduler = _build_scheduler(optimizer, stage, 1)
    lrs = []
    for epoch in (0, 14, 15, 24):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])


def test_sdn_ic_only_recipe_trains_the_exits_on_a_frozen_cnn(fitted, tmp_path, monkeypatch):
    """One epoch of the recipe's stage on a few digits from a plain resnet18 checkpoint: the backbone, the final head and
    every BatchNorm statistic come out bit-identical; only the exit heads move."""
    import dataclasses
    from safetensors.torch import load_file
    from timm.utils import random_seed
    from timm_exits.train import build_model, train
    init = DigitsDataset.__init__

    def few(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.images, self.targets = self.images[::12], self.targets[::12]
    monkeypatch.setattr(DigitsDataset, '__init__', few)
    recipe = _recipe()
    recipe = dataclasses.replace(
        recipe, model='resnet18_mexit', pretrained=False, init_checkpoint=str(fitted['root'] / 'resnet18.safetensors'),
        model_kwargs={**recipe.model_kwargs, 'exit_input_size': SIZE}, num_classes=10, dataset='digits',
        batch_size=32, eval_batch_size=256, workers=0, log_interval=1000,
        stages=[dataclasses.replace(recipe.stages[0], epochs=1)])
    random_seed(recipe.seed, 0)
    before = build_model(recipe).state_dict()  # the backbone from the file (timm drops a 1000-class head: new fc)
    result = train(recipe, str(tmp_path / 'run'))
    weights = load_file(str(tmp_path / 'run' / 'model.safetensors'))
    plain = load_file(str(fitted['root'] / 'resnet18.safetensors'))
    assert all(torch.equal(v, before[k]) for k, v in plain.items() if not k.startswith('fc.'))
    assert [k for k, v in before.items() if not torch.equal(v, weights[k])
            and not k.startswith('exits.')] == []  # backbone, fc, running_*, num_batches_*, uncertainty units
    assert any(not torch.equal(before[k], weights[k]) for k in weights if k.startswith('exits.'))
    assert [e['layer'] for e in result['exits']] == list(timm.create_model('resnet18_mexit', **KW).exit_layers)


# --- 5. serving and torch.compile --------------------------------------------------------------------------------------

def _split_threshold(model, x) -> float:
    """A threshold between two images' first-exit scores (half the images leave there, none sits on it)."""
    with torch.no_grad():
        first = model.exit_scores(model.exit_layers[0], model.forward_exits(x)[0]).sort().values
    k = len(first) // 2
    return float(first[k - 1:k + 1].mean())


def test_exit_scheduler_answers_a_cnn_twin_as_forward_dynamic(fitted):
    from timm_exits.serving import ExitScheduler
    model = fitted['model']
    x = _digits('val', 12).images
    threshold = _split_threshold(model, x)
    budget = model.exit_costs[2]
    settings = [(threshold, None), (threshold, budget), (None, budget), (None, None)] * 3
    with ExitScheduler(model, max_batch_size=4, max_wait_ms=1) as scheduler:
        futures = [scheduler.submit(image, *setting) for image, setting in zip(x, settings)]
        answers = [f.result(timeout=120) for f in futures]
    with torch.no_grad():
        for image, (t, b), answer in zip(x, settings, answers):
            ref = model.forward_dynamic(image[None], threshold=t, budget=b)
            assert answer.exit_layer == int(ref.exit_layer[0]) and abs(answer.cost - float(ref.cost[0])) < 1e-6
            torch.testing.assert_close(torch.as_tensor(answer.logits), ref.logits[0], atol=1e-4, rtol=1e-4)
    assert len({a.exit_layer for a in answers}) > 2
    with ExitScheduler(fitted['plain'], max_batch_size=2) as scheduler:  # a plain CNN: its depth in units
        answer = scheduler.submit(x[0]).result(timeout=60)
        bad = scheduler.submit(torch.randn(1, 3, 32, 32))  # a batch, not one image: this request fails alone
        with pytest.raises(ValueError, match=r'one image of shape \(3, H, W\)'):
            bad.result(timeout=60)
    assert answer.exit_layer == len(model._exit_blocks()) == 8


def test_torch_compile_of_a_cnn_twin_matches_eager():
    import torch._dynamo as dynamo
    dynamo.reset()
    model = _teacher(exit_layers=(2,)).eval()
    x = _digits('val', 8).images
    threshold = _split_threshold(model, x)
    compiled = torch.compile(model, backend='aot_eager')
    try:
        with torch.no_grad():
            for batch in (8, 3):
                torch.testing.assert_close(compiled(x[:batch], threshold=threshold),
                                           model(x[:batch], threshold=threshold), atol=1e-5, rtol=1e-5)
            out = model.forward_dynamic(x, threshold=threshold)
    finally:
        dynamo.reset()
    assert set(out.exit_layer.tolist()) == {2, 8}


# --- 6. Hub push and card, hf-hub: round trip --------------------------------------------------------------------------

HUB_ROUND_TRIP = r"""
import json, sys, torch, timm, timm_exits
from timm_exits import hub
ck, x_path, out, threshold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
folder, url = hub.push(ck, 'resnet18_mexit', 'fake-org/resnet18-sdn', local_dir=out,
                       model_kwargs={'num_classes': 10, 'exit_input_size': (32, 32)})
model = timm.create_model('hf-hub:fake-org/resnet18-sdn', pretrained=True).eval()
x = torch.load(x_path)
with torch.no_grad():
    dyn = model.forward_dynamic(x, threshold=threshold)
    print(json.dumps(dict(logits=model(x).tolist(), dynamic=dyn.logits.tolist(), exits=dyn.exit_layer.tolist(),
                          url=url, layout=[list(model.exit_layers), list(model.exit_input_size),
                                           list(model.exit_head_types)])))
"""


def test_hub_push_and_hf_hub_round_trip_of_a_cnn(fitted, tmp_path):
    from timm_exits import hub
    from ._hub_server import FakeHub
    model = fitted['model']
    x = _digits('val', 8).images
    threshold = _split_threshold(model, x)
    with torch.no_grad():
        ref = model(x), model.forward_dynamic(x, threshold=threshold)
    with pytest.raises(ValueError, match=r'trained with exit_input_size=\[32, 32\].*--model-kwargs exit_input_size='):
        hub.push(fitted['ck'], 'resnet18_mexit', 'me/x', local_dir=tmp_path / 'refused', upload=False,
                 model_kwargs={'num_classes': 10})
    torch.save(x, tmp_path / 'x.pt')
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(('HF_', 'HUGGINGFACE_')) and not k.lower().endswith('_proxy')}
    with FakeHub() as server:
        env.update(HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / 'cache'), HF_HOME=str(tmp_path / 'hf_home'),
                   HF_TOKEN='hf_fake', HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_XET='1', HF_HUB_OFFLINE='0',
                   HF_HUB_DISABLE_PROGRESS_BARS='1', NO_PROXY='127.0.0.1,localhost', PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, '-c', HUB_ROUND_TRIP, str(fitted['ck']), str(tmp_path / 'x.pt'),
                               str(tmp_path / 'export'), str(threshold)], env=env, capture_output=True, text=True,
                              timeout=300, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = set(server.repos['fake-org/resnet18-sdn'])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {'config.json', 'model.safetensors', 'README.md', 'training_args.json'} <= files
    assert got['layout'] == [list(model.exit_layers), [32, 32], ['sdn'] * (len(model.exit_layers) - 1)]
    torch.testing.assert_close(torch.tensor(got['logits']), ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got['dynamic']), ref[1].logits, rtol=0, atol=1e-6)
    assert got['exits'] == ref[1].exit_layer.tolist()
    config = json.loads((tmp_path / 'export' / 'config.json').read_text())
    assert config['architecture'] == 'resnet18_mexit' and config['model_args']['exit_input_size'] == [32, 32]
    card = (tmp_path / 'export' / 'README.md').read_text()
    assert 'library_name: timm' in card and 'import timm_exits' in card and '`sdn`' in card
