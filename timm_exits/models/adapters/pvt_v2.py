""" Adapter for timm's ``PyramidVisionTransformerV2`` (PVT v2): blocks that take tokens and their grid, on the grid. """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.pvt_v2 import PyramidVisionTransformerV2

from ._base import FeatureMapAdapter

__all__ = ['PvtV2Adapter']


def _grid_block(blk: nn.Module, norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """A PVT v2 block (then the stage's norm, after its last block) on a (B, H, W, C) map."""
    size = (x.shape[1], x.shape[2])
    y = blk(x.reshape(x.shape[0], -1, x.shape[3]), size)
    if norm is not None:
        y = norm(y)
    return y.reshape(x.shape[0], *size, -1)


def _downsample(downsample: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A stage's downsample (B, C, H, W) -> (B, H', W', C') from the (B, H, W, C) map of the stage before."""
    return downsample(x.permute(0, 3, 1, 2).contiguous())


class PvtV2Adapter(FeatureMapAdapter):
    """``PyramidVisionTransformerV2``: the patch embed to a (B, H, W, C) grid, then the blocks of each stage (its
    downsample goes with its first block, its norm with its last). The blocks take tokens and their grid, so the
    state is the tokens as a (B, H, W, C) map (no prefix token); the tail turns the last map to (B, C, H, W), as
    each stage ends in ``forward_features``."""
    parent_classes = (PyramidVisionTransformerV2,)
    timm_modules = ('pvt_v2',)
    state_layout = 'NHWC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.patch_embed(x), None

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        units: List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = []
        for stage in self.stages:
            last = len(stage.blocks) - 1
            for j, blk in enumerate(stage.blocks):
                unit = (partial(_grid_block, blk, stage.norm if j == last else None),)
                if j == 0 and stage.downsample is not None:
                    unit = (partial(_downsample, stage.downsample),) + unit
                units.append(unit)
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).contiguous()
