""" Adapter for timm's ``SHViT`` (single-head vision transformer, a convolutional map throughout). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.shvit import SHViT

from ._base import FeatureMapAdapter

__all__ = ['SHViTAdapter']


class SHViTAdapter(FeatureMapAdapter):
    """``SHViT``: stem (patch_embed), then the blocks of every stage (a stage's downsample with its first block)."""
    parent_classes = (SHViT,)
    timm_modules = ('shvit',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.patch_embed(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(stage.downsample, blk) if i == 0 else (blk,)
                for stage in self.stages for i, blk in enumerate(stage.blocks)]
