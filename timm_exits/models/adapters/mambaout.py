""" Adapter for timm's ``MambaOut`` (MambaOut femto..base). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.mambaout import MambaOut

from ._base import FeatureMapAdapter, stage_units

__all__ = ['MambaOutAdapter']


class MambaOutAdapter(FeatureMapAdapter):
    """``MambaOut``: stem, then the blocks of each stage (the stage's downsample goes with its first block) on
    (B, H, W, C) maps; the norm is in the head."""
    parent_classes = (MambaOut,)
    timm_modules = ('mambaout',)
    state_layout = 'NHWC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.stages)
