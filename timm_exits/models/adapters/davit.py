""" Adapter for timm's ``DaVit`` (DaViT tiny..giant). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.davit import DaVit

from ._base import FeatureMapAdapter

__all__ = ['DaVitAdapter']


class DaVitAdapter(FeatureMapAdapter):
    """``DaVit``: stem, then each stage's spatial (window) and channel attention blocks one by one (a stage's blocks
    are pairs of the two; the stage's downsample goes with its first block), ``norm_pre`` (an identity unless the
    head has no norm) in ``_tail``."""
    parent_classes = (DaVit,)
    timm_modules = ('davit',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            blocks = [blk for pair in stage.blocks for blk in pair]
            units.append((stage.downsample, blocks[0]))
            units.extend((blk,) for blk in blocks[1:])
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(x)
