""" Adapter for timm's ``FocalNet`` (FocalNet tiny..huge, SRF and LRF). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.focalnet import FocalNet

from ._base import FeatureMapAdapter, stage_units

__all__ = ['FocalNetAdapter']


class FocalNetAdapter(FeatureMapAdapter):
    """``FocalNet``: stem, then the blocks of each stage (the stage's downsample goes with its first block), the final
    norm in ``_tail``."""
    parent_classes = (FocalNet,)
    timm_modules = ('focalnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.layers)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
