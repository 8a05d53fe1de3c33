""" Multi-exit Vision Transformer (MEViT, 000_*.txt; Bakhtiarnia et al., 001_*.txt) as timm models.

Exit branches follow chosen blocks of a timm ``VisionTransformer``; the final classifier is the last exit. Each exit
carries an uncertainty predictor u_i = sigmoid(w^T f_i(h_i) + b) (eq. 3, 000_*.txt).

- ``model(x)``: full depth, the parent timm model's answer (its ``forward_features`` + ``forward_head``).
- ``model(x, threshold=t)``: each image leaves at its first exit whose criterion passes.
- ``model(x, budget=b)``: never past the deepest exit that costs at most ``b`` of the parent's FLOPs.
- ``model.forward_dynamic(x, ...)``: logits plus the exit each image took and what it cost.
- ``model.forward_exits(x)``: every exit's logits on the whole batch (training, analysis).

Early exit is per image (002_*.txt showed why a batch-wide decision gives no speed-up): images that leave are removed
from the running batch, so later blocks run on fewer rows, and an image's result does not depend on its batch.
"""
import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

from ..hub import explain_missing_weights, published_cfg
from ..losses import attach_exit_losses, scale_gradient
from ._base import (
    NewPartsMixin, build_vit_family, check_fraction, count_flops, embed_tokens, is_fx_tracing, parent_cfgs,
)
from .exit_heads import EXIT_HEADS, ExitHead, create_exit_head

__all__ = ['EXIT_CRITERIA', 'ExitOutput', 'MultiExitVisionTransformer', 'default_exit_layers']

EXIT_CRITERIA = ('confidence', 'entropy', 'uncertainty')


class ExitOutput(NamedTuple):
    """Result of ``forward_dynamic``: per image, logits, 1-based block after which it exited, share of full FLOPs."""
    logits: torch.Tensor
    exit_layer: torch.Tensor
    cost: torch.Tensor


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


class MultiExitVisionTransformer(NewPartsMixin, VisionTransformer):
    """timm ``VisionTransformer`` with early exits after chosen blocks and per-image dynamic inference."""
    new_prefixes = ('exits.', 'uncertainty.')
    new_parts_name = 'exit heads'
    layout_arg = 'exit_layers / exit_head'

    def __init__(
            self,
            exit_layers: Optional[Sequence[int]] = None,
            exit_head: Union[str, Sequence[str]] = 'linear',
            exit_criterion: str = 'confidence',
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
            exit_drop_rate: float = 0.,
            exit_weight: float = 1.,
            exit_num_sampled: Optional[int] = None,
            exit_grad_scale: float = .25,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            exit_layers: 1-based blocks followed by an exit (default: middle block to depth - 1, MEViT's 6..11).
                The final classifier is always the last exit, numbered by the depth.
            exit_head: One of ``EXIT_HEADS`` for every exit, or one name per intermediate exit.
            exit_criterion: 'confidence' (exit when max softmax >= threshold), 'entropy' (normalised entropy <=
                threshold) or 'uncertainty' (u_i of eq. 3, 000_*.txt, <= threshold).
            threshold: Default threshold of ``forward`` (None: no confidence-based exit).
            budget: Default compute budget of ``forward``, a share (0, 1] of the parent's FLOPs (None: no limit).
            exit_drop_rate: Dropout inside the exit branches.
            exit_weight: Train-mode hook (timm train.py): weight of each intermediate exit's CE + in-place KL.
            exit_num_sampled: Train-mode hook: intermediate exits trained per step besides the earliest (MEViT's
                sandwich rule, sec. 2.2 of 000_*.txt); None: every exit, every step.
            exit_grad_scale: Train-mode hook: the intermediate exits' gradient into the backbone is multiplied by
                this, in [0, 1] (0: the exits train on detached tokens, the backbone learns from the final head alone).
            **kwargs: ``VisionTransformer`` arguments.
        """
        super().__init__(**kwargs)
        depth = len(self.blocks)
        if not self.has_class_token:
            raise ValueError('MultiExitVisionTransformer needs class_token=True: the exits read the [CLS] token')
        layers = _exit_layout(depth, exit_layers)
        heads = [exit_head] * len(layers) if isinstance(exit_head, str) else list(exit_head)
        if len(heads) != len(layers):
            raise ValueError(
                f'exit_head must be one name or one per intermediate exit ({len(layers)} for exit_layers={layers}), '
                f'got {len(heads)}: {heads}')
        if exit_criterion not in EXIT_CRITERIA:
            raise ValueError(f'exit_criterion={exit_criterion!r} is not known; allowed: {list(EXIT_CRITERIA)}')
        self.exit_weight, self.exit_num_sampled, self.exit_grad_scale = _check_hook_args(
            exit_weight, exit_num_sampled, exit_grad_scale)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        self.depth = depth
        self.exit_layers = (*layers, depth)
        self.exit_head_types = tuple(heads)
        self.exit_criterion = exit_criterion
        self.threshold = None if threshold is None else check_fraction('threshold', threshold)
        self.budget = None if budget is None else check_fraction('budget', budget, low_open=True)
        self.exits = nn.ModuleDict({
            str(layer): create_exit_head(
                name,
                self.embed_dim,
                self.num_classes,
                num_heads=self.blocks[0].attn.num_heads,
                mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.embed_dim,
                num_prefix_tokens=self.num_prefix_tokens,
                grid_size=self.patch_embed.grid_size,
                drop=exit_drop_rate,
                **dd,
            )
            for layer, name in zip(layers, heads)
        })
        self.uncertainty = nn.ModuleDict({str(layer): self._make_uncertainty(**dd) for layer in self.exit_layers})
        self._init_exits()
        self._flops: Optional[Dict[str, Any]] = None

    # --- construction helpers -------------------------------------------------------------------------------------

    def _make_uncertainty(self, device=None, dtype=None) -> nn.Module:
        """Uncertainty predictor of eq. (3), 000_*.txt: one linear unit on the exit's logits (sigmoid applied later)."""
        return nn.Linear(self.num_classes, 1, device=device, dtype=dtype) if self.num_classes > 0 else nn.Identity()

    def _init_exits(self) -> None:
        for name, module in self.exits.named_modules():
            init_weights_vit_timm(module, name)
        self._init_uncertainty()

    def _init_uncertainty(self) -> None:
        for module in self.uncertainty.values():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=.02)
                nn.init.zeros_(module.bias)

    # --- timm API -------------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Parent groups; an exit (and its uncertainty unit) joins the layer group just after the block it follows."""
        return dict(
            stem=r'^cls_token|reg_token|pos_embed|patch_embed|norm_pre',
            blocks=[(r'^blocks\.(\d+)', None), (r'^(?:exits|uncertainty)\.(\d+)', None), (r'^norm', (99999,))],
        )

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Reset the final head, every exit's head and every uncertainty predictor to ``num_classes``."""
        super().reset_classifier(num_classes, global_pool)
        ref = self.cls_token
        for exit_head in self.exits.values():
            exit_head.reset_classifier(num_classes)
            init_weights_vit_timm(exit_head.head, 'head')
        for key in self.uncertainty:
            self.uncertainty[key] = self._make_uncertainty(device=ref.device, dtype=ref.dtype)
        self._init_uncertainty()
        self._flops = None

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's resize; the CNN exits follow the new grid, token-MLP exits (fixed sequence length) cannot."""
        fixed = sorted({h for h in self.exit_head_types if h in ('mixer', 'resmlp')})
        if fixed:
            raise ValueError(f'exit_head {fixed} has a fixed token count; set_input_size is not supported with it')
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        for exit_head in self.exits.values():
            exit_head.grid_size = tuple(self.patch_embed.grid_size)
        self._flops = None

    # --- exits --------------------------------------------------------------------------------------------------

    def _exit_logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of the exit after block ``layer`` (1-based) from that block's tokens."""
        if layer == self.depth:
            return self.forward_head(self.norm(x))
        return self.exits[str(layer)](x)

    def exit_uncertainty(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """Predicted uncertainty u_i = sigmoid(w^T f_i(h_i) + b) of the exit after block ``layer``, eq. (3)."""
        return torch.sigmoid(self.uncertainty[str(layer)](logits).squeeze(-1))

    def exit_scores(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """Per image, the value ``exit_criterion`` compares with the threshold (max softmax, normalised entropy or
        uncertainty)."""
        if self.exit_criterion == 'uncertainty':
            return self.exit_uncertainty(layer, logits)
        probs = logits.float().softmax(-1)
        if self.exit_criterion == 'confidence':
            return probs.amax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return entropy / math.log(max(probs.shape[-1], 2))

    def _exits_now(self, layer: int, logits: torch.Tensor, threshold: float) -> torch.Tensor:
        scores = self.exit_scores(layer, logits)
        return scores >= threshold if self.exit_criterion == 'confidence' else scores <= threshold

    def _run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(self.blocks[i], x)
        return self.blocks[i](x)

    def forward_exits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every exit for the whole batch, in ``exit_layers`` order, the final classifier last."""
        x = embed_tokens(self, x)
        outputs = []
        for i in range(self.depth):
            x = self._run_block(i, x)
            if i + 1 in self.exit_layers:
                outputs.append(self._exit_logits(i + 1, x))
        return outputs

    # --- compute accounting -----------------------------------------------------------------------------------

    def _count_flops(self) -> Dict[str, Any]:
        """FLOPs of each piece for one image at the model's input size, by torch's flop counter."""
        if self._flops is None:
            ref = self.cls_token
            x = torch.zeros(1, self.in_chans, *self.patch_embed.img_size, device=ref.device, dtype=ref.dtype)
            flops: Dict[str, Any] = {'blocks': [], 'exits': {}}
            flops['embed'], x = count_flops(embed_tokens, self, x)
            for i, blk in enumerate(self.blocks):
                f, x_next = count_flops(blk, x)
                flops['blocks'].append(f)
                layer = i + 1
                if layer in self.exit_layers:
                    f_head, logits = count_flops(self._exit_logits, layer, x_next)
                    f_unc = 0
                    if self.exit_criterion == 'uncertainty' and layer != self.depth:
                        f_unc, _ = count_flops(self.exit_uncertainty, layer, logits)
                    flops['exits'][layer] = f_head + f_unc
                x = x_next
            flops['full'] = flops['embed'] + sum(flops['blocks']) + flops['exits'][self.depth]
            self._flops = flops
        return self._flops

    def _path_cost(self, layer: int, heads: Sequence[int]) -> float:
        """Share of full FLOPs for running to ``layer`` and evaluating the exits ``heads`` on the way."""
        f = self._count_flops()
        return (f['embed'] + sum(f['blocks'][:layer]) + sum(f['exits'][h] for h in heads)) / f['full']

    @property
    def full_flops(self) -> int:
        """FLOPs of one image through the full-depth model (the timm parent's), torch's flop counter."""
        return self._count_flops()['full']

    @property
    def exit_costs(self) -> Tuple[float, ...]:
        """Per exit, share of the full model's FLOPs: blocks up to it plus its own head (the final one is 1.0)."""
        flops = self._count_flops()
        if 'costs' not in flops:  # cached with the counts: forward_dynamic reads it on every call
            flops['costs'] = tuple(self._path_cost(layer, (layer,)) for layer in self.exit_layers)
        return flops['costs']

    @property
    def threshold_costs(self) -> Tuple[float, ...]:
        """Per exit, the share of full FLOPs an image leaving there spent with a threshold: blocks up to it plus every
        exit head evaluated on the way (``forward_dynamic``'s ``cost``)."""
        flops = self._count_flops()
        if 'threshold_costs' not in flops:
            layers = self.exit_layers
            flops['threshold_costs'] = tuple(self._path_cost(layer, layers[:k + 1]) for k, layer in enumerate(layers))
        return flops['threshold_costs']

    def _stop_layer(self, budget: Optional[float]) -> int:
        """Deepest exit whose cost fits ``budget``."""
        if budget is None:
            return self.depth
        costs = self.exit_costs
        fits = [layer for layer, cost in zip(self.exit_layers, costs) if cost <= budget + 1e-9]
        if not fits:
            raise ValueError(
                f'budget={budget:g} is below the cheapest exit (block {self.exit_layers[0]}, cost {costs[0]:.4f} of '
                f'the full model); allowed: {costs[0]:.4f} <= budget <= 1')
        return fits[-1]

    # --- forward ------------------------------------------------------------------------------------------------

    def forward_dynamic(
            self,
            x: torch.Tensor,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
    ) -> ExitOutput:
        """Per-image early exit. Images leave at their first confident exit, or at the deepest exit that fits the
        budget; exited images are removed from the batch before the next block.

        Args:
            x: (B, C, H, W) images.
            threshold: Exit threshold in [0, 1] for ``exit_criterion`` (default: the model's ``threshold``).
            budget: Share (0, 1] of the parent's FLOPs; bounds the blocks plus the answering exit's head. With a
                threshold, the earlier exits' heads evaluated on the way add their cost too, reported in ``cost``.

        Returns:
            ``ExitOutput(logits (B, num_classes), exit_layer (B,) long, cost (B,) float)``.
        """
        threshold = self.threshold if threshold is None else threshold
        budget = self.budget if budget is None else budget
        threshold = None if threshold is None else check_fraction('threshold', threshold)
        budget = None if budget is None else check_fraction('budget', budget, low_open=True)
        if self.num_classes <= 0:
            raise ValueError('forward_dynamic needs a classifier: the model was built or reset with num_classes=0')
        stop = self._stop_layer(budget)
        checked = [layer for layer in self.exit_layers if layer <= stop] if threshold is not None else [stop]
        costs = dict(zip(self.exit_layers, self.exit_costs if threshold is None else self.threshold_costs))

        batch = x.shape[0]
        x = embed_tokens(self, x)
        logits_out = x.new_empty(batch, self.num_classes)
        exit_out = torch.full((batch,), stop, dtype=torch.long, device=x.device)
        cost_out = x.new_empty(batch, dtype=torch.float32)
        rows = torch.arange(batch, device=x.device)
        for i in range(stop):
            x = self.blocks[i](x)
            layer = i + 1
            if layer not in checked:
                continue
            logits = self._exit_logits(layer, x)
            cost = costs[layer]
            if layer == stop:
                logits_out[rows] = logits
                exit_out[rows] = layer
                cost_out[rows] = cost
                break
            leave = self._exits_now(layer, logits, threshold)
            if bool(leave.any()):
                gone = rows[leave]
                logits_out[gone] = logits[leave]
                exit_out[gone] = layer
                cost_out[gone] = cost
                stay = ~leave
                if not bool(stay.any()):
                    break
                rows, x = rows[stay], x[stay]
        return ExitOutput(logits_out, exit_out, cost_out)

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """Final logits with the exits' MEViT losses tied into their backward (see ``timm_exits.losses``).

        The loss added is ``MultiExitTask(distill=True, exit_weight=self.exit_weight,
        num_sampled=self.exit_num_sampled)``'s, with each intermediate exit reading its block's tokens through
        ``scale_gradient(tokens, self.exit_grad_scale)``.
        """
        x = embed_tokens(self, x)
        outputs = []
        for i in range(self.depth):
            x = self._run_block(i, x)
            if i + 1 == self.depth:
                outputs.append(self._exit_logits(i + 1, x))
            elif i + 1 in self.exit_layers:
                outputs.append(self._exit_logits(i + 1, scale_gradient(x, self.exit_grad_scale)))
        uncertainties = [self.exit_uncertainty(layer, z) for layer, z in zip(self.exit_layers, outputs)]
        return attach_exit_losses(outputs[-1], outputs[:-1], uncertainties, self.exit_weight, self.exit_num_sampled)

    def forward(
            self,
            x: torch.Tensor,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
    ) -> torch.Tensor:
        """(B, num_classes) logits. No threshold and no budget: the full-depth answer, equal to the parent model's.

        In train mode (with grad enabled) the output is the same, and a softmax criterion on it also trains every
        exit and uncertainty predictor (eqs. 1-5 of 000_*.txt, see ``timm_exits.losses``). torch.fx traces this
        static full-depth path (a traced ``threshold`` is a Proxy, not a value, so the dynamic path stays out).
        """
        static = threshold is None and budget is None and self.threshold is None and self.budget is None
        if is_fx_tracing() or static:
            if self.training and torch.is_grad_enabled() and self.num_classes > 0:
                return self._forward_train(x)
            return self.forward_head(self.forward_features(x))
        return self.forward_dynamic(x, threshold=threshold, budget=budget).logits


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


def _parent_cfgs(parent: str, depth: int = 12) -> Dict[str, Dict[str, Any]]:
    """Every pretrained tag of the timm parent (same weights and preprocessing), with this family's classifiers."""
    return parent_cfgs(parent, f'{parent}_mexit', _cfg, classifier=_classifier_names(depth, default_exit_layers(depth)))


# published MEViT models: TransFG's evaluation transform (MEViT, 000_*.txt), resize to 600 x 600, centre crop 448
_MEVIT_FGVC = dict(
    input_size=(3, 448, 448), crop_pct=448 / 600, crop_mode='squash', interpolation='bilinear', paper_ids=None,
    paper_name='Multi-Exit Vision Transformer with Custom Fine-Tuning for Fine-Grained Image Recognition',
    classifier=_classifier_names(12, default_exit_layers(12)))


default_cfgs = generate_default_cfgs({
    **_parent_cfgs('vit_tiny_patch16_224'),
    **_parent_cfgs('vit_small_patch16_224'),
    **_parent_cfgs('vit_base_patch16_224'),
    **_parent_cfgs('vit_large_patch16_224', depth=24),
    **_parent_cfgs('deit_tiny_patch16_224'),
    **_parent_cfgs('deit_small_patch16_224'),
    **_parent_cfgs('deit_base_patch16_224'),
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
    'test_vit_mexit_named': published_cfg(
        _cfg, 'test_vit_mexit_named', 'pytest tests/test_hub.py (tiny test model, random weights)',
        input_size=(3, 32, 32), num_classes=10, classifier=_classifier_names(4, default_exit_layers(4))),
})


@explain_missing_weights  # published weights not on the Hub yet: an error naming the repo and the recipe
def _create_multi_exit_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> MultiExitVisionTransformer:
    depth = kwargs.get('depth', 12)
    layers = _exit_layout(depth, kwargs.get('exit_layers'))
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    overlay.setdefault('classifier', _classifier_names(depth, layers))  # every head of this layout
    return build_vit_family(MultiExitVisionTransformer, variant, pretrained, pretrained_cfg_overlay=overlay, **kwargs)


@register_model
def vit_tiny_patch16_224_mexit(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """ViT-Ti/16 with early exits (parent: timm ``vit_tiny_patch16_224``)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_multi_exit_vit('vit_tiny_patch16_224_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch16_224_mexit(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """ViT-S/16 with early exits (parent: timm ``vit_small_patch16_224``)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_multi_exit_vit('vit_small_patch16_224_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_base_patch16_224_mexit(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """ViT-B/16 with early exits, MEViT's backbone (parent: ``vit_base_patch16_224``; MEViT starts from
    ``.augreg_in21k`` or ``.orig_in21k``)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_multi_exit_vit('vit_base_patch16_224_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_large_patch16_224_mexit(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """ViT-L/16 with early exits after blocks 12..23 by default (parent: ``vit_large_patch16_224``)."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_multi_exit_vit('vit_large_patch16_224_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def deit_tiny_patch16_224_mexit(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """DeiT-Ti with early exits (parent: ``deit_tiny_patch16_224``)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_multi_exit_vit('deit_tiny_patch16_224_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_224_mexit(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """DeiT-S with early exits (parent: ``deit_small_patch16_224``)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_multi_exit_vit('deit_small_patch16_224_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_224_mexit(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """DeiT-B with early exits (parent: ``deit_base_patch16_224``)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_multi_exit_vit('deit_base_patch16_224_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def test_vit_mexit(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """Tiny test variant: 32 px, 4 blocks, exits after blocks 2 and 3."""
    model_args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.)
    return _create_multi_exit_vit('test_vit_mexit', pretrained, **dict(model_args, **kwargs))


@register_model
def test_vit_mexit_ls(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """Tiny test variant with layer scale and a register token (DeiT-III / reg-token style prefix handling)."""
    model_args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., init_values=1e-2, reg_tokens=1)
    return _create_multi_exit_vit('test_vit_mexit_ls', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b16_mexit_cars(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """MEViT on Stanford Cars: ViT-B/16 at 448 px, 196 classes, linear exits after blocks 6..11 and the final head,
    uncertainty criterion (eq. 3, 000_*.txt). Weights: ``{TIMM_EXITS_HUB_ORG}/vit_b16_mexit_cars``."""
    model_args = dict(
        img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, exit_layers=tuple(range(6, 12)),
        exit_head='linear', exit_criterion='uncertainty')
    return _create_multi_exit_vit('vit_b16_mexit_cars', pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b16_mexit_aircraft(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """MEViT on FGVC-Aircraft: ViT-B/16 at 448 px, 100 variants, linear exits after blocks 6..11 and the final head,
    uncertainty criterion (eq. 3, 000_*.txt). Weights: ``{TIMM_EXITS_HUB_ORG}/vit_b16_mexit_aircraft``."""
    model_args = dict(
        img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, exit_layers=tuple(range(6, 12)),
        exit_head='linear', exit_criterion='uncertainty')
    return _create_multi_exit_vit('vit_b16_mexit_aircraft', pretrained, **dict(model_args, **kwargs))


@register_model
def test_vit_mexit_named(pretrained: bool = False, **kwargs) -> MultiExitVisionTransformer:
    """Tiny published-weights test variant (``vit_b16_mexit_cars`` in miniature): 32 px, 4 blocks, exits after blocks
    2 and 3, uncertainty criterion. Weights: ``{TIMM_EXITS_HUB_ORG}/test_vit_mexit_named``."""
    model_args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., exit_layers=(2, 3),
        exit_criterion='uncertainty')
    return _create_multi_exit_vit('test_vit_mexit_named', pretrained, **dict(model_args, **kwargs))
