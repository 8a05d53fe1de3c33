""" Adapter for timm's ``NextViT`` (Next-ViT small, base, large). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.nextvit import NextViT

from ._base import FeatureMapAdapter

__all__ = ['NextViTAdapter']


class NextViTAdapter(FeatureMapAdapter):
    """``NextViT``: stem, then the blocks of each stage (the first block of a stage strides), the final norm in
    ``_tail``."""
    parent_classes = (NextViT,)
    timm_modules = ('nextvit',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
