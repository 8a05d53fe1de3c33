""" Adapter for timm's ``InceptionV3``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.inception_v3 import InceptionV3

from ._base import FeatureMapAdapter

__all__ = ['InceptionV3Adapter']


class InceptionV3Adapter(FeatureMapAdapter):
    """``InceptionV3``: stem (Conv2d_1a_3x3 .. Pool2), then every Mixed block (5b .. 7c). A model built with
    ``aux_logits=True`` returns (features, aux) from ``forward_features`` and is not served."""
    parent_classes = (InceptionV3,)
    timm_modules = ('inception_v3',)
    _mixed = ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c')

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.aux_logits:
            raise ValueError('InceptionV3 with aux_logits: forward_features returns (features, aux logits)')
        for m in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.Pool1, self.Conv2d_3b_1x1,
                  self.Conv2d_4a_3x3, self.Pool2):
            x = m(x)
        return x, None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(getattr(self, f'Mixed_{m}'),) for m in self._mixed]
