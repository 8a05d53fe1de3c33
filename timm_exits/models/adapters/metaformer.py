""" Adapter for timm's ``MetaFormer`` (PoolFormer, PoolFormer-V2, ConvFormer, CAFormer). """
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.metaformer import MetaFormer

from ._base import FeatureMapAdapter

__all__ = ['MetaFormerAdapter']


def _on_tokens(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block`` of a token stage on a (B, C, H, W) map: the views the stage takes around its blocks (they cancel
    between consecutive blocks, so the block sees the very tensor the stage would pass it)."""
    B, C, H, W = x.shape
    x = block(x.reshape(B, C, -1).transpose(1, 2))
    return x.transpose(1, 2).reshape(B, C, H, W)


class MetaFormerAdapter(FeatureMapAdapter):
    """``MetaFormer``: stem, then the blocks of each stage (the stage's downsample goes with its first block) on
    (B, C, H, W) maps; the blocks of a stage that runs on tokens (CAFormer's attention stages) see the map as
    (B, H * W, C) tokens. The norm is in the head."""
    parent_classes = (MetaFormer,)
    timm_modules = ('metaformer',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            blocks = [blk if stage.use_nchw else partial(_on_tokens, blk) for blk in stage.blocks]
            units.append((stage.downsample, blocks[0]))
            units.extend((blk,) for blk in blocks[1:])
        return units
