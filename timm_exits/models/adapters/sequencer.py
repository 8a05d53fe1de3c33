""" Adapter for timm's ``Sequencer2d`` (BiLSTM2D mixing, channels-last maps). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.sequencer import Sequencer2d

from ._base import FeatureMapAdapter

__all__ = ['Sequencer2dAdapter']


class Sequencer2dAdapter(FeatureMapAdapter):
    """``Sequencer2d``: stem (patch embedding to a (B, H, W, C) map), then the blocks of every stage (a stage's
    downsample with its first block), then the final norm."""
    parent_classes = (Sequencer2d,)
    timm_modules = ('sequencer',)
    state_layout = 'NHWC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(stage.downsample, blk) if i == 0 else (blk,)
                for stage in self.stages for i, blk in enumerate(stage.blocks)]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
