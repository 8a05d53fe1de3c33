""" Adapter for timm's legacy ``Xception``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.xception import Xception

from ._base import FeatureMapAdapter

__all__ = ['XceptionAdapter']


class XceptionAdapter(FeatureMapAdapter):
    """``Xception``: stem (conv1, bn1, act1, conv2, bn2, act2), then block1..block12, then the exit flow (conv3 ..
    act4)."""
    parent_classes = (Xception,)
    timm_modules = ('xception',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(getattr(self, f'block{i}'),) for i in range(1, 13)]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.act4(self.bn4(self.conv4(self.act3(self.bn3(self.conv3(x))))))
