"""The shared trainer (timm_exits.train): stages, atomic checkpoints, resume, DDP with gloo, the recipes."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import timm
from timm.utils import random_seed
from timm_exits.train import Recipe, Stage, build_model, build_optimizer, train
from timm_exits.data import DigitsDataset

ROOT = Path(__file__).resolve().parents[1]
TINY = Recipe(
    name='tiny', model='test_vit_mexit', dataset='digits', num_classes=10, batch_size=64, eval_batch_size=512,
    workers=0, seed=1, log_interval=1000, model_kwargs=dict(embed_dim=16),
    stages=[Stage('mevit', epochs=2, opt='adamw', lr=3e-3, warmup_epochs=1, task_kwargs=dict(num_sampled=1)),
            Stage('classifier_wise', epochs=1, opt='adam', lr=1e-3, sched='plateau')])
EXIT_KEYS = {'layer', 'accuracy', 'cost', 'gflops', 'latency_ms', 'practical'}


_DIGITS_INIT = DigitsDataset.__init__


def _small_digits_init(self, *args, **kwargs):
    """A quarter of each digits split keeps the trainer tests fast."""
    _DIGITS_INIT(self, *args, **kwargs)
    self.images, self.targets = self.images[::4], self.targets[::4]


@pytest.fixture(autouse=True)
def _small_digits(monkeypatch):
    monkeypatch.setattr(DigitsDataset, '__init__', _small_digits_init)


@pytest.fixture(scope='module', autouse=True)
def _single_threaded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    yield
    torch.set_num_threads(threads)


def test_train_writes_checkpoint_weights_and_evaluation(tmp_path):
    result = train(TINY, str(tmp_path))
    assert set(result) == {'model', 'dataset', 'num_images', 'exits', 'thresholds', 'budgets', 'plot',
                           'worst_case_threshold_cost', 'budgeted_batch', 'budgeted_batch_chosen_on', 'data_config'}
    assert [set(e) for e in result['exits']] == [EXIT_KEYS] * 3 and result['exits'][0]['practical']
    assert json.loads((tmp_path / 'eval.json').read_text()) == result
    assert (tmp_path / 'tradeoff.png').read_bytes()[:4] == b'\x89PNG'
    log = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [(r['stage'], r['epoch']) for r in log] == [('mevit', 1), ('mevit', 2), ('classifier_wise', 1)]
    assert set(log[0]['val_accuracy']) == {'2', '3', '4'}
    model = timm.create_model('test_vit_mexit', embed_dim=16, checkpoint_path=str(tmp_path / 'model.safetensors'))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_file(tmp_path / 'model.safetensors').items())
    assert not [p for p in os.listdir(tmp_path) if '.tmp' in p]


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    train(TINY, str(tmp_path / 'whole'))
    assert train(TINY, str(tmp_path / 'parts'), stop_after=1) is None  # stops after epoch 1 of stage 1
    real_save = torch.save

    def crash(obj, path, *args, **kwargs):  # dies while writing the next checkpoint
        with open(path, 'wb') as f:
            f.write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, str(tmp_path / 'parts'))
    monkeypatch.setattr(torch, 'save', real_save)
    state = torch.load(tmp_path / 'parts' / 'last.pth.tar', weights_only=True)  # the previous one, whole
    assert (state['stage'], state['epoch']) == (0, 0)
    assert train(TINY, str(tmp_path / 'parts'), stop_after=1) is None  # finishes stage 1
    train(TINY, str(tmp_path / 'parts'))
    whole, parts = (load_file(tmp_path / d / 'model.safetensors') for d in ('whole', 'parts'))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_train_with_amp_accumulation_and_mixup_moves_every_exit(tmp_path):
    recipe = dataclasses.replace(TINY, amp=True, grad_accum=2, batch_size=32, mixup=.8, smoothing=.1,
                                 stages=TINY.stages[:1])
    random_seed(recipe.seed, 0)
    before = build_model(recipe).state_dict()
    train(recipe, str(tmp_path))
    after = load_file(tmp_path / 'model.safetensors')
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith(('exits.', 'uncertainty.')))


def test_part_learning_rates_and_frozen_parameters():
    model = timm.create_model('test_vit_liferegress')
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, Stage('liferegress', epochs=1, opt='adamw', lr=1e-3, weight_decay=.05,
                                       part_lrs={'life': 1e-5}))
    lrs = {id(p): g['lr'] for g in opt.param_groups for p in g['params']}
    assert {lrs[id(p)] for p in model.life.parameters()} == {1e-5}
    assert lrs[id(model.head.weight)] == 1e-3 and id(model.blocks[0].attn.qkv.weight) not in lrs
    decay = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    assert decay[id(model.head.weight)] == .05 and decay[id(model.head.bias)] == 0.


def test_ddp_two_cpu_processes_with_gloo(tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(textwrap.dedent(f'''
        import dataclasses, sys
        import torch.distributed as dist
        from safetensors.torch import save_file
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_train import TINY, DigitsDataset, _small_digits_init
        from timm_exits.train import _Run
        DigitsDataset.__init__ = _small_digits_init
        out = sys.argv[1]
        run = _Run(dataclasses.replace(TINY, stages=TINY.stages[:1]), out, '', 'cpu', False)
        assert run.distributed and run.world_size == 2
        run.run()
        save_file({{k: v.contiguous() for k, v in run.model.state_dict().items()}}, f'{{out}}/rank{{run.rank}}.st')
        dist.destroy_process_group()
    '''))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / f'rank{r}.st') for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients were all-reduced
    assert json.loads((tmp_path / 'eval.json').read_text())['num_images'] > 0


@pytest.mark.parametrize('path', sorted((ROOT / 'train_recipes').glob('*.py')), ids=lambda p: p.stem)
def test_recipes_are_valid(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f'recipe_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipes = getattr(module, 'RECIPES', None) or {'default': getattr(module, 'RECIPE', None)}
    if path.stem == 'digits_demo':
        recipes = module.recipes('out', 3, 0)
    for recipe in recipes.values():
        assert isinstance(recipe, Recipe) and timm.is_model(recipe.model.split('.')[0]), recipe.name
        assert all(isinstance(s, Stage) for s in recipe.stages)


def test_recipe_model_flag_takes_any_parent(tmp_path):
    """--model: a timm parent (tag kept) trains as its twin of the recipe's family; other names are refused."""
    from timm_exits.train import family_model, main
    assert family_model('vit_base_patch14_reg4_dinov2.lvd142m', TINY.model) == \
        'vit_base_patch14_reg4_dinov2_mexit.lvd142m'
    assert family_model('eva02_tiny_patch14_224', 'deit_small_liferegress') == 'eva02_tiny_patch14_224_liferegress'
    assert family_model('vit_small_patch16_224_mexit', TINY.model) == 'vit_small_patch16_224_mexit'
    assert family_model('resnet50.a1_in1k', TINY.model) == 'resnet50_mexit.a1_in1k'  # a CNN parent takes exits
    with pytest.raises(ValueError, match="'tnt_s_legacy_patch16_224' is neither a mexit model nor a timm parent"):
        family_model('tnt_s_legacy_patch16_224', TINY.model)
    with pytest.raises(ValueError, match="'resnet50' is neither a liferegress model nor a timm parent"):
        family_model('resnet50', 'deit_small_liferegress')
    with pytest.raises(ValueError, match="'test_vit_liferegress' is a liferegress model; this recipe trains mexit"):
        family_model('test_vit_liferegress', TINY.model)
    recipe = dataclasses.replace(TINY, model_kwargs={}, stages=TINY.stages[:1])
    argv = ['--output', str(tmp_path / 'run'), '--device', 'cpu', '--epochs', '1', '--model', 'eva02_tiny_patch14_224',
            '--model-kwargs', 'depth=3', 'embed_dim=32', 'num_heads=2', 'img_size=28']
    result = main(recipe, argv)
    assert result['model'] == 'eva02_tiny_patch14_224_mexit' and [e['layer'] for e in result['exits']] == [1, 2, 3]
    meta = json.loads(load_file_metadata(tmp_path / 'run' / 'model.safetensors'))
    assert meta['model'] == 'eva02_tiny_patch14_224_mexit'
    with pytest.raises(SystemExit) as e:
        main(recipe, ['--output', str(tmp_path / 'other'), '--model', 'tnt_s_legacy_patch16_224'])
    assert e.value.code == 2


def load_file_metadata(path: Path) -> str:
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        return f.metadata()['timm_exits']
