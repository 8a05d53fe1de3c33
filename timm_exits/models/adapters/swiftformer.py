""" Adapter for timm's ``SwiftFormer``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.swiftformer import SwiftFormer

from ._base import FeatureMapAdapter

__all__ = ['SwiftFormerAdapter']


class SwiftFormerAdapter(FeatureMapAdapter):
    """``SwiftFormer``: stem, then the blocks of every stage (a stage's downsample with its first block), then the
    final norm; the mean of the two (distilled) classifiers in ``forward_head``."""
    parent_classes = (SwiftFormer,)
    timm_modules = ('swiftformer',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(stage.downsample, blk) if i == 0 else (blk,)
                for stage in self.stages for i, blk in enumerate(stage.blocks)]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
