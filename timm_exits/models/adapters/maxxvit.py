""" Adapter for timm's ``MaxxVit`` (MaxViT, MaxxViT, MaxxViT-V2, CoAtNet, CoAtNeXt). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.maxxvit import MaxxVit

from ._base import FeatureMapAdapter

__all__ = ['MaxxVitAdapter']


class MaxxVitAdapter(FeatureMapAdapter):
    """``MaxxVit``: stem, then the blocks of each stage (the first block of a stage strides), the final norm (an
    identity when the head has its own norm) in ``_tail``. Window, grid and relative position sizes follow the image
    size the model was built for, so it runs at that size only."""
    parent_classes = (MaxxVit,)
    timm_modules = ('maxxvit',)
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
