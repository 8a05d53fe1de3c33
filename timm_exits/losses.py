""" Per-exit objectives of MEViT (000_*.txt, eqs. 1-5), and the hook that lets a plain classification loss train them.

``mevit_exit_loss`` is eq. (1) + eq. (5) for one exit. ``attach_exit_losses`` is what a multi-exit model's train-mode
``forward`` returns: the final logits, unchanged, with every exit tied to them so that ``criterion(model(x), y)
.backward()`` also back-propagates each exit's MEViT loss. The exits need the target for that, and a criterion only
passes the final logits' gradient g back. For softmax criteria (cross-entropy, label smoothing, soft-target
cross-entropy after mixup/cutmix) that gradient is g = k (softmax(z) - t), with k the loss scale (1/B for a mean, times
the AMP loss scale, over the accumulation steps) and t the target distribution. k is read off the classes whose target
is 0 (there g_j / p_j = k), then t = p - g / k, and each exit receives k * d(exit loss)/d(exit outputs): exactly the
gradient of ``loss_scale * mean(criterion + sum of exit losses)``. Limits: a criterion that is not a softmax
cross-entropy (e.g. timm's BCE) gives a meaningless k; label smoothing makes k slightly small (no class has t = 0).
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from timm.layers import register_notrace_function

__all__ = ['attach_exit_losses', 'estimate_scale_and_target', 'mevit_exit_loss', 'uncertainty_target']


def uncertainty_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Ground-truth uncertainty u~_i = tanh(|f_i(h_i) - y|), eq. (4) of 000_*.txt, per sample (no gradient).

    For classification f_i(h_i) is read as the exit's class distribution and |.| as the L1 distance to the target
    distribution y: 0 for a confident right answer, tanh(2) for a confident wrong one.
    """
    with torch.no_grad():
        return torch.tanh((logits.float().softmax(-1) - target.float()).abs().sum(-1))


def mevit_exit_loss(
        logits: torch.Tensor,
        uncertainty: torch.Tensor,
        target: torch.Tensor,
        teacher: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample loss of one exit: CE + MSE of the uncertainty predictor (eqs. 1-2) [+ in-place KL, eq. (5)].

    Args:
        logits: (B, C) exit logits f_i(h_i).
        uncertainty: (B,) predicted u_i of eq. (3).
        target: (B, C) target distribution (one-hot, smoothed or mixed).
        teacher: (B, C) final classifier's distribution f_n(h_n); no gradient flows into it.
    """
    log_p = logits.float().log_softmax(-1)
    target = target.float()
    loss = -(target * log_p).sum(-1) + (uncertainty.float() - uncertainty_target(logits, target)) ** 2
    if teacher is not None:
        teacher = teacher.detach().float()
        loss = loss + (teacher * (teacher.clamp_min(1e-12).log() - log_p)).sum(-1)
    return loss


def estimate_scale_and_target(logits: torch.Tensor, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row, the loss scale k and target t of a softmax criterion from its gradient g = k (softmax(z) - t)."""
    p = logits.detach().float().softmax(-1)
    g = grad.float()
    ratio = torch.where(p >= 1e-4, g / p.clamp_min(1e-4), torch.full_like(p, -float('inf')))
    k = ratio.amax(-1).clamp_min(0.).nan_to_num(0.)
    t = (p - g / k.clamp_min(1e-30)[:, None]).clamp_min(0.)
    t = torch.where(k[:, None] > 0, t / t.sum(-1, keepdim=True).clamp_min(1e-12), p)
    return k, t


class _AttachExitLosses(torch.autograd.Function):
    """Identity on the final logits; its backward adds each exit's MEViT loss, scaled like the criterion."""

    @staticmethod
    def forward(ctx, num_exits: int, final: torch.Tensor, *outputs: torch.Tensor) -> torch.Tensor:
        ctx.num_exits = num_exits
        ctx.save_for_backward(final, *outputs)
        return final.view_as(final)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        final, *outputs = ctx.saved_tensors
        n = ctx.num_exits
        k, target = estimate_scale_and_target(final, grad)
        teacher = final.detach().float().softmax(-1)
        with torch.enable_grad():
            leaves = [o.detach().float().requires_grad_() for o in outputs]
            logits, uncertainty = leaves[:n], leaves[n:]
            loss = sum(mevit_exit_loss(z, u, target, teacher) for z, u in zip(logits, uncertainty[:n]))
            # the final exit's uncertainty predictor: eq. (2) alone; the criterion already covers its CE
            loss = loss + (uncertainty[n] - uncertainty_target(final, target)) ** 2
            grads = torch.autograd.grad((k * loss).sum(), leaves)
        return (None, grad, *(g.to(o.dtype) for g, o in zip(grads, outputs)))


@register_notrace_function  # one leaf node when torch.fx traces a model's train-mode forward
def attach_exit_losses(
        final: torch.Tensor,
        exit_logits: Sequence[torch.Tensor],
        uncertainties: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Return ``final`` (same values) with the exits' MEViT losses tied into its backward.

    Args:
        final: (B, C) final classifier logits.
        exit_logits: (B, C) logits of each intermediate exit.
        uncertainties: (B,) predicted uncertainty of each intermediate exit, then of the final exit.
    """
    if len(uncertainties) != len(exit_logits) + 1:
        raise ValueError('uncertainties needs one entry per intermediate exit plus one for the final exit')
    return _AttachExitLosses.apply(len(exit_logits), final, *exit_logits, *uncertainties)
