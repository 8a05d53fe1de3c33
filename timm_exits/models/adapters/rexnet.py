""" Adapter for timm's ``RexNet`` (ReXNet, ReXNet-R). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.rexnet import RexNet

from ._base import FeatureMapAdapter

__all__ = ['RexNetAdapter']


class RexNetAdapter(FeatureMapAdapter):
    """``RexNet``: stem, then every module of ``features`` (the bottlenecks and the final 1x1 ConvNormAct)."""
    parent_classes = (RexNet,)
    timm_modules = ('rexnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.features]
