""" Adapter for timm's ``TinyVit`` (TinyViT 5M..21M). """
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.tiny_vit import TinyVit, TinyVitStage

from ._base import FeatureMapAdapter

__all__ = ['TinyVitAdapter']


def _channels_last(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block`` of a transformer stage (it takes (B, H, W, C)) on a (B, C, H, W) map: the permutes the stage takes
    around its blocks, views that cancel between consecutive blocks."""
    return block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TinyVitAdapter(FeatureMapAdapter):
    """``TinyVit``: patch embedding, then the blocks of each stage (the stage's downsample goes with its first
    block) on (B, C, H, W) maps: the MBConv blocks of the first stage as they are, the transformer blocks of the
    others through the stage's permutes to (B, H, W, C); the norm is in the head."""
    parent_classes = (TinyVit,)
    timm_modules = ('tiny_vit',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.patch_embed(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            if isinstance(stage, TinyVitStage):
                blocks = [partial(_channels_last, blk) for blk in stage.blocks]
                units.append((stage.downsample, blocks[0]))
                units.extend((blk,) for blk in blocks[1:])
            else:  # ConvLayer: its blocks on (B, C, H, W), no downsample
                units.extend((blk,) for blk in stage.blocks)
        return units
