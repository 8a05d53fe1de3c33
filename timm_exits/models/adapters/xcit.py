""" Adapter for timm's ``Xcit`` (XCiT): patch tokens through the cross-covariance blocks, then class attention. """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.xcit import Xcit

from ._base import FeatureMapAdapter

__all__ = ['XcitAdapter']


def _grid_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An XCiT block, which takes tokens and their grid (Hp, Wp), on a (B, Hp, Wp, C) map."""
    return blk(x.flatten(1, 2), x.shape[1], x.shape[2]).reshape(x.shape)


class XcitAdapter(FeatureMapAdapter):
    """``Xcit``: convolutional patch embed plus the Fourier position encoding, then each block of ``blocks``. The
    blocks need the patch grid, so the state is the patch tokens as a (B, Hp, Wp, C) map (no class token: it only
    joins in the class-attention blocks). The tail is ``forward_cls`` (the class token prepended, through
    ``cls_attn_blocks``) and the final norm."""
    parent_classes = (Xcit,)
    timm_modules = ('xcit',)
    state_layout = 'NHWC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        B = x.shape[0]
        x, (Hp, Wp) = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(B, Hp, Wp).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
        x = self.pos_drop(x)
        return x.reshape(B, Hp, Wp, -1), None

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        return [(partial(_grid_block, blk),) for blk in self.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, 2)
        if self.cls_attn_blocks is not None:
            x = self.forward_cls(x)
        return self.norm(x)
