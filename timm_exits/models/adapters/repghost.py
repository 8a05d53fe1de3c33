""" Adapter for timm's ``RepGhostNet``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.repghost import RepGhostNet

from ._base import FeatureMapAdapter

__all__ = ['RepGhostNetAdapter']


class RepGhostNetAdapter(FeatureMapAdapter):
    """``RepGhostNet``: stem (conv_stem, bn1, act1), then every block of every stage of ``blocks``; global pool and
    conv_head are in ``forward_head``."""
    parent_classes = (RepGhostNet,)
    timm_modules = ('repghost',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.act1(self.bn1(self.conv_stem(x))), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.blocks for blk in stage]
