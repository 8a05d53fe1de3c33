""" Adapter for timm's ``GhostNet`` (GhostNet v1, v2, v3). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.ghostnet import GhostNet

from ._base import FeatureMapAdapter

__all__ = ['GhostNetAdapter']


class GhostNetAdapter(FeatureMapAdapter):
    """``GhostNet``: stem (conv_stem, bn1, act1), then every block of every stage of ``blocks``; global pool and
    conv_head are in ``forward_head``."""
    parent_classes = (GhostNet,)
    timm_modules = ('ghostnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.act1(self.bn1(self.conv_stem(x))), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.blocks for blk in stage]
