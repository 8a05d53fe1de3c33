""" Adapter for timm's ``VisionTransformer`` and its subclasses (DeiT's distilled model): no rotary embedding. """
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ._base import ParentAdapter

__all__ = ['VitAdapter']


class VitAdapter(ParentAdapter):
    """``VisionTransformer``: patch embed, position embedding (and prefix tokens), patch dropout, pre-norm, blocks."""
    parent_classes = (VisionTransformer,)
    timm_modules = ('vision_transformer', 'deit', 'vision_transformer_hybrid', 'vitamin')

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x), None

    def _block_rope(self, rope: Optional[torch.Tensor], index: int) -> Optional[torch.Tensor]:
        return None

    def _keep_rope(self, rope: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def _keep_block_rope(self, rope: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def _apply_block(
            self,
            blk: nn.Module,
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        return blk(x) if attn_mask is None else blk(x, attn_mask=attn_mask)

    def _script_block(
            self,
            index: int,
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            if i == index:
                x = blk(x, attn_mask=attn_mask)
        return x

    def _has_cls(self) -> bool:
        return self.has_class_token
