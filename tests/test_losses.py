"""MEViT's per-exit loss (eqs. 1-5 of 000_*.txt) and the train-mode hook that ties it to any softmax criterion."""
import math

import pytest
import torch
import torch.nn.functional as F

import timm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from timm_exits import attach_exit_losses, mevit_exit_loss, uncertainty_target
from timm_exits.losses import estimate_scale_and_target
from timm_exits.tasks import sample_exits


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


def _explicit_mevit_loss(model, x, target, exit_weight=1., mask=None):
    """The reference, written out by hand: (criterion(final) + the final uncertainty's MSE, sum over the exits of
    m_i [w (CE_i + KL_i) + MSE_i]), batch means."""
    outs = model.forward_exits(x)
    us = [model.exit_uncertainty(layer, z) for layer, z in zip(model.exit_layers, outs)]
    teacher = outs[-1].detach().softmax(-1)
    t = F.one_hot(target, outs[-1].shape[-1]).float()
    final = F.cross_entropy(outs[-1], target, reduction='none') + (us[-1] - uncertainty_target(outs[-1], t)) ** 2
    exits = torch.zeros_like(final)
    for m, z, u in zip(mask or [1.] * (len(outs) - 1), outs[:-1], us[:-1]):
        ce_kl = mevit_exit_loss(z, u, t, teacher) - (u - uncertainty_target(z, t)) ** 2
        exits = exits + m * (exit_weight * ce_kl + (u - uncertainty_target(z, t)) ** 2)
    return final.mean(), exits.mean()


def _explicit_gradients(model, x, y, scale=1., exit_weight=1., mask=None, grad_scale=1.):
    """Per parameter, d(final part)/dp + c d(exit part)/dp, c = ``grad_scale`` for the backbone (the parts before
    the last block's output that the exits read), 1 for the exit branches."""
    final, exits = _explicit_mevit_loss(model, x, y, exit_weight, mask)
    names, params = zip(*model.named_parameters())
    g_final = torch.autograd.grad(final * scale, params, allow_unused=True, retain_graph=True)
    g_exits = torch.autograd.grad(exits * scale, params, allow_unused=True)
    backbone = ('cls_token', 'pos_embed', 'patch_embed.', 'norm_pre.', 'blocks.')
    out = {}
    for n, gf, ge in zip(names, g_final, g_exits):
        gf = torch.zeros_like(dict(model.named_parameters())[n]) if gf is None else gf
        ge = torch.zeros_like(gf) if ge is None else ge
        out[n] = gf + (grad_scale if n.startswith(backbone) else 1.) * ge
    return out


def test_train_forward_backprops_every_exit_loss():
    """criterion(model(x), y).backward() in train mode equals the explicit MEViT objective's gradient."""
    model = timm.create_model('test_vit_mexit', exit_head=['mlp', 'linear']).train()
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    (F.cross_entropy(model(x), y) * 64).backward()  # a loss scale, as GradScaler applies
    assert model.exit_grad_scale == .25  # the default: the exits' gradient into the backbone at a quarter
    expected = _explicit_gradients(model, x, y, scale=64, grad_scale=.25)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], rtol=1e-3, atol=1e-5), n


def test_train_forward_with_weight_sampling_and_gradient_scale():
    """exit_weight, exit_num_sampled (sandwich mask drawn in the backward) and exit_grad_scale, against the
    reference: exits' terms weighted, unsampled exits out, the exits' gradient into the backbone scaled."""
    model = timm.create_model('test_vit_mexit', exit_layers=[1, 2, 3], exit_weight=.3, exit_num_sampled=1,
                              exit_grad_scale=.25).train()
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    torch.manual_seed(3)
    out = model(x)
    F.cross_entropy(out, y).backward()
    torch.manual_seed(3)
    mask = sample_exits(3, 1).tolist()
    assert sum(mask) == 2 and mask[0] == 1.
    skipped = str([1, 2, 3][mask.index(0.)])
    skipped_parts = (*model.exits[skipped].parameters(), *model.uncertainty[skipped].parameters())
    assert all(p.grad.abs().sum() == 0 for p in skipped_parts)
    expected = _explicit_gradients(model, x, y, exit_weight=.3, mask=mask, grad_scale=.25)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], rtol=1e-3, atol=1e-6), n
    # the scale acts on the backbone only: with 0 the backbone's gradient is the final classifier's alone
    model = timm.create_model('test_vit_mexit', exit_grad_scale=0.).train()
    F.cross_entropy(model(x), y).backward()
    expected = _explicit_gradients(model, x, y, grad_scale=0.)
    alone = _explicit_gradients(model, x, y, exit_weight=0., mask=[0., 0.])
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], rtol=1e-3, atol=1e-6), n
        if n.startswith('blocks.'):
            assert torch.allclose(p.grad, alone[n], rtol=1e-3, atol=1e-6), n


@pytest.mark.parametrize('kwargs, message', [
    (dict(exit_weight=-1.), 'exit_weight must be a finite number >= 0, got -1.0'),
    (dict(exit_weight=float('nan')), 'exit_weight must be a finite number >= 0, got nan'),
    (dict(exit_weight='yes'), "exit_weight must be a finite number >= 0, got 'yes'"),
    (dict(exit_num_sampled=-1), 'exit_num_sampled must be an integer >= 0 or None \\(every exit\\), got -1'),
    (dict(exit_num_sampled=1.5), 'exit_num_sampled must be an integer >= 0 or None \\(every exit\\), got 1.5'),
    (dict(exit_num_sampled=True), 'exit_num_sampled must be an integer >= 0 or None \\(every exit\\), got True'),
    (dict(exit_grad_scale=2), 'exit_grad_scale must be a number in \\[0, 1\\], got 2'),
    (dict(exit_grad_scale=float('nan')), 'exit_grad_scale must be a number in \\[0, 1\\], got nan'),
])
def test_hook_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('test_vit_mexit', **kwargs)


def test_train_forward_with_label_smoothing_trains_exits():
    model = timm.create_model('test_vit_mexit').train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    LabelSmoothingCrossEntropy(0.1)(model(x), y).backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith(('exits', 'uncert')))


def test_attach_checks_its_arguments():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match='uncertainties'):
        attach_exit_losses(z, [z], [torch.rand(2)])
