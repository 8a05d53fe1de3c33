"""Training objectives (timm_exits.tasks) and timm train.py's step on a multi-exit model (the train-mode hook)."""
import math
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask, LogitDistillationTask
from timm.utils import CheckpointSaver, NativeScaler

from timm_exits.tasks import (
    BackboneTask, ClassifierWiseTask, EndToEndTask, ExitsForward, LifeRegressTask, MEViTTask, create_task, sample_exits,
)

NEW_PARTS = ('exits.', 'uncertainty.')


class _Fixed(nn.Module):
    """Stands in for ExitsForward: fixed exit logits and uncertainties (the loss arithmetic alone)."""

    def __init__(self, logits: List[torch.Tensor], uncertainty: List[torch.Tensor]) -> None:
        super().__init__()
        self.logits, self.uncertainty = logits, uncertainty

    def forward(self, x):
        return self.logits, self.uncertainty


def _hand_case(task):
    # one exit with softmax (0.75, 0.25) and u = 0.2; final classifier (0.5, 0.5) with u = 0.5; class 0
    task.trainable_module = _Fixed(
        [torch.tensor([[math.log(3.), 0.]]), torch.zeros(1, 2)], [torch.tensor([.2]), torch.tensor([.5])])
    return task(torch.zeros(1), torch.tensor([0]))['loss'].item()


def test_losses_against_hand_computed_values():
    model = timm.create_model('test_vit_mexit', exit_layers=[2])
    ce_exit, ce_final = -math.log(.75), math.log(2.)
    mse_exit = (.2 - math.tanh(.25 + .25)) ** 2  # eqs. (2)-(4): u~ = tanh(|f - y|_1)
    mse_final = (.5 - math.tanh(.5 + .5)) ** 2
    kl = .5 * math.log(.5 / .75) + .5 * math.log(.5 / .25)  # eq. (5), teacher = final distribution
    assert _hand_case(MEViTTask(model)) == pytest.approx(ce_final + mse_final + ce_exit + mse_exit + kl, abs=1e-6)
    assert _hand_case(EndToEndTask(model)) == pytest.approx(ce_final + mse_final + .5 * ce_exit + mse_exit, abs=1e-6)
    assert _hand_case(ClassifierWiseTask(model)) == pytest.approx(mse_final + ce_exit + mse_exit, abs=1e-6)
    assert _hand_case(MEViTTask(model, criterion=LabelSmoothingCrossEntropy(.1))) == pytest.approx(
        ce_final + mse_final + (-.95 * math.log(.75) - .05 * math.log(.25)) + mse_exit + kl, abs=1e-6)


def test_single_output_tasks_use_the_criterion_on_the_final_logits():
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    model = timm.create_model('test_vit_liferegress').train()
    expected = F.cross_entropy(model(x), y)
    assert LifeRegressTask(model, 'joint')(x, y)['loss'].item() == pytest.approx(expected.item(), abs=1e-6)
    mexit = timm.create_model('test_vit_mexit').train()
    expected = F.cross_entropy(mexit.forward_head(mexit.forward_features(x)), y)
    assert BackboneTask(mexit)(x, y)['loss'].item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize('hook_kwargs', [
    dict(exit_grad_scale=1.), dict(exit_grad_scale=1., exit_weight=.25, exit_num_sampled=1),
    dict(exit_grad_scale=1., exit_weight=.5, exit_num_sampled=0), dict(exit_grad_scale=0.)])
def test_mevit_task_matches_the_train_mode_hook(hook_kwargs):
    """Both routes of MEViT's objective (task; timm's ClassificationTask through the hook) give the same gradient,
    also with the hook's exit weight and sandwich sampling (the same seed draws the same exits); the hook's
    ``exit_grad_scale=0`` is the task's ``detach_exits``."""
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model = timm.create_model('test_vit_mexit', exit_layers=[1, 2, 3], **hook_kwargs).train()
    torch.manual_seed(7)
    MEViTTask(model, num_sampled=hook_kwargs.get('exit_num_sampled'), exit_weight=hook_kwargs.get('exit_weight', 1.),
              detach_exits=hook_kwargs['exit_grad_scale'] == 0., criterion=nn.CrossEntropyLoss())(x, y)['loss'] \
        .backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)(x, y)['loss']
    torch.manual_seed(7)  # the hook draws its exits in the backward
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-3, atol=1e-6), n
    if 'exit_num_sampled' in hook_kwargs:  # some exit was left out this step, by both routes
        assert any(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n.startswith('exits.'))


def test_mevit_task_calls_forward_exits_not_the_hook(monkeypatch):
    model = timm.create_model('test_vit_mexit').train()
    monkeypatch.setattr(type(model), '_forward_train', lambda *a: pytest.fail('train-mode hook called'))
    MEViTTask(model)(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))['loss'].backward()


def test_sandwich_sampling_keeps_the_earliest_and_draws_k_others():
    draws = torch.stack([sample_exits(6, 2) for _ in range(300)])
    assert (draws[:, 0] == 1).all() and (draws.sum(1) == 3).all()
    assert (draws[:, 1:].mean(0) > .25).all()  # each other exit drawn (expected 0.4)
    assert sample_exits(6, None).tolist() == [1.] * 6
    assert sample_exits(6, 0).tolist() == [1.] + [0.] * 5
    assert sample_exits(1, 3).tolist() == [1.]


def test_sandwich_updates_only_the_sampled_exits_and_every_parameter_has_a_grad():
    model = timm.create_model('test_vit_mexit', exit_layers=[1, 2, 3]).train()
    task = MEViTTask(model, num_sampled=1)
    torch.manual_seed(3)
    task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))['loss'].backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP without find_unused_parameters
    moved = [layer for layer in (1, 2, 3) if model.exits[str(layer)].head.weight.grad.abs().sum() > 0]
    assert moved[0] == 1 and len(moved) == 2
    assert model.head.weight.grad.abs().sum() > 0


def _snapshot(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _steps(task, model: nn.Module, n: int = 3, **opt):
    optimizer = create_optimizer_v2(model, **{'opt': 'adamw', 'lr': 1e-2, 'weight_decay': .05, **opt})
    task.train()
    for _ in range(n):
        optimizer.zero_grad()
        task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))['loss'].backward()
        optimizer.step()


def test_classifier_wise_leaves_backbone_and_final_head_bit_identical():
    model = timm.create_model('test_vit_mexit', drop_path_rate=.1)
    before = _snapshot(model)
    task = ClassifierWiseTask(model)
    _steps(task, model)
    for k, v in model.state_dict().items():
        if k.startswith(NEW_PARTS):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k
    assert not model.blocks[0].drop_path1.training and model.exits['2'].training  # frozen part runs as at inference


def test_classifier_wise_exits_see_detached_tokens():
    model = timm.create_model('test_vit_mexit').train()
    logits, _ = ExitsForward(model, detach_exits=True)(torch.randn(2, 3, 32, 32))
    logits[0].sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith('exits.2.'))
    assert model.exits['2'].head.weight.grad is not None


@pytest.mark.parametrize('stage', ['predictor', 'backbone', 'joint'])
def test_life_regress_stages_freeze_the_right_parameters(stage):
    model = timm.create_model('test_vit_liferegress', drop_rate=.1)
    before = _snapshot(model)
    task = LifeRegressTask(model, stage)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if stage == 'joint' or n.startswith('life.') == (stage == 'predictor')}
    _steps(task, model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    life = {k for k in before if k.startswith('life.')}
    assert changed == (life if stage == 'predictor' else set(before) - life if stage == 'backbone' else set(before))
    assert model.pos_drop.training == (stage != 'predictor')


def test_create_task_checks_names_and_models():
    model = timm.create_model('test_vit_liferegress')
    with pytest.raises(ValueError, match='allowed'):
        create_task('sandwich', model)
    with pytest.raises(ValueError, match='MultiExitVisionTransformer'):
        create_task('mevit', model)
    with pytest.raises(ValueError, match='stage'):
        LifeRegressTask(model, 'both')


@pytest.mark.parametrize('task,kwargs,message', [
    ('end_to_end', dict(exit_weight=-1), r"exit_weight must be a finite number >= 0 \(a loss weight\), got -1"),
    ('end_to_end', dict(final_weight=float('nan')), 'final_weight must be a finite number >= 0 .*got nan'),
    ('mevit', dict(uncertainty_weight=float('inf')), 'uncertainty_weight must be a finite number >= 0 .*got inf'),
    ('mevit', dict(exit_weight=True), 'exit_weight must be .*got True'),
    ('mevit', dict(exit_weight='1'), "exit_weight must be .*got '1'"),
    ('mevit', dict(num_sampled=-1), 'num_sampled must be an int >= 0 or None .*got -1'),
    ('mevit', dict(num_sampled=1.5), 'num_sampled must be an int >= 0 or None .*got 1.5'),
    ('mevit', dict(num_sampled='2'), "num_sampled must be an int >= 0 or None .*got '2'"),
    ('mevit', dict(num_sampled=True), 'num_sampled must be an int >= 0 or None .*got True'),
    ('classifier_wise', dict(train_head='yes'), "train_head must be True or False, got 'yes'"),
    ('classifier_wise', dict(train_head=1), 'train_head must be True or False, got 1'),
    ('end_to_end', dict(detach_exits='no'), "detach_exits must be True or False, got 'no'"),
])
def test_task_arguments_are_checked(task, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_task(task, timm.create_model('test_vit_mexit'), **kwargs)


def test_task_weights_at_zero_and_numpy_ints_are_accepted():
    import numpy as np
    task = create_task('end_to_end', timm.create_model('test_vit_mexit'), exit_weight=0, num_sampled=np.int64(1))
    assert task.exit_weight == 0. and task.num_sampled == 1 and type(task.num_sampled) is int


# --- timm train.py's step, rebuilt from timm's public pieces --------------------------------------------------------

def _train_py_step(model, setting: str):
    """timm train.py's update: ClassificationTask (criterion(model(x), y)), loss scaling, accumulation."""
    criterion = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    mixup = None
    if setting == 'smoothing':
        criterion = LabelSmoothingCrossEntropy(.1)
    elif setting == 'mixup':
        mixup = Mixup(mixup_alpha=.8, cutmix_alpha=1., label_smoothing=.1, num_classes=10)
        criterion = SoftTargetCrossEntropy()
    elif setting == 'jsd':
        criterion = JsdCrossEntropy(num_splits=2, smoothing=.1)
    elif setting == 'grad_checkpointing':
        model.set_grad_checkpointing(True)
    if setting == 'kd':
        teacher = timm.create_model('test_vit_mexit').eval()
        task = LogitDistillationTask(model, teacher, criterion, temperature=2., verbose=False)
    else:
        task = ClassificationTask(model, criterion, verbose=False)
    optimizer = create_optimizer_v2(model, opt='sgd', lr=.05)
    scaler = NativeScaler('cpu') if setting == 'amp_scale' else None  # GradScaler: the loss times 65536
    accum = 2 if setting == 'accumulation' else 1
    task.train()
    for i in range(accum):
        xi, yi = (mixup(x, y) if mixup is not None else (x, y))
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=setting == 'amp_bf16'):
            loss = task(xi, yi)['loss'] / accum
        if scaler is not None:
            scaler(loss, optimizer, need_update=i + 1 == accum)
        else:
            loss.backward()
    if scaler is None:
        optimizer.step()
    return task, optimizer


@pytest.mark.parametrize('setting', [
    'ce', 'smoothing', 'mixup', 'amp_scale', 'amp_bf16', 'accumulation', 'jsd', 'grad_checkpointing', 'kd'])
def test_train_py_step_trains_every_exit(setting, tmp_path):
    model = timm.create_model('test_vit_mexit')
    before = _snapshot(model)
    task, optimizer = _train_py_step(model, setting)
    for k, v in model.state_dict().items():
        if k.startswith(NEW_PARTS):
            assert not torch.equal(v, before[k]), k
    if setting == 'ce':  # train.py's checkpoint loads back through timm.create_model(checkpoint_path=...)
        saver = CheckpointSaver(model, optimizer, checkpoint_dir=str(tmp_path), task=task)
        saver.save_checkpoint(epoch=0)
        loaded = timm.create_model('test_vit_mexit', checkpoint_path=str(tmp_path / 'last.pth.tar'))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_train_py_step_with_bce_fails_loudly():
    model = timm.create_model('test_vit_mexit').train()
    task = ClassificationTask(model, BinaryCrossEntropy(smoothing=.1), verbose=False)
    loss = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))['loss']
    with pytest.raises(RuntimeError, match='not that of a softmax loss'):
        loss.backward()
