""" Adapter for timm's ``HighPerfGpuNet`` (PP-HGNet, PP-HGNetV2). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.hgnet import HighPerfGpuNet

from ._base import FeatureMapAdapter

__all__ = ['HighPerfGpuNetAdapter']


class HighPerfGpuNetAdapter(FeatureMapAdapter):
    """``HighPerfGpuNet``: stem, then the HG blocks of every stage (a stage's downsample with its first block); the
    head (pool, last_conv, fc) in ``forward_head``."""
    parent_classes = (HighPerfGpuNet,)
    timm_modules = ('hgnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(stage.downsample, blk) if i == 0 else (blk,)
                for stage in self.stages for i, blk in enumerate(stage.blocks)]
