""" Per-exit objectives of MEViT (000_*.txt, eqs. 1-5), and the hook that lets a plain classification loss train them.

``mevit_exit_loss`` is eq. (1) + eq. (5) for one exit. ``attach_exit_losses`` is what a multi-exit model's train-mode
``forward`` returns: the final logits, unchanged, with every exit tied to them so that ``criterion(model(x), y)
.backward()`` also back-propagates each exit's MEViT loss. The exits need the target for that, and a criterion only
passes the final logits' gradient g back. For softmax criteria (cross-entropy, label smoothing, soft-target
cross-entropy after mixup/cutmix) that gradient is g = k (softmax(z) - t), with k the loss scale (1/B for a mean, times
the AMP loss scale, over the accumulation steps) and t the target distribution. k is read off the classes whose target
is 0 (there g_j / p_j = k; one k for the batch, see ``estimate_scale_and_target``), then t = p - g / k, and each exit
receives k * d(exit loss)/d(exit outputs): exactly the gradient of ``loss_scale * mean(criterion + sum of exit
losses)``, the exit losses weighted and sampled as ``MultiExitTask``'s (``exit_weight``; ``num_sampled``, MEViT's
sandwich rule). The model may also scale the exits' gradient into the backbone (``scale_gradient`` on the tokens an
exit reads; ``exit_grad_scale`` of the multi-exit models, 0.25 by default: at full scale the exits cost the final
classifier of a ViT trained by timm's train.py 2.5 points on digits, at 0.25 0.9, see the README). Limits:
only a loss that is a function of softmax(z) has rows of g that sum to 0; anything else (timm's BCE) gives a
meaningless k, so the backward raises a RuntimeError there instead of training the final head alone (a gradient
constant along each row, e.g. ``model(x).mean().backward()``, is passed to every sampled exit, times ``exit_weight``).
Label smoothing, mixup/cutmix, logit distillation at temperature 1 and JSD give the target the criterion pulls the
final head to (smoothed, mixed, label and teacher mixed; the JSD pull); distillation at another temperature is not of
the form k (p - t): k comes out too large and the targets are wrong.
"""
import math
from typing import Optional, Sequence, Tuple

import torch

from timm.layers import register_notrace_function

__all__ = [
    'REGRESSION_LOSSES', 'SCALE_NLLS', 'attach_exit_losses', 'estimate_scale_and_target', 'exit_loss', 'gradient_kind',
    'inplace_kl', 'mevit_exit_loss', 'regression_loss', 'scale_nll',
    'sample_exits', 'scale_gradient', 'uncertainty_mse', 'uncertainty_target',
]


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
    loss = -(target.float() * logits.float().log_softmax(-1)).sum(-1) + uncertainty_mse(uncertainty, logits, target)
    return loss if teacher is None else loss + inplace_kl(logits, teacher)


def uncertainty_mse(uncertainty: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample (u_i - u~_i)^2, eq. (2) of 000_*.txt, with u~_i of eq. (4) from the exit's (B, C) logits."""
    return (uncertainty.float() - uncertainty_target(logits, target)) ** 2


def inplace_kl(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per sample KL(f_n || f_i), the in-place distillation of eq. (5), 000_*.txt; ``teacher`` is the final
    classifier's (B, C) distribution, detached here: no gradient flows into it."""
    teacher = teacher.detach().float()
    return (teacher * (teacher.clamp_min(1e-12).log() - logits.float().log_softmax(-1))).sum(-1)


def gradient_kind(grad: torch.Tensor, tol: float = 0.02) -> str:
    """What the criterion's gradient g on the final logits is: 'softmax' (rows sum to ~0, as for any loss of
    softmax(z)) or 'linear' (constant along each row, a linear function of the logits such as the
    ``model(x).mean().backward()`` of timm's model tests: no target to infer, every exit takes the same gradient).

    Raises:
        RuntimeError: Neither, e.g. timm's BinaryCrossEntropy (train.py ``--bce-loss``): the exits' loss cannot be
            inferred, and training the final head alone silently is not an option.
    """
    g = grad.detach().float()
    total = g.abs().sum()
    mean = g.mean(-1, keepdim=True)
    if not bool(total > 0) or bool(mean.abs().sum() * g.shape[-1] <= tol * total):
        return 'softmax'
    if bool((g - mean).abs().sum() <= tol * total):
        return 'linear'
    raise RuntimeError(
        'timm_exits: the gradient reaching a multi-exit model\'s train-mode output is not that of a softmax loss (its '
        'rows do not sum to 0, e.g. BCE: timm train.py --bce-loss), so the exits\' MEViT losses cannot be inferred '
        'from it. Use a softmax criterion (cross-entropy, label smoothing, mixup/cutmix soft targets, JSD), or train '
        'with a timm_exits.tasks objective, which calls forward_exits with any criterion.')


def estimate_scale_and_target(logits: torch.Tensor, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss scale k and per-row target t of a softmax criterion from its gradient g = k (softmax(z) - t).

    timm's criteria average over the batch, so k is one number, the largest of three estimates over the batch:
    - any t >= 0 makes g_j / p_j <= k (equal where a class with p_j >= 1e-4 has t_j = 0), and
    - the sum of g over the classes other than the one pulled up hardest, over their sum of p, <= k (equal for a hard
      label, also when the final head is sure of it: p ~ 1 leaves no informative class of its own);
    - off-target classes share one target c (0, or smoothing / C under label smoothing), so between two of them g
      grows like k p: the median over rows of that slope, between the most and least likely classes once each row's
      two most likely and two hardest-pulled classes are set aside (the label, or mixup's pair).
    The first two are exact for hard and mixed labels and logit distillation at temperature 1, the third for label
    smoothing, where the first two fall short by c / p (as the final head fits the smoothed target, p -> c).

    Returns:
        k (B,), the same for every row, and t (B, C).
    """
    p = logits.detach().float().softmax(-1)
    g = grad.float()
    ratio = torch.where(p >= 1e-4, g / p.clamp_min(1e-4), torch.full_like(p, -float('inf'))).amax(-1)
    others = torch.ones_like(p).scatter_(-1, g.argmin(-1, keepdim=True), 0.)
    bulk = (g * others).sum(-1) / (p * others).sum(-1).clamp_min(1e-30)
    k = torch.maximum(ratio, bulk).nan_to_num(0.).amax()
    if p.shape[-1] > 6:
        off = torch.ones_like(p, dtype=torch.bool)
        off.scatter_(-1, p.topk(2, -1).indices, False).scatter_(-1, g.topk(2, -1, largest=False).indices, False)
        hi = torch.where(off, p, -1.).argmax(-1, keepdim=True)
        lo = torch.where(off, p, 2.).argmin(-1, keepdim=True)
        dp = (p.gather(-1, hi) - p.gather(-1, lo)).squeeze(-1)
        slope = (g.gather(-1, hi) - g.gather(-1, lo)).squeeze(-1) / dp.clamp_min(1e-30)
        k = torch.maximum(k, torch.where(dp > 0, slope, torch.nan).nanmedian().nan_to_num(0.))
    k = k.clamp_min(0.).expand(p.shape[0])
    t = (p - g / k.clamp_min(1e-30)[:, None]).clamp_min(0.)
    t = torch.where(k[:, None] > 0, t / t.sum(-1, keepdim=True).clamp_min(1e-12), p)
    return k, t


def sample_exits(num_exits: int, num_sampled: Optional[int],
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sandwich-rule lower bound (000_*.txt, sec. 2.2): a (num_exits,) 0/1 float mask of the intermediate exits
    updated this step, the earliest always plus ``num_sampled`` others drawn uniformly (None: all exits)."""
    mask = torch.zeros(num_exits)
    if num_exits:
        others = torch.randperm(num_exits - 1, generator=generator)[:num_sampled] + 1
        mask[0] = 1.
        mask[others] = 1.
    return mask


class _AttachExitLosses(torch.autograd.Function):
    """Identity on the final logits; its backward adds each exit's MEViT loss, scaled like the criterion."""

    @staticmethod
    def forward(ctx, num_exits: int, exit_weight: float, num_sampled: Optional[int], final: torch.Tensor,
                *outputs: torch.Tensor) -> torch.Tensor:
        ctx.num_exits, ctx.exit_weight, ctx.num_sampled = num_exits, exit_weight, num_sampled
        ctx.save_for_backward(final, *outputs)
        return final.view_as(final)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        final, *outputs = ctx.saved_tensors
        n, w = ctx.num_exits, ctx.exit_weight
        mask = sample_exits(n, ctx.num_sampled).tolist()
        none = (None, None, None)
        if gradient_kind(grad) == 'linear':  # the same linear objective on every sampled exit's logits, weighted
            return (*none, grad, *((m * w * grad).to(o.dtype) for m, o in zip(mask, outputs[:n])),
                    *(torch.zeros_like(o) for o in outputs[n:]))
        k, target = estimate_scale_and_target(final, grad)
        teacher = final.detach().float().softmax(-1)
        with torch.enable_grad():
            leaves = [o.detach().float().requires_grad_() for o in outputs]
            logits, uncertainty = leaves[:n], leaves[n:]
            loss = sum(m * exit_loss(z, u, target, teacher, w) for m, z, u in zip(mask, logits, uncertainty[:n]))
            # the final exit's uncertainty predictor: eq. (2) alone; the criterion already covers its CE
            loss = loss + uncertainty_mse(uncertainty[n], final, target)
            grads = torch.autograd.grad((k * loss).sum(), leaves)
        return (*none, grad, *(g.to(o.dtype) for g, o in zip(grads, outputs)))


def exit_loss(
        logits: torch.Tensor,
        uncertainty: torch.Tensor,
        target: torch.Tensor,
        teacher: torch.Tensor,
        weight: float = 1.,
) -> torch.Tensor:
    """Per-sample loss of one intermediate exit in the train-mode hook: ``weight`` (CE + in-place KL) + MSE, i.e. eqs.
    (1), (2) and (5) of 000_*.txt with the classification terms weighted (as ``MultiExitTask``'s ``exit_weight``)."""
    return (weight * (-(target.float() * logits.float().log_softmax(-1)).sum(-1) + inplace_kl(logits, teacher))
            + uncertainty_mse(uncertainty, logits, target))


class _ScaleGradient(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


@register_notrace_function
def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it is multiplied by ``scale`` (1: ``x`` itself)."""
    return x if scale == 1. else _ScaleGradient.apply(x, scale)


@register_notrace_function  # one leaf node when torch.fx traces a model's train-mode forward
def attach_exit_losses(
        final: torch.Tensor,
        exit_logits: Sequence[torch.Tensor],
        uncertainties: Sequence[torch.Tensor],
        exit_weight: float = 1.,
        num_sampled: Optional[int] = None,
) -> torch.Tensor:
    """Return ``final`` (same values) with the exits' MEViT losses tied into its backward.

    Per backward, the loss added is that of ``MultiExitTask(distill=True, exit_weight=exit_weight,
    num_sampled=num_sampled)`` at the criterion's scale: sum_i m_i [w (CE_i + KL_i) + MSE_i] + MSE_n, with m_i the
    sandwich mask (``sample_exits``, drawn in the backward) and w = ``exit_weight``.

    Args:
        final: (B, C) final classifier logits.
        exit_logits: (B, C) logits of each intermediate exit.
        uncertainties: (B,) predicted uncertainty of each intermediate exit, then of the final exit.
        exit_weight: Weight of each intermediate exit's CE + KL (its uncertainty MSE keeps weight 1).
        num_sampled: Intermediate exits trained per backward besides the earliest (None: every exit).
    """
    if len(uncertainties) != len(exit_logits) + 1:
        raise ValueError('uncertainties needs one entry per intermediate exit plus one for the final exit')
    return _AttachExitLosses.apply(len(exit_logits), float(exit_weight), num_sampled, final, *exit_logits,
                                   *uncertainties)


REGRESSION_LOSSES = ('l1', 'mse')
SCALE_NLLS = ('laplace', 'gaussian')


def regression_loss(values: torch.Tensor, target: torch.Tensor, loss: str = 'l1') -> torch.Tensor:
    """Mean L1 (TransCrowd's loss on raw counts, 001_*.txt) or squared error of ``values`` against ``target``, both
    (B, K), over the batch and the outputs (float32)."""
    diff = values.float() - target.float()
    if loss == 'l1':
        return diff.abs().mean()
    if loss == 'mse':
        return diff.pow(2).mean()
    raise ValueError(f'loss must be one of {list(REGRESSION_LOSSES)}, got {loss!r}')


def scale_nll(values: torch.Tensor, scale: torch.Tensor, target: torch.Tensor, nll: str = 'laplace',
              reduction: str = 'mean') -> torch.Tensor:
    """Negative log-likelihood of ``target`` under the exit's predicted distribution, centre ``values``, scale
    ``scale`` (B, K): Laplace log(2 b) + |y - mu| / b, Gaussian log(sigma) + (y - mu)^2 / (2 sigma^2) + log(2 pi) / 2,
    averaged over the batch and the outputs (``reduction='none'``: per element, (B, K)).
    Minimised at b = |y - mu| (Laplace, sigma^2 = (y - mu)^2 for the Gaussian): the scale learns the exit's error,
    the regression counterpart of MEViT's u_i target (eq. 4, 000_*.txt)."""
    if reduction not in ('mean', 'none'):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    err = (target.float() - values.float()).abs()
    scale = scale.float()
    if nll == 'laplace':
        out = torch.log(2 * scale) + err / scale
    elif nll == 'gaussian':
        out = torch.log(scale) + err.pow(2) / (2 * scale.pow(2)) + .5 * math.log(2 * math.pi)
    else:
        raise ValueError(f'nll must be one of {list(SCALE_NLLS)}, got {nll!r}')
    return out.mean() if reduction == 'mean' else out
