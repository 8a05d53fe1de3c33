""" Adapter for timm's ``Beit`` (BEiT, BEiT v2): a ViT with relative position biases, shared or per block. """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.beit import Beit

from ._base import FeatureMapAdapter

__all__ = ['BeitAdapter']


def _rel_block(model: nn.Module, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One block with the model's shared relative position bias (None without one), as ``forward_features``."""
    rel_pos_bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    return blk(x, shared_rel_pos_bias=rel_pos_bias)


class BeitAdapter(FeatureMapAdapter):
    """``Beit``: patch embed, the class token, absolute position embedding (if any), then each block with the shared
    relative position bias (recomputed per block from the current weights); the final norm is the tail. The state is
    tokens (B, 1 + N, C), the class token first. Position embedding and relative position tables are sized by the
    patch grid, so the model runs only at the size it was built for."""
    parent_classes = (Beit,)
    timm_modules = ('beit',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x), None

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        return [(partial(_rel_block, self, blk),) for blk in self.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
