""" Adapter for timm's ``FasterNet``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.fasternet import FasterNet

from ._base import FeatureMapAdapter

__all__ = ['FasterNetAdapter']


class FasterNetAdapter(FeatureMapAdapter):
    """``FasterNet``: stem (patch_embed), then the MLP blocks of every stage (a stage's patch merging with its first
    block); global pool and conv_head are in ``forward_head``."""
    parent_classes = (FasterNet,)
    timm_modules = ('fasternet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.patch_embed(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(stage.downsample, blk) if i == 0 else (blk,)
                for stage in self.stages for i, blk in enumerate(stage.blocks)]
