""" Adapter for timm's ``CspNext`` (CSPNeXt, the RTMDet backbone). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.cspnext import CspNext

from ._base import FeatureMapAdapter

__all__ = ['CspNextAdapter']


class CspNextAdapter(FeatureMapAdapter):
    """``CspNext``: stem, then one unit per stage (downsampling conv, SPP in the last, a CSP layer whose cross-stage
    split cannot be cut)."""
    parent_classes = (CspNext,)
    timm_modules = ('cspnext',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [tuple(stage) for stage in self.stages]
