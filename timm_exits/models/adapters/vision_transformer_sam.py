""" Adapter for timm's ``VisionTransformerSAM`` (the SAM image encoder ViT): blocks on a (B, H, W, C) patch grid. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import VisionTransformerSAM

from ._base import FeatureMapAdapter

__all__ = ['VisionTransformerSAMAdapter']


class VisionTransformerSAMAdapter(FeatureMapAdapter):
    """``VisionTransformerSAM``: patch embed to a (B, H, W, C) grid plus the (resampled) position embedding, patch
    dropout and pre-norm, then each block (windowed or global attention) on that grid; the tail is the neck on the
    (B, C, H, W) map. No prefix token."""
    parent_classes = (VisionTransformerSAM,)
    timm_modules = ('vision_transformer_sam',)
    state_layout = 'NHWC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(self.pos_embed, x.shape[1:3])
        x = self.pos_drop(x)
        x = self.patch_drop(x)
        return self.norm_pre(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(x.permute(0, 3, 1, 2))
