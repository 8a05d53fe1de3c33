"""The recipes' trainer under kills and bad input: one source of truth for the weights, the log across resumes, temp
files, zero-step runs, changed arguments, and the error of every bad argument."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from timm_exits import train as train_module
from timm_exits.train import Recipe, RunError, Stage, _Run, _step_cost_main, main, train
from timm_exits.data import DigitsDataset

ROOT = Path(__file__).resolve().parents[1]
RECIPE = Recipe(
    name='resume', model='test_vit_mexit', dataset='digits', num_classes=10, batch_size=64, eval_batch_size=512,
    workers=0, seed=1, log_interval=1000, model_kwargs=dict(embed_dim=16, img_size=16, patch_size=4),
    stages=[Stage('mevit', epochs=2, opt='adamw', lr=3e-3, task_kwargs=dict(num_sampled=1))])
_DIGITS_INIT = DigitsDataset.__init__


def _small_digits_init(self, *args, **kwargs):
    """A quarter of each digits split (4 training batches of 64) keeps these tests fast."""
    _DIGITS_INIT(self, *args, **kwargs)
    self.images, self.targets = self.images[::4], self.targets[::4]


@pytest.fixture(scope='module', autouse=True)
def _small_and_single_threaded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DigitsDataset, '__init__', _small_digits_init)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A run stopped after epoch 1 of 2 ('partial'), and the same run finished ('finished')."""
    root = tmp_path_factory.mktemp('runs')
    assert train(RECIPE, str(root / 'partial'), stop_after=1) is None
    shutil.copytree(root / 'partial', root / 'finished')
    train(RECIPE, str(root / 'finished'))
    return root


def _copy(runs: Path, name: str, dst: Path) -> Path:
    shutil.copytree(runs / name, dst)
    return dst


def _meta(path: Path) -> dict:
    with safe_open(str(path), 'pt') as f:
        return json.loads(f.metadata()['timm_exits'])


def _checkpoint(path: Path) -> dict:
    return torch.load(path / 'last.pth.tar', map_location='cpu', weights_only=True)


def _log_epochs(path: Path) -> list:
    return [(r['stage'], r['epoch']) for r in map(json.loads, (path / 'log.jsonl').read_text().splitlines())]


def _assert_products_match_checkpoint(path: Path) -> None:
    state = _checkpoint(path)
    weights = load_file(path / 'model.safetensors')
    assert weights.keys() == state['state_dict'].keys()
    assert all(torch.equal(weights[k], v) for k, v in state['state_dict'].items())
    assert _meta(path / 'model.safetensors') == {
        'model': 'test_vit_mexit',
        'model_kwargs': {'embed_dim': 16, 'img_size': 16, 'patch_size': 4, 'exit_criterion': 'confidence'},
        'num_classes': 10, 'stage': state['stage'], 'epoch': state['epoch'], 'format': 1,
        'data_config': {'input_size': [3, 16, 16], 'interpolation': 'bicubic', 'mean': [.5, .5, .5],
                        'std': [.5, .5, .5], 'crop_pct': 0.9, 'crop_mode': 'center'}}
    assert state['data_config'] == _meta(path / 'model.safetensors')['data_config']
    assert state['recipe'] == dataclasses.asdict(RECIPE)
    assert set(json.loads((path / 'eval.json').read_text())) >= {'model', 'dataset', 'exits', 'plot'}
    assert (path / 'tradeoff.png').read_bytes()[:4] == b'\x89PNG'
    assert not [p for p in os.listdir(path) if '.tmp' in p]


def test_only_the_checkpoint_exists_while_training(runs):
    assert sorted(os.listdir(runs / 'partial')) == ['last.pth.tar', 'log.jsonl']
    assert _log_epochs(runs / 'partial') == [('mevit', 1)]
    _assert_products_match_checkpoint(runs / 'finished')
    assert (_meta(runs / 'finished' / 'model.safetensors')['stage'], _checkpoint(runs / 'finished')['epoch']) == (0, 1)
    assert _log_epochs(runs / 'finished') == [('mevit', 1), ('mevit', 2)]  # resumed: no row lost, none twice


def test_sigkill_while_the_final_weights_are_written(runs, tmp_path):
    out = _copy(runs, 'partial', tmp_path / 'run')
    script = textwrap.dedent(f'''
        import os, signal, sys
        import torch
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_train_resume import RECIPE, DigitsDataset, _small_digits_init
        from timm_exits.train import train
        DigitsDataset.__init__ = _small_digits_init
        torch.set_num_threads(1)
        replace = os.replace

        def killed_at_weights(src, dst):
            if str(dst).endswith('model.safetensors'):
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        os.replace = killed_at_weights
        train(RECIPE, sys.argv[1])
    ''')
    proc = subprocess.run([sys.executable, '-c', script, str(out)], env={**os.environ, 'PYTHONPATH': str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    files = set(os.listdir(out))
    assert {'last.pth.tar', 'log.jsonl'} <= files and not files & {'model.safetensors', 'eval.json', 'tradeoff.png'}
    assert [f for f in files if f.startswith('model.safetensors.tmp')]  # the kill left its temp file
    assert _checkpoint(out)['epoch'] == 1 and _log_epochs(out) == [('mevit', 1), ('mevit', 2)]
    result = train(RECIPE, str(out))  # the run is finished: only the final step runs again
    _assert_products_match_checkpoint(out)
    assert result == json.loads((out / 'eval.json').read_text())
    assert _log_epochs(out) == [('mevit', 1), ('mevit', 2)]
    finished = load_file(runs / 'finished' / 'model.safetensors')
    assert all(torch.equal(v, load_file(out / 'model.safetensors')[k]) for k, v in finished.items())


def test_stale_weights_of_the_last_epoch_are_rewritten(runs, tmp_path):
    out = _copy(runs, 'finished', tmp_path / 'run')
    older = _checkpoint(runs / 'partial')['state_dict']  # what a kill before the last weights write left behind
    save_file(older, str(out / 'model.safetensors'))  # no metadata, as an earlier version wrote it
    (out / 'eval.json').write_text('{"stale": true}')
    train(RECIPE, str(out))
    _assert_products_match_checkpoint(out)
    assert 'stale' not in json.loads((out / 'eval.json').read_text())
    # weights of another (stage, epoch) are rewritten too
    save_file(older, str(out / 'model.safetensors'), metadata={'timm_exits': json.dumps(
        {**_meta(out / 'model.safetensors'), 'epoch': 0})})
    train(RECIPE, str(out))
    _assert_products_match_checkpoint(out)


def test_missing_products_are_completed_and_matching_ones_kept(runs, tmp_path):
    out = _copy(runs, 'finished', tmp_path / 'run')
    (out / 'tradeoff.png').unlink()
    before = (out / 'model.safetensors').stat().st_mtime_ns, (out / 'eval.json').read_text()
    train(RECIPE, str(out))
    assert ((out / 'model.safetensors').stat().st_mtime_ns, (out / 'eval.json').read_text()) == before
    _assert_products_match_checkpoint(out)
    (out / 'eval.json').unlink()
    train(RECIPE, str(out))
    _assert_products_match_checkpoint(out)


def test_log_keeps_the_row_of_a_kill_after_the_checkpoint(runs, tmp_path, monkeypatch):
    out = _copy(runs, 'partial', tmp_path / 'run')
    write_log = _Run.write_log

    def killed_after_checkpoint(self, rows):
        if len(rows) == 2:
            raise KeyboardInterrupt
        write_log(self, rows)
    monkeypatch.setattr(_Run, 'write_log', killed_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(RECIPE, str(out))
    monkeypatch.setattr(_Run, 'write_log', write_log)
    assert _checkpoint(out)['epoch'] == 1 and _log_epochs(out) == [('mevit', 1)]
    assert not (out / 'model.safetensors').exists()
    train(RECIPE, str(out))
    assert _log_epochs(out) == [('mevit', 1), ('mevit', 2)]
    _assert_products_match_checkpoint(out)


def test_checkpoint_without_log_rows_keeps_the_log_file(runs, tmp_path):
    out = _copy(runs, 'partial', tmp_path / 'run')
    state = _checkpoint(out)
    del state['log']  # as an earlier version wrote it
    torch.save(state, out / 'last.pth.tar')
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"stage": "mev')  # the half line of a kill during an append
    train(RECIPE, str(out))
    assert _log_epochs(out) == [('mevit', 1), ('mevit', 2)]


def test_temp_files_of_a_killed_run_are_removed(runs, tmp_path):
    out = _copy(runs, 'finished', tmp_path / 'run')
    for name in ('last.pth.tar.tmp123', 'log.jsonl.tmp9', 'eval.json.tmp77', 'tradeoff.png.tmp5', 'notes.tmp1'):
        (out / name).write_bytes(b'partial')
    train(RECIPE, str(out))
    assert sorted(p for p in os.listdir(out) if '.tmp' in p) == ['notes.tmp1']  # not a file of the run: kept


class _Stop(Exception):
    pass


def _stop_at_training(monkeypatch):
    def stop(*args, **kwargs):
        raise _Stop
    monkeypatch.setattr(_Run, 'train_epoch', stop)


def test_training_again_first_removes_the_products(runs, tmp_path, monkeypatch):
    _stop_at_training(monkeypatch)
    out = _copy(runs, 'finished', tmp_path / 'more')
    longer = dataclasses.replace(RECIPE, stages=[dataclasses.replace(RECIPE.stages[0], epochs=3)])
    with pytest.raises(_Stop):
        train(longer, str(out), allow_changed_args=True)
    assert sorted(os.listdir(out)) == ['last.pth.tar', 'log.jsonl']
    assert _checkpoint(out)['recipe'] == dataclasses.asdict(longer)  # the run continues with the new arguments
    out = _copy(runs, 'finished', tmp_path / 'over')
    with pytest.raises(_Stop):
        train(RECIPE, str(out), resume=False)
    assert os.listdir(out) == []


def test_changed_arguments_are_refused_and_listed(runs, tmp_path):
    out = _copy(runs, 'finished', tmp_path / 'run')
    changed = dataclasses.replace(RECIPE, batch_size=32, model_kwargs={**RECIPE.model_kwargs, 'embed_dim': 32},
                                  stages=[dataclasses.replace(RECIPE.stages[0], lr=1e-2)])
    with pytest.raises(RunError) as e:
        train(changed, str(out))
    assert 'other arguments' in str(e.value) and '--allow-changed-args' in str(e.value)
    for diff in ("model_kwargs.embed_dim: 16 -> 32", 'stages[0].lr: 0.003 -> 0.01', 'batch_size: 64 -> 32'):
        assert diff in str(e.value)
    folder = dataclasses.replace(RECIPE, dataset='folder')
    with pytest.raises(RunError, match=r"dataset: 'digits' -> 'folder'; data_dir: \(absent\) -> "):
        train(folder, str(out), data_dir=str(tmp_path))
    # workers, log interval, eval batch size and (for digits) the data folder do not change the result
    same = dataclasses.replace(RECIPE, workers=1, log_interval=5, eval_batch_size=100, name='other')
    assert train(same, str(out), data_dir='elsewhere') == json.loads((runs / 'finished' / 'eval.json').read_text())
    with pytest.raises(SystemExit) as e:
        main(RECIPE, ['--output', str(out), '--lr', '0.01', '--device', 'cpu'])
    assert e.value.code == 2


def test_changed_arguments_continue_when_allowed(runs, tmp_path):
    out = _copy(runs, 'finished', tmp_path / 'run')
    longer = dataclasses.replace(RECIPE, stages=[dataclasses.replace(RECIPE.stages[0], epochs=3)])
    train(longer, str(out), allow_changed_args=True)
    assert _log_epochs(out) == [('mevit', 1), ('mevit', 2), ('mevit', 3)]
    assert _meta(out / 'model.safetensors')['epoch'] == 2 == _checkpoint(out)['epoch']
    train(longer, str(out))  # the checkpoint now records the new arguments


@pytest.mark.parametrize('change, message', [
    (dict(batch_size=1000), 'batch_size=1000 makes no optimizer step: the .train. split has 270 images and the last '
                            r'incomplete batch is dropped; allowed: batch_size <= 270'),
    (dict(grad_accum=5), r'grad_accum=5 makes no optimizer step: an epoch has 4 batches of batch_size=64; allowed: '
                         'grad_accum <= 4'),
])
def test_zero_step_runs_stop_before_training(tmp_path, change, message):
    with pytest.raises(RunError, match=message):
        train(dataclasses.replace(RECIPE, **change), str(tmp_path))
    assert os.listdir(tmp_path) == []


def _cli_error(capsys, argv, recipe=RECIPE):
    with pytest.raises(SystemExit) as e:
        main(recipe, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and ': error: ' in err[-1] and 'Traceback' not in '\n'.join(err)  # argparse's form
    return err[-1]


@pytest.mark.parametrize('args, message', [
    (['--epochs', '0'], "argument --epochs: 0 is not allowed: an integer >= 1"),
    (['--epochs', '-1'], "argument --epochs: -1 is not allowed: an integer >= 1"),
    (['--epochs', '2', '3'], 'argument --epochs: one value per stage (1: mevit), got 2: 2 3'),
    (['--lr', '1e-3', '1e-3'], 'argument --lr: one value per stage (1: mevit), got 2'),
    (['--lr', '-1'], 'argument --lr: -1 is not allowed: a finite number > 0'),
    (['--lr', 'nan'], 'argument --lr: nan is not allowed: a finite number > 0'),
    (['--grad-accum', '0'], 'argument --grad-accum: 0 is not allowed: an integer >= 1'),
    (['--batch-size', '0'], 'argument --batch-size: 0 is not allowed: an integer >= 1'),
    (['--workers', '-1'], 'argument --workers: -1 is not allowed: an integer >= 0'),
    (['--stop-after', '-1'], 'argument --stop-after: -1 is not allowed: an integer >= 1'),
    (['--stop-after', '0'], 'argument --stop-after: 0 is not allowed: an integer >= 1'),
    (['--device', 'bogus'], "argument --device: 'bogus' is not a torch device"),
    (['--init-checkpoint', 'no/such.safetensors'], "argument --init-checkpoint: 'no/such.safetensors' does not exist"),
    (['--batch-size', '1000'], ': error: batch_size=1000 makes no optimizer step'),
    (['--model-kwargs', 'no_such_kwarg=1'], "model_kwargs {'embed_dim': 16, 'img_size': 16, 'patch_size': 4, "
                                            "'no_such_kwarg': 1}: "),
    (['--model-kwargs', 'exit_drop_rate=2'], 'exit_drop_rate must be'),
])
def test_cli_errors(capsys, tmp_path, args, message):
    assert message in _cli_error(capsys, ['--output', str(tmp_path / 'out'), '--device', 'cpu'] + args)
    assert not (tmp_path / 'out' / 'eval.json').exists()


def test_cli_data_dir_error(capsys, tmp_path):
    recipe = dataclasses.replace(RECIPE, dataset='folder')
    assert "argument --data-dir: 'no/such/dir' is not a folder (dataset folder reads it)" in _cli_error(
        capsys, ['--output', str(tmp_path / 'out'), '--data-dir', 'no/such/dir'], recipe)


def test_cli_output_errors(capsys, tmp_path, monkeypatch):
    (tmp_path / 'file').write_text('')
    assert f"argument --output: '{tmp_path / 'file'}' is a file, not a folder" in _cli_error(
        capsys, ['--output', str(tmp_path / 'file')])
    assert f"argument --output: '{tmp_path / 'file' / 'sub'}' cannot be created" in _cli_error(
        capsys, ['--output', str(tmp_path / 'file' / 'sub')])
    (tmp_path / 'ro').mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: the folder answers as a read-only one would
        def read_only(*args, **kwargs):
            raise PermissionError(13, 'Permission denied')
        monkeypatch.setattr(train_module.tempfile, 'TemporaryFile', read_only)
    assert f"argument --output: '{tmp_path / 'ro'}' is not writable (Permission denied)" in _cli_error(
        capsys, ['--output', str(tmp_path / 'ro')])
    monkeypatch.undo()
    with pytest.raises(RunError, match="output: '.*file' is a file, not a folder"):
        train(RECIPE, str(tmp_path / 'file'))
    with pytest.raises(RunError, match="init_checkpoint: 'missing.pth' does not exist"):
        train(dataclasses.replace(RECIPE, init_checkpoint='missing.pth'), str(tmp_path / 'out'))
    with pytest.raises(ValueError, match='train.stop_after=0 is not allowed: an integer >= 1'):
        train(RECIPE, str(tmp_path / 'out'), stop_after=0)


@pytest.mark.parametrize('args, message', [
    (['--rounds', '0'], 'argument --rounds: 0 is not allowed: an integer >= 1'),
    (['--batch-size', '0'], 'argument --batch-size: 0 is not allowed: an integer >= 1'),
    (['--model', 'tnt_s_legacy_patch16_224'],
     "argument --model: 'tnt_s_legacy_patch16_224' has no multi-exit variant 'tnt_s_legacy_patch16_224_mexit'"),
])
def test_step_cost_cli_errors(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        _step_cost_main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith('python -m timm_exits.train step-cost: error:') and message in err


def test_step_cost_help_is_whole(capsys):
    with pytest.raises(SystemExit) as e:
        _step_cost_main(['--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert train_module.inspect.cleandoc(train_module.step_cost.__doc__).replace('``', '').split()[-4:] == \
        out[:out.index('options:')].split()[-4:]  # the docstring to its last word


@pytest.mark.parametrize('cls, kwargs, message', [
    (Stage, dict(task='mevit', epochs=0), 'Stage.epochs=0 is not allowed: an integer >= 1'),
    (Stage, dict(task='mevit', epochs=1.5), 'Stage.epochs=1.5 is not allowed: an integer >= 1'),
    (Stage, dict(task='nope', epochs=1), "Stage.task='nope' is not allowed: one of "),
    (Stage, dict(task='mevit', epochs=1, lr=float('nan')), r'Stage.lr=nan is not allowed: a finite number in \(0'),
    (Stage, dict(task='mevit', epochs=1, lr=-1), r'Stage.lr=-1 is not allowed'),
    (Stage, dict(task='mevit', epochs=1, opt='bogus'), "Stage.opt='bogus' is not allowed: a timm optimizer name"),
    (Stage, dict(task='mevit', epochs=1, momentum=1.),
     r'Stage.momentum=1.0 is not allowed: a finite number in \[0, 1\)'),
    (Stage, dict(task='mevit', epochs=1, early_stop=0), 'Stage.early_stop=0 is not allowed: an integer >= 1 or None'),
    (Stage, dict(task='mevit', epochs=1, part_lrs={'life': 0}), 'Stage.part_lrs='),
    (Stage, dict(task='mevit', epochs=1, plateau_factor=0), 'Stage.plateau_factor=0 is not allowed'),
    (Recipe, dict(batch_size=0), 'Recipe.batch_size=0 is not allowed: an integer >= 1'),
    (Recipe, dict(grad_accum=0), 'Recipe.grad_accum=0 is not allowed: an integer >= 1'),
    (Recipe, dict(workers=-1), 'Recipe.workers=-1 is not allowed: an integer >= 0'),
    (Recipe, dict(model='no_such_model'), "Recipe.model='no_such_model' is not allowed"),
    (Recipe, dict(num_classes=0), 'Recipe.num_classes=0 is not allowed: an integer >= 1 or None'),
    (Recipe, dict(smoothing=1.), 'Recipe.smoothing=1.0 is not allowed'),
    (Recipe, dict(keep_rates=(1., 0.)), r'Recipe.keep_rates=\(1.0, 0.0\) is not allowed'),
    (Recipe, dict(clip_grad=0.), 'Recipe.clip_grad=0.0 is not allowed'),
    (Recipe, dict(stages=[dict(task='mevit')]), 'Recipe.stages=.* is not allowed: a list of Stage'),
])
def test_recipe_and_stage_values_are_checked(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        if cls is Stage:
            Stage(**kwargs)
        else:
            dataclasses.replace(RECIPE, **kwargs)


def test_default_criterion_is_recorded_and_checked(runs):
    """The recipe left exit_criterion at its default: the weights record it, so another one is refused on load."""
    weights = str(runs / 'finished' / 'model.safetensors')
    kwargs = dict(num_classes=10, embed_dim=16, img_size=16, patch_size=4)
    timm.create_model('test_vit_mexit', checkpoint_path=weights, **kwargs)
    with pytest.raises(ValueError, match="exit_criterion='confidence'"):
        timm.create_model('test_vit_mexit', checkpoint_path=weights, exit_criterion='uncertainty', **kwargs)
