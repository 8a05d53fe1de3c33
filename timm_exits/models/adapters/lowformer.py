""" Adapter for timm's ``LowFormer`` (LowFormer B0..B3). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.lowformer import LowFormer

from ._base import FeatureMapAdapter

__all__ = ['LowFormerAdapter']


class LowFormerAdapter(FeatureMapAdapter):
    """``LowFormer``: stem, then the blocks of each stage (a Sequential of blocks, the first strides); the head has
    its own convolution and norm."""
    parent_classes = (LowFormer,)
    timm_modules = ('lowformer',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage]
