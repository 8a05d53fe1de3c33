""" Adapter for timm's ``EfficientVitMsra`` (EfficientViT, MSRA). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.efficientvit_msra import EfficientVitMsra

from ._base import FeatureMapAdapter

__all__ = ['EfficientVitMsraAdapter']


class EfficientVitMsraAdapter(FeatureMapAdapter):
    """``EfficientVitMsra``: stem (patch_embed), then the EfficientViT blocks of every stage (a stage's downsample, patch
    merging between residual blocks, with its first block); window attention pads, so any input size runs."""
    parent_classes = (EfficientVitMsra,)
    timm_modules = ('efficientvit_msra',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.patch_embed(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(stage.downsample, blk) if i == 0 else (blk,)
                for stage in self.stages for i, blk in enumerate(stage.blocks)]
