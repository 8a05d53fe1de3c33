""" Adapter for timm's ``InceptionResnetV2``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.inception_resnet_v2 import InceptionResnetV2

from ._base import FeatureMapAdapter

__all__ = ['InceptionResnetV2Adapter']


class InceptionResnetV2Adapter(FeatureMapAdapter):
    """``InceptionResnetV2``: stem (conv2d_1a .. maxpool_5a), then mixed_5b, the Block35s, the Block17s (mixed_6a
    with the first), the Block8s (mixed_7a with the first) and block8, then conv2d_7b."""
    parent_classes = (InceptionResnetV2,)
    timm_modules = ('inception_resnet_v2',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        for m in (self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a, self.conv2d_3b, self.conv2d_4a,
                  self.maxpool_5a):
            x = m(x)
        return x, None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units: List[Tuple[nn.Module, ...]] = [(self.mixed_5b,)]
        for down, repeat in ((None, self.repeat), (self.mixed_6a, self.repeat_1), (self.mixed_7a, self.repeat_2)):
            units += [(down, blk) if i == 0 and down is not None else (blk,) for i, blk in enumerate(repeat)]
        return units + [(self.block8,)]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d_7b(x)
