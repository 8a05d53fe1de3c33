""" Adapter for timm's legacy ``SENet`` (legacy SE-ResNet, SE-ResNeXt, SENet-154). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.senet import SENet

from ._base import FeatureMapAdapter

__all__ = ['SENetAdapter']


class SENetAdapter(FeatureMapAdapter):
    """``SENet``: stem (layer0, pool0), then the blocks of layer1..layer4; global pool and last_linear in
    ``forward_head``."""
    parent_classes = (SENet,)
    timm_modules = ('senet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.pool0(self.layer0(x)), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for blk in layer]
