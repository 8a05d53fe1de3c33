""" Adapter for timm's ``CSATv2``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.csatv2 import Block, CSATv2, TransformerBlock

from ._base import FeatureMapAdapter

__all__ = ['CSATv2Adapter']


class CSATv2Adapter(FeatureMapAdapter):
    """``CSATv2``: stem (the learnable DCT, ``stem_dct``), then every conv and transformer block of the stages (the
    norm ending a stage and the next stage's downsampling conv go with the block after them); what follows the last
    block is the tail."""
    parent_classes = (CSATv2,)
    timm_modules = ('csatv2',)

    def _groups(self) -> Tuple[List[Tuple[nn.Module, ...]], Tuple[nn.Module, ...]]:
        """The units and the modules after the last block."""
        units: List[Tuple[nn.Module, ...]] = []
        pending: List[nn.Module] = []
        for m in (m for stage in self.stages for m in stage):
            pending.append(m)
            if isinstance(m, (Block, TransformerBlock)):
                units.append(tuple(pending))
                pending = []
        return units, tuple(pending)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem_dct(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return self._groups()[0]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._groups()[1]:
            x = m(x)
        return x
