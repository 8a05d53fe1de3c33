""" Adapter for timm's ``RegNet`` (RegNetX, RegNetY, RegNetV pre-activation). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.regnet import RegNet

from ._base import FeatureMapAdapter

__all__ = ['RegNetAdapter']


class RegNetAdapter(FeatureMapAdapter):
    """``RegNet``: stem, then the blocks b1..bN of stages s1..s4 (stride in each stage's first block), then
    final_conv (a 1x1 conv or an activation or identity); the pooled head in ``forward_head``."""
    parent_classes = (RegNet,)
    timm_modules = ('regnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in (self.s1, self.s2, self.s3, self.s4) for blk in stage.children()]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)
