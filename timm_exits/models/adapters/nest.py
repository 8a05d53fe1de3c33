""" Adapter for timm's ``Nest`` (NesT: transformer blocks within image blocks, aggregated between levels). """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.nest import Nest, blockify, deblockify

from ._base import FeatureMapAdapter

__all__ = ['NestAdapter']


def _block(level: nn.Module, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A NesT transformer layer, which takes (B, T, N, C) image blocks, on the (B, T * N, C) tokens of ``level``."""
    return blk(x.reshape(x.shape[0], level.pos_embed.shape[1], -1, x.shape[2])).flatten(1, 2)


def _to_map(level: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (B, T * N, C) tokens of ``level`` as the (B, C, H, W) map the level returns."""
    x = x.reshape(x.shape[0], level.pos_embed.shape[1], -1, x.shape[2])
    return deblockify(x, level.block_size).permute(0, 3, 1, 2)


def _enter(level: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A level's entry (pool, blockify, position embedding) on a (B, C, H, W) map, to its (B, T * N, C) tokens."""
    x = blockify(level.pool(x).permute(0, 2, 3, 1), level.block_size)
    return (x + level.pos_embed).flatten(1, 2)


class NestAdapter(FeatureMapAdapter):
    """``Nest``: patch embed and the first level's entry, then each transformer layer of each level (a level's
    entry, undoing the previous level's blocks to a map, pooling and blockifying, goes with its first layer). The
    state is the tokens of all image blocks (B, T * N, C), block by block, no prefix token. The tail is the last
    level's map and the final (channel) norm. The position embeddings are sized by the grid, so the model runs only
    at the size it was built for."""
    parent_classes = (Nest,)
    timm_modules = ('nest',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return _enter(self.levels[0], self.patch_embed(x)), None

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        units: List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = []
        for i, level in enumerate(self.levels):
            first = () if i == 0 else (partial(_to_map, self.levels[i - 1]), partial(_enter, level))
            units += [first + (partial(_block, level, blk),) if j == 0 else (partial(_block, level, blk),)
                      for j, blk in enumerate(level.transformer_encoder)]
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_map(self.levels[-1], x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
