""" Early exit and LifeRegress patch slimming in one model (MEViT, 000_*.txt; LifeRegress, 003_*.txt) as timm models.

Early exit saves depth on the images that are easy; patch slimming saves width (patches) on every image. Here both run
in one model: one life-regression module after block ``life_layer`` predicts each patch's life (eqs. 1-3, 003), before
each block after a prune layer every image keeps its top-n_t patches by life (Property 1, eqs. 9-10), and exits after
chosen blocks read the slimmed tokens ([CLS], or the mean of the patches kept); images leave at their first confident
exit (or the deepest one a budget affords) and are removed from the running batch together with their lives and the
positions of their kept patches.

- ``model(x)``: the parent timm model's answer (full depth, keep rate 1, the default ``keep_rate=1.0``).
- ``model(x, keep_rate=r)``: slimmed at rho = r, full depth; ``threshold=t``: per-image early exit on top;
  ``budget=b``: no image spends more than b of the parent's FLOPs.
- ``model.forward_dynamic(x, threshold=, budget=, keep_rate=, deadline_ms=)``: logits, exit taken and cost per image.
- ``model.forward_anytime(x, threshold=, keep_rate=)``: each exit's answer for the images still running.
- Train mode (timm's train.py through ``--device-modules timm_exits``, or ``timm_exits.tasks``): no patch is dropped;
  the soft weights of eqs. (6)-(7), 003, weigh every attention after ``life_layer`` and every exit is trained with
  MEViT's losses (eqs. 1-5, 000) through the multi-exit train-mode hook, so ``criterion(model(x), y)`` trains the
  backbone, the exits and the life predictor together.

**Budget rule.** A budget without a keep rate picks the deepest exit first, then the largest keep rate in
[``min_keep_rate``, 1] whose cost at that exit fits: the deepest exit that fits at some keep rate in that range
answers, at the largest keep rate that still fits there. With a keep rate in the call the budget picks only the exit
(the deepest whose cost at that keep rate fits). With a threshold the costs are the threshold paths' (every exit head
evaluated on the way). A budget below the cheapest option (first exit at ``min_keep_rate``) raises, naming it.

Only exit heads that read [CLS] or the mean of the patch tokens (``linear``, ``mlp``, ``vit``) can follow slimmed
tokens: each image keeps different patches, so no patch grid is left for the CNN heads, and the token-MLP heads
(``mixer``, ``resmlp``) have one weight per patch position.
"""
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

from ..losses import attach_exit_losses, scale_gradient
from ._base import add_block_group, check_fraction, is_fx_tracing
from ._build import build_family, register_twins
from ._costs import largest_rate
from .adapters import EvaAdapter, VitAdapter, register_adapted
from .exit_heads import EXIT_HEADS
from .life_regress_vit import (
    DEFAULT_KEEP_RATE, LifeRegressMixin, LifeRegression, _check_layout, _check_temperature, token_counts,
)
from .multi_exit_vit import AnytimeStep, ExitOutput, MultiExitMixin, _cfg as _mexit_cfg, _classifier_names, \
    _classifiers, default_exit_layers

__all__ = [
    'POOLED_EXIT_HEADS', 'MultiExitLifeRegressEva', 'MultiExitLifeRegressMixin',
    'MultiExitLifeRegressVisionTransformer',
]

POOLED_EXIT_HEADS = ('linear', 'mlp', 'vit')  # exit heads that read [CLS] / the mean of the patches, never the grid


class MultiExitLifeRegressMixin(MultiExitMixin):
    """Early exits (``MultiExitMixin``) on LifeRegress-slimmed tokens, on any parent class through its adapter
    (``MultiExitLifeRegressVisionTransformer``, ``MultiExitLifeRegressEva``; ``timm_exits.convert`` for a model
    already built). The life module and its functions are LifeRegress's own (``LifeRegression``,
    ``LifeRegressMixin.life_attn_mask`` / ``_keep_longest`` / ``_plan``)."""
    family = 'mexit_liferegress'  # its twins' suffix; the parents it takes: adapters.FAMILY_STATES
    __jit_ignored_attributes__ = ['_flops']
    new_prefixes = ('exits.', 'uncertainty.', 'life.')
    new_parts_name = 'exit heads and life predictor'
    layout_arg = 'exit_layers / exit_head / life_layer'

    # LifeRegress's soft attention weights (eqs. 6-7), top-n selection (Property 1) and schedule (eqs. 9-10)
    life_attn_mask = LifeRegressMixin.life_attn_mask
    _keep_longest = LifeRegressMixin._keep_longest
    _plan = LifeRegressMixin._plan
    _num_patches = LifeRegressMixin._num_patches
    # and its slimmed features path: forward_intermediates at a keep rate returns the slimmed path
    _slim_tokens = LifeRegressMixin._slim_tokens
    forward_intermediates = LifeRegressMixin.forward_intermediates

    def _default_keep_rate(self) -> float:
        return self.keep_rate

    def _init_mechanism(
            self,
            exit_head: Union[str, Sequence[str]] = 'linear',
            budget: Optional[float] = None,
            life_layer: Optional[int] = None,
            prune_layers: Optional[Sequence[int]] = None,
            keep_rate: float = 1.,
            train_keep_rate: float = DEFAULT_KEEP_RATE,
            min_keep_rate: float = .5,
            U: float = 1.5,
            **exit_kwargs: Any,
    ) -> None:
        """Check the arguments and add the exits and the life predictor to a built parent (``MultiExitMixin.__init__``
        splits them from the parent's; ``timm_exits.convert``).

        Args:
            exit_layers, exit_head, exit_criterion, threshold, exit_drop_rate, exit_weight, exit_num_sampled,
                exit_grad_scale: As ``MultiExitMixin`` (``exit_head`` one of ``POOLED_EXIT_HEADS``).
            budget: Default compute budget of ``forward``, a share (0, 1] of the parent's FLOPs (module docstring:
                the rule that picks the exit and the keep rate).
            life_layer, prune_layers, U: As ``LifeRegressMixin`` (default: ``default_life_layout``).
            keep_rate: Default rho in (0, 1] of ``forward`` (1.0: nothing dropped, the parent's answer).
            train_keep_rate: rho in (0, 1) whose schedule sets the target mean and std of the lives in train mode
                (eqs. 9-10, 003_*.txt); at rho = 1 every life would be T and the life predictor would get no gradient.
            min_keep_rate: Lowest keep rate a budget may pick, in (0, 1].
        """
        names = [exit_head] if isinstance(exit_head, str) else list(exit_head) \
            if isinstance(exit_head, Sequence) else []
        grid = sorted({h for h in names if h in EXIT_HEADS and h not in POOLED_EXIT_HEADS})
        if grid:
            raise ValueError(
                f'exit_head {grid} reads the patch tokens at their grid positions (or one weight per position), but '
                f'patch slimming keeps different patches in each image, so no grid is left after a prune layer; '
                f'allowed with slimming: {list(POOLED_EXIT_HEADS)} (they read [CLS] or the mean of the patches kept)')
        depth = len(self.blocks)
        life_layer, prune_layers = _check_layout(depth, life_layer, prune_layers)
        U = _check_temperature(U)
        keep_rate = check_fraction('keep_rate', keep_rate, low_open=True, allow_none=False)
        train_keep_rate = check_fraction('train_keep_rate', train_keep_rate, low_open=True, high_open=True,
                                         allow_none=False)
        min_keep_rate = check_fraction('min_keep_rate', min_keep_rate, low_open=True, allow_none=False)
        budget = None if budget is None else check_fraction('budget', budget, low_open=True)
        super()._init_mechanism(exit_head=exit_head, budget=None, **exit_kwargs)
        self.life_layer, self.prune_layers, self.U = life_layer, prune_layers, U
        self.keep_rate, self.train_keep_rate, self.min_keep_rate = keep_rate, train_keep_rate, min_keep_rate
        ref = next(self.parameters())
        self.life = LifeRegression(self.embed_dim, cls_query=self._has_cls(), device=ref.device, dtype=ref.dtype)
        for name, module in self.life.named_modules():
            init_weights_vit_timm(module, name)
        self.life.train(self.training)  # a converted model's new part follows its mode
        self.budget = budget
        if budget is not None:  # a default budget no option fits fails now, not at the first forward
            self._plan_budget(budget, None, self.threshold is not None)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Parent groups; each exit joins the group after its block, the life module that of ``life_layer``."""
        return add_block_group(super().group_matcher(coarse), (r'^life\.', (self.life_layer - 1,)))

    # --- compute accounting -----------------------------------------------------------------------------------

    def token_schedule(self, keep_rate: Optional[float] = None, img_size: Optional[Sequence[int]] = None
                       ) -> Tuple[int, ...]:
        """n_t, the patches (prefix tokens excluded) each block t = 1..depth runs on at ``keep_rate`` (default: the
        model's) and ``img_size`` (default: the model's input size)."""
        rate = self.keep_rate if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        return token_counts(self._patches_at(self._size(img_size)), self.depth, self.prune_layers, rate)

    def _schedule(self, keep_rate: Optional[float], img_size: Tuple[int, int]) -> Tuple[List[int], float, float]:
        """Patches per block at ``keep_rate`` (default: the model's) and the target mean and std of the lives (eqs.
        9-10, 003_*.txt)."""
        return self._plan(self.keep_rate if keep_rate is None else keep_rate, self._patches_at(img_size))

    def exit_costs_for(self, keep_rate: float, img_size: Optional[Sequence[int]] = None) -> Tuple[float, ...]:
        """Per exit, the share of the parent's FLOPs an image answering there costs at ``keep_rate`` (blocks on the
        slimmed schedule, the life module when anything is dropped, the exit's own head)."""
        rate = check_fraction('keep_rate', keep_rate, low_open=True, allow_none=False)
        return self._count_flops(None if img_size is None else tuple(img_size), rate)['costs']

    def threshold_costs_for(self, keep_rate: float, img_size: Optional[Sequence[int]] = None) -> Tuple[float, ...]:
        """``exit_costs_for`` with every exit head evaluated on the way (a threshold's path)."""
        rate = check_fraction('keep_rate', keep_rate, low_open=True, allow_none=False)
        return self._count_flops(None if img_size is None else tuple(img_size), rate)['threshold_costs']

    def flops_ratio(self, keep_rate: Optional[float] = None) -> float:
        """Share of the parent's FLOPs at full depth (final exit, no exit head on the way) at ``keep_rate``."""
        rate = self.keep_rate if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        return self._count_flops(None, rate)['costs'][-1]

    def plan_budget(self, budget: float, keep_rate: Optional[float] = None, threshold: bool = False
                    ) -> Tuple[float, int]:
        """(keep rate, exit) that ``budget`` picks (module docstring, "Budget rule"); ``threshold``: costs of a
        threshold's path."""
        budget = check_fraction('budget', budget, low_open=True, allow_none=False)
        rate = None if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        return self._plan_budget(budget, rate, threshold)

    def _plan_budget(self, budget: Optional[float], keep_rate: Optional[float], threshold_path: bool = False,
                     img_size: Optional[Tuple[int, int]] = None) -> Tuple[float, int]:
        """(keep rate, last exit) of a call on checked arguments; see the module docstring for the rule."""
        if budget is None:
            return (self.keep_rate if keep_rate is None else keep_rate), self.depth
        what = 'threshold_costs' if threshold_path else 'costs'
        key = ('budget', budget, keep_rate, what, self._size(img_size))
        if key in self._flops:
            return self._flops[key]

        def cost(rate: float, k: int) -> float:
            return self._count_flops(img_size, rate)[what][k]

        if keep_rate is not None:
            fits = [k for k in range(len(self.exit_layers)) if cost(keep_rate, k) <= budget + 1e-9]
            if not fits:
                low, k = min((cost(keep_rate, k), k) for k in range(len(self.exit_layers)))
                raise ValueError(
                    f'budget={budget:g} is below the cheapest exit at keep_rate={keep_rate:g} (block '
                    f'{self.exit_layers[k]}, cost {low:.4f} of the parent\'s FLOPs); allowed: {low:.4f} <= budget '
                    f'<= 1, or a lower keep_rate')
            plan = (keep_rate, self.exit_layers[fits[-1]])
        else:
            low = self.min_keep_rate

            def cheapest(k: int) -> float:  # at 1.0 no life module runs: the cheapest rate of the exits before slimming
                return min(cost(low, k), cost(1., k))

            fits = [k for k in range(len(self.exit_layers)) if cheapest(k) <= budget + 1e-9]
            if not fits:
                least, k = min((cheapest(k), k) for k in range(len(self.exit_layers)))
                raise ValueError(
                    f'budget={budget:g} is below the cheapest option (exit after block {self.exit_layers[k]}, keep '
                    f'rates in [min_keep_rate={low:g}, 1]: {least:.4f} of the parent\'s FLOPs); allowed: '
                    f'{least:.4f} <= budget <= 1')
            k = fits[-1]
            num = self._patches_at(self._size(img_size))
            rate = largest_rate(lambda r: cost(r, k) <= budget + 1e-9, low, num,
                                lambda r: token_counts(num, self.depth, self.prune_layers, r), self.prune_layers)
            plan = (rate, self.exit_layers[k])
        self._flops[key] = plan
        return plan

    # --- the slimmed path ---------------------------------------------------------------------------------------

    @torch.jit.unused
    def forward_dynamic(
            self,
            x: torch.Tensor,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
            keep_rate: Optional[float] = None,
            deadline_ms: Optional[float] = None,
    ) -> ExitOutput:
        """Per-image early exit on slimmed tokens.

        Args:
            x: (B, C, H, W) images.
            threshold: Exit threshold in [0, 1] for ``exit_criterion`` (default: the model's ``threshold``).
            budget: Share (0, 1] of the parent's FLOPs (default: the model's ``budget``), a ceiling on every image's
                ``cost``; it picks the keep rate too unless ``keep_rate`` is given (module docstring).
            keep_rate: rho in (0, 1] (default: the model's ``keep_rate``, unless a budget picks it).
            deadline_ms: Anytime inference: milliseconds from this call after which every image still running answers
                at the first exit reached (``exit_layer`` says which).

        Returns:
            ``ExitOutput(logits, exit_layer, cost)``; ``cost`` is the share of the parent's FLOPs each image spent
            (slimmed blocks, the life module when anything is dropped, exit heads on the way).
        """
        return self._forward_dynamic(x, threshold, budget, keep_rate, deadline_ms)

    @torch.jit.unused
    def forward_anytime(self, x: torch.Tensor, threshold: Optional[float] = None,
                        keep_rate: Optional[float] = None) -> Iterator[AnytimeStep]:
        """``MultiExitMixin.forward_anytime`` on the slimmed schedule of ``keep_rate`` (default: the model's)."""
        return self._anytime(x, threshold, keep_rate)

    # --- whole-batch paths: every exit, features, train mode ----------------------------------------------------

    def _soft_pass(self, x: torch.Tensor, grad_scale: float = 1., heads: bool = True, features: bool = False
                   ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Train mode: every token kept; after ``life_layer`` every attention is weighted by the soft weights of
        eqs. (6)-(7), 003_*.txt, mu and sigma from ``train_keep_rate``'s schedule. Returns the final tokens (before
        the norm) and, with ``heads``, every exit's logits (intermediate exits read ``scale_gradient(tokens,
        grad_scale)``; ``features``: their pre-logits features instead)."""
        _, mu, sigma = self._plan(self.train_keep_rate, self._num_patches(x))
        x, rope = self._embed(x)
        lives: Optional[torch.Tensor] = None
        outputs = []
        for i, blk in enumerate(self.blocks):
            mask = None if lives is None else self.life_attn_mask(lives, i + 1, x.dtype)
            block_rope = self._block_rope(rope, i)
            if self.grad_checkpointing:
                x = checkpoint(self._apply_block, blk, x, block_rope, mask)
            else:
                x = self._apply_block(blk, x, block_rope, mask)
            layer = i + 1
            if layer == self.life_layer:
                lives = self.life(x, self.num_prefix_tokens, mu, sigma)
            if heads and layer in self.exit_layers:
                tokens = x if layer == self.depth else scale_gradient(x, grad_scale)
                outputs.append(self.exit_features(layer, tokens) if features else self._exit_logits(layer, tokens))
        return x, outputs

    def forward_exits(self, x: torch.Tensor, keep_rate: Optional[float] = None) -> List[torch.Tensor]:
        """Logits of every exit for the whole batch at ``keep_rate`` (default: the model's), the final one last;
        train mode: the soft weights of eqs. (6)-(7) instead of dropping patches."""
        return self._forward_exits(x, keep_rate=keep_rate)

    def _forward_exits(self, x: torch.Tensor, grad_scale: float = 1., features: bool = False,
                       keep_rate: Optional[float] = None) -> List[torch.Tensor]:
        if self.training:
            return self._soft_pass(x, grad_scale, features=features)[1]
        rate = self.keep_rate if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        if features:
            if rate < 1.:
                raise ValueError(f'every exit\'s features of the whole batch are read at keep_rate=1 (eval mode), got '
                                 f'keep_rate={rate:g}; a slimmed walk gives each exit\'s answer (forward_anytime) '
                                 f'and the scale decides inside forward_dynamic')
            return super()._forward_exits(x, grad_scale, features=True)
        return [step.logits for step in self._walker(self._img_size(x), None, None, rate, every_head=True).anytime(x)]

    @torch.jit.unused
    def forward_features(self, x: torch.Tensor, keep_rate: Optional[float] = None) -> torch.Tensor:
        """Tokens after the final norm: the parent's at keep rate 1 (default), slimmed below it; train mode: every
        token, the soft weights of eqs. (6)-(7) after ``life_layer``."""
        if self.training:
            return self.norm(self._soft_pass(x, heads=False)[0])
        rate = self.keep_rate if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        if rate >= 1.:
            return super().forward_features(x)
        return self._slim_tokens(x, *self._plan(rate, self._num_patches(x)), [])[0]

    def forward(
            self,
            x: torch.Tensor,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
            keep_rate: Optional[float] = None,
    ) -> torch.Tensor:
        """(B, num_classes) logits. No argument (and the defaults ``keep_rate=1.0``, no threshold, no budget): the
        parent's answer. In train mode (grad enabled) the output carries every exit's MEViT loss into the backward
        (``MultiExitMixin``'s hook) on the soft-weighted tokens; the defaults apply in eval mode only.
        ``torch.jit.script`` compiles the full-depth, keep-rate-1 forward only (and refuses anything else)."""
        if torch.jit.is_scripting():
            if threshold is not None or budget is not None or keep_rate is not None or self.threshold is not None \
                    or self.budget is not None or self.keep_rate < 1.:
                raise RuntimeError('a scripted exits + slimming model runs full depth at keep rate 1 only: no '
                                   'threshold, budget or keep rate (as arguments or model defaults)')
            tokens, rope = self._embed(x)
            for i, blk in enumerate(self.blocks):
                tokens = self._script_block(i, tokens, self._block_rope(rope, i), None)
            return self.forward_head(self.norm(tokens))
        return self._forward_eager(x, threshold, budget, keep_rate)

    @torch.jit.unused
    def _forward_eager(
            self,
            x: torch.Tensor,
            threshold: Optional[float],
            budget: Optional[float],
            keep_rate: Optional[float],
    ) -> torch.Tensor:
        defaults = not self.training
        plain = threshold is None and budget is None and keep_rate is None and not (defaults and (
            self.threshold is not None or self.budget is not None or self.keep_rate < 1))
        if is_fx_tracing() or plain:
            if self.training and torch.is_grad_enabled() and self.num_classes > 0 and self.task == 'classification':
                return attach_exit_losses(  # here, not in MultiExitMixin._forward_train: torch.fx's leaf
                    *self._exit_loss_inputs(x), self.exit_weight, self.exit_num_sampled)
            return self.forward_head(self.forward_features(x))
        threshold, budget = self._resolve(threshold, budget, defaults)
        keep_rate = None if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
        return self._dynamic(x, threshold, budget, None, keep_rate).logits


@register_adapted
class MultiExitLifeRegressVisionTransformer(MultiExitLifeRegressMixin, VitAdapter, VisionTransformer):
    """timm ``VisionTransformer`` (ViT, DeiT, DINOv2, SigLIP, CLIP, ...) with early exits and LifeRegress slimming."""


@register_adapted
class MultiExitLifeRegressEva(MultiExitLifeRegressMixin, EvaAdapter, Eva):
    """timm ``Eva`` (EVA02, DINOv3, Perception Encoder, RoPE-ViT) with early exits and LifeRegress slimming; a kept
    patch keeps its rotary position embedding."""


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return _mexit_cfg(**{'paper_ids': None, **kwargs})


default_cfgs = generate_default_cfgs({
    'test_vit_mexit_liferegress.r32': _cfg(
        input_size=(3, 32, 32), num_classes=10, classifier=_classifier_names(4, default_exit_layers(4))),
})


def _create_mexit_liferegress(
        variant: str,
        pretrained: bool = False,
        parent: Optional[str] = None,
        **kwargs: Any,
) -> MultiExitLifeRegressMixin:
    """A model with exits and slimming on timm architecture ``parent`` (its own arguments and weights), or on a
    ``VisionTransformer`` of ``kwargs``."""
    return build_family(MultiExitLifeRegressMixin, variant, pretrained, parent=parent, classifier_fn=_classifiers,
                        **kwargs)


@register_model
def test_vit_mexit_liferegress(pretrained: bool = False, **kwargs) -> MultiExitLifeRegressMixin:
    """Tiny test variant: 32 px, 16 patches, 4 blocks, exits after blocks 2 and 3, lives predicted after block 1,
    patches leave after blocks 2 and 3."""
    model_args = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2., life_layer=1, prune_layers=(2, 3))
    return _create_mexit_liferegress('test_vit_mexit_liferegress', pretrained, **dict(model_args, **kwargs))


# ``<parent>_mexit_liferegress`` for every timm VisionTransformer / Eva architecture, every pretrained tag mirrored
register_twins(__name__, 'mexit_liferegress', _create_mexit_liferegress, _cfg,
               '``{parent}`` with early exits and LifeRegress patch slimming (parent: timm ``{parent}``, its weights '
               'and arguments).')
