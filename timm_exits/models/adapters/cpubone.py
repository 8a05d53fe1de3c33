""" Adapter for timm's ``CPUBone``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.cpubone import CPUBone

from ._base import FeatureMapAdapter

__all__ = ['CPUBoneAdapter']


class CPUBoneAdapter(FeatureMapAdapter):
    """``CPUBone``: stem, then every block of every stage (a stage's stride in its first block); the head (in_conv,
    pool, MLP classifier) in ``forward_head``."""
    parent_classes = (CPUBone,)
    timm_modules = ('cpubone',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage]
