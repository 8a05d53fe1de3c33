""" Adapter for timm's ``EfficientVit`` and ``EfficientVitLarge`` (MIT EfficientViT B0..B3, L1..L3). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.efficientvit_mit import EfficientVit, EfficientVitLarge

from ._base import FeatureMapAdapter

__all__ = ['EfficientVitAdapter']


class EfficientVitAdapter(FeatureMapAdapter):
    """``EfficientVit`` / ``EfficientVitLarge``: stem, then the blocks of each stage (the first, a strided MBConv,
    downsamples); the head has its own convolution and norm."""
    parent_classes = (EfficientVit, EfficientVitLarge)
    timm_modules = ('efficientvit_mit',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage.blocks]
