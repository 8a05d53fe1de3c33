""" Adapter for timm's ``ConvMixer``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.convmixer import ConvMixer

from ._base import FeatureMapAdapter

__all__ = ['ConvMixerAdapter']


class ConvMixerAdapter(FeatureMapAdapter):
    """``ConvMixer``: stem (patch convolution), then every mixer block of ``blocks``."""
    parent_classes = (ConvMixer,)
    timm_modules = ('convmixer',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.blocks]
