""" Multi-exit Vision Transformer (MEViT, 000_*.txt; Bakhtiarnia et al., 001_*.txt) as timm models.

Exit branches follow chosen blocks of a timm ``VisionTransformer``; the final classifier is the last exit. Each exit
carries an uncertainty predictor u_i = sigmoid(w^T f_i(h_i) + b) (eq. 3, 000_*.txt).

- ``model(x)``: full depth, the parent timm model's answer (its ``forward_features`` + ``forward_head``).
- ``model(x, threshold=t)``: each image leaves at its first exit whose criterion passes.
- ``model(x, budget=b)``: no image spends more than ``b`` of the parent's FLOPs (heads passed through included): it
  runs at most to the deepest exit whose cost fits (with a threshold, whose threshold path fits).
- ``model.forward_dynamic(x, ...)``: logits plus the exit each image took and what it cost.
- ``model.forward_exits(x)``: every exit's logits on the whole batch (training, analysis).

Early exit is per image (002_*.txt showed why a batch-wide decision gives no speed-up): images that leave are removed
from the running batch, so later blocks run on fewer rows, and an image's result does not depend on its batch. A
threshold makes the path depend on the data, so ``torch.jit.trace``, ``torch.onnx.export`` and ``torch.export`` of such
a call raise (they would replay the example batch's exits); full depth and a budget alone export faithfully.
"""
import math
import time
from numbers import Real
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

from ..losses import attach_exit_losses, scale_gradient
from ._base import (
    NewPartsMixin, add_block_group, check_fraction, count_flops, is_fx_tracing, pop_kwargs, tracing_tool,
)
from ._build import build_family, register_twins
from ._costs import cost_placement, schedule_costs
from ._pretrained import explain_missing_weights, published_cfg
from .adapters import EvaAdapter, VitAdapter, register_adapted
from .exit_heads import EXIT_HEADS, create_exit_head
from .walker import CRITERIA, TASKS, AnytimeStep, ExitCriterion, ExitOutput, ExitWalker, criteria_for, criterion

__all__ = [
    'EXIT_CRITERIA', 'AnytimeStep', 'ExitOutput', 'MultiExitEva', 'MultiExitMixin', 'MultiExitVisionTransformer',
    'predicted_scale',
    'default_exit_layers',
]

EXIT_CRITERIA = tuple(CRITERIA)  # the built-in criteria (a registered one joins CRITERIA)
_KEYS = {layer: str(layer) for layer in range(1, 257)}  # module keys of exits: no str() in a graph torch.compile traces


def _key(layer: int) -> str:
    """Key of the exit after block ``layer`` in ``exits`` / ``uncertainty``."""
    return _KEYS.get(layer) or str(layer)


def predicted_scale(unit: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A regression exit's scale s = softplus(unit(f)) + 1e-4 (B, K) in target units, float32: the Laplace b or the
    Gaussian sigma of its negative log-likelihood (the regression counterpart of u_i, eq. 3, 000_*.txt)."""
    return nn.functional.softplus(unit(features).float()) + 1e-4


def default_exit_layers(depth: int) -> Tuple[int, ...]:
    """MEViT's layout: an exit after every block from the middle on (6..11 for 12 blocks), the final one implied."""
    return tuple(range(max(depth // 2, 1), depth))


def _exit_layout(depth: int, exit_layers: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """Check ``exit_layers`` and return the sorted intermediate exits (the final one, ``depth``, excluded)."""
    if exit_layers is None:
        return default_exit_layers(depth)
    if isinstance(exit_layers, int) or not isinstance(exit_layers, Sequence):
        raise ValueError(f'exit_layers must be a sequence of block numbers in 1..{depth}, got {exit_layers!r}')
    layers = list(exit_layers)
    bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= depth]
    if bad:
        raise ValueError(f'exit_layers must hold block numbers in 1..{depth} (1-based), got {bad} in {layers}')
    if len(set(layers)) != len(layers):
        raise ValueError(f'exit_layers must not repeat a block, got {layers}')
    return tuple(sorted(v for v in layers if v != depth))


def _check_size(size: Any) -> Tuple[int, int]:
    """``exit_input_size`` as (H, W) of positive ints."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, Sequence) or len(size) not in (2, 3) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f'exit_input_size must be (H, W) (or (C, H, W)) of positive ints, got {size!r}')
    return tuple(size[-2:])


def _check_criterion(task: str, exit_criterion: Optional[str]) -> str:
    """The criterion of ``task`` (default: 'confidence' for classification, 'patience' for regression), checked."""
    if task not in TASKS:
        raise ValueError(f'task must be one of {list(TASKS)}, got {task!r}')
    if exit_criterion is None:
        exit_criterion = 'confidence' if task == 'classification' else 'patience'
    if exit_criterion not in criteria_for(task):
        other = next((t for t in TASKS if t != task and exit_criterion in criteria_for(t)), None)
        why = f' (a criterion of {other} models)' if other else ''
        reason = {'regression': ': a softmax over real-valued outputs measures nothing',
                  'classification': ': it compares real-valued outputs in target units'}[task] if other else ''
        raise ValueError(f'exit_criterion={exit_criterion!r} is not a criterion of task={task!r}{why}{reason}; '
                         f'allowed: {list(criteria_for(task))}')
    return exit_criterion


def _check_hook_args(weight: Any, num_sampled: Any, grad_scale: Any) -> Tuple[float, Optional[int], float]:
    """Validate the train-mode hook's ``exit_weight``, ``exit_num_sampled`` and ``exit_grad_scale``."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
        raise ValueError(f'exit_weight must be a finite number >= 0, got {weight!r}')
    if num_sampled is not None and (isinstance(num_sampled, bool) or not isinstance(num_sampled, int)
                                    or num_sampled < 0):
        raise ValueError(f'exit_num_sampled must be an integer >= 0 or None (every exit), got {num_sampled!r}')
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not 0 <= grad_scale <= 1:
        raise ValueError(f'exit_grad_scale must be a number in [0, 1], got {grad_scale!r}')
    return float(weight), num_sampled, float(grad_scale)


def _classifier_names(depth: int, exit_layers: Sequence[int]) -> Tuple[str, ...]:
    """Every module whose shape depends on num_classes: the final head, each exit's head, each uncertainty."""
    return ('head', *(f'exits.{i}.head' for i in exit_layers), *(f'uncertainty.{i}' for i in (*exit_layers, depth)))


class MultiExitMixin(NewPartsMixin):
    """Early exits after chosen blocks and per-image dynamic inference, on any parent class through its adapter
    (``MultiExitVisionTransformer``, ``MultiExitEva``; ``timm_exits.convert`` for a model already built)."""
    family = 'mexit'  # its twins' suffix; the parents it takes: adapters.FAMILY_STATES
    __jit_unused_properties__ = [
        'full_flops', 'exit_costs', 'threshold_costs', 'worst_case_threshold_cost', 'criterion']
    __jit_ignored_attributes__ = ['_flops']
    new_prefixes = ('exits.', 'uncertainty.')
    new_parts_name = 'exit heads'
    layout_arg = 'exit_layers / exit_head'

    def __init__(self, **kwargs: Any) -> None:
        """The parent's arguments (``VisionTransformer``, ``Eva``) and the exits' (``_init_mechanism``)."""
        own = pop_kwargs(type(self), kwargs)
        super().__init__(**kwargs)
        self._init_mechanism(**own)

    def _init_mechanism(
            self,
            exit_layers: Optional[Sequence[int]] = None,
            exit_head: Optional[Union[str, Sequence[str]]] = None,
            exit_criterion: Optional[str] = None,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
            exit_drop_rate: float = 0.,
            exit_weight: float = 1.,
            exit_num_sampled: Optional[int] = None,
            exit_grad_scale: float = .25,
            task: str = 'classification',
            exit_patience: int = 1,
            exit_input_size: Optional[Sequence[int]] = None,
    ) -> None:
        """Check the arguments and add the exits to a built parent (``__init__`` and ``timm_exits.convert``).

        Args:
            exit_layers: 1-based blocks followed by an exit (ViT default: middle block to depth - 1, MEViT's 6..11;
                feature-map default: the blocks closest to 15, 30, 45, 60, 75 and 90 % of the parent's FLOPs,
                Shallow-Deep Networks' placement). The final classifier is always the last exit, numbered by the depth.
                On a feature-map parent the blocks are its adapter's units (``len(model._exit_blocks())``).
            exit_head: One of ``EXIT_HEADS`` for every exit, or one name per intermediate exit (default 'linear' on
                a ViT, SDN's internal classifier 'sdn' on a feature map).
            exit_criterion: Classification: 'confidence' (exit when max softmax >= threshold), 'entropy'
                (normalised entropy <= threshold) or 'uncertainty' (u_i of eq. 3, 000_*.txt, <= threshold); the
                default 'confidence'.
                Regression: 'patience' (PABEE: the last ``exit_patience + 1`` exits agree within the threshold, in
                target units; the default) or 'uncertainty' (the exit's predicted scale <= threshold).
            threshold: Default threshold of ``forward`` (None: no confidence-based exit); in [0, 1] for
                classification, a finite number >= 0 in target units for regression.
            budget: Default compute budget of ``forward``, a share (0, 1] of the parent's FLOPs (None: no limit).
            exit_drop_rate: Dropout inside the exit branches.
            exit_weight: Train-mode hook (timm train.py): weight of each intermediate exit's CE + in-place KL.
            exit_num_sampled: Train-mode hook: intermediate exits trained per step besides the earliest (MEViT's
                sandwich rule, sec. 2.2 of 000_*.txt); None: every exit, every step.
            exit_grad_scale: Train-mode hook: the intermediate exits' gradient into the backbone is multiplied by
                this, in [0, 1] (0: the exits train on detached tokens, the backbone learns from the final head alone).
            task: 'classification' (logits) or 'regression' (``num_classes`` real outputs, 1 for a count: TransCrowd,
                001_*.txt). Never inferred from ``num_classes``. Regression: the exits and the final head (the
                parent's pooling, [CLS] or average: TransCrowd's token and GAP variants) predict values; each exit's
                ``uncertainty`` unit predicts a scale from the exit's features; the train-mode hook adds no loss
                (train with ``timm_exits.tasks``' regression tasks).
            exit_patience: Regression 'patience' criterion: consecutive agreeing exits before an image leaves.
            exit_input_size: Feature-map parents: the (H, W) the exit heads are sized and the costs counted at
                (default: the parent's pretrained input size; a ViT's is its ``img_size``).
        """
        exit_criterion = _check_criterion(task, exit_criterion)
        depth = len(self._exit_blocks())
        layers = self._exit_sites(exit_layers, exit_input_size)
        heads = self._exit_head_types(layers, exit_head)
        exit_drop_rate = check_fraction('exit_drop_rate', exit_drop_rate, high_open=True, allow_none=False)
        self.exit_weight, self.exit_num_sampled, self.exit_grad_scale = _check_hook_args(
            exit_weight, exit_num_sampled, exit_grad_scale)
        ref = next(self.parameters())
        dd = dict(device=ref.device, dtype=ref.dtype)
        self.depth = depth
        self.exit_layers = (*layers, depth)
        self.exit_head_types = tuple(heads)
        criterion(exit_criterion, task, exit_patience)  # a bad patience fails now, naming it
        self.task = task
        self.exit_patience = exit_patience
        self.exit_criterion = exit_criterion
        self.threshold = None if threshold is None else self._check_threshold(threshold)
        self.budget = None if budget is None else check_fraction('budget', budget, low_open=True)
        self.exits = nn.ModuleDict({
            str(layer): create_exit_head(
                name, num_classes=self.num_classes, drop=exit_drop_rate,
                **self._exit_head_args(layer, self._exit_pool()), **dd)
            for layer, name in zip(layers, heads)
        })
        self.uncertainty = nn.ModuleDict({
            str(layer): self._make_uncertainty(layer, **dd) for layer in self.exit_layers})
        self._init_exits()
        self.train(self.training)  # a converted model's new parts follow its mode
        self._flops = {}
        if self.budget is not None:  # a default budget no exit fits fails now, not at the first forward
            self._stop_layer(self.budget)

    def _exit_sites(self, exit_layers: Optional[Sequence[int]], exit_input_size: Optional[Sequence[int]]
                    ) -> Tuple[int, ...]:
        """The intermediate exits (checked); on a feature map the input size the heads are sized at is set first,
        and the default exits follow the parent's FLOPs (Shallow-Deep Networks' placement)."""
        self._flops: Dict[Any, Any] = {}
        if self.state_kind == 'map':
            if exit_input_size is None:  # a built model (convert) knows its pretrained input size
                exit_input_size = (getattr(self, 'pretrained_cfg', None) or {}).get('input_size') or (224, 224)
            self.exit_input_size = _check_size(tuple(exit_input_size))
            if exit_layers is None:
                exit_layers = cost_placement(self, self._input_size())
        elif exit_input_size is not None:
            raise ValueError(f'exit_input_size applies to feature-map parents; {type(self).__name__} is sized by its '
                             f'img_size (got exit_input_size={exit_input_size!r})')
        return _exit_layout(len(self._exit_blocks()), exit_layers)

    def _exit_head_types(self, layers: Sequence[int], exit_head: Optional[Union[str, Sequence[str]]]
                         ) -> List[str]:
        """One checked head name per intermediate exit: the heads must read the parent's state (tokens or a map)."""
        maps = self.state_kind == 'map'
        exit_head = ('sdn' if maps else 'linear') if exit_head is None else exit_head
        heads = [exit_head] * len(layers) if isinstance(exit_head, str) else list(exit_head)
        if len(heads) != len(layers):
            raise ValueError(
                f'exit_head must be one name or one per intermediate exit ({len(layers)} for exit_layers={layers}), '
                f'got {len(heads)}: {heads}')
        wrong = sorted({h for h in heads if EXIT_HEADS.get(h) is not None and EXIT_HEADS[h].state != self.state_kind})
        if wrong:
            what = 'a feature map' if maps else 'ViT tokens'
            raise ValueError(
                f'exit_head {wrong} cannot read {what} ({type(self).__name__}); allowed here: '
                f'{sorted(k for k, v in EXIT_HEADS.items() if v.state == self.state_kind)}')
        fixed = sorted({h for h in heads if EXIT_HEADS.get(h) is not None and EXIT_HEADS[h].fixed_grid})
        if fixed and self.dynamic_img_size:
            raise ValueError(
                f'exit_head {fixed} mixes a fixed number of patch tokens ({self.patch_embed.num_patches}) and cannot '
                f'follow dynamic_img_size=True; use another exit head (allowed with dynamic_img_size: '
                f'{sorted(k for k, v in EXIT_HEADS.items() if not v.fixed_grid)}) or a fixed img_size')
        if not maps and not self._has_cls():
            needs_cls = sorted({h for h in heads if h in _CLS_HEADS})
            if needs_cls:
                raise ValueError(
                    f'exit_head {needs_cls} combines the [CLS] token with the patches, and this parent has no class '
                    f'token (class_token=False); allowed without one: {sorted(set(EXIT_HEADS) - set(_CLS_HEADS))} '
                    f'(their [CLS] reading becomes the mean of the patch tokens)')
        return heads

    def layout_args(self) -> Dict[str, Any]:
        """Constructor arguments fixing the exit (and, with slimming, life) layout, JSON-ready (timm's
        ``model_args``), as checkpoints record them."""
        heads = self.exit_head_types
        args = dict(
            exit_layers=list(self.exit_layers[:-1]),
            exit_head=heads[0] if len(set(heads)) == 1 else list(heads),
            exit_criterion=self.exit_criterion,
            threshold=self.threshold,
            budget=self.budget,
        )
        if self.state_kind == 'map':  # feature-map exit heads are sized at this input size
            args.update(exit_input_size=list(self.exit_input_size))
        if self.task != 'classification':  # recorded where it differs from the default (older records have none)
            args.update(task=self.task, exit_patience=self.exit_patience)
        if getattr(self, 'life', None) is not None:  # exits and slimming in one model (mexit_liferegress)
            args.update(life_layer=self.life_layer, prune_layers=list(self.prune_layers), keep_rate=self.keep_rate,
                        train_keep_rate=self.train_keep_rate, min_keep_rate=self.min_keep_rate, U=self.U)
        return args

    # --- construction helpers -------------------------------------------------------------------------------------

    def _exit_pool(self) -> str:
        """Pooling of the exit branches: [CLS]; the mean of the patch tokens without a class token, and for regression
        on a parent pooling by average (TransCrowd's GAP variant: every exit reads what the final head reads)."""
        avg = not self._has_cls() or (self.task == 'regression' and getattr(self, 'global_pool', None) == 'avg')
        return 'avg' if avg else 'token'

    def _check_threshold(self, threshold: Any) -> float:
        """A threshold of the task: in [0, 1] for classification, in target units (finite, >= 0) for regression."""
        if self.task == 'classification':
            return check_fraction('threshold', threshold)
        if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
            threshold = threshold.item()
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 <= threshold < math.inf:
            raise ValueError(f'threshold must be a finite number >= 0 in target units (task=\'regression\', '
                             f'exit_criterion={self.exit_criterion!r}) or None, got {threshold!r}')
        return float(threshold)

    def _unit_features(self, layer: int) -> int:
        """Width of the features the exit after block ``layer`` maps to its outputs."""
        if layer == self.depth:
            head = self.get_classifier()
            return head.in_features if isinstance(head, nn.Linear) else getattr(
                self, 'head_hidden_size', self.num_features)
        return self.exits[_key(layer)].num_features

    def _make_uncertainty(self, layer: Optional[int] = None, device=None, dtype=None) -> nn.Module:
        """Classification: the uncertainty predictor of eq. (3), 000_*.txt, one linear unit on the exit's logits
        (sigmoid applied later). Regression: one linear map from the exit's features to the raw scale of each
        output (``exit_scale``)."""
        if self.num_classes <= 0:
            return nn.Identity()
        if self.task == 'regression':
            return nn.Linear(self._unit_features(layer), self.num_classes, device=device, dtype=dtype)
        return nn.Linear(self.num_classes, 1, device=device, dtype=dtype)

    def _init_exits(self) -> None:
        for name, module in self.exits.named_modules():
            init_weights_vit_timm(module, name)
        self._init_uncertainty()

    def _init_uncertainty(self) -> None:
        for module in self.uncertainty.values():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=.02)
                # regression: raw 0.5413 gives a scale of softplus(0.5413) = 1.0 target unit at the start
                nn.init.constant_(module.bias, .5413 if self.task == 'regression' else 0.)

    # --- timm API -------------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Parent groups; an exit (and its uncertainty unit) joins the layer group just after the block it follows."""
        return add_block_group(super().group_matcher(coarse), (r'^(?:exits|uncertainty)\.(\d+)', None))

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Reset the final head, every exit's head and every uncertainty predictor to ``num_classes``."""
        if global_pool is None:
            super().reset_classifier(num_classes)
        else:
            super().reset_classifier(num_classes, global_pool)
        ref = next(self.parameters())
        for exit_head in self.exits.values():
            exit_head.reset_classifier(num_classes)
            init_weights_vit_timm(exit_head.head, 'head')
        for key in self.uncertainty:
            self.uncertainty[key] = self._make_uncertainty(int(key), device=ref.device, dtype=ref.dtype)
        self._init_uncertainty()
        self._flops = {}

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's resize; the CNN exits follow the new grid, token-MLP exits (fixed sequence length) cannot."""
        fixed = sorted({h for h in self.exit_head_types if h in ('mixer', 'resmlp')})
        if fixed:
            raise ValueError(f'exit_head {fixed} has a fixed token count; set_input_size is not supported with it')
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        for exit_head in self.exits.values():
            exit_head.grid_size = tuple(self.patch_embed.grid_size)
        self._flops = {}

    # --- exits --------------------------------------------------------------------------------------------------

    def _exit_logits(self, layer: int, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits of the exit after block ``layer`` (1-based) from that block's tokens (``grid_size``: their patch
        grid, when it is not the model's, with ``dynamic_img_size``)."""
        if layer == self.depth:
            return self._final(x)
        return self.exits[_key(layer)](x, grid_size=grid_size)

    def _grid_size(self, x: torch.Tensor) -> Optional[Tuple[int, int]]:
        """Patch grid of images x when it may differ from the model's (``dynamic_img_size``), else None."""
        return self._grid_at(x.shape[-2:])

    def _img_size(self, x: Optional[torch.Tensor] = None) -> Tuple[int, int]:
        """Spatial size the costs are counted at: that of images x with ``dynamic_img_size`` or on a feature-map
        parent that takes any size, else the model's (a fixed-size feature-map parent refuses another size)."""
        if x is None:
            return self._input_size()
        size = int(x.shape[-2]), int(x.shape[-1])
        if self.state_kind == 'map':
            if getattr(self, 'fixed_input_size', False) and size != self._input_size():
                raise ValueError(f'x has spatial size {size}; {type(self).__name__} runs only at its input size '
                                 f'{self._input_size()} (build it with img_size={size} for another)')
            return size
        return size if self.dynamic_img_size else self._input_size()

    def exit_uncertainty(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """Predicted uncertainty u_i = sigmoid(w^T f_i(h_i) + b) of the exit after block ``layer``, eq. (3)."""
        return torch.sigmoid(self.uncertainty[_key(layer)](logits).squeeze(-1))

    def exit_scale(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Regression: the predicted scale s = softplus(w^T f + b) + 1e-4 (B, K), target units, of the exit after
        block ``layer`` from its features f (``exit_features``): the Laplace b or Gaussian sigma of its NLL."""
        return predicted_scale(self.uncertainty[_key(layer)], features)

    def exit_head_module(self, layer: int) -> nn.Module:
        """The last linear layer of the exit after block ``layer`` (the final one: the parent's ``head``)."""
        return self.get_classifier() if layer == self.depth else self.exits[_key(layer)].head

    def exit_features(self, layer: int, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Pre-logits features of the exit after block ``layer`` from that block's tokens: the exit's output is
        ``exit_head_module(layer)(features)``, bit for bit ``_exit_logits``."""
        if layer == self.depth:
            return self._final(x, pre_logits=True)
        return self.exits[_key(layer)](x, pre_logits=True, grid_size=grid_size)

    def _exit_with_unit(self, layer: int, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None):
        """The exit after block ``layer`` and its learned criterion's unit (what the cost model counts): logits and
        u_i (classification), or values and the scale from the exit's features (regression)."""
        if self.task == 'regression':
            features = self.exit_features(layer, x, grid)
            return self.exit_head_module(layer)(features), self.exit_scale(layer, features)
        logits = self._exit_logits(layer, x, grid)
        return logits, self.exit_uncertainty(layer, logits)

    def set_exit_criterion(self, exit_criterion: str, exit_patience: Optional[int] = None) -> None:
        """Switch the criterion (a name of the model's task) and, for 'patience', its count; costs are recounted."""
        allowed = criteria_for(self.task)
        if exit_criterion not in allowed:
            raise ValueError(f'exit_criterion={exit_criterion!r} is not a criterion of task={self.task!r}; '
                             f'allowed: {list(allowed)}')
        patience = self.exit_patience if exit_patience is None else exit_patience
        criterion(exit_criterion, self.task, patience)  # a bad patience fails here, naming it
        self.exit_criterion, self.exit_patience, self._flops = exit_criterion, patience, {}

    def exit_scores(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """Per image, the value ``exit_criterion`` compares with the threshold (max softmax, normalised entropy or
        uncertainty)."""
        return self.criterion.scores(logits, self.uncertainty[_key(layer)])

    @property
    def criterion(self) -> ExitCriterion:
        """The ``exit_criterion`` object of the model's task: its scores, its decision and its per-image state."""
        return criterion(self.exit_criterion, self.task, self.exit_patience)

    def _exits_now(self, layer: int, logits: torch.Tensor, threshold: float) -> torch.Tensor:
        return self.criterion.leaves(self.exit_scores(layer, logits), threshold)

    def _run_block(self, blk: Any, i: int, x: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
        rope = self._block_rope(rope, i)
        if getattr(self, 'grad_checkpointing', False) and not torch.jit.is_scripting():
            return checkpoint(self._apply_block, blk, x, rope, None)
        return self._apply_block(blk, x, rope, None)

    def forward_exits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every exit for the whole batch, in ``exit_layers`` order, the final classifier last."""
        return self._forward_exits(x)

    def forward_exits_with_scale(self, x: torch.Tensor, grad_scale: float = 1.,
                                 **kwargs: Any) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Regression: every exit's predicted values and scales (``exit_scale``) for the whole batch, in
        ``exit_layers`` order, the final head last; ``grad_scale`` as in ``_forward_exits``."""
        if self.task != 'regression':
            raise ValueError(f'forward_exits_with_scale needs task=\'regression\'; this model has task={self.task!r}')
        features = self._forward_exits(x, grad_scale, features=True, **kwargs)
        values = [self.exit_head_module(layer)(f) for layer, f in zip(self.exit_layers, features)]
        return values, [self.exit_scale(layer, f) for layer, f in zip(self.exit_layers, features)]

    def _forward_exits(self, x: torch.Tensor, grad_scale: float = 1., features: bool = False) -> List[torch.Tensor]:
        """``forward_exits``, each intermediate exit reading its block's tokens through ``scale_gradient(tokens,
        grad_scale)`` (the final classifier never); ``features``: each exit's pre-logits features instead."""
        grid = self._grid_size(x)
        x, rope = self._embed(x)
        outputs = []
        for i, blk in enumerate(self._exit_blocks()):
            x = self._run_block(blk, i, x, rope)
            layer = i + 1
            if layer in self.exit_layers:
                tokens = x if layer == self.depth else scale_gradient(x, grad_scale)
                outputs.append(self.exit_features(layer, tokens, grid) if features else
                               self._exit_logits(layer, tokens, grid))
        return outputs

    # --- compute accounting -----------------------------------------------------------------------------------

    def _size(self, img_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
        return self._input_size() if img_size is None else tuple(int(v) for v in img_size)

    def _schedule(self, keep_rate: Optional[float], img_size: Tuple[int, int]) -> Tuple[List[int], float, float]:
        """Patches per block at ``keep_rate`` and the target mean and std of the lives (every patch here)."""
        return [self._patches_at(img_size)] * self.depth, 0., 1.

    def _count_flops(self, img_size: Optional[Tuple[int, int]] = None,
                     keep_rate: Optional[float] = None) -> Dict[str, Any]:
        """Costs of one image at ``img_size`` and ``keep_rate`` (defaults: the model's), torch's flop counter on the
        pieces (``_costs.schedule_costs``): ``full`` (the parent's FLOPs), ``costs`` and ``threshold_costs`` per exit
        as shares of it, the schedule ``counts``. A cached lookup traces into a compiled graph; counting runs
        eagerly."""
        img_size = self._size(img_size)
        counts = tuple(self._schedule(keep_rate, img_size)[0])
        return self._flops.get(('schedule', img_size, counts)) or schedule_costs(self, img_size, counts)

    @property
    def full_flops(self) -> int:
        """FLOPs of one image through the full-depth model (the timm parent's) at the model's input size, torch's flop
        counter."""
        return self._count_flops()['full']

    @property
    def exit_costs(self) -> Tuple[float, ...]:
        """Per exit, share of the full model's FLOPs at the model's input size: blocks up to it plus its own head (the
        final one is 1.0). What an image costs when a budget alone sends it there (``exit_costs_at`` for another
        size)."""
        return self._count_flops()['costs']

    @property
    def threshold_costs(self) -> Tuple[float, ...]:
        """Per exit, the share of full FLOPs an image leaving there spent with a threshold: blocks up to it plus every
        exit head evaluated on the way (``forward_dynamic``'s ``cost``), at the model's input size."""
        return self._count_flops()['threshold_costs']

    @property
    def worst_case_threshold_cost(self) -> float:
        """Share of the full model's FLOPs an image that no exit lets go costs with a threshold and no budget: every
        block and every exit head. Above 1.0 the exits cost more than they can save on such images (expensive heads,
        e.g. ``exit_head='vit'``); a ``budget`` caps it."""
        return self.threshold_costs[-1]

    def exit_costs_at(self, img_size: Sequence[int]) -> Tuple[float, ...]:
        """``exit_costs`` counted at input size ``img_size`` (H, W) (``dynamic_img_size``: attention grows faster
        than the rest, so the shares change with the size)."""
        return self._count_flops(tuple(img_size))['costs']

    def threshold_costs_at(self, img_size: Sequence[int]) -> Tuple[float, ...]:
        """``threshold_costs`` counted at input size ``img_size`` (H, W)."""
        return self._count_flops(tuple(img_size))['threshold_costs']

    def _stop_layer(
            self,
            budget: Optional[float],
            threshold_path: bool = False,
            img_size: Optional[Tuple[int, int]] = None,
    ) -> int:
        """Deepest exit whose cost fits ``budget``: with ``threshold_path`` the cost of reaching it through every
        earlier exit head (``threshold_costs``), else blocks plus its own head (``exit_costs``). Either way no image
        spends more than the budget."""
        return self._plan_budget(budget, None, threshold_path, img_size)[1]

    def _plan_budget(self, budget: Optional[float], keep_rate: Optional[float], threshold_path: bool = False,
                     img_size: Optional[Tuple[int, int]] = None) -> Tuple[float, int]:
        """(keep rate, last exit) of a call on checked arguments: every patch, the deepest exit whose cost fits."""
        if keep_rate is not None:
            raise ValueError(f'keep_rate={keep_rate:g} applies to a model with patch slimming (<parent>_mexit_'
                             f'liferegress); {type(self).__name__} runs every patch (keep_rate must be None)')
        if budget is None:
            return 1., self.depth
        flops = self._count_flops(img_size)
        costs = flops['threshold_costs'] if threshold_path else flops['costs']
        fits = [layer for layer, cost in zip(self.exit_layers, costs) if cost <= budget + 1e-9]
        if not fits:
            cost, layer = min(zip(costs, self.exit_layers))
            raise ValueError(
                f'budget={budget:g} is below the cheapest exit (block {layer}, cost {cost:.4f} of the full model); '
                f'allowed: {cost:.4f} <= budget <= 1')
        return 1., fits[-1]

    def _walk_plan(
            self,
            threshold: Optional[float],
            budget: Optional[float],
            keep_rate: Optional[float],
            img_size: Tuple[int, int],
    ) -> Tuple[Optional[float], float, int]:
        """(threshold, keep rate, last exit) of a call on checked arguments. With a threshold and a budget the last
        exit checked is the deepest whose threshold path (every head on the way) fits; when no threshold path fits,
        the budget alone decides: the threshold is dropped, no earlier head runs, every image answers at the deepest
        exit whose own cost fits (an error only when none does)."""
        if threshold is not None and budget is not None:
            try:
                return (threshold, *self._plan_budget(budget, keep_rate, True, img_size))
            except ValueError:  # no threshold path fits: the budget alone decides
                threshold = None
        return (threshold, *self._plan_budget(budget, keep_rate, False, img_size))

    # --- forward ------------------------------------------------------------------------------------------------

    def _resolve(
            self,
            threshold: Optional[float],
            budget: Optional[float],
            defaults: bool = True,
    ) -> Tuple[Optional[float], Optional[float]]:
        """Checked (threshold, budget): the arguments, each falling back to the model's default when ``defaults``."""
        if defaults:
            threshold = self.threshold if threshold is None else threshold
            budget = self.budget if budget is None else budget
        threshold = None if threshold is None else self._check_threshold(threshold)
        budget = None if budget is None else check_fraction('budget', budget, low_open=True)
        return threshold, budget

    @torch.jit.unused
    def forward_dynamic(
            self,
            x: torch.Tensor,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
            deadline_ms: Optional[float] = None,
    ) -> ExitOutput:
        """Per-image early exit. Images leave at their first confident exit, or at the deepest exit that fits the
        budget; exited images are removed from the batch before the next block.

        Args:
            x: (B, C, H, W) images.
            threshold: Exit threshold in [0, 1] for ``exit_criterion`` (default: the model's ``threshold``).
            budget: Share (0, 1] of the parent's FLOPs (default: the model's ``budget``), a ceiling on every image's
                ``cost``: alone, the blocks plus the answering exit's head (``exit_costs``); with a threshold, the
                exit heads evaluated on the way count too (``threshold_costs``), so the last exit checked is the
                deepest whose threshold path fits. When no threshold path fits, the budget alone decides (the deepest
                exit whose own cost fits, no earlier head evaluated).
            deadline_ms: Anytime inference (001_*.txt): milliseconds from this call after which every image still
                running answers at the first exit reached (``exit_layer`` says which); exits before it are skipped
                without evaluating their heads unless a threshold needs them.

        Returns:
            ``ExitOutput(logits (B, num_classes), exit_layer (B,) long, cost (B,) float32)``: ``cost`` is the share
            of the full model's FLOPs at this input size each image spent, heads passed through included.

        Raises:
            RuntimeError: A threshold or deadline under ``torch.jit.trace``, ``torch.onnx.export`` or
                ``torch.export``, which would record one batch's exits and replay them for every input.
        """
        return self._forward_dynamic(x, threshold, budget, None, deadline_ms)

    def _forward_dynamic(
            self,
            x: torch.Tensor,
            threshold: Optional[float],
            budget: Optional[float],
            keep_rate: Optional[float],
            deadline_ms: Optional[float],
    ) -> ExitOutput:
        """``forward_dynamic`` of every family: defaults applied, arguments checked, the deadline started."""
        threshold, budget, keep_rate, deadline = self._call_args(threshold, budget, keep_rate, deadline_ms)
        return self._dynamic(x, threshold, budget, deadline, keep_rate)

    def _call_args(
            self,
            threshold: Optional[float],
            budget: Optional[float],
            keep_rate: Optional[float],
            deadline_ms: Optional[float],
    ) -> Tuple[Optional[float], Optional[float], Optional[float], Optional[float]]:
        """Checked (threshold, budget, keep rate, deadline in ``time.perf_counter()`` seconds) of a call, the model's
        defaults applied; a tracer refuses a deadline."""
        start = time.perf_counter()
        threshold, budget = self._resolve(threshold, budget)
        keep_rate = None if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        if deadline_ms is None:
            return threshold, budget, keep_rate, None
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, Real) or not deadline_ms >= 0 \
                or math.isinf(deadline_ms):
            raise ValueError(f'deadline_ms must be a finite number of milliseconds >= 0 or None, got {deadline_ms!r}')
        self._refuse_tracing(threshold, deadline_ms)
        return threshold, budget, keep_rate, start + deadline_ms / 1e3

    @torch.jit.unused
    def forward_anytime(self, x: torch.Tensor, threshold: Optional[float] = None) -> Iterator[AnytimeStep]:
        """Anytime inference (budgeted / anytime prediction, 001_*.txt): yields, exit by exit, the logits of every
        image still running, so a caller can stop at any point and keep, per image, the logits of the last step it
        appeared in: its best answer so far.

        Args:
            x: (B, C, H, W) images.
            threshold: Exit threshold of ``exit_criterion`` (default: the model's): images whose criterion passes
                leave (``exited``) and are not computed further. None: every image runs to the final exit.

        Yields:
            ``AnytimeStep(exit_layer, rows, logits, exited, cost)`` for each exit in ``exit_layers`` order, until no
            image is left; the last one is the final classifier's.
        """
        return self._anytime(x, threshold, None)

    def _anytime(self, x: torch.Tensor, threshold: Optional[float], keep_rate: Optional[float]
                 ) -> Iterator[AnytimeStep]:
        threshold, _, keep_rate, _ = self._call_args(threshold, None, keep_rate, None)
        if self.num_classes <= 0:
            raise ValueError('forward_anytime needs a classifier: the model was built or reset with num_classes=0')
        self._refuse_tracing(threshold)
        yield from self._walker(self._img_size(x), threshold, None, keep_rate, every_head=True).anytime(x)

    @torch.jit.unused
    def exit_walker(
            self,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
            keep_rate: Optional[float] = None,
            img_size: Optional[Sequence[int]] = None,
            deadline_ms: Optional[float] = None,
    ) -> ExitWalker:
        """The per-image walk of ``forward_dynamic(x, threshold, budget[, keep_rate])`` for images of ``img_size``
        (default: the model's), to drive step by step: ``start(x, rows)`` embeds images, ``step(state)`` runs the next
        segment and returns who leaves with their answers and the state of who goes on (``timm_exits.models.walker``).
        The model's defaults apply; ``keep_rate`` needs a model with slimming; ``deadline_ms`` counts from this call.
        """
        threshold, budget, keep_rate, deadline = self._call_args(threshold, budget, keep_rate, deadline_ms)
        if self.num_classes <= 0:
            raise ValueError('exit_walker needs a classifier: the model was built or reset with num_classes=0')
        self._refuse_tracing(threshold)
        return self._walker(self._size(img_size), threshold, budget, keep_rate, deadline)

    def _walker(
            self,
            img_size: Tuple[int, int],
            threshold: Optional[float],
            budget: Optional[float],
            keep_rate: Optional[float] = None,
            deadline: Optional[float] = None,
            every_head: bool = False,
    ) -> ExitWalker:
        """The walk of a call on checked arguments (``deadline`` in ``time.perf_counter()`` seconds)."""
        threshold, rate, stop = self._walk_plan(threshold, budget, keep_rate, img_size)
        flops = self._count_flops(img_size, rate)  # counted once, outside compiled code
        costs = flops['threshold_costs'] if threshold is not None or every_head else flops['costs']
        counts, mu, sigma = self._schedule(rate, img_size)
        grid = self._grid_at(img_size)
        return ExitWalker(self, threshold, stop, dict(zip(self.exit_layers, costs)), counts, mu, sigma, deadline,
                          every_head, grid, img_size)

    def _refuse_tracing(self, threshold: Optional[float], deadline_ms: Optional[float] = None) -> None:
        tool = tracing_tool()
        if (threshold is not None or deadline_ms is not None) and tool is not None:
            what = f'threshold={threshold:g}' if threshold is not None else f'deadline_ms={deadline_ms:g}'
            raise RuntimeError(
                f'{tool} of a call with {what}: which exit each image takes depends on its data (or the clock), and '
                f'{tool} would record the exits of the example batch and replay them for every input (wrong logits, '
                f'no warning). What exports: full depth (no threshold, no budget), a fixed budget without a threshold '
                f'(model(x, budget=b) stops every image at one exit), or a LifeRegress model at a keep rate. For early '
                f'exit after export, export each segment between exits and decide between them at run time.')

    def _dynamic(
            self,
            x: torch.Tensor,
            threshold: Optional[float],
            budget: Optional[float],
            deadline: Optional[float] = None,
            keep_rate: Optional[float] = None,
    ) -> ExitOutput:
        """``forward_dynamic`` on checked arguments (no defaults applied here); ``deadline`` in
        ``time.perf_counter()`` seconds."""
        if self.num_classes <= 0:
            raise ValueError('forward_dynamic needs a classifier: the model was built or reset with num_classes=0')
        self._refuse_tracing(threshold)
        return self._walker(self._img_size(x), threshold, budget, keep_rate, deadline).run(x)

    def _segment(
            self,
            x: torch.Tensor,
            lives: Optional[torch.Tensor],
            kept: Optional[torch.Tensor],
            blocks: List[nn.Module],
            ropes: List[Optional[torch.Tensor]],
            counts: Optional[List[int]],
            life_at: int,
            mu: float,
            sigma: float,
            exit_head: Optional[nn.Module],
            uncertainty: nn.Module,
            grid: Optional[Tuple[int, int]],
            threshold: Optional[float],
            state: Optional[torch.Tensor],
            with_head: bool = True,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
               Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The work between two exit decisions, one graph under torch.compile: ``blocks`` (block i gets the rotary
        rows ``ropes[i]`` of the patches kept), then the exit ``exit_head`` (None: the final norm and head; not run
        without ``with_head``) and which images the criterion lets go (None without a threshold).

        With slimming (``counts``: patches per block) the lives are predicted before block ``life_at`` (eqs. 1-3,
        003_*.txt) and before each block every image keeps its n_t patches of longest life (Property 1), their
        positions in the full grid in ``kept``. Modules come as arguments, not block numbers, so that segments alike
        share a compiled graph. Returns (tokens, lives, kept, logits, leave, criterion state)."""
        npt = getattr(self, 'num_prefix_tokens', 0)
        for j, (blk, rope) in enumerate(zip(blocks, ropes)):
            if counts is not None:
                if j == life_at:
                    lives = self.life(x, npt, mu, sigma)
                if lives is not None and x.shape[1] - npt > counts[j]:
                    x, lives, idx = self._keep_longest(x, lives, counts[j])
                    kept = idx if kept is None else kept.gather(1, idx)
            if kept is not None:
                rope = self._keep_block_rope(rope, kept)
            x = self._apply_block(blk, x, rope, None)
        if not with_head:
            return x, lives, kept, None, None, state
        leave = None
        if threshold is not None and self.task == 'regression':  # values, and the scale from the exit's features
            if exit_head is None:
                features = self._final(x, pre_logits=True)
                logits = self.get_classifier()(features)
            else:
                features = exit_head(x, pre_logits=True, grid_size=grid)
                logits = exit_head.head(features)
            scale = predicted_scale(uncertainty, features) if self.criterion.learned else None
            leave, state = self.criterion.decide(logits, scale, threshold, state)
            return x, lives, kept, logits, leave, state
        logits = self._final(x) if exit_head is None else exit_head(x, grid_size=grid)
        if threshold is not None:
            leave, state = self.criterion.decide(logits, uncertainty, threshold, state)
        return x, lives, kept, logits, leave, state

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """Final logits with the exits' MEViT losses tied into their backward (see ``timm_exits.losses``).

        The loss added is ``MultiExitTask(distill=True, exit_weight=self.exit_weight,
        num_sampled=self.exit_num_sampled)``'s, with each intermediate exit reading its block's tokens through
        ``scale_gradient(tokens, self.exit_grad_scale)``.
        """
        return attach_exit_losses(*self._exit_loss_inputs(x), self.exit_weight, self.exit_num_sampled)

    def _exit_loss_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """(final logits, intermediate exits' logits, every exit's uncertainty) of the train-mode hook. A family
        whose forward lives in another module calls ``attach_exit_losses`` on these there: torch.fx keeps that
        function one leaf node only where the traced forward's own module names it."""
        outputs = self._forward_exits(x, self.exit_grad_scale)
        uncertainties = [self.exit_uncertainty(layer, z) for layer, z in zip(self.exit_layers, outputs)]
        return outputs[-1], outputs[:-1], uncertainties

    def forward(
            self,
            x: torch.Tensor,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
    ) -> torch.Tensor:
        """(B, num_classes) logits. No threshold and no budget: the full-depth answer, equal to the parent model's.

        In train mode (with grad enabled) the output is the same, and a softmax criterion on it also trains every
        exit and uncertainty predictor (eqs. 1-5 of 000_*.txt, see ``timm_exits.losses``); the model's default
        ``threshold`` / ``budget`` apply in eval mode only. torch.fx traces this static full-depth path (a traced
        ``threshold`` is a Proxy, not a value, so the dynamic path stays out); ``torch.jit.script`` compiles full
        depth only. ``torch.jit.trace``, ``torch.onnx.export`` and ``torch.export`` record full depth or a fixed
        budget faithfully and refuse a threshold (see ``forward_dynamic``).
        """
        if torch.jit.is_scripting():  # scripted: full depth (the dynamic path is @torch.jit.unused)
            if threshold is None and budget is None and self.threshold is None and self.budget is None:
                return self.forward_head(self.forward_features(x))
            return self._forward_dynamic_logits(x, threshold, budget, True)
        return self._forward_eager(x, threshold, budget)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor, threshold: Optional[float], budget: Optional[float]) -> torch.Tensor:
        # the model's default threshold / budget apply in eval mode only: train mode trains every exit
        defaults = not self.training
        if is_fx_tracing() or (threshold is None and budget is None and not (
                defaults and (self.threshold is not None or self.budget is not None))):
            if self.training and torch.is_grad_enabled() and self.num_classes > 0 and self.task == 'classification':
                return self._forward_train(x)
            return self.forward_head(self.forward_features(x))
        return self._forward_dynamic_logits(x, threshold, budget, defaults)

    @torch.jit.unused
    def _forward_dynamic_logits(
            self,
            x: torch.Tensor,
            threshold: Optional[float],
            budget: Optional[float],
            defaults: bool = True,
    ) -> torch.Tensor:
        threshold, budget = self._resolve(threshold, budget, defaults)
        return self._dynamic(x, threshold, budget).logits


_CLS_HEADS = ('cnn_add', 'cnn_project')  # exit heads that combine [CLS] with the patches


@register_adapted
class MultiExitVisionTransformer(MultiExitMixin, VitAdapter, VisionTransformer):
    """timm ``VisionTransformer`` (ViT, DeiT, DINOv2, SigLIP, CLIP, AIMv2, ...) with early exits."""


@register_adapted
class MultiExitEva(MultiExitMixin, EvaAdapter, Eva):
    """timm ``Eva`` (EVA02, DINOv3, Perception Encoder, RoPE-ViT) with early exits."""


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': (0.5, 0.5, 0.5),
        'std': (0.5, 0.5, 0.5),
        'first_conv': 'patch_embed.proj',
        'classifier': _classifier_names(12, default_exit_layers(12)),
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2106.15183',
        **kwargs,
    }


def _classifiers(kwargs: Dict[str, Any]) -> Tuple[str, ...]:
    """Classifier modules of the layout ``kwargs`` build (its ``exit_layers`` checked against its depth)."""
    depth = kwargs.get('depth', 12)
    return _classifier_names(depth, _exit_layout(depth, kwargs.get('exit_layers')))


# published MEViT models: TransFG's evaluation transform (MEViT, 000_*.txt), resize to 600 x 600, centre crop 448
_MEVIT_FGVC = dict(
    input_size=(3, 448, 448), crop_pct=448 / 600, crop_mode='squash', interpolation='bilinear', paper_ids=None,
    paper_name='Multi-Exit Vision Transformer with Custom Fine-Tuning for Fine-Grained Image Recognition',
    classifier=_classifier_names(12, default_exit_layers(12)))


default_cfgs = generate_default_cfgs({
    'test_vit_mexit.r32': _cfg(
        input_size=(3, 32, 32), num_classes=10, classifier=_classifier_names(4, default_exit_layers(4))),
    'test_vit_mexit_ls.r32': _cfg(
        input_size=(3, 32, 32), num_classes=10, classifier=_classifier_names(4, default_exit_layers(4))),
    # fine-tuned weights published on the Hub as {TIMM_EXITS_HUB_ORG}/{name} (timm_exits.hub)
    'vit_b16_mexit_cars': published_cfg(
        _cfg, 'vit_b16_mexit_cars', 'python train_recipes/mevit_cars.py --data-dir /data/stanford_cars',
        num_classes=196, **_MEVIT_FGVC),
    'vit_b16_mexit_aircraft': published_cfg(
        _cfg, 'vit_b16_mexit_aircraft', 'python train_recipes/mevit_aircraft.py --data-dir /data/fgvc_aircraft',
        num_classes=100, **_MEVIT_FGVC),
    'vit_mexit_named_tiny': published_cfg(
        _cfg, 'vit_mexit_named_tiny', 'pytest tests/test_hub.py (tiny test model, random weights)',
        input_size=(3, 32, 32), num_classes=10, classifier=_classifier_names(4, default_exit_layers(4))),
})


@explain_missing_weights  # published weights not on the Hub yet: an error naming the repo and the recipe
def _create_multi_exit_vit(
        variant: str,
        pretrained: bool = False,
        parent: Optional[str] = None,
        **kwargs: Any,
) -> MultiExitMixin:
    """A multi-exit model on timm architecture ``parent`` (its own arguments and weights), or on a
    ``VisionTransformer`` of ``kwargs``."""
    return build_family(MultiExitMixin, variant, pretrained, parent=parent, classifier_fn=_classifiers, **kwargs)


@register_model
def test_vit_mexit(pretrained: bool = False, **kwargs) -> MultiExitMixin:
    """Tiny test variant: 32 px, 4 blocks, exits after blocks 2 and 3."""
    model_args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.)
    return _create_multi_exit_vit('test_vit_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def test_vit_mexit_ls(pretrained: bool = False, **kwargs) -> MultiExitMixin:
    """Tiny test variant with layer scale and a register token (DeiT-III / reg-token style prefix handling)."""
    model_args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., init_values=1e-2, reg_tokens=1)
    return _create_multi_exit_vit('test_vit_mexit_ls', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b16_mexit_cars(pretrained: bool = False, **kwargs) -> MultiExitMixin:
    """MEViT on Stanford Cars: ViT-B/16 at 448 px, 196 classes, linear exits after blocks 6..11 and the final head,
    uncertainty criterion (eq. 3, 000_*.txt). Weights: ``{TIMM_EXITS_HUB_ORG}/vit_b16_mexit_cars``."""
    model_args = dict(
        img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, exit_layers=tuple(range(6, 12)),
        exit_head='linear', exit_criterion='uncertainty')
    return _create_multi_exit_vit('vit_b16_mexit_cars', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b16_mexit_aircraft(pretrained: bool = False, **kwargs) -> MultiExitMixin:
    """MEViT on FGVC-Aircraft: ViT-B/16 at 448 px, 100 variants, linear exits after blocks 6..11 and the final head,
    uncertainty criterion (eq. 3, 000_*.txt). Weights: ``{TIMM_EXITS_HUB_ORG}/vit_b16_mexit_aircraft``."""
    model_args = dict(
        img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, exit_layers=tuple(range(6, 12)),
        exit_head='linear', exit_criterion='uncertainty')
    return _create_multi_exit_vit('vit_b16_mexit_aircraft', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_mexit_named_tiny(pretrained: bool = False, **kwargs) -> MultiExitMixin:
    """Tiny published-weights test variant (``vit_b16_mexit_cars`` in miniature): 32 px, 4 blocks, exits after blocks
    2 and 3, uncertainty criterion. Weights: ``{TIMM_EXITS_HUB_ORG}/vit_mexit_named_tiny``."""
    model_args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., exit_layers=(2, 3),
        exit_criterion='uncertainty')
    return _create_multi_exit_vit('vit_mexit_named_tiny', pretrained, **dict(model_args, **kwargs))


# ``<parent>_mexit`` for every timm VisionTransformer / Eva architecture, every pretrained tag mirrored
register_twins(__name__, 'mexit', _create_multi_exit_vit, _cfg,
               '``{parent}`` with early exits (parent: timm ``{parent}``, its weights and arguments).')
