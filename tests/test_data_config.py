"""One preprocessing for a checkpoint: a flag, else what the checkpoint records, else the pretrained cfg.

validate, export and hub push resolve it the same way (``timm_exits.data.resolve_data_cfg``); a checkpoint written by
timm's train.py (its ``args``) is evaluated as train.py evaluates it, image for image.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm
from timm.data import create_dataset as timm_dataset, create_loader, resolve_data_config

from timm_exits.data import (
    DATA_CONFIG_KEYS, recorded_data_config, resolve_data_cfg, write_digits_folder,
)
from timm_exits.validate import main as validate_main

# A rotary Eva twin whose pretrained cfg (CLIP's mean and std, bicubic, crop 0.9) is not the training's
EVA = 'eva02_tiny_patch14_224_mexit'
EVA_KWARGS = dict(img_size=28, depth=2, embed_dim=32, num_heads=2)
TRAIN_MEAN, TRAIN_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _train_py_args(**changes) -> argparse.Namespace:
    """timm train.py's ``args`` as its checkpoints pickle them (the preprocessing arguments and a few others)."""
    args = dict(model=EVA, model_kwargs=dict(EVA_KWARGS), num_classes=10, img_size=28, input_size=None, in_chans=None,
                mean=list(TRAIN_MEAN), std=list(TRAIN_STD), crop_pct=1.0, interpolation='', train_crop_mode=None,
                lr=1e-3, epochs=2, batch_size=64)
    args.update(changes)
    return argparse.Namespace(**args)


@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('digits') / 'folder'
    write_digits_folder(str(root), num_val=200, img_size=28)
    return root


@pytest.fixture(scope='module')
def train_py_checkpoint(tmp_path_factory) -> Path:
    """An Eva twin with random weights saved in train.py's layout (state_dict + args)."""
    torch.manual_seed(3)
    model = timm.create_model(EVA, num_classes=10, **EVA_KWARGS)
    path = tmp_path_factory.mktemp('ckpt') / 'last.pth.tar'
    torch.save({'epoch': 1, 'arch': EVA, 'state_dict': model.state_dict(), 'args': _train_py_args()}, path)
    return path


def _train_py_top1(model: torch.nn.Module, args: argparse.Namespace, root: Path) -> int:
    """Correct images of train.py's evaluation, rebuilt from timm's public pieces: its data config
    (``resolve_data_config(vars(args), model=model)``), its eval loader (``create_loader`` with input size,
    interpolation, mean, std and crop_pct, nothing else), top-1 of the model's output."""
    config = resolve_data_config(vars(args), model=model)
    dataset = timm_dataset('', root=str(root), split='validation')
    loader = create_loader(dataset, input_size=config['input_size'], batch_size=64, is_training=False,
                           interpolation=config['interpolation'], mean=config['mean'], std=config['std'],
                           num_workers=0, crop_pct=config['crop_pct'], use_prefetcher=False, device=torch.device('cpu'))
    correct = 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
    return correct


def _validate(checkpoint: Path, root: Path, out: Path, *flags: str) -> dict:
    return validate_main(['--checkpoint', str(checkpoint), '--dataset', 'folder', '--data-dir', str(root), '--split',
                          'validation', '--output', str(out), '--workers', '0', '--no-progress', *flags])


# --- resolution order --------------------------------------------------------------------------------------------

def _model_with_cfg(cfg: dict) -> torch.nn.Module:
    model = timm.create_model('test_vit_mexit', pretrained_cfg_overlay=cfg)
    return model


VALUES = {  # three candidate values per key: index 0 flag, 1 record, 2 pretrained cfg
    'input_size': [(3, 32, 32)] * 3,
    'mean': [(0.1, 0.2, 0.3), (0.4, 0.4, 0.4), (0.7, 0.6, 0.5)],
    'std': [(0.9, 0.8, 0.7), (0.2, 0.2, 0.2), (0.3, 0.3, 0.3)],
    'crop_pct': [0.5, 0.75, 0.95],
    'crop_mode': ['squash', 'border', 'center'],
    'interpolation': ['nearest', 'bilinear', 'lanczos'],
}


@pytest.mark.parametrize('seed', range(40))
def test_each_value_comes_from_the_first_source_that_has_it(seed):
    """Fuzz: random keys set by flags, by a recorded data config or train.py args, by the pretrained cfg."""
    rng = random.Random(seed)
    keys = [k for k in DATA_CONFIG_KEYS if k != 'input_size']
    flags = {k: VALUES[k][0] for k in keys if rng.random() < 0.4}
    record = {k: VALUES[k][1] for k in keys if rng.random() < 0.5}
    cfg = {k: VALUES[k][2] for k in keys if rng.random() < 0.7}
    train_py = rng.random() < 0.5 and 'crop_mode' not in record
    if train_py:
        plain = dict(model='test_vit_mexit', model_kwargs={}, img_size=None, mean=None, std=None, crop_pct=None)
        recorded = vars(_train_py_args(**{**plain, **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in record.items()}}))
        where = 'checkpoint: train.py args'
    else:
        recorded = {'model': 'test_vit_mexit', 'data_config': record}
        where = 'checkpoint: recorded data config'
    model = _model_with_cfg({k: None for k in keys} | cfg)
    resolved = resolve_data_cfg(model, flags, recorded)
    defaults = dict(interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875,
                    crop_mode='center')
    for key in keys:
        if key in flags:
            expected, source = VALUES[key][0], 'command line'
        elif key in record:
            expected, source = VALUES[key][1], where
        elif key == 'crop_mode' and train_py:  # train.py's eval loader passes no crop mode: the centre crop
            expected, source = 'center', where
        elif key in cfg:
            expected, source = VALUES[key][2], 'pretrained cfg'
        else:
            expected, source = defaults[key], 'timm default'
        assert resolved[key] == expected and resolved.sources[key] == source, (key, resolved.describe())
    assert resolved['input_size'] == (3, 32, 32)
    json.dumps(resolved.record())  # JSON-ready as recorded


def test_train_py_args_read_as_timm_reads_them():
    """The record of train.py args gives what timm's resolve_data_config(vars(args), model) gives."""
    model = timm.create_model(EVA, num_classes=10, **EVA_KWARGS)
    for changes in ({}, dict(mean=[0.3], std=[0.6]), dict(interpolation='bilinear', crop_pct=0.8),
                    dict(img_size=None, input_size=[3, 28, 28])):
        args = _train_py_args(**changes)
        ours = resolve_data_cfg(model, recorded=vars(args))
        timms = resolve_data_config(vars(args), model=model)
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in timms.items()} | {'crop_mode': 'center'} \
            == dict(ours), changes
    assert recorded_data_config({'lr': 0.1}) == ({}, '')  # train args without preprocessing record none


def test_model_size_when_the_pretrained_cfg_size_does_not_fit():
    model = timm.create_model(EVA, num_classes=10, **EVA_KWARGS)
    resolved = resolve_data_cfg(model)
    assert resolved['input_size'] == (3, 28, 28) and resolved.sources['input_size'] == 'model (img_size)'
    assert resolved['mean'] == model.pretrained_cfg['mean'] and resolved.sources['mean'] == 'pretrained cfg'


@pytest.mark.parametrize('flags, message', [
    ({'crop_mode': 'middle'}, "--crop-mode 'middle' is not known; allowed: center, squash, border"),
    ({'interpolation': 'cubic'}, "--interpolation 'cubic' is not known; allowed: bilinear"),
    ({'mean': [0.5, 0.5]}, '--mean must be 1 or 3 (one per input channel) numbers'),
    ({'std': [0.5, 0., 0.5]}, '--std must be 1 or 3 (one per input channel) numbers > 0'),
    ({'crop_pct': 0}, '--crop-pct must be a number > 0'),
    ({'input_size': [1, 32, 32]}, '--input-size (1, 32, 32): the model takes 3 input channels'),
    ({'img_size': 64}, 'input size (3, 64, 64) from the command line (--img-size / --input-size) does not fit'),
])
def test_bad_overrides_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_data_cfg(timm.create_model('test_vit_mexit'), flags)


def test_bad_record_names_the_checkpoint():
    with pytest.raises(ValueError, match=re.escape("the checkpoint records a bad data config (checkpoint: recorded "
                                                   "data config): data_config['mean'] must be")):
        resolve_data_cfg(timm.create_model('test_vit_mexit'), recorded={'data_config': {'mean': [1, 2]}})


def test_validate_flags_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        validate_main(['--model', 'test_vit_mexit', '--dataset', 'digits', '--output', str(tmp_path), '--workers',
                       '0', '--no-progress', '--crop-mode', 'middle'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --crop-mode 'middle' is not known; allowed: center, squash, border"]
    assert not (tmp_path / 'eval.json').exists()


# --- a train.py checkpoint evaluated as train.py evaluates it --------------------------------------------------------

def test_validate_equals_train_py_evaluation_to_the_image(train_py_checkpoint, digits_folder, tmp_path):
    """train.py's args layout (no timm checkout needed): the final exit's top-1 of validate equals train.py's
    evaluation of the same weights and images; the pretrained cfg's preprocessing would give another one."""
    state = torch.load(train_py_checkpoint, weights_only=False)
    model = timm.create_model(EVA, num_classes=10, **EVA_KWARGS)
    model.load_state_dict(state['state_dict'])
    expected = _train_py_top1(model, state['args'], digits_folder)
    result = _validate(train_py_checkpoint, digits_folder, tmp_path)
    n = result['num_images']
    assert n == 200 and round(result['exits'][-1]['accuracy'] * n / 100) == expected
    assert result['data_config']['mean'] == TRAIN_MEAN and result['data_config']['crop_pct'] == 1.0
    assert result['data_config']['sources']['mean'] == 'checkpoint: train.py args'
    assert result['data_config']['sources']['interpolation'] == 'pretrained cfg'  # train.py's '' falls back
    pretrained = argparse.Namespace(**{**vars(state['args']), 'mean': None, 'std': None, 'crop_pct': None})
    assert _train_py_top1(model, pretrained, digits_folder) != expected  # the images tell the two apart
    flagged = _validate(train_py_checkpoint, digits_folder, tmp_path / 'flags', '--mean',
                        *map(str, model.pretrained_cfg['mean']), '--std', *map(str, model.pretrained_cfg['std']),
                        '--crop-pct', str(model.pretrained_cfg['crop_pct']))
    assert round(flagged['exits'][-1]['accuracy'] * n / 100) == _train_py_top1(model, pretrained, digits_folder)
    assert flagged['data_config']['sources']['mean'] == 'command line'


def test_export_manifest_records_the_training_preprocessing(train_py_checkpoint, tmp_path):
    pytest.importorskip('onnxscript')
    from timm_exits.export import main as export_main
    kwargs = [f'{k}={v}' for k, v in EVA_KWARGS.items()]
    assert export_main(['--model', EVA, '--model-kwargs', *kwargs, '--num-classes', '10', '--checkpoint',
                        str(train_py_checkpoint), '--output', str(tmp_path / 'onnx'), '--static']) == 0
    manifest = json.loads((tmp_path / 'onnx' / 'manifest.json').read_text())
    assert manifest['mean'] == TRAIN_MEAN and manifest['std'] == TRAIN_STD and manifest['crop_pct'] == 1.0
    assert manifest['input_size'] == [3, 28, 28] and manifest['crop_mode'] == 'center'


def test_recipe_records_its_preprocessing_and_validate_reads_it(tmp_path):
    from timm_exits.train import Recipe, Stage, train
    recipe = Recipe(name='dc', model='test_vit_mexit', dataset='digits', num_classes=10, workers=0, batch_size=64,
                    stages=[Stage('mevit', epochs=1, opt='adamw', lr=1e-3)], data_config={'mean': [0.25], 'std': [0.75]})
    train(recipe, str(tmp_path / 'run'), '', 'cpu')
    result = validate_main(['--checkpoint', str(tmp_path / 'run' / 'model.safetensors'), '--dataset', 'digits',
                            '--split', 'val', '--output', str(tmp_path / 'eval'), '--workers', '0', '--no-progress'])
    assert result['data_config']['mean'] == [0.25] * 3 and result['data_config']['std'] == [0.75] * 3
    assert result['data_config']['sources']['mean'] == 'checkpoint: recorded data config'
    trained = json.loads((tmp_path / 'run' / 'eval.json').read_text())  # the recipe's own evaluation, val split
    assert [r['accuracy'] for r in result['exits']] == [r['accuracy'] for r in trained['exits']]
    default = validate_main(['--checkpoint', str(tmp_path / 'run' / 'model.safetensors'), '--dataset', 'digits',
                             '--split', 'val', '--output', str(tmp_path / 'e2'), '--workers', '0', '--no-progress',
                             '--mean', '0.5', '--std', '0.5'])
    assert [r['accuracy'] for r in default['exits']] != [r['accuracy'] for r in trained['exits']]


# --- timm's own train.py, where a pytorch-image-models checkout is named --------------------------------------------

TIMM_DIR = os.environ.get('TIMM_DIR', '')


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(TIMM_DIR, 'train.py')),
                    reason='set TIMM_DIR to a pytorch-image-models checkout to run timm\'s train.py')
def test_validate_equals_timm_train_py(digits_folder, tmp_path):
    """timm's train.py trains the Eva twin with its own normalisation; validate's final-exit top-1 on the same
    checkpoint and images equals the top-1 train.py printed for its last epoch."""
    kwargs = [f'{k}={v}' for k, v in EVA_KWARGS.items()]
    cmd = [sys.executable, os.path.join(TIMM_DIR, 'train.py'), '--device-modules', 'timm_exits', '--data-dir',
           str(digits_folder), '--model', EVA, '--model-kwargs', *kwargs, '--num-classes', '10', '--img-size', '28',
           '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5', '--crop-pct', '1', '--epochs', '1',
           '--lr', '1e-3', '-b', '64', '--device', 'cpu', '-j', '1', '--no-prefetcher', '--hflip', '0',
           '--color-jitter', '0', '--output', str(tmp_path), '--experiment', 'run', '--log-interval', '1000']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=TIMM_DIR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (tmp_path / 'run' / 'summary.csv').read_text().splitlines()
    header, last = rows[0].split(','), rows[-1].split(',')
    train_py_top1 = float(last[header.index('eval_top1')])
    result = _validate(tmp_path / 'run' / 'last.pth.tar', digits_folder, tmp_path / 'eval')
    n = result['num_images']
    assert round(result['exits'][-1]['accuracy'] * n / 100) == round(train_py_top1 * n / 100)
