"""MEViT's per-exit loss (eqs. 1-5 of 000_*.txt) and the train-mode hook that ties it to any softmax criterion."""
import math

import pytest
import torch
import torch.nn.functional as F

import timm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from timm_exits import attach_exit_losses, mevit_exit_loss, uncertainty_target
from timm_exits.losses import estimate_scale_and_target


def test_exit_loss_against_hand_computed_values():
    logits = torch.tensor([[math.log(3.), 0.]])  # softmax (0.75, 0.25)
    target = torch.tensor([[1., 0.]])
    teacher = torch.tensor([[0.5, 0.5]])
    u = torch.tensor([0.2])
    ce = -math.log(0.75)
    u_tilde = math.tanh(0.25 + 0.25)  # eq. (4): tanh of the L1 distance to the target
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # eq. (5)
    assert uncertainty_target(logits, target).item() == pytest.approx(u_tilde, abs=1e-6)
    assert mevit_exit_loss(logits, u, target).item() == pytest.approx(ce + (0.2 - u_tilde) ** 2, abs=1e-6)
    assert mevit_exit_loss(logits, u, target, teacher).item() == pytest.approx(ce + (0.2 - u_tilde) ** 2 + kl, abs=1e-6)


def test_no_gradient_into_teacher_or_uncertainty_target():
    logits = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    u = torch.rand(4, requires_grad=True)
    target = F.one_hot(torch.arange(4), 5).float()
    mevit_exit_loss(logits, u, target, teacher.softmax(-1)).sum().backward()
    assert teacher.grad is None
    # d/dz of the loss = CE and KL parts only (u~ is a target): p - t + p - q
    p = logits.softmax(-1)
    assert torch.allclose(logits.grad, 2 * p - target - teacher.softmax(-1), atol=1e-5)


@pytest.mark.parametrize('kind', ['hard', 'mixup'])
def test_scale_and_target_recovered_from_a_criterion_gradient(kind):
    z = torch.randn(6, 10, requires_grad=True)
    if kind == 'hard':
        t = F.one_hot(torch.randint(0, 10, (6,)), 10).float()
    else:
        t = 0.7 * F.one_hot(torch.randint(0, 10, (6,)), 10).float() + 0.3 * F.one_hot(torch.randint(0, 10, (6,)), 10)
    (SoftTargetCrossEntropy()(z, t) * 128 / 4).backward()  # AMP-style loss scale 128, accumulation over 4 steps
    k, t_hat = estimate_scale_and_target(z, z.grad)
    assert torch.allclose(k, torch.full((6,), 128 / 4 / 6))
    assert torch.allclose(t_hat, t, atol=1e-5)


def _explicit_mevit_loss(model, x, target):
    """criterion(final) + sum of every exit's MEViT loss, written out by hand (the reference)."""
    outs = model.forward_exits(x)
    us = [model.exit_uncertainty(layer, z) for layer, z in zip(model.exit_layers, outs)]
    teacher = outs[-1].detach().softmax(-1)
    loss = F.cross_entropy(outs[-1], target, reduction='none')
    t = F.one_hot(target, outs[-1].shape[-1]).float()
    for z, u in zip(outs[:-1], us[:-1]):
        loss = loss + mevit_exit_loss(z, u, t, teacher)
    loss = loss + (us[-1] - uncertainty_target(outs[-1], t)) ** 2
    return loss.mean()


def test_train_forward_backprops_every_exit_loss():
    """criterion(model(x), y).backward() in train mode equals the explicit MEViT objective's gradient."""
    model = timm.create_model('test_vit_mexit', exit_head=['mlp', 'linear']).train()
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    (F.cross_entropy(model(x), y) * 64).backward()  # a loss scale, as GradScaler applies
    hooked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (_explicit_mevit_loss(model, x, y) * 64).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(hooked[n], p.grad, rtol=1e-3, atol=1e-5), n


def test_train_forward_with_label_smoothing_trains_exits():
    model = timm.create_model('test_vit_mexit').train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    LabelSmoothingCrossEntropy(0.1)(model(x), y).backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith(('exits', 'uncert')))


def test_attach_checks_its_arguments():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match='uncertainties'):
        attach_exit_losses(z, [z], [torch.rand(2)])
