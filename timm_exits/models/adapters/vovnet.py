""" Adapter for timm's ``VovNet`` (VoVNet v1/v2, ESE-VoVNet). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vovnet import VovNet

from ._base import FeatureMapAdapter

__all__ = ['VovNetAdapter']


class VovNetAdapter(FeatureMapAdapter):
    """``VovNet``: stem, then the OSA blocks of every stage (a stage's max pool with its first block); the pooled
    head in ``forward_head``."""
    parent_classes = (VovNet,)
    timm_modules = ('vovnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units: List[Tuple[nn.Module, ...]] = []
        for stage in self.stages:
            pool = () if stage.pool is None else (stage.pool,)
            units += [pool + (blk,) if i == 0 else (blk,) for i, blk in enumerate(stage.blocks)]
        return units
