""" Adapter for timm's ``ResNet`` (ResNet, ResNeXt, SE-ResNet, ECA-ResNet, ResNet-D, Wide ResNet, ...). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.resnet import ResNet

from ._base import FeatureMapAdapter

__all__ = ['ResNetAdapter']


class ResNetAdapter(FeatureMapAdapter):
    """``ResNet``: stem (conv1, bn1, act1, maxpool), then the blocks of layer1..layer4 (stride and downsample in each
    layer's first block), global pool and fc in ``forward_head``."""
    parent_classes = (ResNet,)
    timm_modules = ('resnet', 'resnest', 'res2net', 'sknet')

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.maxpool(self.act1(self.bn1(self.conv1(x)))), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for blk in layer]
