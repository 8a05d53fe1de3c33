""" LifeRegress: life-regression patch slimming for Vision Transformers (Chen et al., 003_*.txt) as timm models.

One life-regression module after block ``life_layer`` (t_base) predicts every patch's life tau_i in one go (eqs. 1-3).
At inference patches leave after the blocks in ``prune_layers`` (1-based, [4, 7, 10] in the paper, so blocks 5, 8 and 11
are the first to run on fewer): each keeps the top-n_t patches by life (Property 1), n_t shrinking by the keep rate rho
at each prune layer (Sec. III-D). [CLS] (and any register token) lives T = depth blocks and is always kept.

- ``model(x)``: eval mode slims with the model's keep rate (default 0.7); ``keep_rate=1.0`` is the parent timm model.
- ``model(x, keep_rate=r)``, ``model(x, budget=b)``: another keep rate, or the largest one whose FLOPs fit ``b`` of the
  parent's (``keep_rate_for_budget``). ``token_schedule``, ``flops`` and ``flops_ratio`` tell what a rate costs.
- Train mode drops nothing: soft weights beta_i(t) weigh every attention after ``life_layer`` (eqs. 6-7), so the life
  predictor trains end to end through the usual cross-entropy (eq. 8).

Two misprints of 003_*.txt are corrected. Eq. (10) lacks the square of (t - mu): as printed it is identically 0
(sum (t - mu)(n_t - n_{t+1}) + (T - mu) n_T = N mu - N mu); the standard deviation of the lives implied by n_t is used.
Eq. (7), 1 / (1 + exp(U (tau - t))), is flipped: it tends to 1 *after* the life ends, against eq. (4) and the text
("beta approaches beta-bar as U grows"); beta_i(t) = sigmoid(U (tau_i - t)) is used, which tends to eq. (4)'s step.
"""
import math
from numbers import Real
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._features import feature_take_indices
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

from ._base import (
    NewPartsMixin, add_block_group, check_fraction, is_fx_tracing, parent_cfgs, pop_kwargs,
)
from ._build import build_family, register_twins
from ._costs import largest_rate, path_flops
from ._pretrained import explain_missing_weights, published_cfg
from .adapters import EvaAdapter, VitAdapter, register_adapted

__all__ = [
    'DEFAULT_KEEP_RATE', 'LifeRegressEva', 'LifeRegressMixin', 'LifeRegressVisionTransformer', 'LifeRegression',
    'default_life_layout', 'life_stats', 'renormalize_lives', 'soft_weights', 'token_counts',
]

DEFAULT_KEEP_RATE = 0.7


def token_counts(num_patches: int, depth: int, prune_layers: Sequence[int], keep_rate: float) -> Tuple[int, ...]:
    """n_t, the patches used by block t = 1..depth (Sec. III-D, 003_*.txt): N up to the first prune layer, then
    ceil(rho * previous) after each prune layer (EViT's rounding, never below 1)."""
    counts, n = [], num_patches
    for t in range(1, depth + 1):
        counts.append(n)
        if t in prune_layers:
            n = max(1, math.ceil(keep_rate * n - 1e-9))  # 1e-9: rho = k / n gives k whatever the float rounding
    return tuple(counts)


def life_stats(counts: Sequence[int]) -> Tuple[float, float]:
    """Target mean and std of the lives implied by the schedule n_t (eqs. 9-10, 003_*.txt): n_t - n_{t+1} patches
    live exactly t blocks, n_T live T. Eq. (10) with the square of (t - mu) it misses (see the module docstring)."""
    depth, num = len(counts), counts[0]
    lives = [(t, n - (counts[t] if t < depth else 0)) for t, n in enumerate(counts, 1)]  # (life, how many patches)
    mu = sum(t * k for t, k in lives) / num
    sigma = math.sqrt(sum((t - mu) ** 2 * k for t, k in lives) / num)
    return mu, sigma


def renormalize_lives(scores: torch.Tensor, mu: float, sigma: float, eps: float = 1e-6) -> torch.Tensor:
    """tau_i = (s_i - mean(s)) / std(s) * sigma + mu over the last dim, eq. (3), 003_*.txt. Population std (eq. (10)'s
    1/N), at least ``eps``: equal scores all get life mu."""
    mean = scores.mean(-1, keepdim=True)
    var = (scores - mean).square().mean(-1, keepdim=True)  # not .std(): no warning on an empty batch
    return (scores - mean) / var.clamp_min(eps * eps).sqrt() * sigma + mu


def soft_weights(lives: torch.Tensor, t: float, U: float) -> torch.Tensor:
    """beta_i(t) = sigmoid(U (tau_i - t)), eq. (7) of 003_*.txt with its sign corrected: 1 for t << tau, 0.5 at
    t = tau, 0 after; eq. (4)'s step as U grows."""
    return torch.sigmoid(U * (lives - t))


class LifeRegression(nn.Module):
    """Life-regression module (Fig. 2, 003_*.txt): LayerNorm (eq. 1), bilinear score of each patch with [CLS] (eq. 2),
    per-image renormalisation to the target mean and std of lives (eq. 3). ``cls_query=False`` (a parent without a
    class token): the mean of the normalised patch tokens stands in for [CLS]."""

    def __init__(self, dim: int, cls_query: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cls_query = cls_query
        self.norm = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.proj = nn.Linear(dim, dim, bias=False, **dd)  # W of eq. (2) is proj.weight^T

    def scores(self, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """s_i = x̄_cls^T W x̄_i (eqs. 1-2) of the patches of tokens x (B, L, D), as (x̄_cls W) · x̄_i: D^2 + N D
        multiply-adds per image. Returns (B, N) float32."""
        x = self.norm(x)
        query = self.proj(x[:, 0] if self.cls_query else x[:, num_prefix_tokens:].mean(1))
        return (x[:, num_prefix_tokens:] @ query.unsqueeze(-1)).squeeze(-1).float()

    def forward(self, x: torch.Tensor, num_prefix_tokens: int, mu: float, sigma: float) -> torch.Tensor:
        """Lives tau (B, N), float32, of the patches of tokens x (B, L, D), eqs. (1)-(3)."""
        return renormalize_lives(self.scores(x, num_prefix_tokens), mu, sigma)


def default_life_layout(depth: int) -> Tuple[int, Tuple[int, ...]]:
    """The paper's layout scaled to ``depth``: patches leave after blocks 4, 7, 10 of 12 (rounded to depth * k / 12,
    at least 2, before the last block), lives predicted after the block before the first of them."""
    prune = tuple(sorted({min(max(round(depth * k / 12), 2), depth - 1) for k in (4, 7, 10)}))
    return prune[0] - 1, prune


def _check_layout(depth: int, life_layer: Any, prune_layers: Any) -> Tuple[int, Tuple[int, ...]]:
    """Check ``life_layer`` (1..depth-1) and ``prune_layers`` (strictly increasing, in life_layer+1..depth-1); None:
    ``default_life_layout``."""
    if depth < 3:
        raise ValueError(f'LifeRegress needs a parent of at least 3 blocks (a life layer, a prune layer, a last '
                         f'block), got depth={depth}')
    default_life, default_prune = default_life_layout(depth)
    life_layer = default_life if life_layer is None and prune_layers is None else life_layer
    prune_layers = default_prune if prune_layers is None else prune_layers
    if life_layer is None:
        life_layer = prune_layers[0] - 1 if isinstance(prune_layers, Sequence) and prune_layers else life_layer
    if isinstance(life_layer, bool) or not isinstance(life_layer, int) or not 1 <= life_layer < depth:
        raise ValueError(f'life_layer must be a block number in 1..{depth - 1} (1-based), got {life_layer!r}')
    if isinstance(prune_layers, (int, str)) or not isinstance(prune_layers, Sequence) or not prune_layers:
        raise ValueError(
            f'prune_layers must be a non-empty sequence of block numbers in {life_layer + 1}..{depth - 1}, '
            f'got {prune_layers!r}')
    layers = list(prune_layers)
    bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, int) or not life_layer < v < depth]
    if bad or any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(
            f'prune_layers must be strictly increasing block numbers in {life_layer + 1}..{depth - 1} (after '
            f'life_layer={life_layer}, before the last block), got {layers}')
    return life_layer, tuple(layers)


def _check_temperature(U: Any) -> float:
    if isinstance(U, bool) or not isinstance(U, Real) or not math.isfinite(U) or U <= 0:
        raise ValueError(f'U (temperature of eq. 7) must be a finite number > 0, got {U!r}')
    return float(U)


class LifeRegressMixin(NewPartsMixin):
    """LifeRegress patch slimming (003_*.txt) on any parent class through its adapter
    (``LifeRegressVisionTransformer``, ``LifeRegressEva``; ``timm_exits.convert`` for a model already built)."""
    family = 'liferegress'  # its twins' suffix; the parents it takes: adapters.FAMILY_STATES
    __jit_ignored_attributes__ = ['_flops', '_budget_rates']
    new_prefixes = ('life.',)
    new_parts_name = 'life predictor'
    layout_arg = 'life_layer'

    def __init__(self, **kwargs: Any) -> None:
        """The parent's arguments (``VisionTransformer``, ``Eva``) and the life predictor's (``_init_mechanism``)."""
        own = pop_kwargs(type(self), kwargs)
        super().__init__(**kwargs)
        self._init_mechanism(**own)

    def _init_mechanism(
            self,
            life_layer: Optional[int] = None,
            prune_layers: Optional[Sequence[int]] = None,
            keep_rate: Optional[float] = None,
            U: float = 1.5,
            budget: Optional[float] = None,
    ) -> None:
        """Check the arguments and add the life predictor to a built parent (``__init__`` and
        ``timm_exits.convert``).

        Args:
            life_layer: t_base, the 1-based block after which the life module runs; before ``prune_layers[0]``. The
                default, the block before the first prune layer (3 for 12 blocks), feeds the first slimming layer
                (the paper clamps lives to [4, 12] "as predicted at layer 4").
            prune_layers: 1-based blocks after which patches leave (default: the paper's 4, 7, 10 for 12 blocks,
                scaled to the depth, ``default_life_layout``).
            keep_rate: Default rho in (0, 1] (default 0.7 without a budget, none with one).
            U: Temperature of the soft weights, eq. (7) (paper: 1.5).
            budget: Default share (0, 1] of the parent's FLOPs; caps the keep rate (see ``resolve_keep_rate``).
        """
        self.depth = len(self.blocks)
        self.life_layer, self.prune_layers = _check_layout(self.depth, life_layer, prune_layers)
        self.U = _check_temperature(U)
        if keep_rate is None and budget is None:
            keep_rate = DEFAULT_KEEP_RATE
        self.keep_rate = None if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        self.budget = None if budget is None else check_fraction('budget', budget, low_open=True)
        ref = next(self.parameters())
        self.life = LifeRegression(self.embed_dim, cls_query=self._has_cls(), device=ref.device, dtype=ref.dtype)
        for name, module in self.life.named_modules():
            init_weights_vit_timm(module, name)
        self.life.train(self.training)  # a converted model's new part follows its mode
        self._reset_costs()

    # --- timm API -------------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def layout_args(self) -> Dict[str, Any]:
        """Constructor arguments fixing the life layout, JSON-ready (timm's ``model_args``), as checkpoints record
        them."""
        return dict(life_layer=self.life_layer, prune_layers=list(self.prune_layers), keep_rate=self.keep_rate,
                    U=self.U, budget=self.budget)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Parent groups; the life module joins the group of block ``life_layer``, the block it follows."""
        return add_block_group(super().group_matcher(coarse), (r'^life\.', (self.life_layer - 1,)))

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's reset; FLOPs (the head's) are counted again."""
        super().reset_classifier(num_classes, global_pool)
        self._reset_costs()

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's resize; the schedule follows the new patch count and FLOPs are counted again."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self._reset_costs()

    # --- keep rate, schedule and compute ----------------------------------------------------------------------

    def _reset_costs(self) -> None:
        """Forget counted FLOPs; a default budget is resolved again now (a check, and torch.fx cannot count)."""
        self._flops: Dict[Any, Any] = {}
        self._budget_rates: Dict[float, float] = {}
        if self.budget is not None:
            self.keep_rate_for_budget(self.budget)
        # the default schedule, what a scripted forward (no Python keep-rate logic) runs
        self._script_counts, self._script_mu, self._script_sigma = self._plan(
            self.resolve_keep_rate(), self.patch_embed.num_patches)

    def resolve_keep_rate(self, keep_rate: Optional[float] = None, budget: Optional[float] = None) -> float:
        """The keep rate a forward uses. Arguments replace the model's defaults as a pair (neither given: the
        defaults). A budget caps the rate, min(keep_rate, ``keep_rate_for_budget(budget)``); alone it picks it."""
        if keep_rate is None and budget is None:
            keep_rate, budget = self.keep_rate, self.budget
        rate = 1. if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        if budget is not None:
            rate = min(rate, self.keep_rate_for_budget(budget))
        return rate

    def token_schedule(self, keep_rate: Optional[float] = None) -> Tuple[int, ...]:
        """n_t, the patches (prefix tokens excluded) each block t = 1..depth runs on at the model's input size."""
        return token_counts(self.patch_embed.num_patches, self.depth, self.prune_layers,
                            self.resolve_keep_rate(keep_rate))

    def _schedule_flops(self, counts: Sequence[int]) -> int:
        """FLOPs of one image on the schedule ``counts`` at the model's input size (``_costs.path_flops``: the
        embedding, each block at its n_t patches, the head, the life module when anything is dropped)."""
        return path_flops(self, tuple(self.patch_embed.img_size), counts, self.depth, (self.depth,))

    def flops(self, keep_rate: Optional[float] = None) -> int:
        """FLOPs per image at the model's input size and ``keep_rate`` (default: the model's), torch's flop counter.
        At keep_rate=1.0 they are the parent timm model's."""
        return self._schedule_flops(self.token_schedule(keep_rate))

    def flops_ratio(self, keep_rate: Optional[float] = None) -> float:
        """``flops(keep_rate)`` as a share of the parent's (keep_rate=1.0)."""
        return self.flops(keep_rate) / self.flops(1.)

    def keep_rate_for_budget(self, budget: float) -> float:
        """Largest keep rate whose counted FLOPs are at most ``budget`` (a share (0, 1]) of the parent's.

        The cost is a step function of rho (integer counts): ``_costs.largest_rate``. Cached per model.
        """
        budget = check_fraction('budget', budget, low_open=True)
        if budget not in self._budget_rates:
            num, full = self.patch_embed.num_patches, self.flops(1.)

            def counts(rate: float) -> Tuple[int, ...]:
                return token_counts(num, self.depth, self.prune_layers, rate)

            def fits(rate: float) -> bool:
                return self._schedule_flops(counts(rate)) / full <= budget + 1e-9

            cheapest = 1. if fits(1.) else self._schedule_flops(counts(0.)) / full
            if cheapest > budget + 1e-9:
                raise ValueError(
                    f'budget={budget:g} is below the cheapest schedule (one patch left after block '
                    f'{self.prune_layers[0]}: {cheapest:.4f} of the parent\'s FLOPs); allowed: '
                    f'{cheapest:.4f} <= budget <= 1')
            self._budget_rates[budget] = largest_rate(fits, 0., num, counts, self.prune_layers)
        return self._budget_rates[budget]

    # --- forward ------------------------------------------------------------------------------------------------

    def life_attn_mask(self, lives: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive attention mask log beta_j(t) (B, 1, 1, L) over keys j for block t: eq. (6) as softmax(h + log beta).
        Prefix tokens live T (``depth``)."""
        lives = F.pad(lives, (self.num_prefix_tokens, 0), value=float(self.depth))
        return F.logsigmoid(self.U * (lives - t)).to(dtype)[:, None, None, :]

    def _keep_longest(
            self,
            x: torch.Tensor,
            lives: torch.Tensor,
            n: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image, the prefix tokens and the ``n`` patches of longest life (Property 1: the top-n beta_i(t) are
        the top-n tau_i) in their original order; their lives and their positions among the current patches follow."""
        npt = self.num_prefix_tokens
        idx = lives.topk(n, dim=1).indices.sort(dim=1).values
        patches = x[:, npt:].gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :npt], patches], dim=1), lives.gather(1, idx), idx

    def _plan(self, keep_rate: float, num_patches: int) -> Tuple[List[int], float, float]:
        """Token schedule n_t and the target mean and std of lives (eqs. 9-10) for ``keep_rate``."""
        counts = list(token_counts(num_patches, self.depth, self.prune_layers, keep_rate))
        mu, sigma = life_stats(counts)
        return counts, mu, sigma

    def _num_patches(self, x: torch.Tensor) -> int:
        """Patches of images x: the model's count, or that of x's size with ``dynamic_img_size``."""
        if self.dynamic_img_size and not is_fx_tracing():
            h, w = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
            return h * w
        return self.patch_embed.num_patches

    def _slim_tokens(
            self,
            x: torch.Tensor,
            counts: List[int],
            mu: float,
            sigma: float,
            take: List[int],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Normed final tokens of images x on the schedule ``counts`` and, for each 0-based block in ``take``, every
        token after it (a patch already dropped carries the features it left with).

        Eval: (B, prefix + n_T, D), patches dropped after each prune layer (no computation for them). Train: every
        token, the soft weights of eqs. (6)-(7) in each attention after ``life_layer``.
        """
        x, rope_full = self._embed(x)
        rope = rope_full
        npt = self.num_prefix_tokens
        slim = self.training or counts[-1] < counts[0]  # keep_rate 1 in eval: the parent's path, life module skipped
        last = max(take) if len(take) > 0 else -1
        lives: Optional[torch.Tensor] = None
        full: Optional[torch.Tensor] = None  # (B, N, D): every patch's latest features (for intermediates)
        pos: Optional[torch.Tensor] = None  # (B, n): positions in the full grid of the patches still running
        intermediates: List[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            t = i + 1
            mask: Optional[torch.Tensor] = None
            if self.training and lives is not None:
                mask = self.life_attn_mask(lives, t, x.dtype)
            if torch.jit.is_scripting():  # TorchScript passes no module as an argument
                x = self._script_block(i, x, self._block_rope(rope, i), mask)
            elif self.grad_checkpointing:
                x = checkpoint(self._apply_block, blk, x, self._block_rope(rope, i), mask)
            else:
                x = self._apply_block(blk, x, self._block_rope(rope, i), mask)
            if slim and t == self.life_layer:
                lives = self.life(x, npt, mu, sigma)
            if i in take:
                if full is not None and pos is not None:
                    index = pos.unsqueeze(-1).expand(-1, -1, x.shape[-1])
                    intermediates.append(torch.cat([x[:, :npt], full.scatter(1, index, x[:, npt:])], dim=1))
                else:
                    intermediates.append(x)
            if not self.training and t < self.depth and counts[t] < counts[i] and lives is not None:
                if i < last:  # intermediates still to come: remember every patch's features
                    if full is None or pos is None:
                        full = x[:, npt:]
                    else:
                        full = full.scatter(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, npt:])
                x, lives, kept = self._keep_longest(x, lives, counts[t])
                pos = kept if pos is None else pos.gather(1, kept)
                rope = self._keep_rope(rope_full, pos)  # rotary entries of the patches kept
        return self.norm(x), intermediates

    def _default_keep_rate(self) -> float:
        """The keep rate of a call without one: the model's (``resolve_keep_rate``)."""
        return self.resolve_keep_rate()

    @torch.jit.unused
    def predict_lives(self, x: torch.Tensor, keep_rate: Optional[float] = None) -> torch.Tensor:
        """Lives tau (B, N) of the patches of images x (eqs. 1-3), mu and sigma from ``keep_rate``'s schedule."""
        x, rope = self._embed(x)
        for i in range(self.life_layer):
            x = self._apply_block(self.blocks[i], x, self._block_rope(rope, i), None)
        npt = self.num_prefix_tokens
        counts = token_counts(x.shape[1] - npt, self.depth, self.prune_layers, self.resolve_keep_rate(keep_rate))
        return self.life(x, npt, *life_stats(counts))

    @torch.jit.unused
    def forward_features(self, x: torch.Tensor, keep_rate: Optional[float] = None) -> torch.Tensor:
        """Tokens after the final norm at ``keep_rate`` (default: the model's, so ``forward(x)`` equals
        ``forward_head(forward_features(x))``).

        Eval: (B, prefix + n_T, D), patches dropped after each prune layer (no computation for them). Train: every
        token, the soft weights of eqs. (6)-(7) in each attention after ``life_layer``, mu and sigma of eq. (3)
        from the keep rate's schedule (eqs. 9-10).
        """
        rate = self._default_keep_rate() if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        return self._slim_tokens(x, *self._plan(rate, self._num_patches(x)), [])[0]

    @torch.jit.unused
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[float] = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``VisionTransformer.forward_intermediates`` on the slimmed path, so its final features equal
        ``forward_features(x, keep_rate)`` (the model's keep rate by default). Every intermediate keeps the full patch
        grid: a patch dropped after an earlier block carries the features it had when it left. ``keep_rate=1.0``
        (or ``attn_mask`` / ``is_causal``) is the parent's path.
        """
        rate = self._default_keep_rate() if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        if rate >= 1. or attn_mask is not None or is_causal or self.training:  # train mode drops nothing
            extra = dict(output_dict=True) if output_dict else {}  # Eva's has no output_dict
            parent = next(c for c in type(self).__mro__ if c.__module__.split('.')[0] == 'timm')  # also when borrowed
            return parent.forward_intermediates(
                self, x, indices=indices, return_prefix_tokens=return_prefix_tokens, norm=norm, stop_early=stop_early,
                output_fmt=output_fmt, intermediates_only=intermediates_only, attn_mask=attn_mask, is_causal=is_causal,
                **extra)
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, _ = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        final, intermediates = self._slim_tokens(x, *self._plan(rate, self._num_patches(x)), list(take_indices))
        intermediates = [self.norm(y) if norm else y for y in intermediates]
        npt = self.num_prefix_tokens
        prefix_tokens = [y[:, :npt] for y in intermediates] if npt else None
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out: Dict[str, Any] = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                out['image_features'] = final
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (final, intermediates)

    def forward(
            self,
            x: torch.Tensor,
            keep_rate: Optional[float] = None,
            budget: Optional[float] = None,
    ) -> torch.Tensor:
        """(B, num_classes) logits at ``keep_rate`` and/or ``budget`` (see ``resolve_keep_rate``).

        torch.fx traces the model's default keep rate (a traced argument is a Proxy, not a value); so does
        ``torch.jit.script``, whose forward takes no keep rate or budget. ``torch.jit.trace``, ``torch.onnx.export``
        and ``torch.export`` record the keep rate of the call (the same schedule for every input).
        """
        if torch.jit.is_scripting():
            if keep_rate is not None or budget is not None:
                raise RuntimeError('a scripted LifeRegress model runs at its default keep rate: keep_rate and budget '
                                   'are not arguments of the scripted forward')
            return self.forward_head(self._slim_tokens(x, self._script_counts, self._script_mu, self._script_sigma,
                                                       [])[0])
        return self._forward_eager(x, keep_rate, budget)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor, keep_rate: Optional[float], budget: Optional[float]) -> torch.Tensor:
        rate = self.resolve_keep_rate() if is_fx_tracing() else self.resolve_keep_rate(keep_rate, budget)
        return self.forward_head(self.forward_features(x, keep_rate=rate))


@register_adapted
class LifeRegressVisionTransformer(LifeRegressMixin, VitAdapter, VisionTransformer):
    """timm ``VisionTransformer`` (ViT, DeiT, DINOv2, SigLIP, CLIP, AIMv2, ...) with LifeRegress patch slimming."""


@register_adapted
class LifeRegressEva(LifeRegressMixin, EvaAdapter, Eva):
    """timm ``Eva`` (EVA02, DINOv3, Perception Encoder, RoPE-ViT) with LifeRegress patch slimming; a kept patch keeps
    its rotary position embedding."""


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_name': 'Life Regression based Patch Slimming for Vision Transformers',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # short names of the first families, the same models as <parent>_liferegress
    **parent_cfgs('deit_tiny_patch16_224', 'deit_tiny_liferegress', _cfg),
    **parent_cfgs('deit_small_patch16_224', 'deit_small_liferegress', _cfg),
    'deit_small_liferegress.in1k': published_cfg(  # trained life predictor, on the Hub (timm_exits.hub)
        _cfg, 'deit_small_liferegress.in1k', 'python train_recipes/liferegress_imagenet.py --data-dir /data/imagenet',
        crop_pct=.875, paper_ids='arXiv:2304.04926'),
    **parent_cfgs('deit_base_patch16_224', 'deit_base_liferegress', _cfg),
    **parent_cfgs('vit_tiny_patch16_224', 'vit_tiny_liferegress', _cfg),
    **parent_cfgs('vit_small_patch16_224', 'vit_small_liferegress', _cfg),
    **parent_cfgs('vit_base_patch16_224', 'vit_base_liferegress', _cfg),
    'test_vit_liferegress.r32': _cfg(input_size=(3, 32, 32), num_classes=10),
})


@explain_missing_weights  # published weights not on the Hub yet: an error naming the repo and the recipe
def _create_life_regress_vit(
        variant: str,
        pretrained: bool = False,
        parent: Optional[str] = None,
        **kwargs: Any,
) -> LifeRegressMixin:
    """A LifeRegress model on timm architecture ``parent`` (its own arguments and weights), or on a
    ``VisionTransformer`` of ``kwargs``."""
    return build_family(LifeRegressMixin, variant, pretrained, parent=parent, **kwargs)


@register_model
def deit_tiny_liferegress(pretrained: bool = False, **kwargs) -> LifeRegressMixin:
    """DeiT-Ti with LifeRegress patch slimming (parent: ``deit_tiny_patch16_224``)."""
    return _create_life_regress_vit('deit_tiny_liferegress', pretrained, parent='deit_tiny_patch16_224', **kwargs)


@register_model
def deit_small_liferegress(pretrained: bool = False, **kwargs) -> LifeRegressMixin:
    """DeiT-S with LifeRegress patch slimming, the paper's main backbone (parent: ``deit_small_patch16_224``)."""
    return _create_life_regress_vit('deit_small_liferegress', pretrained, parent='deit_small_patch16_224', **kwargs)


@register_model
def deit_base_liferegress(pretrained: bool = False, **kwargs) -> LifeRegressMixin:
    """DeiT-B with LifeRegress patch slimming (parent: ``deit_base_patch16_224``)."""
    return _create_life_regress_vit('deit_base_liferegress', pretrained, parent='deit_base_patch16_224', **kwargs)


@register_model
def vit_tiny_liferegress(pretrained: bool = False, **kwargs) -> LifeRegressMixin:
    """ViT-Ti/16 with LifeRegress patch slimming (parent: ``vit_tiny_patch16_224``)."""
    return _create_life_regress_vit('vit_tiny_liferegress', pretrained, parent='vit_tiny_patch16_224', **kwargs)


@register_model
def vit_small_liferegress(pretrained: bool = False, **kwargs) -> LifeRegressMixin:
    """ViT-S/16 with LifeRegress patch slimming (parent: ``vit_small_patch16_224``)."""
    return _create_life_regress_vit('vit_small_liferegress', pretrained, parent='vit_small_patch16_224', **kwargs)


@register_model
def vit_base_liferegress(pretrained: bool = False, **kwargs) -> LifeRegressMixin:
    """ViT-B/16 with LifeRegress patch slimming (parent: ``vit_base_patch16_224``)."""
    return _create_life_regress_vit('vit_base_liferegress', pretrained, parent='vit_base_patch16_224', **kwargs)


@register_model
def test_vit_liferegress(pretrained: bool = False, **kwargs) -> LifeRegressMixin:
    """Tiny test variant: 32 px, 16 patches, 4 blocks, lives predicted after block 1, patches leave after 2 and 3."""
    model_args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., life_layer=1, prune_layers=(2, 3))
    return _create_life_regress_vit('test_vit_liferegress', pretrained, **dict(model_args, **kwargs))


# ``<parent>_liferegress`` for every timm VisionTransformer / Eva architecture, every pretrained tag mirrored
register_twins(__name__, 'liferegress', _create_life_regress_vit, _cfg,
               '``{parent}`` with LifeRegress patch slimming (parent: timm ``{parent}``, its weights and arguments).')
