""" Adapter for timm's ``Hiera`` (Hiera tiny..huge, AbsWin variants). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.hiera import Hiera

from ._base import FeatureMapAdapter

__all__ = ['HieraAdapter']


class HieraAdapter(FeatureMapAdapter):
    """``Hiera``: patch embedding, position embedding and unroll (tokens in mask-unit order, (B, N, C)), then the
    blocks one by one (the first block of a stage pools the queries); the norm is in the head. No mask (eval mode).
    Position embeddings and the unroll follow the build size, so it runs at that size only."""
    parent_classes = (Hiera,)
    timm_modules = ('hiera',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.unroll(self._pos_embed(self.patch_embed(x, mask=None))), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.blocks]
