""" Adapter for timm's ``MlpMixer`` (MLP-Mixer, ResMLP, gMLP): tokens through a stack of MLP blocks. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.mlp_mixer import MlpMixer

from ._base import FeatureMapAdapter

__all__ = ['MlpMixerAdapter']


class MlpMixerAdapter(FeatureMapAdapter):
    """``MlpMixer``: patch stem, then each block of ``blocks`` (MixerBlock, ResBlock or SpatialGatingBlock) on the
    patch tokens (B, N, C), no prefix token; the final norm is the tail. The token-mixing MLPs are sized by the
    number of patches, so the model runs only at the size it was built for."""
    parent_classes = (MlpMixer,)
    timm_modules = ('mlp_mixer',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
