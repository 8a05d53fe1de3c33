""" Adapter for timm's ``SHViT`` (SHViT S1..S4). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.shvit import SHViT

from ._base import FeatureMapAdapter

__all__ = ['SHViTAdapter']


class SHViTAdapter(FeatureMapAdapter):
    """``SHViT``: patch embedding, then the blocks of each stage (the stage's downsample goes with its first block);
    the norm is in the head."""
    parent_classes = (SHViT,)
    timm_modules = ('shvit',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.patch_embed(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            blocks = list(stage.blocks)
            units.append((stage.downsample, blocks[0]))
            units.extend((blk,) for blk in blocks[1:])
        return units
