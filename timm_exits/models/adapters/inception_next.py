""" Adapter for timm's ``MetaNeXt`` (InceptionNeXt). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.inception_next import MetaNeXt

from ._base import FeatureMapAdapter, stage_units

__all__ = ['MetaNeXtAdapter']


class MetaNeXtAdapter(FeatureMapAdapter):
    """``MetaNeXt``: stem, then the blocks of each stage (the stage's downsample goes with its first block); the
    norm is in the head."""
    parent_classes = (MetaNeXt,)
    timm_modules = ('inception_next',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.stages)
