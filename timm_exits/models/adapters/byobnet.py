""" Adapter for timm's ``ByobNet`` (byobnet, byoanet and mobilevit: RepVGG, MobileOne, GENet, BoTNet, HaloNet, ...). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.byobnet import ByobNet

from ._base import FeatureMapAdapter

__all__ = ['ByobNetAdapter']


class ByobNetAdapter(FeatureMapAdapter):
    """``ByobNet``: stem, then the blocks of each stage (a stage is a Sequential of blocks, the first strides),
    ``final_conv`` (an identity unless the config has ``num_features``) in ``_tail``. Models with self-attention of
    a fixed feature size (BoTNet, LambdaNet, attention-pool heads) run only at their build size: their pretrained
    config says ``fixed_input_size``."""
    parent_classes = (ByobNet,)
    timm_modules = ('byobnet', 'byoanet', 'mobilevit')

    @property
    @torch.jit.unused  # Python-side: a scripted model compiles its forward only
    def fixed_input_size(self) -> bool:
        return bool((getattr(self, 'pretrained_cfg', None) or {}).get('fixed_input_size', False))

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for stage in self.stages for blk in stage]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)
