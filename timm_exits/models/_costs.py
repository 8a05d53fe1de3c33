""" One FLOP cost model for every family: the FLOPs of one image by pieces, counted with torch's flop counter.

Pieces: the embedding, a block at n patches, an exit head at n patches (the final one is the parent's norm and head;
a learned criterion's unit counted with its exit), the life module (at every patch). A path (blocks up to an exit on a
token schedule, the heads evaluated on the way, the life module when the schedule drops anything) is their sum, so
every family's ``exit_costs``, ``threshold_costs``, ``flops_ratio``, budgets and plans read the same numbers. Pieces are
counted once per input size (a block once per kind of block, all blocks of a ViT being alike) and kept in the model's
``_flops`` cache, which ``reset_classifier`` / ``set_input_size`` clear.
"""
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._base import count_flops
from .adapters import eval_mode

__all__ = ['cost_placement', 'largest_rate', 'path_flops', 'schedule_costs']

SDN_PLACEMENT = (.15, .3, .45, .6, .75, .9)  # Shallow-Deep Networks: exits nearest these shares of the FLOPs

Size = Tuple[int, int]


def _block_kind(blk: nn.Module) -> Tuple[Any, ...]:
    """Blocks of one class with the same parameter shapes cost the same at the same token count."""
    return (type(blk), tuple((name, tuple(p.shape)) for name, p in blk.named_parameters()))


class _Pieces:
    """FLOPs of one image through each piece of ``model`` at input size ``img_size``, counted on first use."""

    def __init__(self, model: nn.Module, img_size: Size) -> None:
        self.model, self.img_size, self.store = model, img_size, {}
        ref = next(model.parameters())
        x = torch.zeros(1, model._in_chans(), *img_size, device=ref.device, dtype=ref.dtype)
        self.grid = model._grid_at(img_size)
        with eval_mode(model):
            self.embed, (self.tokens, self.rope) = count_flops(
                lambda z: tuple(None if t is None else t.detach() for t in model._embed(z)), x)
        self.npt = getattr(model, 'num_prefix_tokens', 0)
        self.blocks = list(model._exit_blocks())
        self.maps = model.state_kind == 'map'
        self.states = [self.tokens]  # a feature map's input of each block (a ViT's blocks all see the embedding)
        if self.maps:
            with torch.no_grad(), eval_mode(model):
                for blk in self.blocks:
                    self.states.append(model._apply_block(blk, self.states[-1], None, None))
        self.kinds = [('unit', i) if self.maps else _block_kind(blk) for i, blk in enumerate(self.blocks)]

    def _count(self, key: Any, fn: Callable[[], Any]) -> int:
        """Counted inside ``count_flops`` (a tracer paused, grad on), so that a count taken while ``torch.jit.trace``
        records a forward leaves nothing in its graph."""
        if key not in self.store:
            with eval_mode(self.model):  # no BatchNorm statistics move, whatever the model's mode
                self.store[key] = count_flops(lambda _: fn(), self.tokens)[0]  # the tokens name the device
        return self.store[key]

    def _tokens(self, n: int, after: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The state a block sees: a ViT's first n patches (and prefix tokens), a feature map's after ``after``
        blocks."""
        if self.maps:
            return self.states[after], None
        rope = self.rope
        if n != self.tokens.shape[1] - self.npt:
            rope = self.model._keep_rope(rope, torch.arange(n, device=self.tokens.device)[None])
        return self.tokens[:, :self.npt + n], rope

    def block(self, i: int, n: int) -> int:
        """Block ``i`` (0-based) on n patches (and the prefix tokens)."""
        def run() -> torch.Tensor:
            z, rope = self._tokens(n, i)
            return self.model._apply_block(self.blocks[i], z, self.model._block_rope(rope, i), None)

        return self._count(('block', self.kinds[i], n), run)

    def exit(self, layer: int, n: int) -> int:
        """The exit after block ``layer`` (1-based; the depth: the final norm and head) on n patches, with the
        learned criterion's unit when the model's criterion reads one."""
        model = self.model

        def run() -> torch.Tensor:
            z = self._tokens(n, layer)[0]
            if layer == len(self.blocks):
                return model._final(z)
            if model.criterion.learned:
                return model._exit_with_unit(layer, z, self.grid)
            return model._exit_logits(layer, z, self.grid)

        return self._count(('exit', layer, n), run)

    def life(self, n: int) -> int:
        """The life-regression module on n patches."""
        return self._count(('life', n), lambda: self.model.life(self._tokens(n)[0], self.npt, 0., 1.))


def _pieces(model: nn.Module, img_size: Size) -> _Pieces:
    key = ('pieces', img_size)
    if key not in model._flops:
        model._flops[key] = _Pieces(model, img_size)
    return model._flops[key]


def path_flops(
        model: nn.Module,
        img_size: Size,
        counts: Sequence[int],
        layer: int,
        heads: Sequence[int],
) -> int:
    """FLOPs of one image running blocks 1..``layer`` on the schedule ``counts`` (patches per block), evaluating the
    exits ``heads`` on the way (each at the patches its block left) and, when the schedule drops anything and the
    path passes the model's ``life_layer``, the life module once at every patch (eqs. 1-3, 003_*.txt)."""
    p = _pieces(model, img_size)
    total = p.embed + sum(p.block(i, counts[i]) for i in range(layer)) + sum(p.exit(h, counts[h - 1]) for h in heads)
    life_layer = getattr(model, 'life_layer', None)
    if life_layer is not None and counts[-1] < counts[0] and layer > life_layer:
        total += p.life(counts[0])
    return total


@torch.compiler.disable  # counted eagerly, outside any graph being compiled
def schedule_costs(model: nn.Module, img_size: Size, counts: Sequence[int]) -> Dict[str, Any]:
    """Costs of one image at ``img_size`` on the schedule ``counts``, as shares of the parent's FLOPs (``full``: every
    patch through every block and the final head): per exit in ``model.exit_layers``, ``costs`` (blocks and its own
    head: a budget alone sends an image there) and ``threshold_costs`` (every exit head on the way too). Cached."""
    counts = tuple(counts)
    key = ('schedule', img_size, counts)
    if key not in model._flops:
        depth, layers = model.depth, model.exit_layers
        full = path_flops(model, img_size, (counts[0],) * depth, depth, (depth,))
        model._flops[key] = {
            'full': full,
            'counts': counts,
            'costs': tuple(path_flops(model, img_size, counts, layer, (layer,)) / full for layer in layers),
            'threshold_costs': tuple(
                path_flops(model, img_size, counts, layer, layers[:k + 1]) / full for k, layer in enumerate(layers)),
        }
    return model._flops[key]


def largest_rate(fits: Callable[[float], bool], low: float, num_patches: int, counts: Callable[[float], Sequence[int]],
                 prune_layers: Sequence[int]) -> float:
    """Largest keep rate in [``low``, 1] for which ``fits(rate)``, given that ``fits(low)`` or ``fits(1.)`` holds.

    The cost is a step function of the rate (integer token counts, eqs. 9-10, 003_*.txt): bisection, then the right
    end of the step found (the largest rate giving the same ``counts``), which costs the same.
    """
    if fits(1.):
        return 1.
    lo, hi = low, 1.
    while hi - lo > 1 / (4 * num_patches * num_patches):  # steps are at least 1 / N^2 wide
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    c = counts(lo)
    rate = max(lo, min(c[p] / c[p - 1] for p in prune_layers))
    return rate if fits(rate) else lo


def cost_placement(model: nn.Module, img_size: Size, shares: Sequence[float] = SDN_PLACEMENT) -> Tuple[int, ...]:
    """Exits after the blocks (1-based) whose cumulative FLOPs (embedding and blocks, of the parent's total with its
    final head) lie closest to each of ``shares`` (Shallow-Deep Networks' placement), the last block excluded."""
    p = _pieces(model, img_size)
    depth = len(p.blocks)
    done = [p.embed]
    for i in range(depth):
        done.append(done[-1] + p.block(i, 1))
    full = done[-1] + p.exit(depth, 1)
    picked = {min(range(1, depth + 1), key=lambda k: abs(done[k] / full - share)) for share in shares}
    return tuple(sorted(k for k in picked if k < depth))
