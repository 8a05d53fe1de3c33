""" Adapter for timm's ``GlobalContextVit`` (GC ViT xxtiny..base). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.gcvit import GlobalContextVit

from ._base import FeatureMapAdapter

__all__ = ['GlobalContextVitAdapter']


class GlobalContextVitAdapter(FeatureMapAdapter):
    """``GlobalContextVit``: stem, then each stage as one unit: every block of a stage attends to the global query
    the stage computes from its (downsampled) input, which no single map between blocks carries. Window sizes follow
    the build size, so it runs at that size only."""
    parent_classes = (GlobalContextVit,)
    timm_modules = ('gcvit',)
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(stage,) for stage in self.stages]
