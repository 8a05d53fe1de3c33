""" What a mechanism (exits, life slimming) needs from a parent model class, in one small interface.

A parent adapter is a mixin placed between a mechanism and a timm model class: ``class M(Mechanism, Adapter, Parent)``.
The mechanisms call only these methods and the attributes every timm ViT has (``blocks``, ``patch_embed``, ``norm``,
``forward_head``, ``num_prefix_tokens``, ``embed_dim``, ``dynamic_img_size``), so a new parent class needs one adapter.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['ParentAdapter']


class ParentAdapter:
    """Interface of a parent adapter; the defaults fit a ViT without rotary position embeddings."""
    parent_classes: Tuple[type, ...] = ()  # timm classes (and their subclasses) this adapter serves
    timm_modules: Tuple[str, ...] = ()  # timm modules whose registered architectures are built on those classes

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images to the tokens the first block sees, exactly as the parent's ``forward_features``, and the rotary
        position embedding of the patches (None without one)."""
        raise NotImplementedError(f'{type(self).__name__}: every parent adapter defines _embed (see VitAdapter)')

    def _block_rope(self, rope: Optional[torch.Tensor], index: int) -> Optional[torch.Tensor]:
        """The rotary embedding block ``index`` (0-based) receives."""
        return rope

    def _keep_rope(self, rope: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
        """The rotary embedding of the patches at positions ``keep`` (B, n) of the full grid, per image."""
        return rope

    def _keep_block_rope(self, rope: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
        """The rotary embedding one block receives (``_block_rope``) for the patches at positions ``keep`` (B, n)."""
        return rope

    def _apply_block(
            self,
            blk: nn.Module,
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """One block on tokens x, as the parent runs it (``attn_mask``: additive, broadcast over heads)."""
        raise NotImplementedError(f'{type(self).__name__}: every parent adapter defines _apply_block (see VitAdapter)')

    def _script_block(
            self,
            index: int,
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``_apply_block`` of block ``index`` under ``torch.jit.script``, which passes no module as an argument."""
        raise NotImplementedError(f'{type(self).__name__}: every parent adapter defines _script_block (see VitAdapter)')

    def _has_cls(self) -> bool:
        """Whether the first token is a class token."""
        return getattr(self, 'cls_token', None) is not None
