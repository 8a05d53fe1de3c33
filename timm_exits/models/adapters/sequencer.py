""" Adapter for timm's ``Sequencer2d`` (Sequencer: BiLSTM token mixing on a (B, H, W, C) grid). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.sequencer import Sequencer2d

from ._base import FeatureMapAdapter

__all__ = ['Sequencer2dAdapter']


class Sequencer2dAdapter(FeatureMapAdapter):
    """``Sequencer2d``: patch stem to a (B, H, W, C) grid, then the blocks of each stage (a stage's downsample goes
    with its first block); the final norm is the tail. No prefix token."""
    parent_classes = (Sequencer2d,)
    timm_modules = ('sequencer',)
    state_layout = 'NHWC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            first = () if isinstance(stage.downsample, nn.Identity) else (stage.downsample,)
            units += [first + (stage.blocks[0],)] + [(blk,) for blk in stage.blocks[1:]]
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
