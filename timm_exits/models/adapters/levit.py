""" Adapter for timm's ``Levit`` and ``LevitDistilled`` (LeViT, its conv-mode twin levit_conv_*). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.levit import Levit

from ._base import FeatureMapAdapter

__all__ = ['LevitAdapter']


class LevitAdapter(FeatureMapAdapter):
    """``Levit``: the convolutional stem (its map flattened to tokens unless ``use_conv``), then the blocks of each
    stage (the attention downsample of a stage goes with its first block); no final norm. The state is tokens
    (B, N, C) without a prefix token, or a (B, C, H, W) map in conv mode (``use_conv``), hence ``state_layout`` per
    model. The attention biases are sized by the grid, so the model runs only at the size it was built for."""
    parent_classes = (Levit,)
    timm_modules = ('levit',)
    fixed_input_size = True

    @property
    @torch.jit.unused  # Python-side: a scripted model compiles its forward only
    def state_layout(self) -> str:  # type: ignore[override]
        return 'NCHW' if self.use_conv else 'NLC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.stem(x)
        return (x if self.use_conv else x.flatten(2).transpose(1, 2)), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            first = () if isinstance(stage.downsample, nn.Identity) else (stage.downsample,)
            units += [first + (stage.blocks[0],)] + [(blk,) for blk in stage.blocks[1:]]
        return units
