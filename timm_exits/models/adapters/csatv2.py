""" Adapter for timm's ``CSATv2``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.csatv2 import Block, CSATv2, TransformerBlock

from ._base import FeatureMapAdapter

__all__ = ['CSATv2Adapter']


class CSATv2Adapter(FeatureMapAdapter):
    """``CSATv2``: the learnable DCT stem, then the conv and transformer blocks of each stage, a stage's strided conv
    going with its first block and its trailing norm with its last; the head has its own norm."""
    parent_classes = (CSATv2,)
    timm_modules = ('csatv2',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem_dct(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units: List[Tuple[nn.Module, ...]] = []
        for stage in self.stages:
            pending: List[nn.Module] = []
            for layer in stage:
                pending.append(layer)
                if isinstance(layer, (Block, TransformerBlock)):
                    units.append(tuple(pending))
                    pending = []
            if pending:  # a trailing norm: with the stage's last block
                units[-1] = units[-1] + tuple(pending)
        return units
