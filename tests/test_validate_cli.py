"""``python -m timm_exits.validate``: one-line errors, model arguments read from the checkpoint, warnings, progress."""
import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import timm
from timm_exits import validate
from timm_exits.models._checkpoint import METADATA_KEY

KWARGS = {'exit_criterion': 'uncertainty', 'exit_layers': [1, 3], 'threshold': 0.9}
RECORD = {'model': 'test_vit_mexit', 'model_kwargs': KWARGS, 'num_classes': 10}
FAST = ['--dataset', 'digits', '--split', 'val', '--workers', '0', '--batch-size', '200', '--no-progress']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A run folder with the three checkpoint formats of one model and a plain-backbone checkpoint."""
    path = tmp_path_factory.mktemp('run')
    model = timm.create_model('test_vit_mexit', **KWARGS)
    sd = model.state_dict()
    save_file(sd, path / 'model.safetensors', metadata={METADATA_KEY: json.dumps(dict(RECORD, stage=0, epoch=1,
                                                                                        format=1))})
    torch.save({'state_dict': sd, 'recipe': dict(RECORD, name='tiny')}, path / 'last.pth.tar')
    torch.save({'state_dict': sd, 'args': argparse.Namespace(**RECORD, lr=0.1)}, path / 'model_best.pth.tar')
    save_file({k: v for k, v in sd.items() if not k.startswith(model.new_prefixes)}, path / 'backbone.safetensors')
    save_file(sd, path / 'plain.safetensors')  # nothing recorded
    data = (path / 'last.pth.tar').read_bytes()
    (path / 'cut.pth.tar').write_bytes(data[:len(data) // 3])
    (path / 'bad.safetensors').write_bytes(b'\x00' * 64)
    (path / 'a_file').write_text('x')
    return path


def _fail(argv, capsys):
    with pytest.raises(SystemExit) as info:
        validate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert 'Traceback' not in '\n'.join(err)
    return err[-1]


@pytest.mark.parametrize('argv,message', [
    (['--checkpoint', '{d}/missing.pth'], 'error: --checkpoint: checkpoint {d}/missing.pth does not exist'),
    (['--checkpoint', '{d}/cut.pth.tar'], 'error: checkpoint {d}/cut.pth.tar is truncated, corrupt or not a torch'),
    (['--checkpoint', '{d}/bad.safetensors'], 'error: checkpoint {d}/bad.safetensors is not a valid safetensors'),
    (['--checkpoint', '{d}/last.pth.tar', '--target-drop', 'nan'],
     'argument --target-drop: must be a finite number >= 0, got nan'),
    (['--checkpoint', '{d}/last.pth.tar', '--target-cost', '0'], 'argument --target-cost: must be a number in (0, 1]'),
    (['--checkpoint', '{d}/last.pth.tar', '--dataset', 'imagenet'], "error: --dataset 'imagenet' is not known; "
                                                                      'allowed: digits, folder, torch/cifar10'),
    (['--checkpoint', '{d}/last.pth.tar', '--split', 'dev'],
     "error: --split 'dev' is not a split of digits; allowed: ['train', 'val', 'test']"),
    (['--checkpoint', '{d}/last.pth.tar', '--calib-split', 'dev'], "error: --calib-split 'dev' is not a split"),
    (['--checkpoint', '{d}/last.pth.tar', '--dataset', 'folder', '--data-dir', '{d}', '--split', 'test'],
     "error: --split 'test': --dataset folder reads an ImageFolder at --data-dir/test"),
    (['--checkpoint', '{d}/last.pth.tar', '--batch-size', '0'],
     'argument --batch-size: must be an integer >= 1, got 0'),
    (['--checkpoint', '{d}/last.pth.tar', '--workers', '-1'], 'argument --workers: must be an integer >= 0, got -1'),
    (['--checkpoint', '{d}/last.pth.tar', '--keep-rates', '0'], 'argument --keep-rates: must be a number in (0, 1]'),
    (['--checkpoint', '{d}/last.pth.tar', '--keep-rates', '1.5'], 'argument --keep-rates: must be a number in (0, 1]'),
    (['--model', 'vit_nope_mexit'], "error: --model 'vit_nope_mexit' is not a registered model"),
    ([], 'error: --model is required: no --checkpoint to read it from'),
    (['--checkpoint', '{d}/plain.safetensors'], 'error: --model is required: the checkpoint does not name its model'),
    (['--checkpoint', '{d}/last.pth.tar', '--output', '{d}/a_file/eval'], "error: --output '{d}/a_file/eval' cannot "
                                                                          'be written'),
    (['--checkpoint', '{d}/last.pth.tar', '--model-kwargs', 'exit_criterion=confidence'],
     "error: --model-kwargs exit_criterion='confidence' conflicts with the checkpoint, trained with "
     "exit_criterion='uncertainty'"),
    (['--checkpoint', '{d}/last.pth.tar', '--num-classes', '5'],
     'error: checkpoint {d}/last.pth.tar was trained with num_classes=10, this model has num_classes=5'),
    (['--checkpoint', '{d}/plain.safetensors', '--model', 'test_vit_mexit', '--num-classes', '5'],
     'create the model with num_classes=10'),
    (['--checkpoint', '{d}/plain.safetensors', '--model', 'test_vit_mexit'], 'exit_layers'),  # layout, visible
    (['--checkpoint', '{d}/last.pth.tar', '--device', 'bogus'], "error: --device 'bogus' is not a torch device"),
    (['--model', 'test_vit_liferegress', '--target-cost', '0.5'],
     'error: --target-drop / --target-cost choose an early-exit threshold: a multi-exit model only'),
])
def test_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(d=run_dir) for a in argv]
    if '--output' not in argv:
        argv += ['--output', str(tmp_path / 'out')]
    assert message.format(d=run_dir) in _fail(FAST + argv, capsys)  # argv last: its flags win


def test_empty_folder_dataset(tmp_path, run_dir, capsys):
    (tmp_path / 'data' / 'test' / 'zero').mkdir(parents=True)
    line = _fail(['--checkpoint', str(run_dir / 'last.pth.tar'), '--dataset', 'folder', '--data-dir',
                  str(tmp_path / 'data'), '--output', str(tmp_path / 'out'), '--workers', '0'], capsys)
    assert line.startswith('error: ') and 'zero' in line  # torchvision: no valid file for the class 'zero'


def test_no_images_no_null_accuracy(tmp_path):
    model = timm.create_model('test_vit_mexit')
    with pytest.raises(ValueError, match='no images to evaluate'):
        validate.collect_outputs(model, validate.make_loader([], 4), torch.device('cpu'))
    with pytest.raises(ValueError, match='refusing to write a NaN'):
        validate.write_json({'accuracy': float('nan')}, str(tmp_path / 'eval.json'))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('file', ['model.safetensors', 'last.pth.tar', 'model_best.pth.tar'])
def test_model_arguments_come_from_the_checkpoint(run_dir, tmp_path, file, monkeypatch, caplog):
    """No --model, no --model-kwargs, no --num-classes: all three checkpoint formats carry them."""
    seen = {}
    collect = validate.collect_outputs

    def spy(model, *args, **kwargs):
        seen['model'] = model
        return collect(model, *args, **kwargs)

    monkeypatch.setattr(validate, 'collect_outputs', spy)
    with caplog.at_level('INFO'):
        result = validate.main(['--checkpoint', str(run_dir / file), '--output', str(tmp_path), *FAST])
    model = seen['model']
    assert (model.exit_layers, model.exit_criterion, model.threshold, model.num_classes) == ((1, 3, 4), 'uncertainty',
                                                                                             0.9, 10)
    assert [e['layer'] for e in result['exits']] == [1, 3, 4] and result['model'] == 'test_vit_mexit'
    assert 'random weights' not in caplog.text and 'UNTRAINED' not in caplog.text
    written = json.loads((tmp_path / 'eval.json').read_text())
    accuracies = [r['accuracy'] for key in ('exits', 'thresholds', 'budgets') for r in written[key]]
    assert accuracies and all(isinstance(a, float) for a in accuracies)  # never null


def test_explicit_flags_win_over_the_checkpoint(run_dir, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(validate, 'evaluate', lambda model, *a, **k: seen.setdefault('model', model) and {
        'model': 'x', 'dataset': 'digits', 'num_images': 1, 'plot': 'tradeoff.png'})
    monkeypatch.setattr(validate, 'plot_tradeoff', lambda result, path: None)
    validate.main(['--checkpoint', str(run_dir / 'last.pth.tar'), '--model-kwargs', 'threshold=0.5',
                   'exit_criterion=uncertainty', '--output', str(tmp_path), *FAST])
    assert (seen['model'].threshold, seen['model'].exit_criterion) == (0.5, 'uncertainty')


def test_untrained_parts_warn(run_dir, tmp_path, caplog):
    with caplog.at_level('INFO'):
        validate.main(['--model', 'test_vit_mexit', '--checkpoint', str(run_dir / 'backbone.safetensors'),
                       '--output', str(tmp_path / 'a'), *FAST])
    assert 'has no exit heads; loading its backbone only' in caplog.text
    assert caplog.text.count('UNTRAINED') == 1
    caplog.clear()
    with caplog.at_level('INFO'):
        validate.main(['--model', 'test_vit_liferegress', '--output', str(tmp_path / 'b'), *FAST])
    assert 'test_vit_liferegress has random weights (neither --checkpoint nor --pretrained)' in caplog.text
    caplog.clear()
    with caplog.at_level('INFO'):  # --pretrained of weights without exits (a parent tag's file, offline)
        validate.main(['--model', 'test_vit_mexit', '--pretrained', '--model-kwargs',
                       f"pretrained_cfg_overlay={{'file': '{run_dir / 'backbone.safetensors'}'}}",
                       '--output', str(tmp_path / 'c'), *FAST])
    assert caplog.text.count('are UNTRAINED') == 1 and 'random weights' not in caplog.text


def test_default_workers_never_above_the_cpus(monkeypatch):
    assert validate.build_parser().get_default('workers') <= validate.available_cpus()
    monkeypatch.setattr(validate, 'available_cpus', lambda: 1)
    assert validate.build_parser().get_default('workers') == 1


def test_progress_bar(run_dir, tmp_path, capsys):
    argv = ['--checkpoint', str(run_dir / 'model.safetensors'), '--output', str(tmp_path), *FAST]
    validate.main([a for a in argv if a != '--no-progress'] + ['--batch-size', '120'])
    assert 'val: 100%' in capsys.readouterr().err  # tqdm, 360 images in 3 batches
    validate.main(argv)
    assert '%|' not in capsys.readouterr().err


def test_cli_process_error_is_one_line(run_dir, tmp_path):
    """The real command: exit status 2, one error line, no traceback."""
    argv = [sys.executable, '-m', 'timm_exits.validate', '--dataset', 'digits', '--checkpoint',
            str(run_dir / 'missing.pth'), '--output', str(tmp_path)]
    bad = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f'error: --checkpoint: checkpoint {run_dir}/missing.pth does not exist']
