""" Adapter for timm's ``InceptionV4``. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import ConvNormAct
from timm.models.inception_v4 import InceptionV4

from ._base import FeatureMapAdapter

__all__ = ['InceptionV4Adapter']


class InceptionV4Adapter(FeatureMapAdapter):
    """``InceptionV4``: stem (the plain convolutions that begin ``features``), then every mixed, inception and
    reduction module of ``features``."""
    parent_classes = (InceptionV4,)
    timm_modules = ('inception_v4',)

    def _stem_len(self) -> int:
        mods = list(self.features)
        return next(i for i, m in enumerate(mods) if not isinstance(m, ConvNormAct))

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        for m in list(self.features)[:self._stem_len()]:
            x = m(x)
        return x, None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(m,) for m in list(self.features)[self._stem_len():]]
