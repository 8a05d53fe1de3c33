""" Fit the new parts of a timm-exits model on a frozen model, without labels: ``timm_exits.fit(model, loader)`` and
``python -m timm_exits.fit``.

The backbone and the final head stay frozen (bit-identical: only the new parts' parameters reach the optimizer, and
frozen modules run in eval mode); every new part learns from the model's own final output, so any images serve
(Phuong & Lampert's distillation-based training of exits; LGViT's second stage: frozen backbone, exits distilled from
the final logits):

- each exit head: T^2 KL(softmax(z_n / T) || softmax(z_i / T)) with z_n the frozen model's final logits, plus
  ``label_weight`` x cross-entropy on the images that have a label (``y >= 0``);
- each uncertainty unit u_i (eq. 3, 000_*.txt): the MSE of eq. (2) against eq. (4)'s target with y the final answer,
  u~_i = tanh(|softmax(z_i) - onehot(argmax z_n)|_1) (0 when exit i agrees confidently with the full model);
- the life predictor (LifeRegress, 003_*.txt): the same KL, from the parent's output (keep rate 1) to the train-mode
  output with the soft weights of eqs. (6)-(7) (and, with exits, to every exit on those tokens).

Regression models (``task='regression'``, ``*_mexit`` and ``*_mexit_liferegress``): every exit learns the frozen
model's final value v_n (detached) by ``loss`` ('l1', 'huber' with delta 1 target unit, or 'mse'), plus
``label_weight`` x the same loss to the label where there is one (not NaN); each exit's scale unit s_i learns by the
negative log-likelihood of v_n given the exit's detached value and s_i: Laplace with 'l1' (its minimiser is the mean
absolute deviation from v_n), Gaussian with 'huber' and 'mse' (the root mean square deviation), so the scale
criterion's threshold reads as a distance from the full model's answer in target units. With slimming, the life
predictor learns through the final value on soft-weighted tokens (the same loss to v_n) and the final scale unit by the
same NLL; without slimming the final scale unit has nothing to learn (its error against v_n is zero) and stays as it
is. The temperature is a classification setting (a KL between class distributions) and is refused here.

Multi-exit models: one backbone pass per batch, without gradient, serves the final logits and every exit's tokens
(captured at the exits' inputs); only the heads run with gradient. ``cache=True`` keeps what each head reads before
any of its parameters acts (``ExitHead.reading``: the [CLS] token or the mean patch token of ``linear`` and ``mlp``
heads; on a feature map the max and average pooling of ``sdn`` and the global average of ``pool_linear``) with the
final logits (regression: the final values), so epochs after the first skip the backbone. Frozen modules run in eval
mode, composite ones included (timm's ``BatchNormAct2d``): a CNN's BatchNorm statistics stay bit-identical too. With
slimming the tokens depend on the life predictor being fitted: one pass with gradient (soft weights) plus one without
(the parent's output, the teacher) per batch, and no cache.

The command line runs like the recipes (``timm_exits.train``): every file atomic, ``last.pth.tar`` after every epoch
(resumed by rerunning the same command; other arguments are refused, listed), ``log.jsonl``, a progress bar, DDP under
``torchrun`` (gloo on CPU), then ``model.safetensors`` (safetensors metadata ``timm_exits``: model, kwargs, classes,
the fit's arguments) that ``timm.create_model(..., checkpoint_path=)``, ``python -m timm_exits.validate``,
``calibrate``, ``export`` and ``hub push`` read, and ``fit.json`` (per epoch: loss, agreement of each exit with the
final answer on the fitting images, or for regression each exit's mean distance from the final value, seconds).
"""
import argparse
import json
import logging
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from ._files import atomic_write, write_json
from .data import available_cpus
from .models._base import UntrainedWeightsWarning, new_parts_filter
from .models._checkpoint import METADATA_KEY, layout_args, load_checkpoint_into, read_checkpoint
from .models.multi_exit_vit import MultiExitMixin
from .models.exit_heads import CACHEABLE_EXIT_HEADS
from .losses import scale_nll
from .tasks import freeze_modes, in_parts
from .validate import _int_at_least, callable_module, run_command

_logger = logging.getLogger(__name__)

__all__ = ['CACHEABLE_HEADS', 'FIT_LOSSES', 'FitModule', 'distill_loss', 'fit', 'fit_options', 'fit_parts', 'main',
           'regression_distill_loss', 'run', 'uncertainty_target']

CACHEABLE_HEADS = CACHEABLE_EXIT_HEADS  # heads whose reading (ExitHead.reading) comes before any parameter
CHECKPOINT, LOG, WEIGHTS, SUMMARY = 'last.pth.tar', 'log.jsonl', 'model.safetensors', 'fit.json'
PRODUCTS = (SUMMARY, WEIGHTS)
METADATA_FORMAT = 1
FIT_LOSSES = {'l1': 'laplace', 'huber': 'gaussian', 'mse': 'gaussian'}  # regression: loss -> the scale units' NLL
DEFAULT_TEMPERATURE, DEFAULT_LOSS = 2., 'l1'


def fit_parts(model: nn.Module) -> Tuple[str, ...]:
    """Module names of the parts ``fit`` trains ('exits', 'uncertainty', 'life'); a ValueError when there is nothing
    to fit (a plain timm model, or a multi-exit model without intermediate exits)."""
    prefixes = tuple(p.rstrip('.') for p in getattr(model, 'new_prefixes', ()))
    if not prefixes:
        raise ValueError(f'{type(model).__name__} has nothing to fit: no exits, uncertainty units or life predictor '
                         "(build a '<parent>_mexit', '<parent>_liferegress' or '<parent>_mexit_liferegress' model)")
    if isinstance(model, MultiExitMixin) and len(model.exit_layers) < 2 and getattr(model, 'life', None) is None:
        raise ValueError(f'{type(model).__name__} has nothing to fit: no intermediate exit (exit_layers is empty)')
    return prefixes


def uncertainty_target(exit_logits: torch.Tensor, final_logits: torch.Tensor) -> torch.Tensor:
    """u~_i = tanh(|softmax(z_i) - onehot(argmax z_n)|_1), eq. (4) of 000_*.txt with y the final answer (no grad)."""
    with torch.no_grad():
        y = F.one_hot(final_logits.argmax(-1), final_logits.shape[-1]).float()
        return torch.tanh((exit_logits.float().softmax(-1) - y).abs().sum(-1))


def distill_loss(
        exit_logits: torch.Tensor,
        final_logits: torch.Tensor,
        temperature: float = 2.,
        labels: Optional[torch.Tensor] = None,
        label_weight: float = 0.,
) -> torch.Tensor:
    """Per image T^2 KL(softmax(z_n / T) || softmax(z_i / T)) + ``label_weight`` CE(z_i, y) where y >= 0 (no label:
    -1). ``final_logits`` is the frozen teacher (no gradient flows into it)."""
    t = float(temperature)
    teacher = (final_logits.detach().float() / t).softmax(-1)
    student = (exit_logits.float() / t).log_softmax(-1)
    loss = t * t * (teacher * (teacher.clamp_min(1e-12).log() - student)).sum(-1)
    if labels is not None and label_weight > 0:
        has = labels >= 0
        ce = F.cross_entropy(exit_logits.float(), labels.clamp_min(0), reduction='none')
        loss = loss + label_weight * torch.where(has, ce, torch.zeros_like(ce))
    return loss


def regression_distill_loss(
        values: torch.Tensor,
        final: torch.Tensor,
        loss: str = DEFAULT_LOSS,
        labels: Optional[torch.Tensor] = None,
        label_weight: float = 0.,
) -> torch.Tensor:
    """Per image, the mean over the K outputs of ``loss`` ('l1' |v_i - v_n|, 'huber' with delta 1, 'mse') between an
    exit's (B, K) ``values`` and the frozen model's ``final`` values (no gradient flows into them), plus
    ``label_weight`` x the same loss to ``labels`` ((B,) or (B, K); an image whose label has a NaN counts none)."""
    if loss not in FIT_LOSSES:
        raise ValueError(f'loss must be one of {list(FIT_LOSSES)}, got {loss!r}')

    def distance(target: torch.Tensor) -> torch.Tensor:
        v, t = values.float(), target.float()
        if loss == 'huber':
            return F.huber_loss(v, t, reduction='none', delta=1.).mean(-1)
        return ((v - t).abs() if loss == 'l1' else (v - t).pow(2)).mean(-1)
    out = distance(final.detach())
    if labels is not None and label_weight > 0:
        k = values.shape[-1]
        if labels.shape[1:] not in ((() if k == 1 else None), (k,)):
            raise ValueError(f'labels must be (B,) for one output or (B, {k}), got {tuple(labels.shape)}')
        y = labels.float().reshape(len(labels), k)
        has = torch.isfinite(y).all(-1)
        term = distance(torch.where(has[:, None], y, values.detach().float()))
        out = out + label_weight * torch.where(has, term, torch.zeros_like(term))
    return out


def _summary(head: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """What exit ``head`` reads of its input before any of its parameters acts, (B, R) (``ExitHead.reading``)."""
    return head.reading(tokens)


def _head_from_summary(head: nn.Module, summary: torch.Tensor) -> torch.Tensor:
    """Logits of a cacheable exit from its reading (its forward after ``_summary``)."""
    return head.from_reading(summary)


def fit_options(model: nn.Module, temperature: Optional[float] = None, loss: Optional[str] = None,
                names: Tuple[str, str] = ('temperature', 'loss')) -> Tuple[Optional[float], Optional[str]]:
    """``(temperature, loss)`` for ``model``'s task, defaults filled in: classification takes a temperature (default
    2) and no loss; regression a loss (``FIT_LOSSES``, default 'l1') and no temperature. ``names``: the arguments'
    names in the errors (the command line's flags)."""
    if getattr(model, 'task', 'classification') == 'regression':
        if temperature is not None:
            raise ValueError(f'{names[0]} applies to classification (the KL between class distributions); a regression '
                             f'model\'s exits learn the final value by {names[1]} ({", ".join(FIT_LOSSES)}), got '
                             f'{names[0]}={temperature!r}')
        loss = DEFAULT_LOSS if loss is None else loss
        if loss not in FIT_LOSSES:
            raise ValueError(f'{names[1]} must be one of {list(FIT_LOSSES)}, got {loss!r}')
        return None, loss
    if loss is not None:
        raise ValueError(f'{names[1]} applies to regression models (task=\'regression\'); a classification model\'s '
                         f'exits learn the final class distribution by the KL at {names[0]}, got {names[1]}={loss!r}')
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    return _check_number(names[0], temperature, 0., low_open=True), None


class FitModule(nn.Module):
    """The trainable module of ``fit``: from a batch (images, or cached exit readings and final outputs) to the loss.

    Args:
        model: A timm-exits model (its new parts train; everything else is frozen by ``freeze``).
        temperature: T of the distillation KL (classification; default 2).
        label_weight: Weight of the label term (cross-entropy, or ``loss`` for regression) on labelled images.
        uncertainty_weight: Weight of the uncertainty MSE (eq. 2), or of the scale NLL for regression.
        loss: Regression: 'l1' (scale NLL: Laplace), 'huber' or 'mse' (Gaussian); default 'l1'.
    """

    def __init__(self, model: nn.Module, temperature: Optional[float] = None, label_weight: float = 0.,
                 uncertainty_weight: float = 1., loss: Optional[str] = None) -> None:
        super().__init__()
        self.model = model
        self.parts = fit_parts(model)
        self.temperature, self.loss = fit_options(model, temperature, loss)
        self.label_weight, self.uncertainty_weight = label_weight, uncertainty_weight
        self.regression = getattr(model, 'task', 'classification') == 'regression'
        self.exits_only = isinstance(model, MultiExitMixin) and getattr(model, 'life', None) is None
        # regression without slimming: the final scale unit's error against the final value is 0, nothing to learn
        self.fixed = (f'uncertainty.{model.depth}',) if self.regression and self.exits_only else ()

    def trains(self, name: str) -> bool:
        """Whether parameter ``name`` of the model learns here."""
        return in_parts(name, self.parts) and not in_parts(name, self.fixed)

    def freeze(self) -> None:
        """Only the new parts need gradient; train mode on the model (the soft weights of the slimming families) with
        every frozen module in eval mode (``tasks.freeze_modes``: no dropout or drop-path in the backbone, BatchNorm
        on its running statistics, which stay untouched: the features of inference)."""
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.trains(name))
        self.train()
        freeze_modes(self.model, lambda name: in_parts(name, self.parts))

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if self.trains(n)]

    # --- multi-exit: one pass without gradient, heads with it -------------------------------------------------

    def exit_inputs(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[Dict[str, Any]], torch.Tensor]:
        """One backbone pass without gradient: the tokens (and keyword arguments) each intermediate exit head is
        called with, and the final logits."""
        captured: Dict[str, Tuple[torch.Tensor, Dict[str, Any]]] = {}

        def hook(key: str) -> Callable:
            def capture(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
                captured[key] = (args[0].detach(), dict(kwargs))
            return capture
        handles = [head.register_forward_pre_hook(hook(k), with_kwargs=True) for k, head in self.model.exits.items()]
        try:
            with torch.no_grad():
                final = self.model.forward_exits(x)[-1].detach()
        finally:
            for h in handles:
                h.remove()
        keys = list(self.model.exits.keys())
        missing = [k for k in keys if k not in captured]
        if missing:
            raise RuntimeError(f'exits {missing} were not called by forward_exits; cannot capture their inputs')
        return [captured[k][0] for k in keys], [captured[k][1] for k in keys], final

    def cache_entry(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """What the cache keeps of images x: each exit's reading (B, R_i) (its width depends on the exit: a CNN's
        maps differ from block to block) and the (B, C) final logits."""
        tokens, _, final = self.exit_inputs(x)
        with torch.no_grad():
            summaries = [_summary(h, t).detach() for h, t in zip(self.model.exits.values(), tokens)]
        return summaries, final

    def _exit_losses(self, logits: Sequence[torch.Tensor], final: torch.Tensor, labels: Optional[torch.Tensor],
                     final_student: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Sum over exits of the per-image losses, and each exit's agreement with the final answer."""
        model = self.model
        total = final.new_zeros(final.shape[0], dtype=torch.float32)
        agree = []
        answer = final.argmax(-1)
        for layer, z in zip(model.exit_layers[:-1], logits):
            total = total + distill_loss(z, final, self.temperature, labels, self.label_weight)
            u = model.exit_uncertainty(layer, z)
            total = total + self.uncertainty_weight * (u.float() - uncertainty_target(z, final)) ** 2
            agree.append((z.argmax(-1) == answer).float().sum())
        z_n = final if final_student is None else final_student
        if final_student is not None:  # slimming: the final head's output on soft-weighted tokens learns too
            total = total + distill_loss(z_n, final, self.temperature, labels, self.label_weight)
            agree.append((z_n.argmax(-1) == answer).float().sum())
        u_n = model.exit_uncertainty(model.exit_layers[-1], z_n)
        total = total + self.uncertainty_weight * (u_n.float() - uncertainty_target(z_n, final)) ** 2
        return total, agree

    def _regression_losses(self, features: Sequence[torch.Tensor], final: torch.Tensor,
                           labels: Optional[torch.Tensor], final_student: Optional[torch.Tensor]
                           ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Regression: per image, the sum over exits (with slimming the final head on soft-weighted tokens too) of
        ``regression_distill_loss`` to the final values plus the scale NLL of the final values given the exit's
        detached values and the scale from its detached features; and each exit's summed mean |v_i - v_n|."""
        model = self.model
        total = final.new_zeros(final.shape[0], dtype=torch.float32)
        deviation = []
        pairs = list(zip(model.exit_layers[:-1], features))
        if final_student is not None:
            pairs.append((model.exit_layers[-1], final_student))
        nll = FIT_LOSSES[self.loss]
        for layer, f in pairs:
            v = model.exit_head_module(layer)(f)
            total = total + regression_distill_loss(v, final, self.loss, labels, self.label_weight)
            scale = model.exit_scale(layer, f.detach())
            total = total + self.uncertainty_weight * scale_nll(v.detach(), scale, final, nll, 'none').mean(-1)
            deviation.append((v.detach().float() - final.float()).abs().mean(-1).sum())
        return total, deviation

    def _losses(self, outputs: Sequence[torch.Tensor], final: torch.Tensor, labels: Optional[torch.Tensor],
                final_student: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if self.regression:
            return self._regression_losses(outputs, final, labels, final_student)
        return self._exit_losses(outputs, final, labels, final_student)

    def forward(self, x: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                summaries: Optional[torch.Tensor] = None, final: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """``{'loss' (mean over the batch), 'agree' (E',) images whose exit answer equals the final one (regression:
        the sum of each image's mean |v_i - v_n|)}``: from images ``x``, or (multi-exit, cached) from ``summaries``
        (each exit's (B, R_i) reading) and ``final`` (B, C)."""
        model = self.model
        pre = self.regression  # regression: the exits' features (their values and scales both read them)
        if summaries is not None:
            outs = [h.from_reading(r, pre_logits=pre) for h, r in zip(model.exits.values(), summaries)]
            total, agree = self._losses(outs, final, labels, None)
        elif self.exits_only:
            tokens, kwargs, final = self.exit_inputs(x)
            outs = [h(t, **{**kw, 'pre_logits': pre}) for h, t, kw in zip(model.exits.values(), tokens, kwargs)]
            total, agree = self._losses(outs, final, labels, None)
        else:
            final = self._teacher(x)
            if isinstance(model, MultiExitMixin):  # exits and slimming: every exit on the soft-weighted tokens
                outs = model._forward_exits(x, features=True) if pre else model.forward_exits(x)
                total, agree = self._losses(outs[:-1], final, labels, outs[-1])
            else:  # LifeRegress: the train-mode (soft-weighted) output against the parent's
                student = model.forward_head(model.forward_features(x))
                total = distill_loss(student, final, self.temperature, labels, self.label_weight)
                agree = [(student.argmax(-1) == final.argmax(-1)).float().sum()]
        return {'loss': total.mean(), 'agree': torch.stack(agree).detach()}

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen model's full answer (full depth, keep rate 1: the parent's output), without gradient."""
        model = self.model
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                if isinstance(model, MultiExitMixin):
                    return model.forward_exits(x, keep_rate=1.)[-1]
                return model.forward_head(model.forward_features(x, keep_rate=1.))
        finally:
            for m, mode in modes.items():
                m.training = mode


def _check_number(name: str, value: Any, low: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value <= low if low_open else value < low):
        raise ValueError(f'{name} must be a finite number {">" if low_open else ">="} {low:g}, got {value!r}')
    return float(value)


def _check_cache(model: nn.Module) -> None:
    if not (isinstance(model, MultiExitMixin) and getattr(model, 'life', None) is None):
        raise ValueError('cache=True keeps the tokens the exit heads read; with slimming the tokens change as the life '
                         'predictor learns, so it is only for multi-exit models (*_mexit)')
    heads = sorted(set(model.exit_head_types) - set(CACHEABLE_HEADS))
    if heads:
        raise ValueError(f'cache=True: exit heads {heads} read every token, not one fixed reading (their parameters act '
                         f'on the whole state, so there is nothing to keep); cacheable heads: {list(CACHEABLE_HEADS)}')


def _batches(loader: Iterator, device: torch.device, regression: bool = False
             ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Images and labels on ``device``: class indices (-1: none), or for regression float values (NaN: none; an
    integer batch's -1, the unlabelled folder's marker, reads as none)."""
    for x, y in loader:
        y = torch.as_tensor(y)
        if regression:
            y = y.float() if y.is_floating_point() else torch.where(y == -1, torch.nan, y.float())
        else:
            y = y.long()
        yield x.to(device, non_blocking=True), y.to(device)


def fit(
        model: nn.Module,
        loader: DataLoader,
        epochs: int = 10,
        lr: float = 1e-3,
        temperature: Optional[float] = None,
        label_weight: float = 0.,
        uncertainty_weight: float = 1.,
        weight_decay: float = 0.05,
        cache: bool = False,
        device: Optional[torch.device] = None,
        progress: bool = False,
        state: Optional[Dict[str, Any]] = None,
        on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None,
        seed: int = 0,
        loss: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Fit ``model``'s new parts (exits, uncertainty units, life predictor) on the images of ``loader`` by distillation
    from the model's own final output; the backbone and the final head stay bit-identical (module docstring).

    Args:
        model: A ``*_mexit``, ``*_liferegress`` or ``*_mexit_liferegress`` model with a trained backbone.
        loader: ``(images, labels)`` batches; label -1 where there is none (regression: float values, NaN where there
            is none; an integer -1 also reads as none); labels count only with ``label_weight``.
        epochs: Passes over the loader (>= 1).
        lr: AdamW learning rate (cosine schedule per step, timm's).
        temperature: T of the KL (classification only; default 2, LGViT's).
        label_weight: Weight of the cross-entropy (regression: ``loss``) on labelled images (0: labels unused).
        uncertainty_weight: Weight of the uncertainty MSE (regression: of the scale NLL).
        weight_decay: AdamW weight decay (timm's groups: none on norms and biases).
        cache: Keep each exit's reading and the final logits of the first epoch; later epochs read them (multi-exit
            models with cacheable heads, ``CACHEABLE_HEADS``: linear, mlp, sdn, pool_linear). The loader's first epoch is then what every epoch sees.
        device: Where the model and the batches go (default: the model's device).
        progress: Show a progress bar (batches) on stderr.
        state: A checkpoint of an earlier call (``on_epoch``'s argument): continue after its epoch.
        on_epoch: Called after every epoch with the state to keep (new parts, optimizer, schedule, epoch, log).
        seed: Every epoch reseeds the RNGs from (seed, epoch) (shuffling, dropout).
        loss: Regression only: 'l1' (default; scales by the Laplace NLL), 'huber' (delta 1) or 'mse' (Gaussian NLL).

    Returns:
        One row per epoch: ``{'epoch', 'loss', 'agreement' (per exit, share of images whose answer equals the
        final one; regression: 'deviation', the mean |v_i - v_n| in target units), 'seconds', 'cached'}``.
    """
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    from timm.scheduler import create_scheduler_v2
    from timm.utils import random_seed
    from tqdm import tqdm
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f'epochs must be an integer >= 1, got {epochs!r}')
    lr = _check_number('lr', lr, 0., low_open=True)
    temperature, loss = fit_options(model, temperature, loss)
    label_weight = _check_number('label_weight', label_weight, 0.)
    uncertainty_weight = _check_number('uncertainty_weight', uncertainty_weight, 0.)
    weight_decay = _check_number('weight_decay', weight_decay, 0.)
    module = FitModule(model, temperature, label_weight, uncertainty_weight, loss)
    if cache:
        _check_cache(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    module.freeze()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    trainable = nn.parallel.DistributedDataParallel(module) if distributed else module
    params = {id(p) for p in module.trainable_parameters()}
    no_decay = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    groups = [{**g, 'params': [p for p in g['params'] if id(p) in params]}
              for g in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)]
    optimizer = create_optimizer_v2([g for g in groups if g['params']], opt='adamw', lr=lr, weight_decay=weight_decay)
    steps = len(loader)
    if steps == 0:
        raise ValueError('the loader yields no batch: no image to fit on')
    scheduler = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, step_on_epochs=False,
                                    updates_per_epoch=steps)[0]
    first, rows = 0, []
    if state is not None:
        model.load_state_dict({**model.state_dict(), **state['parts']})
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        first, rows = state['epoch'] + 1, list(state['log'])
    store: Optional[Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]] = None
    for epoch in range(first, epochs):
        random_seed(seed + epoch, rank)
        if isinstance(getattr(loader, 'sampler', None), DistributedSampler):
            loader.sampler.set_epoch(0 if cache else epoch)
        start = time.time()
        module.freeze()
        total, count, agree = 0., 0, None
        cached = store is not None
        if cached:
            order = torch.randperm(len(store[2]))
            size = loader.batch_size or 1
            batches = (([r[order[i:i + size]] for r in store[0]], store[1][order[i:i + size]],
                        store[2][order[i:i + size]]) for i in range(0, len(order), size))
        else:
            batches = _batches(loader, device, module.regression)
            kept: List[Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]] = []
        bar = tqdm(batches, total=steps, desc=f'fit {epoch + 1}/{epochs}' + (' (cached)' if cached else ''),
                   unit='batch', disable=not progress or rank != 0, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            if cached:
                summaries, final, y = batch
                out = trainable(labels=y, summaries=summaries, final=final)
            elif cache:
                x, y = batch
                summaries, final = module.cache_entry(x)
                kept.append((summaries, final, y))
                out = trainable(labels=y, summaries=summaries, final=final)
            else:
                x, y = batch
                out = trainable(x, labels=y)
            optimizer.zero_grad(set_to_none=True)
            out['loss'].backward()
            optimizer.step()
            scheduler.step_update(epoch * steps + i + 1)
            n = len(y)
            total, count = total + float(out['loss'].detach()) * n, count + n
            agree = out['agree'] if agree is None else agree + out['agree']
            bar.set_postfix(loss=f'{total / count:.4f}')
        if cache and not cached:
            readings, finals, ys = zip(*kept)
            store = ([torch.cat(r) for r in zip(*readings)], torch.cat(finals), torch.cat(ys))
        if distributed:
            sums = torch.tensor([total, count, *agree.tolist()], device=device, dtype=torch.float64)
            dist.all_reduce(sums)
            total, count, agree = float(sums[0]), int(sums[1]), sums[2:]
        labels = [str(layer) for layer in model.exit_layers[:-1]] if isinstance(model, MultiExitMixin) else []
        if not isinstance(model, MultiExitMixin) or getattr(model, 'life', None) is not None:
            labels = labels + ['final (soft-weighted)'] if isinstance(model, MultiExitMixin) else ['soft-weighted']
        agree_list = [float(a) / max(count, 1) for a in agree.tolist()]
        key = 'deviation' if module.regression else 'agreement'
        rows.append({'epoch': epoch + 1, 'loss': total / max(count, 1), key: dict(zip(labels, agree_list)),
                     'seconds': time.time() - start, 'cached': cached, 'lr': optimizer.param_groups[0]['lr']})
        if on_epoch is not None:
            on_epoch({'epoch': epoch, 'log': rows, 'optimizer': optimizer.state_dict(),
                      'scheduler': scheduler.state_dict(),
                      'parts': {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                                if in_parts(k, module.parts)}})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return rows


# --- command line -----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m timm_exits.fit``."""
    from timm.utils import ParseKwargs
    from .data import add_data_config_args
    parser = argparse.ArgumentParser(prog='python -m timm_exits.fit', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help="a timm-exits model, tag allowed ('<parent>_mexit', "
                        "'<parent>_liferegress', '<parent>_mexit_liferegress')")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help="the tag's pretrained backbone and head")
    weights.add_argument('--checkpoint', default='', help='weights: a plain timm checkpoint (backbone and head) or a '
                         'timm-exits one (its new parts are the starting point)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--num-classes', type=_int_at_least(1), default=None)
    parser.add_argument('--data-dir', required=True, help='images: a folder, nested (class folders: labels) or flat '
                        '(no labels); with --dataset folder / digits the dataset root')
    parser.add_argument('--dataset', default='images', help="'images' (default), 'folder', 'digits', 'torch/<name>'")
    parser.add_argument('--split', default='', help="split of --dataset ('' for images: --data-dir itself)")
    parser.add_argument('--output', required=True, help='run folder (model.safetensors, fit.json, log.jsonl, '
                        'last.pth.tar)')
    parser.add_argument('--epochs', type=_int_at_least(1), default=10)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('--batch-size', type=_int_at_least(1), default=64)
    parser.add_argument('--temperature', type=float, default=None, help='classification: T of the KL from the final '
                        'output (default 2); refused for a regression model')
    parser.add_argument('--loss', choices=list(FIT_LOSSES), default=None, help="regression: each exit's loss to the "
                        "final value, 'l1' (default; scales by the Laplace NLL), 'huber' (delta 1) or 'mse' (Gaussian "
                        'NLL); refused for a classification model')
    parser.add_argument('--label-weight', type=float, default=0., help='weight of the cross-entropy (regression: of '
                        '--loss to the target) where labels exist')
    parser.add_argument('--uncertainty-weight', type=float, default=1., help='weight of the uncertainty MSE '
                        '(regression: of the scale NLL)')
    parser.add_argument('--cache', action='store_true', help='keep what the exit heads read after the first epoch '
                        '(linear, mlp, sdn, pool_linear heads; implies --no-augment)')
    parser.add_argument('--no-augment', action='store_true', help="the eval transform (default: timm's training "
                        'augmentation)')
    parser.add_argument('--seed', type=_int_at_least(0), default=0)
    workers = min(4, available_cpus())
    parser.add_argument('--workers', type=_int_at_least(0), default=workers)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-resume', action='store_true', help='start over even if OUTPUT holds a fit')
    parser.add_argument('--no-progress', action='store_true')
    add_data_config_args(parser)
    return parser


RESULT_ARGS = ('model', 'pretrained', 'checkpoint', 'model_kwargs', 'num_classes', 'data_dir', 'dataset', 'split',
               'epochs', 'lr', 'weight_decay', 'batch_size', 'temperature', 'label_weight', 'uncertainty_weight',
               'cache', 'no_augment', 'seed', 'img_size', 'input_size', 'use_train_size', 'crop_pct', 'crop_mode',
               'crop_border_pixels', 'mean', 'std', 'interpolation', 'count_crop', 'count_resize')


def _fingerprint(args: argparse.Namespace) -> Dict[str, Any]:
    out = {k: getattr(args, k) for k in RESULT_ARGS}
    if getattr(args, 'loss', None) is not None:  # regression (a classification fit's record has no loss)
        out['loss'] = args.loss
    for k in ('checkpoint', 'data_dir'):
        out[k] = os.path.abspath(out[k]) if out[k] else ''
    return json.loads(json.dumps(out, default=str))


def _create(args: argparse.Namespace) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    import timm
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if not timm.is_model(args.model):
        raise ValueError(f'--model {args.model!r} is not a registered model; e.g. vit_small_patch16_224_mexit '
                         "(timm.list_models('*_mexit') after import timm_exits)")
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UntrainedWeightsWarning)  # fitting them is the point
        try:
            model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
        except TypeError as e:
            raise ValueError(f'--model {args.model} with --model-kwargs {args.model_kwargs}: {e}') from e
        fit_parts(model)
        recorded = None
        if args.checkpoint:
            state_dict, recorded = read_checkpoint(args.checkpoint)
            if not any(k.startswith(model.new_prefixes) for k in state_dict):
                model.load_state_dict(new_parts_filter(state_dict, model), strict=True)
            else:
                load_checkpoint_into(model, state_dict, recorded, args.checkpoint)
    return model, recorded


def _recorded_kwargs(model: nn.Module, given: Dict[str, Any]) -> Dict[str, Any]:
    layout = layout_args(model)
    keys = ('exit_layers', 'exit_head', 'exit_criterion', 'life_layer', 'prune_layers', 'U', 'exit_input_size', 'task',
            'exit_patience')
    fixed = {k: layout[k] for k in keys if k in layout}
    return json.loads(json.dumps({**fixed, **given}, default=str))


def _check_labels(args: argparse.Namespace, model: nn.Module, ds: Any) -> None:
    """Refuse ``--label-weight`` where the dataset's labels are of the other task (class indices for a regression
    model, counts for a classifier)."""
    counts = args.dataset == 'counting' or args.dataset.startswith('digits_count')
    regression = getattr(model, 'task', 'classification') == 'regression'
    if args.label_weight > 0 and getattr(ds, 'labelled', True) and counts != regression:
        what = ('class indices; a regression model needs values (--dataset counting or digits_count)' if regression
                else 'counts; a classification model needs class indices')
        raise ValueError(f'--label-weight {args.label_weight:g}: the labels of --dataset {args.dataset} are {what}; '
                         'or fit without labels (--label-weight 0)')


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Fit as the command line asks; bad input raises ValueError naming the flag, before anything is written."""
    from timm.utils.distributed import init_distributed_device_so
    from safetensors.torch import save_file
    from .train import _device_problem, _output_problem, _remove
    from .calibrate import _folder, command_dataset
    for flag, value, low, low_open in (('--lr', args.lr, 0., True),
                                       ('--weight-decay', args.weight_decay, 0., False),
                                       ('--label-weight', args.label_weight, 0., False),
                                       ('--uncertainty-weight', args.uncertainty_weight, 0., False)):
        try:
            _check_number(flag, value, low, low_open)
        except ValueError as e:
            raise ValueError(str(e).replace(' must be', ': must be')) from None
    problem = _device_problem(args.device)
    if problem:
        raise ValueError(f'--device: {problem}')
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise ValueError(f'--checkpoint {args.checkpoint!r} is not a file')
    if args.dataset == 'images' and not os.path.isdir(_folder(args)):
        raise ValueError(f'--data-dir {_folder(args)!r} is not a folder')
    from timm.utils import random_seed
    random_seed(args.seed)  # a random backbone (neither --pretrained nor --checkpoint) is the same on a resume
    model, recorded = _create(args)
    try:
        args.temperature, args.loss = fit_options(model, args.temperature, args.loss, ('--temperature', '--loss'))
    except ValueError as e:
        raise ValueError(str(e).replace(' must be', ': must be', 1)) from None
    if not args.pretrained and not args.checkpoint:
        _logger.warning(f'warning: {args.model} has a random backbone (neither --pretrained nor --checkpoint): the '
                        'exits learn to imitate an untrained model')
    if args.cache:
        _check_cache(model)
    augment = not (args.cache or args.no_augment)
    ds, cfg = command_dataset(args, model, recorded, augment)
    _check_labels(args, model, ds)
    problem = _output_problem(args.output)
    if problem:
        raise ValueError(f'--output: {problem}')
    info = init_distributed_device_so(device=args.device)
    device = torch.device(info['device'])
    rank, world, distributed = info['global_rank'], info['world_size'], info['distributed']
    path = lambda name: os.path.join(args.output, name)  # noqa: E731
    fingerprint = _fingerprint(args)
    state = None
    if os.path.exists(path(CHECKPOINT)) and not args.no_resume:
        state = torch.load(path(CHECKPOINT), map_location='cpu', weights_only=True)
        from .train import _differences
        diffs = _differences(state.get('args', {}), fingerprint)
        if diffs:
            raise ValueError(f'--output {args.output!r} holds a fit with other arguments: ' + '; '.join(diffs)
                             + '. Rerun with its arguments, or --no-resume to start over')
    if rank == 0:
        for name in os.listdir(args.output):
            if any(name.startswith(f'{f}.tmp') for f in (CHECKPOINT, LOG, *PRODUCTS)):
                _remove(path(name))
        if args.no_resume:
            _remove(path(CHECKPOINT))
        done = state is not None and state['epoch'] + 1 >= args.epochs and os.path.exists(path(WEIGHTS))
        if not done:
            for name in PRODUCTS:
                _remove(path(name))
    if distributed:
        dist.barrier()
    model = model.to(device)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed) \
        if distributed else None
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, drop_last=False)

    def save(st: Dict[str, Any]) -> None:
        if rank != 0:
            return
        st = {**st, 'args': fingerprint}
        atomic_write(path(CHECKPOINT), lambda tmp: torch.save(st, tmp))

        def write_log(tmp: str) -> None:
            with open(tmp, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in st['log'])
        atomic_write(path(LOG), write_log)
        row = st['log'][-1]
        what, key = ('mean distance from the final value', 'deviation') if 'deviation' in row else \
            ('agreement with the final answer', 'agreement')
        _logger.info(f'epoch {st["epoch"] + 1}/{args.epochs}: loss {row["loss"]:.4f}, {what} '
                     + ', '.join(f'{k}: {v:.3f}' for k, v in row[key].items()))

    try:
        rows = fit(model, loader, args.epochs, args.lr, args.temperature, args.label_weight, args.uncertainty_weight,
                   args.weight_decay, args.cache, device, progress=not args.no_progress, state=state, on_epoch=save,
                   seed=args.seed, loss=args.loss)
    finally:
        if distributed:
            dist.barrier()
    if rank == 0:
        info = {'model': args.model, 'model_kwargs': _recorded_kwargs(model, args.model_kwargs),
                'num_classes': int(model.num_classes), 'format': METADATA_FORMAT, 'fit': fingerprint,
                'data_config': cfg.record()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path(WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(info)}))
        write_json({'model': args.model, 'images': len(ds), 'labelled': bool(getattr(ds, 'labelled', True)),
                    'epochs': rows, 'args': fingerprint}, path(SUMMARY))
        _logger.info(f'fitted weights written to {path(WEIGHTS)}')
    if distributed:
        dist.destroy_process_group()
    return rows


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """``python -m timm_exits.fit``: bad input prints one ``error: ...`` line and exits with status 2."""
    return run_command(build_parser(), run, argv)


callable_module(__name__, fit)

if __name__ == '__main__':
    main()
