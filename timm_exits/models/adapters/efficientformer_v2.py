""" Adapter for timm's ``EfficientFormerV2`` (EfficientFormer-V2 S0, S1, S2, L). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.efficientformer_v2 import EfficientFormerV2

from ._base import FeatureMapAdapter, stage_units

__all__ = ['EfficientFormerV2Adapter']


class EfficientFormerV2Adapter(FeatureMapAdapter):
    """``EfficientFormerV2``: stem, then the blocks of each stage (the stage's downsample goes with its first block),
    the final norm in ``_tail``. Attention biases follow the build size, so it runs at that size only."""
    parent_classes = (EfficientFormerV2,)
    timm_modules = ('efficientformer_v2',)
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.stages)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
