""" Adapter for timm's ``CPUBone`` (CPUBone B0..B3 and variants). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.cpubone import CPUBone

from ._base import FeatureMapAdapter

__all__ = ['CPUBoneAdapter']


class CPUBoneAdapter(FeatureMapAdapter):
    """``CPUBone``: stem, then the blocks of each stage (a Sequential of blocks, the first strides); the head has
    its own convolution and norm."""
    parent_classes = (CPUBone,)
    timm_modules = ('cpubone',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage]
