""" Adapter for timm's ``EdgeNeXt`` (EdgeNeXt xx-small..base). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.edgenext import EdgeNeXt

from ._base import FeatureMapAdapter, stage_units

__all__ = ['EdgeNeXtAdapter']


class EdgeNeXtAdapter(FeatureMapAdapter):
    """``EdgeNeXt``: stem, then the blocks of each stage (the stage's downsample goes with its first block),
    ``norm_pre`` (an identity unless the head has no norm) in ``_tail``."""
    parent_classes = (EdgeNeXt,)
    timm_modules = ('edgenext',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.stages)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(x)
