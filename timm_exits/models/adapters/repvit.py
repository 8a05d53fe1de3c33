""" Adapter for timm's ``RepVit`` (RepViT). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.repvit import RepVit

from ._base import FeatureMapAdapter

__all__ = ['RepVitAdapter']


class RepVitAdapter(FeatureMapAdapter):
    """``RepVit``: stem, then the RepViT blocks of every stage (a stage's downsample with its first block); mean
    pooling and the (distilled) classifier in ``forward_head``."""
    parent_classes = (RepVit,)
    timm_modules = ('repvit',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(stage.downsample, blk) if i == 0 else (blk,)
                for stage in self.stages for i, blk in enumerate(stage.blocks)]
