""" Adapter for timm's ``EfficientNet`` (EfficientNet, MixNet, MNASNet, MobileNetV2, FBNet, TinyNet, ...). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.efficientnet import EfficientNet

from ._base import FeatureMapAdapter

__all__ = ['EfficientNetAdapter']


class EfficientNetAdapter(FeatureMapAdapter):
    """``EfficientNet``: stem (conv_stem, bn1), then every block of every stage of ``blocks``, then conv_head and bn2
    (in ``forward_features``); global pool and classifier in ``forward_head``."""
    parent_classes = (EfficientNet,)
    timm_modules = ('efficientnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.bn1(self.conv_stem(x)), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.blocks for blk in stage]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(x))
