""" Adapter for timm's ``PoolingVisionTransformer`` (PiT, its distilled twins): the class token(s) and the patch
tokens of each stage in one token tensor. """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.pit import PoolingVisionTransformer

from ._base import FeatureMapAdapter

__all__ = ['PitAdapter']


def _enter_stage(num_tokens: int, grid: Tuple[int, int], stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A stage's entry on tokens (class tokens first) of the ``grid`` before it: its pooling of the map and of the
    class tokens, then its norm, as ``Transformer.forward`` does between two stages."""
    cls_tokens, x = x[:, :num_tokens], x[:, num_tokens:]
    x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    if stage.pool is not None:
        x, cls_tokens = stage.pool(x, cls_tokens)
    return stage.norm(torch.cat((cls_tokens, x.flatten(2).transpose(1, 2)), dim=1))


class PitAdapter(FeatureMapAdapter):
    """``PoolingVisionTransformer``: patch embed plus position embedding, the class token(s) prepended, then the
    blocks of each stage (the stage's pooling, of the patch map and of the class tokens, and its norm go with its
    first block). The state is tokens (B, T + H * W, C), the T = ``num_tokens`` class (and distillation) tokens
    first; the stage grids follow from the position embedding's and the pooling convolutions' sizes. The tail
    keeps the class tokens and norms them (``forward_features``). The position embedding is added without
    resampling, so the model runs only at the size it was built for."""
    parent_classes = (PoolingVisionTransformer,)
    timm_modules = ('pit',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)), dim=1), None

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        grid = tuple(self.pos_embed.shape[-2:])
        units: List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = []
        for stage in self.transformers:
            units.append((partial(_enter_stage, self.num_tokens, grid, stage), stage.blocks[0]))
            units += [(blk,) for blk in stage.blocks[1:]]
            if stage.pool is not None:
                conv = stage.pool.conv
                grid = tuple((g + 2 * p - k) // s + 1 for g, p, k, s in zip(grid, conv.padding, conv.kernel_size,
                                                                           conv.stride))
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, :self.num_tokens])
