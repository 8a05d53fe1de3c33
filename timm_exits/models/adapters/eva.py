""" Adapter for timm's ``Eva`` (EVA02, DINOv3, Perception Encoder, RoPE-ViT): rotary position embeddings. """
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.models.eva import Eva

from ._base import ParentAdapter

__all__ = ['EvaAdapter']


class EvaAdapter(ParentAdapter):
    """``Eva``: the rotary embedding made by ``_pos_embed`` goes to every block as ``rope=`` (one per block in
    'mixed' mode); a patch kept by slimming keeps its own rotary entries."""
    parent_classes = (Eva,)
    timm_modules = ('eva',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        x, rope = self._pos_embed(x)
        return self.norm_pre(x), rope

    def _block_rope(self, rope: Optional[torch.Tensor], index: int) -> Optional[torch.Tensor]:
        if rope is not None and self.rope_mixed:
            return rope[index]
        return rope

    def _keep_rope(self, rope: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows of the kept patches, shaped as ``Eva._pos_embed`` shapes them after patch dropout: (N, dim) ->
        (B, 1, n, dim); mixed (depth, heads, N, dim) -> (depth, B, heads, n, dim). Plain indexing: torch.fx and
        TorchScript trace it."""
        if rope is None:
            return None
        if self.rope_mixed:
            return rope[:, :, keep].transpose(1, 2)
        return rope[keep].unsqueeze(1)

    def _keep_block_rope(self, rope: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
        """One block's rows of the kept patches, as ``_block_rope(_keep_rope(rope, keep), i)``: (N, dim) -> (B, 1, n,
        dim); mixed, per block (heads, N, dim) -> (B, heads, n, dim)."""
        if rope is None:
            return None
        if self.rope_mixed:
            return rope[:, keep].transpose(0, 1)
        return rope[keep].unsqueeze(1)

    def _apply_block(
            self,
            blk: nn.Module,
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        return blk(x, rope=rope, attn_mask=attn_mask)

    def _script_block(
            self,
            index: int,
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            if i == index:
                x = blk(x, rope=rope, attn_mask=attn_mask)
        return x
