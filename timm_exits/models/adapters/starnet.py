""" Adapter for timm's ``StarNet``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.starnet import StarNet

from ._base import FeatureMapAdapter

__all__ = ['StarNetAdapter']


class StarNetAdapter(FeatureMapAdapter):
    """``StarNet``: stem, then the star blocks of every stage (a stage is a Sequential whose first module, the
    downsampling ConvBN, goes with its first block), then the final norm."""
    parent_classes = (StarNet,)
    timm_modules = ('starnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units: List[Tuple[nn.Module, ...]] = []
        for stage in self.stages:
            mods = list(stage)
            units += [tuple(mods[:2])] + [(blk,) for blk in mods[2:]]
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
