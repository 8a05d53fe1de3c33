""" Adapter for timm's ``ConvNeXt`` (ConvNeXt, ConvNeXt-V2, ConvNeXt atto..xxlarge, ...). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXt

from ._base import FeatureMapAdapter, stage_units

__all__ = ['ConvNeXtAdapter']


class ConvNeXtAdapter(FeatureMapAdapter):
    """``ConvNeXt``: stem, then the blocks of each stage (the stage's downsample goes with its first block),
    ``norm_pre`` (an identity unless the head has no norm) in ``_tail``."""
    parent_classes = (ConvNeXt,)
    timm_modules = ('convnext',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.stages)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(x)
