"""Exits and slimming trained together: ``MEViTLifeRegressTask`` against a loss computed by hand, its stages, the
train-mode hook of timm's train.py, and the digits recipe that trains it."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import timm
from timm.task import ClassificationTask

from timm_exits.models.life_regress_vit import life_stats, token_counts
from timm_exits.tasks import MEViTLifeRegressTask, create_task


def _model(**kwargs):
    return timm.create_model('test_vit_mexit_liferegress', exit_layers=(1, 2, 3), **kwargs)


def _by_hand(model, x, y):
    """Soft-weighted forward (eqs. 1-3 and 6-7 of 003 written out) and the sandwich loss with every exit (eqs. 1-5 of
    000): CE + KL(final || exit) + (u - tanh(|p - y|_1))^2 per exit, CE + (u - tanh(|p - y|_1))^2 for the final."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    mu, sigma = life_stats(token_counts(16, 4, (2, 3), model.train_keep_rate))
    lives, logits = None, []
    for t, blk in enumerate(model.blocks, 1):
        mask = None
        if lives is not None:
            every = torch.cat([torch.full_like(lives[:, :1], 4.), lives], 1)  # [CLS] lives T = 4 blocks
            mask = F.logsigmoid(1.5 * (every - t))[:, None, None, :]
        tokens = blk(tokens, attn_mask=mask)
        if t == 1:
            normed = model.life.norm(tokens)
            scores = (normed[:, 1:] @ model.life.proj(normed[:, 0])[..., None]).squeeze(-1)
            std = (scores - scores.mean(1, keepdim=True)).square().mean(1, keepdim=True).sqrt()
            lives = (scores - scores.mean(1, keepdim=True)) / std * sigma + mu
        if t < 4:
            logits.append(model.exits[str(t)](tokens))
    logits.append(model.forward_head(model.norm(tokens)))
    target = F.one_hot(y, 10).float()
    teacher = logits[-1].detach().softmax(-1)
    loss = 0.
    for layer, z in zip((1, 2, 3, 4), logits):
        p = z.softmax(-1)
        u = torch.sigmoid(model.uncertainty[str(layer)](z).squeeze(-1))
        loss = loss + F.cross_entropy(z, y) + ((u - torch.tanh((p - target).abs().sum(-1)).detach()) ** 2).mean()
        if layer < 4:
            loss = loss + (teacher * (teacher.log() - z.log_softmax(-1))).sum(-1).mean()
    return loss


def test_loss_equals_hand_computed():
    model = _model()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 7])
    task = create_task('mevit_liferegress', model, stage='joint', num_sampled=None)
    assert isinstance(task, MEViTLifeRegressTask)
    task.train()
    loss = task(x, y)['loss']
    torch.testing.assert_close(loss, _by_hand(model, x, y), rtol=1e-5, atol=1e-5)


def test_joint_gradients_reach_the_life_module_and_every_exit():
    model = _model()
    task = create_task('mevit_liferegress', model, stage='joint', num_sampled=None).train()
    task(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))['loss'].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f'no gradient reached {missing}'


@pytest.mark.parametrize('stage', ['predictor', 'backbone'])
def test_stages_train_their_parts(stage):
    model = _model()
    task = create_task('mevit_liferegress', model, stage=stage, num_sampled=None).train()
    task(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))['loss'].backward()
    life = {n for n, _ in model.named_parameters() if n.startswith('life.')}
    graded = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if stage == 'predictor':
        assert trainable == life and graded == life
    else:
        assert not trainable & life and graded == trainable == {n for n, _ in model.named_parameters()} - life


def test_refuses_a_model_without_slimming_and_unknown_stages():
    with pytest.raises(ValueError, match=r'MEViTLifeRegressTask needs a model with exits and slimming'):
        create_task('mevit_liferegress', timm.create_model('test_vit_mexit'))
    with pytest.raises(ValueError, match=r"stage='both' is not known; allowed: \['predictor', 'backbone', 'joint'\]"):
        create_task('mevit_liferegress', _model(), stage='both')


def test_train_py_step_trains_exits_and_life_through_the_hook():
    """timm's train.py: ClassificationTask, criterion(model(x), y) only; the hook adds every exit's loss."""
    model = _model(exit_grad_scale=1.)
    task = ClassificationTask(model, torch.nn.CrossEntropyLoss(), verbose=False).train()
    task(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))['loss'].backward()
    assert model.life.proj.weight.grad.abs().sum() > 0
    assert all(model.exits[k].head.weight.grad.abs().sum() > 0 for k in model.exits)
    assert all(model.uncertainty[k].weight.grad.abs().sum() > 0 for k in model.uncertainty)


def test_digits_recipe_trains_the_combined_model_from_the_mevit_run(monkeypatch):
    path = Path(__file__).parents[1] / 'train_recipes' / 'digits_demo.py'
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location('recipe_digits_demo', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = module.recipes('out', 30, 0)['mexit_liferegress']
    assert recipe.model == 'test_vit_mexit_liferegress' and recipe.init_checkpoint.endswith('mevit/model.safetensors')
    assert [(s.task, s.task_kwargs['stage']) for s in recipe.stages] == [
        ('mevit_liferegress', 'predictor'), ('mevit_liferegress', 'backbone')]
