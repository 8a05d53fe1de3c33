""" Adapter for timm's ``MultiScaleVit`` (MViT-V2 tiny..huge, with and without class token). """
import math
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.mvitv2 import MultiScaleVit

from ._base import FeatureMapAdapter

__all__ = ['MultiScaleVitAdapter']


def _on_square_grid(block: nn.Module, prefix: int, x: torch.Tensor) -> torch.Tensor:
    """``block`` on tokens (B, prefix + H * W, C) of a square grid, which it takes with its grid size."""
    side = math.isqrt(x.shape[1] - prefix)
    if side * side != x.shape[1] - prefix:
        raise ValueError(f'MultiScaleVitAdapter serves square grids; {x.shape[1] - prefix} patch tokens are not one')
    return block(x, [side, side])[0]


class MultiScaleVitAdapter(FeatureMapAdapter):
    """``MultiScaleVit``: patch embedding, class token and position embedding where the model has them (tokens
    (B, N, C), the class token first), then the blocks one by one (a block that pools its queries shrinks the
    grid; the grid size each block takes is read off the token count of a square grid), the final norm in
    ``_tail``. Relative positions follow the build size, so it runs at that (square) size only."""
    parent_classes = (MultiScaleVit,)
    timm_modules = ('mvitv2',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x, _ = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x, None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        prefix = 0 if self.cls_token is None else 1
        return [(partial(_on_square_grid, blk, prefix),) for stage in self.stages for blk in stage.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
