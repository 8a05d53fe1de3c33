""" Adapter for timm's ``FastVit`` (FastViT T8..MA36, MobileCLIP image towers). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.fastvit import FastVit

from ._base import FeatureMapAdapter

__all__ = ['FastVitAdapter']


class FastVitAdapter(FeatureMapAdapter):
    """``FastVit``: stem, then the blocks of each stage (the stage's downsample and conditional positional encoding
    go with its first block), ``final_conv`` in ``_tail``. A model made with ``fork_feat=True`` (dense features, no
    classifier) returns a list from ``forward_features`` and is not served."""
    parent_classes = (FastVit,)
    timm_modules = ('fastvit',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        if self.fork_feat:
            raise ValueError('FastVit made with fork_feat=True returns per-stage features, not one map: not served')
        units = []
        for stage in self.stages:
            blocks = list(stage.blocks)
            units.append((stage.downsample, stage.pos_emb, blocks[0]))
            units.extend((blk,) for blk in blocks[1:])
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)
