""" Adapter for timm's ``CspNet`` (CSPResNet, CSPResNeXt, CSPDarkNet, DarkNet, CS3 models). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.cspnet import CspNet, DarkStage

from ._base import FeatureMapAdapter

__all__ = ['CspNetAdapter']


class CspNetAdapter(FeatureMapAdapter):
    """``CspNet``: stem, then per stage either its blocks (a ``DarkStage``: ``conv_down`` goes with the first block)
    or the whole stage as one unit (``CrossStage``, ``CrossStage3``: the blocks run on half the channels, which
    join the other half only after the last block)."""
    parent_classes = (CspNet,)
    timm_modules = ('cspnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            if type(stage) is DarkStage:
                blocks = list(stage.blocks)
                units.append((stage.conv_down, blocks[0]))
                units.extend((blk,) for blk in blocks[1:])
            else:
                units.append((stage,))
        return units
