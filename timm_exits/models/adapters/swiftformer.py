""" Adapter for timm's ``SwiftFormer`` (SwiftFormer XS, S, L1, L3). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.swiftformer import SwiftFormer

from ._base import FeatureMapAdapter

__all__ = ['SwiftFormerAdapter']


class SwiftFormerAdapter(FeatureMapAdapter):
    """``SwiftFormer``: stem, then the blocks of each stage (the stage's downsample goes with its first block), the
    final norm in ``_tail``. Its pretrained config marks it fixed input size."""
    parent_classes = (SwiftFormer,)
    timm_modules = ('swiftformer',)
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            blocks = list(stage.blocks)
            units.append((stage.downsample, blocks[0]))
            units.extend((blk,) for blk in blocks[1:])
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
