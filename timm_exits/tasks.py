""" Training objectives of the seeds as ``timm.task.TrainingTask`` subclasses.

Every task's ``forward(input, target)`` returns ``{'loss', 'output', ...}`` like timm's ``ClassificationTask`` and works
with any timm criterion (cross-entropy, label smoothing, mixup/cutmix soft targets, BCE, JSD): each exit's
classification term is ``criterion(exit_logits, target)``. Multi-exit tasks run ONE backbone pass per step through
``forward_exits`` (inside a small wrapper module, so that DDP sees every used parameter in its forward) and never call
``model(x)`` in train mode, so the model's own train-mode hook (``timm_exits.losses.attach_exit_losses``) stays out.

- ``MEViTTask``: sandwich rule with in-place distillation (sec. 2.2, eqs. 1-5 of 000_*.txt): the full model with the
  final classifier (upper bound) and, in the same step, the earliest exit plus ``num_sampled`` random exits (lower
  bound), each with CE + uncertainty MSE + KL from the final classifier's (detached) distribution.
- ``EndToEndTask``: Bakhtiarnia's end-to-end strategy, l_t = l + sum_b lambda_b l_b (II-A, IV-B of 001_*.txt), the final
  exit weighing twice an early one by default.
- ``ClassifierWiseTask``: Bakhtiarnia's classifier-wise strategy: backbone (and final head) frozen, exits trained
  independently of each other on detached tokens.
- ``BackboneTask``: the backbone and final classifier alone (``forward_head(forward_features(x))``), new parts frozen.
- ``LifeRegressTask``: LifeRegress (003_*.txt, eq. 8): stage 'predictor' (backbone frozen), 'backbone' (life predictor
  frozen), Algorithm 1; 'joint' is the single-stage ablation (Table IV).
- ``MEViTLifeRegressTask``: both in one model (``*_mexit_liferegress``): MEViT's sandwich rule with in-place
  distillation on the soft-weighted tokens of eqs. (6)-(7), 003, in LifeRegress's stages.

Bakhtiarnia's branches have no uncertainty predictor; there the tasks still fit each exit's u_i (eq. 3 of 000) to
eq. (4)'s target on detached logits, which leaves the classifiers' objective exactly the paper's.

Regression (``task='regression'`` models, TransCrowd's counting in 001_*.txt): ``RegressionTask`` and its settings
``RegressionEndToEndTask`` (final term weighted twice each early exit), ``RegressionClassifierWiseTask`` (frozen
backbone), ``RegressionMEViTTask`` (sandwich rule, each exit also pulled to the detached final prediction) and
``RegressionBackboneTask`` (the backbone and final head alone); L1 or MSE, and each exit's scale fitted by a Laplace or
Gaussian negative log-likelihood on detached values and features (the regressors' objective stays the seed's).
"""
import math
from numbers import Integral, Real
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.task import TrainingTask, resolve_classification_loss

from .losses import REGRESSION_LOSSES, SCALE_NLLS, inplace_kl, regression_loss, sample_exits, scale_nll, uncertainty_mse
from .models.life_regress_vit import LifeRegressMixin, LifeRegressVisionTransformer
from .models.mexit_liferegress import MultiExitLifeRegressMixin
from .models.multi_exit_vit import MultiExitMixin, MultiExitVisionTransformer

__all__ = [
    'BackboneTask', 'ClassifierWiseTask', 'EndToEndTask', 'ExitsForward', 'LIFE_STAGES', 'LifeRegressTask',
    'MEViTLifeRegressTask', 'MEViTTask', 'RegressionBackboneTask', 'RegressionClassifierWiseTask',
    'RegressionEndToEndTask', 'RegressionExitsForward', 'RegressionMEViTTask', 'RegressionTask', 'regression_target',
    'MultiExitTask', 'TASKS', 'check_bool', 'check_weight', 'create_task', 'freeze_modes', 'freeze_parts', 'in_parts',
    'sample_exits', 'target_distribution',
]

LIFE_STAGES = ('predictor', 'backbone', 'joint')


def target_distribution(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) float target y of eq. (4), 000_*.txt: one-hot from class indices, soft (mixup/cutmix) targets as given."""
    return target.float() if target.ndim == 2 else F.one_hot(target.long(), num_classes).float()


def check_weight(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0 (a loss weight), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f'{name} must be a finite number >= 0 (a loss weight), got {value!r}')
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ValueError naming ``name`` (a string such as 'yes' is not accepted)."""
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be True or False, got {value!r}')
    return value


def in_parts(name: str, prefixes: Sequence[str]) -> bool:
    """Whether module or parameter ``name`` is one of ``prefixes`` (module names) or inside one."""
    return any(name == p or name.startswith(p + '.') for p in prefixes)


def freeze_parts(model: nn.Module, trainable: Callable[[str], bool]) -> None:
    """Set ``requires_grad`` of every parameter from ``trainable(name)``."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))


def freeze_modes(model: nn.Module, trainable: Callable[[str], bool]) -> None:
    """Eval mode on every module of ``model`` that is frozen (``trainable(name)`` false) and holds no trainable module:
    a frozen part computes the features of inference (no dropout, no drop-path) and its BatchNorm layers read their
    running statistics without updating them, composite ones too (timm's ``BatchNormAct2d`` has children, so a rule
    on leaf modules alone would leave it updating its statistics). Modules holding a trainable part keep their mode."""
    holders = set()
    for name, _ in model.named_modules():
        if name and trainable(name):
            parts = name.split('.')
            holders.update('.'.join(parts[:i]) for i in range(len(parts)))
    for name, module in model.named_modules():
        if name and not trainable(name) and name not in holders:
            module.eval()


def _check_model_task(owner: str, model: nn.Module, task: str) -> None:
    """Refuse a model of the other task: classification tasks read softmax logits, regression tasks real values."""
    have = getattr(model, 'task', 'classification')
    if have != task:
        names = sorted(k for k, v in TASKS.items() if getattr(v, 'model_task', 'classification') == have)
        raise ValueError(f'{owner} trains task={task!r} models; this model was built with task={have!r}; '
                         f'its tasks: {names}')


def regression_target(target: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """(B, K) float target of a regression model with K outputs from (B,) (K = 1) or (B, K) values; a target that
    is not finite (NaN, inf) or of another shape raises, naming it."""
    if not torch.is_tensor(target) or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f'a regression target must be a real tensor, got {type(target).__name__}')
    target = target.float()
    if target.ndim == 1 and num_outputs == 1:
        target = target[:, None]
    if target.ndim != 2 or target.shape[1] != num_outputs:
        raise ValueError(f'a regression target must be (B,) for one output or (B, {num_outputs}), got '
                         f'{tuple(target.shape)}')
    if not torch.isfinite(target).all():
        raise ValueError(f'a regression target must be finite; got {int((~torch.isfinite(target)).sum())} NaN or '
                         f'inf values in the batch')
    return target


def _detach_inputs(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


class ExitsForward(nn.Module):
    """Trainable module of the multi-exit tasks: one backbone pass, every exit's logits and predicted uncertainty.

    Args:
        model: A ``MultiExitVisionTransformer``.
        detach_uncertainty: Feed each uncertainty predictor detached logits (its MSE then trains it alone).
        detach_exits: Feed each intermediate exit detached tokens (no exit gradient reaches the backbone).
    """

    def __init__(self, model: MultiExitVisionTransformer, detach_uncertainty: bool = False,
                 detach_exits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.detach_uncertainty = detach_uncertainty
        self.detach_exits = detach_exits

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        hooks = [m.register_forward_pre_hook(_detach_inputs) for m in self.model.exits.values()] \
            if self.detach_exits else []
        try:
            logits = self.model.forward_exits(x)
        finally:
            for hook in hooks:
                hook.remove()
        uncertainty = [
            self.model.exit_uncertainty(layer, z.detach() if self.detach_uncertainty else z)
            for layer, z in zip(self.model.exit_layers, logits)]
        return logits, uncertainty


class _FinalForward(nn.Module):
    """Trainable module of ``BackboneTask``: the timm parent's path, never the multi-exit train-mode hook."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x))


class _WrappedModelTask(TrainingTask):
    """Base of the tasks: the trainable module wraps the model (``.model``); parts of the model can be frozen.

    Args:
        wrapper: ``ExitsForward`` or ``_FinalForward`` around the model.
        criterion: timm criterion (default: ``create_classification_loss(**criterion_kwargs)``).
        trainable_parts: Module names (and their sub-modules) that train; None: all but ``frozen_parts``.
        frozen_parts: Module names frozen. Frozen parameters get ``requires_grad=False``; frozen modules (dropout,
            drop-path, BatchNorm: ``freeze_modes``) run in eval mode, so a frozen part computes the features it
            computes at inference and its BatchNorm statistics stay untouched.
    """

    def __init__(
            self,
            wrapper: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            trainable_parts: Optional[Sequence[str]] = None,
            frozen_parts: Sequence[str] = (),
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = False,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.trainable_module = wrapper
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self.trainable_parts = None if trainable_parts is None else tuple(trainable_parts)
        self.frozen_parts = tuple(frozen_parts)
        freeze_parts(self.model, self.is_trainable)

    @property
    def model(self) -> nn.Module:
        """The plain model (no wrapper, DDP, compile or EMA)."""
        return self.get_eval_model()

    def is_trainable(self, name: str) -> bool:
        """Whether the model's parameter or module ``name`` trains in this task."""
        inside = self.trainable_parts is None or in_parts(name, self.trainable_parts)
        return inside and not in_parts(name, self.frozen_parts)

    def train(self, mode: bool = True) -> '_WrappedModelTask':
        super().train(mode)
        if mode and (self.trainable_parts is not None or self.frozen_parts):
            freeze_modes(self.model, self.is_trainable)
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> '_WrappedModelTask':
        """Wrap the trainable module in DDP (after freezing: DDP registers the parameters that need grad)."""
        self.trainable_module = nn.parallel.DistributedDataParallel(
            self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the trainable module (before ``prepare_distributed``)."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.trainable_module

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The model inside the wrapper, unwrapped from DDP, compile and EMA."""
        current = super().get_eval_model(module=module, ema=ema)
        while current is not None and not isinstance(current, (ExitsForward, _FinalForward, RegressionExitsForward)):
            inner = getattr(current, 'module', None)
            current = getattr(current, '_orig_mod', None) if inner is None else inner
        return None if current is None else current.model


class MultiExitTask(_WrappedModelTask):
    """Weighted multi-exit objective on one ``forward_exits`` pass (the tasks below are its settings).

    loss = w_n criterion(f_n) + sum_i m_i [w_i criterion(f_i) + w_i KL(f_n || f_i) + MSE(u_i, u~_i)] + MSE(u_n, u~_n)

    with m_i the sandwich mask (``sample_exits``), the KL of eq. (5) only when ``distill``, and each MSE that of eq. (2)
    against eq. (4)'s target (000_*.txt), all means over the batch.

    Args:
        model: A ``MultiExitVisionTransformer``.
        criterion: timm criterion for every classification term (default: ``create_classification_loss``).
        final_weight: w_n of the final classifier's term.
        exit_weight: w_i of every intermediate exit.
        distill: Add the in-place KL from the final classifier's detached distribution.
        num_sampled: Intermediate exits drawn each step besides the earliest (None: every exit, every step).
        detach_uncertainty: Fit the uncertainty predictors on detached logits.
        detach_exits: Feed the intermediate exits detached tokens.
        uncertainty_weight: Weight of the MSE terms.
        **kwargs: ``criterion_kwargs``, ``trainable_parts``, ``frozen_parts``, ``device``, ``dtype``, ``verbose``.
    """

    def __init__(
            self,
            model: MultiExitVisionTransformer,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            final_weight: float = 1.,
            exit_weight: float = 1.,
            distill: bool = False,
            num_sampled: Optional[int] = None,
            detach_uncertainty: bool = False,
            detach_exits: bool = False,
            uncertainty_weight: float = 1.,
            **kwargs: Any,
    ) -> None:
        if not isinstance(model, MultiExitMixin):
            raise ValueError(f'{type(self).__name__} needs a MultiExitVisionTransformer, got {type(model).__name__}')
        _check_model_task(type(self).__name__, model, 'classification')
        if num_sampled is not None and (isinstance(num_sampled, bool) or not isinstance(num_sampled, Integral)
                                        or num_sampled < 0):
            raise ValueError(f'num_sampled must be an int >= 0 or None (every exit), got {num_sampled!r}')
        final_weight, exit_weight, uncertainty_weight = (
            check_weight(n, v) for n, v in (('final_weight', final_weight), ('exit_weight', exit_weight),
                                            ('uncertainty_weight', uncertainty_weight)))
        for name, value in (('distill', distill), ('detach_uncertainty', detach_uncertainty),
                            ('detach_exits', detach_exits)):
            check_bool(name, value)
        super().__init__(ExitsForward(model, detach_uncertainty, detach_exits), criterion, **kwargs)
        self.final_weight = final_weight
        self.exit_weight = exit_weight
        self.distill = distill
        self.num_sampled = None if num_sampled is None else int(num_sampled)
        self.uncertainty_weight = uncertainty_weight

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One backbone pass; returns the total ``loss``, the final ``output`` and the two parts of the loss."""
        logits, uncertainty = self.trainable_module(input)
        final = logits[-1]
        y = target_distribution(target, final.shape[-1])
        teacher = final.detach().float().softmax(-1)
        mask = sample_exits(len(logits) - 1, self.num_sampled).tolist()
        # unsampled exits enter with weight 0: every parameter gets a gradient, DDP needs no unused-parameter scan
        exit_loss = final.new_zeros((), dtype=torch.float32)
        for m, z, u in zip(mask, logits[:-1], uncertainty[:-1]):
            loss = self.exit_weight * self.criterion(z, target)
            loss = loss + self.uncertainty_weight * uncertainty_mse(u, z, y).mean()
            if self.distill:
                loss = loss + self.exit_weight * inplace_kl(z, teacher).mean()
            exit_loss = exit_loss + m * loss
        final_loss = self.criterion(final, target)
        final_u = self.uncertainty_weight * uncertainty_mse(uncertainty[-1], final, y).mean()
        loss = self.final_weight * final_loss + final_u + exit_loss
        return {'loss': loss, 'output': final, 'final_loss': final_loss.detach(), 'exit_loss': exit_loss.detach()}


class MEViTTask(MultiExitTask):
    """MEViT's sandwich rule with in-place distillation (sec. 2.2, eqs. 1-5 of 000_*.txt).

    Upper bound: the full model with the final classifier (criterion + its uncertainty MSE). Lower bound, same step:
    the earliest exit and ``num_sampled`` random others, each with eq. (1) (criterion + MSE) plus eq. (5)'s KL from
    the final classifier's distribution, detached (no gradient into the teacher side).
    """

    def __init__(self, model: MultiExitVisionTransformer, num_sampled: Optional[int] = 2, **kwargs: Any) -> None:
        super().__init__(model, distill=True, num_sampled=num_sampled, **kwargs)


class EndToEndTask(MultiExitTask):
    """Bakhtiarnia's end-to-end strategy: l_t = final_weight * l + sum_b exit_weight * l_b (II-A, IV-B of 001_*.txt);
    the default makes the final exit's contribution double an early exit's, at plain fine-tuning's scale."""

    def __init__(self, model: MultiExitVisionTransformer, final_weight: float = 1., exit_weight: float = .5,
                 **kwargs: Any) -> None:
        kwargs.setdefault('detach_uncertainty', True)
        super().__init__(model, final_weight=final_weight, exit_weight=exit_weight, **kwargs)


class ClassifierWiseTask(MultiExitTask):
    """Bakhtiarnia's classifier-wise strategy (II-A, IV-A of 001_*.txt): the backbone's parameters are frozen and
    stay unchanged; each exit is trained on detached tokens, independently of the others and of the backbone.

    Args:
        model: A ``MultiExitVisionTransformer`` with a trained backbone.
        train_head: Train the final classifier too (a linear probe on the frozen backbone, e.g. a new dataset's head,
            as in seed 004); by default it is frozen and the final accuracy cannot move.
    """

    def __init__(self, model: MultiExitVisionTransformer, train_head: bool = False, **kwargs: Any) -> None:
        check_bool('train_head', train_head)
        kwargs.setdefault('detach_uncertainty', True)
        parts = ('exits', 'uncertainty', *(('head',) if train_head else ()))
        super().__init__(
            model, final_weight=float(train_head), detach_exits=True, trainable_parts=parts, **kwargs)


class BackboneTask(_WrappedModelTask):
    """Fine-tune the backbone and final classifier alone (``forward_head(forward_features(x))``, the timm parent's
    path), the parts this package adds (exits, uncertainty and life predictors) frozen; works on any timm ViT.

    Bakhtiarnia's classifier-wise strategy starts from such a trained backbone (III, 001_*.txt).
    """

    def __init__(self, model: nn.Module, criterion: Optional[Union[nn.Module, Callable]] = None, **kwargs: Any) -> None:
        _check_model_task(type(self).__name__, model, 'classification')
        kwargs.setdefault('frozen_parts', tuple(p.rstrip('.') for p in getattr(model, 'new_prefixes', ())))
        super().__init__(_FinalForward(model), criterion, **kwargs)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        return {'loss': self.criterion(output, target), 'output': output}


class LifeRegressTask(BackboneTask):
    """LifeRegress training (003_*.txt): the criterion (eq. 8) through the train-mode soft weights of eqs. (6)-(7).

    Args:
        model: A ``LifeRegressVisionTransformer``.
        stage: 'predictor' (Algorithm 1, step 3: backbone frozen, life predictor trained), 'backbone' (step 5: life
            predictor frozen, backbone fine-tuned) or 'joint' (the single-stage ablation of Table IV).
    """

    def __init__(self, model: LifeRegressVisionTransformer, stage: str = 'predictor', **kwargs: Any) -> None:
        if not isinstance(model, LifeRegressMixin):
            raise ValueError(f'LifeRegressTask needs a LifeRegressVisionTransformer, got {type(model).__name__}')
        if stage not in LIFE_STAGES:
            raise ValueError(f'stage={stage!r} is not known; allowed: {list(LIFE_STAGES)}')
        parts = {'predictor': dict(trainable_parts=('life',), frozen_parts=()),
                 'backbone': dict(frozen_parts=('life',)), 'joint': dict(frozen_parts=())}[stage]
        super().__init__(model, **parts, **kwargs)
        self.stage = stage


class MEViTLifeRegressTask(MEViTTask):
    """Exits and slimming trained together (a ``*_mexit_liferegress`` model): MEViT's sandwich rule with in-place
    distillation (eqs. 1-5, 000_*.txt; ``MEViTTask``) on one train-mode ``forward_exits`` pass, where every attention
    after ``life_layer`` is weighted by the soft weights of eqs. (6)-(7), 003_*.txt, so the loss of every sampled exit
    and of the final classifier reaches the life predictor. LifeRegress's stages (Algorithm 1, 003) choose what trains.

    Args:
        model: A ``MultiExitLifeRegressVisionTransformer`` (or ``MultiExitLifeRegressEva``).
        stage: 'predictor' (life predictor alone, backbone, exits and uncertainty predictors frozen), 'backbone' (life
            predictor frozen, everything else trained) or 'joint' (everything).
        num_sampled: Intermediate exits drawn each step besides the earliest (MEViT's sandwich rule).
        **kwargs: ``MultiExitTask``'s (``criterion``, ``exit_weight``, ``uncertainty_weight``, ...).
    """

    def __init__(self, model: MultiExitLifeRegressMixin, stage: str = 'predictor', num_sampled: Optional[int] = 2,
                 **kwargs: Any) -> None:
        if not isinstance(model, MultiExitLifeRegressMixin):
            raise ValueError(f'MEViTLifeRegressTask needs a model with exits and slimming (*_mexit_liferegress), got '
                             f'{type(model).__name__}')
        if stage not in LIFE_STAGES:
            raise ValueError(f'stage={stage!r} is not known; allowed: {list(LIFE_STAGES)}')
        parts = {'predictor': dict(trainable_parts=('life',)), 'backbone': dict(frozen_parts=('life',)),
                 'joint': {}}[stage]
        super().__init__(model, num_sampled=num_sampled, **parts, **kwargs)
        self.stage = stage


class RegressionExitsForward(nn.Module):
    """Trainable module of the regression tasks: one backbone pass, every exit's values and predicted scale.

    Args:
        model: A ``task='regression'`` multi-exit model.
        detach_scale: Feed each scale unit detached features (its NLL then trains it alone).
        detach_exits: Feed each intermediate exit detached tokens (no exit gradient reaches the backbone).
    """

    def __init__(self, model: MultiExitMixin, detach_scale: bool = True, detach_exits: bool = False) -> None:
        super().__init__()
        self.model, self.detach_scale, self.detach_exits = model, detach_scale, detach_exits

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        hooks = [m.register_forward_pre_hook(_detach_inputs) for m in self.model.exits.values()] \
            if self.detach_exits else []
        try:
            features = self.model._forward_exits(x, features=True)
        finally:
            for hook in hooks:
                hook.remove()
        layers = self.model.exit_layers
        values = [self.model.exit_head_module(k)(f) for k, f in zip(layers, features)]
        scales = [self.model.exit_scale(k, f.detach() if self.detach_scale else f) for k, f in zip(layers, features)]
        return values, scales


class RegressionTask(_WrappedModelTask):
    """Multi-exit regression objective on one pass (TransCrowd's counting with exits, 001_*.txt):

    loss = w_n l(y_n, y) + sum_i m_i [w_i l(y_i, y) + w_d l(y_i, sg(y_n))] + w_s sum_i NLL(y | sg(y_i), s_i)

    with l the L1 (TransCrowd) or squared error, m_i the sandwich mask (``sample_exits``), sg a detached value (the
    final prediction as in-place teacher, MEViT's eq. 5 for regression) and s_i each exit's predicted scale (the
    final head's too) fitted by the negative log-likelihood ``nll`` on detached values: l_t = l + sum_b lambda_b l_b
    of II-A (001_*.txt) when w_d = w_s = 0.

    Args:
        model: A ``task='regression'`` multi-exit model (``*_mexit``, ``*_mexit_liferegress``).
        loss: 'l1' or 'mse'.
        final_weight: w_n.
        exit_weight: w_i of every intermediate exit.
        distill_weight: w_d of the pull to the detached final prediction (0: none).
        num_sampled: Intermediate exits drawn each step besides the earliest (None: every exit, every step).
        nll: 'laplace' or 'gaussian': the scale's likelihood.
        nll_weight: w_s (0: the scales do not train).
        detach_scale: Fit the scales on detached features (True: the regressors' objective is unchanged).
        detach_exits: Feed the intermediate exits detached tokens.
        stage: With a ``*_mexit_liferegress`` model, LifeRegress's stage ('predictor', 'backbone', 'joint'); None
            trains every part not frozen otherwise.
        **kwargs: ``trainable_parts``, ``frozen_parts``, ``device``, ``dtype``, ``verbose``.
    """
    model_task = 'regression'

    def __init__(
            self,
            model: MultiExitMixin,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            loss: str = 'l1',
            final_weight: float = 1.,
            exit_weight: float = 1.,
            distill_weight: float = 0.,
            num_sampled: Optional[int] = None,
            nll: str = 'laplace',
            nll_weight: float = 1.,
            detach_scale: bool = True,
            detach_exits: bool = False,
            stage: Optional[str] = None,
            **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(model, MultiExitMixin):
            raise ValueError(f'{owner} needs a multi-exit model (*_mexit, *_mexit_liferegress) built with '
                             f"task='regression', got {type(model).__name__}")
        _check_model_task(owner, model, 'regression')
        if criterion is not None:
            raise ValueError(f'{owner} takes loss= ({list(REGRESSION_LOSSES)}), not a classification criterion; got '
                             f'criterion={criterion!r}')
        if loss not in REGRESSION_LOSSES:
            raise ValueError(f'loss must be one of {list(REGRESSION_LOSSES)}, got {loss!r}')
        if nll not in SCALE_NLLS:
            raise ValueError(f'nll must be one of {list(SCALE_NLLS)}, got {nll!r}')
        if num_sampled is not None and (isinstance(num_sampled, bool) or not isinstance(num_sampled, Integral)
                                        or num_sampled < 0):
            raise ValueError(f'num_sampled must be an int >= 0 or None (every exit), got {num_sampled!r}')
        weights = {n: check_weight(n, v) for n, v in (('final_weight', final_weight), ('exit_weight', exit_weight),
                                                       ('distill_weight', distill_weight), ('nll_weight', nll_weight))}
        check_bool('detach_scale', detach_scale)
        check_bool('detach_exits', detach_exits)
        if stage is not None:
            if not isinstance(model, MultiExitLifeRegressMixin):
                raise ValueError(f'stage={stage!r} is a LifeRegress stage and needs a *_mexit_liferegress model, got '
                                 f'{type(model).__name__}')
            if stage not in LIFE_STAGES:
                raise ValueError(f'stage={stage!r} is not known; allowed: {list(LIFE_STAGES)}')
            kwargs.update({'predictor': dict(trainable_parts=('life',)), 'backbone': dict(frozen_parts=('life',)),
                           'joint': {}}[stage])
        super().__init__(RegressionExitsForward(model, detach_scale, detach_exits), nn.L1Loss(), **kwargs)
        self.loss, self.nll, self.stage = loss, nll, stage
        self.final_weight, self.exit_weight = weights['final_weight'], weights['exit_weight']
        self.distill_weight, self.nll_weight = weights['distill_weight'], weights['nll_weight']
        self.num_sampled = None if num_sampled is None else int(num_sampled)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One backbone pass; returns the total ``loss``, the final ``output`` and the parts of the loss."""
        values, scales = self.trainable_module(input)
        final = values[-1]
        y = regression_target(target, final.shape[-1]).to(final.device)
        teacher = final.detach()
        mask = sample_exits(len(values) - 1, self.num_sampled).tolist()
        exit_loss = final.new_zeros((), dtype=torch.float32)
        for m, v in zip(mask, values[:-1]):
            term = self.exit_weight * regression_loss(v, y, self.loss)
            if self.distill_weight:
                term = term + self.distill_weight * regression_loss(v, teacher, self.loss)
            exit_loss = exit_loss + m * term
        final_loss = regression_loss(final, y, self.loss)
        nll_loss = sum(scale_nll(v.detach(), s, y, self.nll) for v, s in zip(values, scales))
        loss = self.final_weight * final_loss + exit_loss + self.nll_weight * nll_loss
        return {'loss': loss, 'output': final, 'final_loss': final_loss.detach(), 'exit_loss': exit_loss.detach(),
                'nll_loss': nll_loss.detach()}


class RegressionEndToEndTask(RegressionTask):
    """Bakhtiarnia's end-to-end strategy for regression: l_t = l + sum_b lambda_b l_b (II-A, IV-B of 001_*.txt), the
    final term weighted twice each early exit (final_weight 1, exit_weight 0.5)."""

    def __init__(self, model: MultiExitMixin, final_weight: float = 1., exit_weight: float = .5,
                 **kwargs: Any) -> None:
        super().__init__(model, final_weight=final_weight, exit_weight=exit_weight, **kwargs)


class RegressionClassifierWiseTask(RegressionTask):
    """Bakhtiarnia's classifier-wise strategy for regression (II-A, IV-A of 001_*.txt): backbone and final head
    frozen (``train_head``: the final head trains too, on the frozen features), each exit trained on detached
    tokens, independently of the others."""

    def __init__(self, model: MultiExitMixin, train_head: bool = False, **kwargs: Any) -> None:
        check_bool('train_head', train_head)
        parts = ('exits', 'uncertainty', *(('head',) if train_head else ()))
        super().__init__(model, final_weight=float(train_head), detach_exits=True, trainable_parts=parts, **kwargs)


class RegressionMEViTTask(RegressionTask):
    """MEViT's sandwich rule with in-place distillation for regression (sec. 2.2, 000_*.txt): the final head, the
    earliest exit and ``num_sampled`` random others each step, each exit also pulled (``distill_weight``) to the
    detached final prediction."""

    def __init__(self, model: MultiExitMixin, num_sampled: Optional[int] = 2, distill_weight: float = 1.,
                 **kwargs: Any) -> None:
        super().__init__(model, num_sampled=num_sampled, distill_weight=distill_weight, **kwargs)


class RegressionBackboneTask(RegressionTask):
    """The backbone and final head alone (TransCrowd's training, 001_*.txt), the parts this package adds frozen."""

    def __init__(self, model: MultiExitMixin, **kwargs: Any) -> None:
        kwargs.setdefault('frozen_parts', tuple(p.rstrip('.') for p in getattr(model, 'new_prefixes', ())))
        super().__init__(model, exit_weight=0., nll_weight=0., **kwargs)


TASKS: Dict[str, Callable[..., TrainingTask]] = {
    'mevit': MEViTTask,
    'end_to_end': EndToEndTask,
    'classifier_wise': ClassifierWiseTask,
    'backbone': BackboneTask,
    'liferegress': LifeRegressTask,
    'mevit_liferegress': MEViTLifeRegressTask,
    'regression_end_to_end': RegressionEndToEndTask,
    'regression_classifier_wise': RegressionClassifierWiseTask,
    'regression_mevit': RegressionMEViTTask,
    'regression_backbone': RegressionBackboneTask,
}


def create_task(name: str, model: nn.Module, criterion: Optional[Union[nn.Module, Callable]] = None,
                **kwargs: Any) -> TrainingTask:
    """Task ``name`` of ``TASKS`` for ``model``, with ``criterion`` and the task's keyword arguments."""
    if name not in TASKS:
        raise ValueError(f'task={name!r} is not known; allowed: {sorted(TASKS)}')
    return TASKS[name](model, criterion=criterion, **kwargs)
