""" Adapter for timm's ``Twins`` (Twins-PCPVT, Twins-SVT): blocks that take tokens and their grid, on the grid. """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.twins import Twins

from ._base import FeatureMapAdapter

__all__ = ['TwinsAdapter']


def _grid_block(blk: nn.Module, pos_blk: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """A Twins block (then the stage's position block, after its first block) on a (B, H, W, C) map."""
    size = (x.shape[1], x.shape[2])
    y = blk(x.reshape(x.shape[0], -1, x.shape[3]), size)
    if pos_blk is not None:
        y = pos_blk(y, size)
    return y.reshape(x.shape[0], *size, -1)


def _grid_embed(embed: nn.Module, drop: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A stage's patch embed (and dropout) from the (B, H, W, C) map of the stage before, to a (B, H', W', C') map."""
    x, size = embed(x.permute(0, 3, 1, 2).contiguous())
    return drop(x).reshape(x.shape[0], *size, -1)


class TwinsAdapter(FeatureMapAdapter):
    """``Twins``: per stage its patch embed (and dropout, with the stage's first block), then each block, the
    position-encoding generator (``pos_block``) going with the stage's first block. The blocks take tokens and
    their grid, so the state is the tokens as a (B, H, W, C) map (no prefix token); the tail flattens the last
    stage's map to tokens and applies the final norm."""
    parent_classes = (Twins,)
    timm_modules = ('twins',)
    state_layout = 'NHWC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x, size = self.patch_embeds[0](x)
        return self.pos_drops[0](x).reshape(x.shape[0], *size, -1), None

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        units: List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = []
        for i, (embed, drop, blocks, pos_blk) in enumerate(
                zip(self.patch_embeds, self.pos_drops, self.blocks, self.pos_block)):
            first = () if i == 0 else (partial(_grid_embed, embed, drop),)
            units += [first + (partial(_grid_block, blocks[0], pos_blk),)]
            units += [(partial(_grid_block, blk, None),) for blk in blocks[1:]]
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.reshape(x.shape[0], -1, x.shape[3]))
