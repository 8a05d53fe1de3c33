""" Adapter for timm's ``EfficientFormer`` (EfficientFormer L1, L3, L7). """
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.efficientformer import EfficientFormer, Flat

from ._base import FeatureMapAdapter

__all__ = ['EfficientFormerAdapter']


def _on_tokens(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A token block (after the last stage's ``Flat``) on a (B, C, H, W) map: ``Flat``'s views and their inverse,
    which cancel between consecutive blocks, so the block sees the very tensor the stage would pass it."""
    B, C, H, W = x.shape
    return block(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)


class EfficientFormerAdapter(FeatureMapAdapter):
    """``EfficientFormer``: stem, then the blocks of each stage (the stage's downsample goes with its first block)
    on (B, C, H, W) maps; the last stage's ``Flat`` turns the map into tokens for its last (attention) blocks, which
    see it through ``Flat``'s views, and ``_tail`` flattens before the final norm. Built for a fixed input size."""
    parent_classes = (EfficientFormer,)
    timm_modules = ('efficientformer',)
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.stages:
            tokens, blocks = False, []
            for blk in stage.blocks:
                if isinstance(blk, Flat):
                    tokens = True
                else:
                    blocks.append(partial(_on_tokens, blk) if tokens else blk)
            units.append((stage.downsample, blocks[0]))
            units.extend((blk,) for blk in blocks[1:])
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        if any(isinstance(m, Flat) for m in self.stages[-1].blocks):
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)
