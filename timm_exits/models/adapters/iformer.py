""" Adapter for timm's ``IFormer`` (iFormer T..L). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.iformer import IFormer

from ._base import FeatureMapAdapter, stage_units

__all__ = ['IFormerAdapter']


class IFormerAdapter(FeatureMapAdapter):
    """``IFormer``: stem, then the blocks of each stage (the stage's downsample goes with its first block); the
    norm is in the head."""
    parent_classes = (IFormer,)
    timm_modules = ('iformer',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.stages)
