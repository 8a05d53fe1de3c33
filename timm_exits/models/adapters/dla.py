""" Adapter for timm's ``DLA`` (Deep Layer Aggregation). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.dla import DLA

from ._base import FeatureMapAdapter

__all__ = ['DLAAdapter']


class DLAAdapter(FeatureMapAdapter):
    """``DLA``: stem (base_layer), then the levels level0..level5, each one unit: a level's tree passes its children
    and shortcut between sub-trees, so it cannot be cut below a level."""
    parent_classes = (DLA,)
    timm_modules = ('dla',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.base_layer(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(level,) for level in (self.level0, self.level1, self.level2, self.level3, self.level4, self.level5)]
