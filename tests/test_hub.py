"""Hub side: named cfgs, missing-weights errors, push (strict layout, atomic export, card), round trips.

No network: Hub traffic goes to a fake Hub on 127.0.0.1 (``tests/_hub_server.py``). huggingface_hub reads HF_ENDPOINT,
HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, so everything that talks to the fake Hub runs in a subprocess.
"""
import argparse
import json
import warnings
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from huggingface_hub import ModelCard, constants as hf_constants
from safetensors.torch import save_file

import timm
import timm_exits.hub as hub
from timm_exits import MissingWeightsError

from ._hub_server import FakeHub
from .conftest import spread_exit_heads

ORG = 'fake-org'
NAMED = 'vit_mexit_named_tiny'
REPO = f'{ORG}/{NAMED}'
VERIFIED_DATASETS = {'tanganke/stanford_cars', 'HuggingFaceM4/FGVC-Aircraft', 'ILSVRC/imagenet-1k'}
PUBLISHED = {
    'vit_b16_mexit_cars': (196, 'python train_recipes/mevit_cars.py --data-dir /data/stanford_cars'),
    'vit_b16_mexit_aircraft': (100, 'python train_recipes/mevit_aircraft.py --data-dir /data/fgvc_aircraft'),
    'deit_small_liferegress.in1k': (1000, 'python train_recipes/liferegress_imagenet.py --data-dir /data/imagenet'),
}
EVAL = {
    'model': NAMED, 'dataset': 'random-tiny', 'num_images': 8,
    'exits': [
        {'layer': 2, 'accuracy': 51.25, 'cost': 0.551, 'gflops': 0.0011, 'latency_ms': None, 'practical': True},
        {'layer': 3, 'accuracy': 60.0, 'cost': 0.776, 'gflops': 0.0015, 'practical': False},
        {'layer': 4, 'accuracy': 62.5, 'cost': 1.0, 'gflops': 0.002, 'latency_ms': 1.5, 'practical': True},
    ],
    'thresholds': [{'threshold': 0.2, 'accuracy': 58.75, 'mean_cost': 0.7}],
    'budgets': [{'budget': 0.6, 'accuracy': 51.25, 'mean_cost': 0.551}],
}

# timm train.py's preprocessing arguments of the pushed checkpoint (not the named model's pretrained cfg)
TRAIN_PREPROCESSING = dict(mean=[0.25, 0.5, 0.75], std=[0.2, 0.3, 0.4], crop_pct=1.0, interpolation='bilinear',
                           img_size=None, input_size=None)

LOAD = r"""
import json, sys, torch, timm, timm_exits
x, threshold = torch.load(sys.argv[1]), float(sys.argv[2])
out = {}
def load(name, **kwargs):
    model = timm.create_model(name, pretrained=True, **kwargs).eval()
    with torch.no_grad():
        dyn = model.forward_dynamic(x, threshold=threshold)
        return dict(logits=model(x).tolist(), dynamic=dyn.logits.tolist(), exits=dyn.exit_layer.tolist(),
                    layout=[list(model.exit_layers), model.exit_criterion],
                    hub_id=model.pretrained_cfg.get('hf_hub_id'),
                    data={k: list(v) if isinstance(v, tuple) else v
                          for k, v in timm.data.resolve_data_config(model=model).items()})
for key, name in [('named', 'vit_mexit_named_tiny'), ('hub', 'hf-hub:fake-org/vit_mexit_named_tiny')] + [
        ('local', 'local-dir:' + p) for p in sys.argv[3:]]:
    out[key] = load(name)
for key, repo in [('missing_repo', 'fake-org/never-pushed'), ('missing_file', 'fake-org/empty')]:
    try:
        load('vit_mexit_named_tiny', pretrained_cfg_overlay=dict(hf_hub_id=repo))
    except timm_exits.MissingWeightsError as e:
        out[key] = str(e)
try:
    load('hf-hub:fake-org/corrupt')
except ValueError as e:
    out['corrupt'] = str(e)
from PIL import Image
usage = open(sys.argv[3] + '/README.md').read().split('```python\n')[1].split('```')[0]
exec(usage, {'img': Image.new('RGB', (48, 40))})  # the card's usage snippet, as written
out['usage'] = 'ran'
print(json.dumps(out))
"""


def _env(url: str, cache: Path, offline: bool = False) -> Dict[str, str]:
    """Child environment: the fake Hub, a private cache and home (no real token), no proxies, the fake org."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(('HF_', 'HUGGINGFACE_')) and not k.lower().endswith('_proxy')}
    env.update(
        HF_ENDPOINT=url, HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / 'hf_home'), HF_TOKEN='hf_fake',
        HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_XET='1', HF_HUB_DISABLE_PROGRESS_BARS='1',
        HF_HUB_DISABLE_UPDATE_CHECK='1', NO_PROXY='127.0.0.1,localhost', TIMM_EXITS_HUB_ORG=ORG,
        HF_HUB_OFFLINE='1' if offline else '0')
    return env


def _run(args: list, env: Dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'{args[0]} {args[1][:40]!r} failed:\n{proc.stdout}\n{proc.stderr}'
    return proc


@pytest.fixture(scope='module')
def fake_hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope='module')
def published(fake_hub, tmp_path_factory) -> Dict[str, Any]:
    """A tiny named checkpoint (timm train.py style, DDP prefixes) pushed with the CLI, then loaded three ways."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp('hub')
    model = spread_exit_heads(timm.create_model(NAMED)).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        threshold = model.exit_scores(2, model.forward_exits(x)[0]).median().item()
        dyn = model.forward_dynamic(x, threshold=threshold)
        ref = dict(logits=model(x), dynamic=dyn.logits, exits=dyn.exit_layer.tolist())
    torch.save(x, root / 'x.pt')
    torch.save({
        'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
        'args': argparse.Namespace(model=NAMED, model_kwargs={'exit_criterion': 'uncertainty'}, lr=0.01, epochs=3,
                                   **TRAIN_PREPROCESSING),
    }, root / 'ckpt.pth.tar')
    (root / 'eval.json').write_text(json.dumps(EVAL))
    env = _env(fake_hub.url, root / 'cache')
    push = _run(['-m', 'timm_exits.hub', 'push', str(root / 'ckpt.pth.tar'), '--model', NAMED, '--eval',
                 str(root / 'eval.json'), '--local-dir', str(root / 'export')], env)
    export = root / 'export'
    fake_hub.commit(f'{ORG}/empty', {'README.md': b'no weights here'})
    fake_hub.commit(f'{ORG}/corrupt', {'config.json': (export / 'config.json').read_bytes(),
                                       'model.safetensors': b'\x00' * 64})
    loaded = json.loads(_run(['-c', LOAD, str(root / 'x.pt'), str(threshold), str(export)], env).stdout)
    return dict(root=root, ref=ref, threshold=threshold, push=push, loaded=loaded, env=env)


def _assert_same(ref: Dict[str, Any], got: Dict[str, Any]) -> None:
    assert torch.allclose(ref['logits'], torch.tensor(got['logits']), atol=1e-6, rtol=0)
    assert torch.allclose(ref['dynamic'], torch.tensor(got['dynamic']), atol=1e-6, rtol=0)
    assert ref['exits'] == got['exits'] and got['layout'] == [[2, 3, 4], 'uncertainty']


# --- named models --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_named_cfg(name):
    classes, recipe = PUBLISHED[name]
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id == f'{hub.hub_org()}/{name}' and cfg.hf_hub_filename == 'model.safetensors'
    assert cfg.num_classes == classes and hub.recipe_of(cfg) == recipe and cfg.paper_name
    assert name in hub.published_models() and name in timm.list_pretrained()
    if 'mexit' in name:
        assert cfg.input_size == (3, 448, 448) and cfg.mean == (.5, .5, .5) and int(448 / cfg.crop_pct) == 600
        assert cfg.paper_name.startswith('Multi-Exit Vision Transformer with Custom Fine-Tuning')
    else:
        assert cfg.paper_ids == 'arXiv:2304.04926' and cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN
        assert timm.models.get_pretrained_cfg('deit_small_liferegress').tag == 'fb_in1k', 'default tag must stay'


def test_named_layout():
    with torch.device('meta'):
        model = timm.create_model('vit_b16_mexit_cars')
    assert model.exit_layers == (6, 7, 8, 9, 10, 11, 12) and set(model.exit_head_types) == {'linear'}
    assert model.exit_criterion == 'uncertainty' and model.num_classes == 196
    assert tuple(model.patch_embed.img_size) == (448, 448) and len(model.blocks) == 12 and model.embed_dim == 768
    args = hub.layout_args(model)
    assert args == dict(exit_layers=[6, 7, 8, 9, 10, 11], exit_head='linear', exit_criterion='uncertainty')


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_named_card_data(name):
    data = hub.card_metadata(name)
    assert set(data['datasets']) <= VERIFIED_DATASETS and data['base_model'].startswith('timm/')
    assert {'image-classification', 'timm', 'timm-exits'} <= set(data['tags']) and data['citation']
    assert ('early-exit' if 'mexit' in name else 'patch-slimming') in data['tags']
    assert {n for n in hub.published_models() if n != NAMED} == set(PUBLISHED), 'a card per model'


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_missing_weights_offline(name, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(MissingWeightsError) as info, torch.device('meta'):  # meta: no time on weights never loaded
        timm.create_model(name, pretrained=True)
    msg = str(info.value)
    assert f"'{hub.hub_org()}/{name}'" in msg and PUBLISHED[name][1] in msg and 'HF_HUB_OFFLINE' in msg
    assert f'python -m timm_exits.hub push CHECKPOINT --model {name}' in msg


def test_missing_weights_online(published):
    missing, no_file = published['loaded']['missing_repo'], published['loaded']['missing_file']
    assert "'fake-org/never-pushed'" in missing and 'does not exist' in missing
    assert 'pytest tests/test_hub.py' in missing, 'the recipe of the named model'
    assert "'fake-org/empty'" in no_file and 'has no model.safetensors' in no_file


# --- round trips -----------------------------------------------------------------------------------------------------

def test_push_cli_round_trip(published, fake_hub):
    assert 'RuntimeWarning' not in published['push'].stderr and 'committed: ' in published['push'].stdout
    files = fake_hub.repos[REPO]
    assert {'config.json', 'model.safetensors', 'README.md', 'training_args.json'} <= set(files)
    assert not any(f.endswith(('.bin', '.pth', '.pt')) for f in files), 'no pickle on the Hub'
    for key in ('named', 'hub', 'local'):
        _assert_same(published['ref'], published['loaded'][key])
    assert published['loaded']['named']['hub_id'] == REPO and published['loaded']['usage'] == 'ran'


def test_offline_cache_load(published, fake_hub):
    env = _env(fake_hub.url, published['root'] / 'cache', offline=True)
    before = len(fake_hub.requests)
    code = LOAD.split('for key, repo in')[0] + 'print(json.dumps(out))'  # named and hf-hub loads only
    loaded = json.loads(_run(['-c', code, str(published['root'] / 'x.pt'), str(published['threshold'])], env).stdout)
    assert len(fake_hub.requests) == before, 'offline load must not touch the Hub'
    for key in ('named', 'hub'):
        _assert_same(published['ref'], loaded[key])


def test_corrupt_weights_on_hub(published):
    msg = published['loaded']['corrupt']
    assert "'fake-org/corrupt'" in msg and 'not a valid safetensors file' in msg


def test_exported_files(published):
    export = published['root'] / 'export'
    config = json.loads((export / 'config.json').read_text())
    assert config['architecture'] == NAMED and config['num_classes'] == 10
    assert config['model_args'] == dict(
        exit_layers=[2, 3], exit_head='linear', exit_criterion='uncertainty', num_classes=10, in_chans=3,
        global_pool='token', img_size=[32, 32])
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32] and 'hf_hub_id' not in config['pretrained_cfg']
    assert json.loads((export / 'training_args.json').read_text())['lr'] == 0.01
    card = ModelCard.load(export / 'README.md')
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert {'image-classification', 'timm', 'timm-exits', 'early-exit'} <= set(card.data.tags)
    text = card.text
    assert 'import timm_exits' in text and f"timm.create_model('{NAMED}', pretrained=True)" in text
    assert '| 2 | 51.25 | 0.551 | 0.00 | - | yes |' in text and '| 0.2 | 58.75 | 0.700 |' in text
    assert 'Shen, Tianyi' in text and 'exits after blocks 2, 3 and the final head (block 4)' in text
    try:
        import matplotlib  # noqa: F401
        assert (export / 'tradeoff.png').is_file() and '](tradeoff.png)' in text
    except ImportError:
        assert not (export / 'tradeoff.png').exists() and 'matplotlib was not installed' in text


# --- push: refusals and atomic export -------------------------------------------------------------------------------

def test_push_refuses_exit_layout_mismatch(tmp_path):
    other = timm.create_model('test_vit_mexit', exit_layers=(1, 2, 3))
    save_file(other.state_dict(), tmp_path / 'other.safetensors')
    with pytest.raises(ValueError, match='exit_layers'):
        hub.push(tmp_path / 'other.safetensors', NAMED, local_dir=tmp_path / 'out', upload=False)
    assert [p.name for p in tmp_path.iterdir()] == ['other.safetensors']


def test_push_refuses_life_layout_mismatch(tmp_path):
    life = timm.create_model('test_vit_liferegress')
    ckpt = {'state_dict': life.state_dict(), 'args': argparse.Namespace(model_kwargs={'life_layer': 2})}
    torch.save(ckpt, tmp_path / 'life.pth')
    with pytest.raises(ValueError, match='life_layer=2'):
        hub.push(tmp_path / 'life.pth', 'test_vit_liferegress', 'me/tiny', local_dir=tmp_path / 'out', upload=False)
    assert [p.name for p in tmp_path.iterdir()] == ['life.pth']


def test_push_refuses_corrupt_checkpoints(tmp_path):
    (tmp_path / 'bad.safetensors').write_bytes(b'\x00' * 64)
    (tmp_path / 'bad.pth.tar').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='bad.safetensors is not a valid safetensors file'):
        hub.push(tmp_path / 'bad.safetensors', NAMED, local_dir=tmp_path / 'out', upload=False)
    with pytest.raises(ValueError, match='bad.pth.tar is truncated, corrupt or not a torch checkpoint'):
        hub.push(tmp_path / 'bad.pth.tar', NAMED, local_dir=tmp_path / 'out', upload=False)
    assert not (tmp_path / 'out').exists()


def test_push_refuses_recipe_hidden_layout(tmp_path):
    """A recipe checkpoint (safetensors metadata or the 'recipe' key) trained with another exit criterion."""
    model = timm.create_model('test_vit_mexit', exit_criterion='uncertainty')
    meta = {'model': 'test_vit_mexit', 'model_kwargs': {'exit_criterion': 'uncertainty'}, 'num_classes': 10,
            'stage': 0, 'epoch': 3, 'format': 1}
    save_file(model.state_dict(), tmp_path / 'model.safetensors', metadata={'timm_exits': json.dumps(meta)})
    torch.save({'state_dict': model.state_dict(), 'recipe': meta}, tmp_path / 'last.pth.tar')
    for name in ('model.safetensors', 'last.pth.tar'):
        with pytest.raises(ValueError, match=f"{name} was trained with exit_criterion='uncertainty'.*"
                                             f"this model has exit_criterion='confidence'"):
            hub.push(tmp_path / name, 'test_vit_mexit', 'me/x', local_dir=tmp_path / 'out', upload=False)
    folder, _ = hub.push(tmp_path / 'model.safetensors', 'test_vit_mexit', 'me/x', local_dir=tmp_path / 'out',
                         upload=False, model_kwargs=dict(exit_criterion='uncertainty'))
    assert json.loads((folder / 'training_args.json').read_text()) == meta
    assert json.loads((folder / 'config.json').read_text())['model_args']['exit_criterion'] == 'uncertainty'


@pytest.mark.parametrize('how', ['absolute', 'relative', 'symlink'])
def test_push_publishes_no_file_outside_the_run_folder(tmp_path, how, caplog):
    """An eval JSON whose "plot" names a file outside the checkpoint's folder: that file never reaches the export."""
    run, outside = tmp_path / 'run', tmp_path / 'elsewhere'
    run.mkdir(), outside.mkdir()
    secret = outside / 'secret.png'
    secret.write_bytes(b'\x89PNG\r\n\x1a\n' + b'SECRET' * 10)  # even a real PNG header: outside is outside
    save_file(timm.create_model(NAMED).state_dict(), run / 'model.safetensors')
    plot = {'absolute': str(secret), 'relative': '../elsewhere/secret.png', 'symlink': 'tradeoff.png'}[how]
    if how == 'symlink':
        (run / 'tradeoff.png').symlink_to(secret)
    (run / 'eval.json').write_text(json.dumps(dict(EVAL, plot=plot)))
    with caplog.at_level('WARNING'):
        folder, _ = hub.push(run / 'model.safetensors', NAMED, evaluation=run / 'eval.json',
                             local_dir=tmp_path / 'out', upload=False)
    assert 'not inside the checkpoint' in caplog.text
    for file in folder.iterdir():
        assert b'SECRET' not in file.read_bytes(), file
    assert sorted(p.name for p in folder.iterdir()) <= ['README.md', 'config.json', 'model.safetensors',
                                                         'tradeoff.png']


def test_push_refuses_system_file_as_plot(tmp_path, caplog):
    system = Path('/etc/passwd')
    if not system.is_file():
        pytest.skip('no /etc/passwd here')
    save_file(timm.create_model(NAMED).state_dict(), tmp_path / 'model.safetensors')
    (tmp_path / 'eval.json').write_text(json.dumps(dict(EVAL, plot=str(system))))
    with caplog.at_level('WARNING'):
        folder, _ = hub.push(tmp_path / 'model.safetensors', NAMED, evaluation=tmp_path / 'eval.json',
                             local_dir=tmp_path / 'out', upload=False)
    content = system.read_bytes()
    assert all(file.read_bytes() != content for file in folder.iterdir())
    assert f'evaluation plot {system} is not inside' in caplog.text


def test_push_copies_png_inside_run_folder_only(tmp_path, caplog):
    save_file(timm.create_model(NAMED).state_dict(), tmp_path / 'model.safetensors')
    (tmp_path / 'notes.png').write_text('not a png')  # inside, but not an image
    (tmp_path / 'eval.json').write_text(json.dumps(dict(EVAL, plot='notes.png')))
    with caplog.at_level('WARNING'):
        folder, _ = hub.push(tmp_path / 'model.safetensors', NAMED, evaluation=tmp_path / 'eval.json',
                             local_dir=tmp_path / 'out', upload=False)
    assert 'is not a PNG file' in caplog.text
    if (folder / 'tradeoff.png').exists():
        assert (folder / 'tradeoff.png').read_bytes().startswith(b'\x89PNG\r\n\x1a\n')


def test_export_leaves_nothing_on_error(tmp_path, monkeypatch):
    save_file(timm.create_model(NAMED).state_dict(), tmp_path / 'w.safetensors')
    (tmp_path / 'labels.txt').write_text('one\ntwo\n')
    with pytest.raises(ValueError, match='2 names for 10 classes'):
        hub.push(tmp_path / 'w.safetensors', NAMED, local_dir=tmp_path / 'out', upload=False,
                 label_names=tmp_path / 'labels.txt')

    def fail(*args, **kwargs):  # the card is the last file: config.json and model.safetensors are written by now
        assert {p.name for p in tmp_path.glob('.out.*/*')} == {'config.json', 'model.safetensors'}
        raise KeyError('template field')

    monkeypatch.setattr(hub, 'render_card', fail)
    with pytest.raises(KeyError, match='template field'):
        hub.push(tmp_path / 'w.safetensors', NAMED, local_dir=tmp_path / 'out', upload=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['labels.txt', 'w.safetensors'], 'no partial export'
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('x')
    with pytest.raises(FileExistsError):
        hub.push(tmp_path / 'w.safetensors', NAMED, local_dir=tmp_path / 'full', upload=False)
    assert [p.name for p in (tmp_path / 'full').iterdir()] == ['keep.txt']
    with pytest.raises(SystemExit) as info:
        hub.main(['push', str(tmp_path / 'w.safetensors'), '--model', NAMED, '--no-upload'])
    assert info.value.code == 2


def test_local_dir_round_trip_life_layout(tmp_path):
    kwargs = dict(life_layer=2, prune_layers=(3,), keep_rate=0.5, U=2.)
    model = timm.create_model('test_vit_liferegress', **kwargs).eval()
    recipe = dict(name='tiny', model='test_vit_liferegress', model_kwargs=dict(kwargs, prune_layers=[3]))
    torch.save({'state_dict': model.state_dict(), 'epoch': 1, 'recipe': recipe}, tmp_path / 'life.pth.tar')
    (tmp_path / 'plot.png').write_bytes(b'\x89PNG\r\n\x1a\n fake')
    evaluation = {'model': 'test_vit_liferegress', 'dataset': 'random', 'plot': 'plot.png',
                  'keep_rates': [{'keep_rate': 0.5, 'accuracy': 70.0, 'flops_ratio': 0.81}]}
    (tmp_path / 'eval.json').write_text(json.dumps(evaluation))
    folder, url = hub.push(
        tmp_path / 'life.pth.tar', 'test_vit_liferegress', 'me/tiny-life', tmp_path / 'eval.json', tmp_path / 'out',
        upload=False, model_kwargs=kwargs)
    assert url is None and (folder / 'tradeoff.png').read_bytes() == b'\x89PNG\r\n\x1a\n fake'
    assert json.loads((folder / 'training_args.json').read_text()) == recipe  # timm_exits.train's checkpoint format
    assert '| 0.5 | 70.00 | 0.810 | - | - |' in (folder / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert (loaded.life_layer, loaded.prune_layers, loaded.keep_rate, loaded.U) == (2, (3,), 0.5, 2.)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)
    note = hub._plot(dict(EVAL, keep_rates=[]), tmp_path)
    assert 'matplotlib was not installed' in note and not any(tmp_path.iterdir())


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip('matplotlib')
    evaluation = dict(EVAL, keep_rates=[], plot='not-drawn.png', _dir=str(tmp_path))  # a plot the eval failed to draw
    assert hub._plot(evaluation, tmp_path) == '![Accuracy against compute](tradeoff.png)'
    assert (tmp_path / 'tradeoff.png').read_bytes()[:4] == b'\x89PNG'


def test_label_names(tmp_path):
    with torch.device('meta'):
        model = timm.create_model('deit_small_liferegress.in1k')
    labels = hub._label_config(model, hub.card_metadata('deit_small_liferegress.in1k'), None)
    assert len(labels['label_names']) == 1000 and labels['label_names'][0] == 'n01440764'  # timm's ImageNet synsets
    (tmp_path / 'names.txt').write_text('\n'.join(f'class {i}' for i in range(1000)))
    assert hub._label_config(model, {}, tmp_path / 'names.txt') == dict(label_names=[f'class {i}' for i in range(1000)])
    assert hub._label_config(timm.create_model(NAMED), hub.card_metadata(NAMED), None) == {}


def test_any_parent_twin_round_trip_with_parent_base_model(tmp_path):
    """A twin of any timm parent (here a rotary Eva at a tiny size) publishes with its build arguments and the
    parent's Hub repo as base_model, and comes back equal through local-dir."""
    kwargs = dict(depth=3, embed_dim=32, num_heads=2, img_size=28, num_classes=4, exit_layers=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = timm.create_model('eva02_tiny_patch14_224_mexit', **kwargs).eval()
    torch.save({'state_dict': model.state_dict(), 'epoch': 1}, tmp_path / 'twin.pth.tar')
    folder, _ = hub.push(tmp_path / 'twin.pth.tar', 'eva02_tiny_patch14_224_mexit', 'me/eva-exits', None,
                         tmp_path / 'out', upload=False, model_kwargs=kwargs)
    card = (folder / 'README.md').read_text()
    parent_repo = timm.models.get_pretrained_cfg('eva02_tiny_patch14_224').hf_hub_id
    assert f'base_model: {parent_repo}' in card
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert type(loaded).__name__ == 'MultiExitEva' and loaded.exit_layers == (1, 2, 3)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_loaded_back_with_the_training_preprocessing(published):
    """config.json's pretrained cfg holds train.py's mean, std, crop and interpolation: hf-hub: and local-dir: give
    users the training transform through timm.data.resolve_data_config(model=...)."""
    expected = dict(input_size=[3, 32, 32], interpolation='bilinear', mean=TRAIN_PREPROCESSING['mean'],
                    std=TRAIN_PREPROCESSING['std'], crop_pct=1.0, crop_mode='center')
    for key in ('hub', 'local'):
        assert published['loaded'][key]['data'] == expected, key
    assert 'mean (0.25, 0.5, 0.75) [checkpoint: train.py args]' in published['push'].stderr
    card = (published['root'] / 'export' / 'README.md').read_text()
    assert 'mean (0.25, 0.5, 0.75), std (0.2, 0.3, 0.4), crop_pct 1 (center, bilinear)' in card


def test_push_refuses_an_evaluation_of_other_preprocessing(published, tmp_path):
    evaluation = dict(EVAL, data_config=dict(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], crop_pct=1.0))
    (tmp_path / 'eval.json').write_text(json.dumps(evaluation))
    with pytest.raises(ValueError, match=r'was measured with mean=\[0.5, 0.5, 0.5\], std=\[0.5, 0.5, 0.5\], but the '
                                         r'push records mean=\[0.25, 0.5, 0.75\], std=\[0.2, 0.3, 0.4\]'):
        hub.push(published['root'] / 'ckpt.pth.tar', NAMED, evaluation=tmp_path / 'eval.json',
                 local_dir=tmp_path / 'export', upload=False)
    assert not (tmp_path / 'export').exists()
