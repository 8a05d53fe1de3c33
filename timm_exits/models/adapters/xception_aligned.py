""" Adapter for timm's ``XceptionAligned`` (aligned Xception-41/65/71, Xception-p). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.xception_aligned import XceptionAligned

from ._base import FeatureMapAdapter

__all__ = ['XceptionAlignedAdapter']


class XceptionAlignedAdapter(FeatureMapAdapter):
    """``XceptionAligned``: stem, then every Xception module of ``blocks``, then the final activation (``act``)."""
    parent_classes = (XceptionAligned,)
    timm_modules = ('xception_aligned',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)
