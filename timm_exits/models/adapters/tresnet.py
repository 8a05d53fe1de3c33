""" Adapter for timm's ``TResNet``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.tresnet import TResNet

from ._base import FeatureMapAdapter

__all__ = ['TResNetAdapter']


class TResNetAdapter(FeatureMapAdapter):
    """``TResNet``: stem (the modules of ``body`` before layer1: space-to-depth, conv1), then the blocks of
    layer1..layer4."""
    parent_classes = (TResNet,)
    timm_modules = ('tresnet',)
    _layers = ('layer1', 'layer2', 'layer3', 'layer4')

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        for name, m in self.body.named_children():
            if name in self._layers:
                break
            x = m(x)
        return x, None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for name, layer in self.body.named_children() if name in self._layers for blk in layer]
