""" Adapter for timm's ``NormFreeNet`` (NFNet-F, NF-ResNet, NF-RegNet, ECA-NFNet, NF-SE-ResNet, ...). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.nfnet import NormFreeNet

from ._base import FeatureMapAdapter

__all__ = ['NormFreeNetAdapter']


class NormFreeNetAdapter(FeatureMapAdapter):
    """``NormFreeNet``: stem, then the blocks of each stage (a Sequential of blocks, the first strides),
    ``final_conv`` and ``final_act`` in ``_tail``."""
    parent_classes = (NormFreeNet,)
    timm_modules = ('nfnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.final_conv(x))
