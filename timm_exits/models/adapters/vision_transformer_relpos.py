""" Adapter for timm's ``VisionTransformerRelPos`` (ViT with relative position biases, shared or per block). """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer_relpos import VisionTransformerRelPos

from ._base import FeatureMapAdapter

__all__ = ['VisionTransformerRelPosAdapter']


def _rel_block(model: nn.Module, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One block with the model's shared relative position bias (None without one), as ``forward_features``."""
    shared_rel_pos = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
    return blk(x, shared_rel_pos=shared_rel_pos)


class VisionTransformerRelPosAdapter(FeatureMapAdapter):
    """``VisionTransformerRelPos``: patch embed and the class token (if any), then each block with the shared
    relative position bias (recomputed per block from the current weights); the final norm is the tail. The state is
    tokens (B, N, C) with the class token first where ``cls_token`` is set (``num_prefix_tokens``). The relative
    position tables are sized by the patch grid, so the model runs only at the size it was built for."""
    parent_classes = (VisionTransformerRelPos,)
    timm_modules = ('vision_transformer_relpos',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x, None

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        return [(partial(_rel_block, self, blk),) for blk in self.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
