""" Adapter for timm's ``MobileNetV3`` (MobileNetV3, MobileNetV4, LCNet, FBNetV3, HardCoReNAS). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.mobilenetv3 import MobileNetV3

from ._base import FeatureMapAdapter

__all__ = ['MobileNetV3Adapter']


class MobileNetV3Adapter(FeatureMapAdapter):
    """``MobileNetV3``: stem (conv_stem, bn1), then every block of every stage of ``blocks``; global pool, conv_head,
    norm_head and act2 are in ``forward_head``, so there is no tail."""
    parent_classes = (MobileNetV3,)
    timm_modules = ('mobilenetv3', 'hardcorenas')

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.bn1(self.conv_stem(x)), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.blocks for blk in stage]
