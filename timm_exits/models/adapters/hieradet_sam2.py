""" Adapter for timm's ``HieraDet`` (SAM2's Hiera image encoders, as classifiers). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.hieradet_sam2 import HieraDet

from ._base import FeatureMapAdapter

__all__ = ['HieraDetAdapter']


class HieraDetAdapter(FeatureMapAdapter):
    """``HieraDet``: patch embedding and (interpolated) position embedding, then the blocks one by one on (B, H, W, C)
    maps (the first block of a stage pools); the norm is in the head."""
    parent_classes = (HieraDet,)
    timm_modules = ('hieradet_sam2',)
    state_layout = 'NHWC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self._pos_embed(self.patch_embed(x)), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.blocks]
