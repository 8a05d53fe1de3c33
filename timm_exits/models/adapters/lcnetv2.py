""" Adapter for timm's ``LCNetV2`` (PP-LCNetV2). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.lcnetv2 import LCNetV2

from ._base import FeatureMapAdapter

__all__ = ['LCNetV2Adapter']


class LCNetV2Adapter(FeatureMapAdapter):
    """``LCNetV2``: stem, then every block of every stage; global pool and conv_head are in ``forward_head``."""
    parent_classes = (LCNetV2,)
    timm_modules = ('lcnetv2',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage]
