""" Adapter for timm's ``ResNetV2`` (BiT, pre-activation ResNet-V2, ResNet-V2 with GroupNorm/EvoNorm, ...). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.resnetv2 import ResNetV2

from ._base import FeatureMapAdapter

__all__ = ['ResNetV2Adapter']


class ResNetV2Adapter(FeatureMapAdapter):
    """``ResNetV2``: stem, then the blocks of each stage (downsampling in the first block), the final norm (pre-act
    models; an identity otherwise) in ``_tail``."""
    parent_classes = (ResNetV2,)
    timm_modules = ('resnetv2',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
