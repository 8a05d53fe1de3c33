""" What a mechanism (exits, life slimming) needs from a parent model class, in one small interface.

A parent adapter is a mixin placed between a mechanism and a timm model class: ``class M(Mechanism, Adapter, Parent)``.
The mechanisms call only these methods and the attributes every timm ViT has (``blocks``, ``patch_embed``, ``norm``,
``forward_head``, ``num_prefix_tokens``, ``embed_dim``, ``dynamic_img_size``), so a new parent class needs one adapter.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['FeatureMapAdapter', 'ParentAdapter']


class ParentAdapter:
    """Interface of a parent adapter; the defaults fit a ViT without rotary position embeddings."""
    state_kind = 'tokens'  # what the blocks pass: 'tokens' (B, N, D) or 'map' (a feature map, FeatureMapAdapter)
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


class FeatureMapAdapter(ParentAdapter):
    """Interface of an adapter for a parent whose blocks pass a feature map, (B, C, H, W) or (B, H, W, C) (Swin), or
    tokens (B, N, C) of a parent that is not a timm ViT (``state_layout``). The parent's ``forward_features(x)`` is ``_tail(u_n(...u_1(_embed(x)[0])))`` where
    u_1..u_n are ``_units()`` (each a tuple of modules run in order: a stage's downsampling goes with its first
    block), bit for bit; the final answer is ``forward_head(forward_features(x))``. Exits follow units, numbered
    1..n. An adapter defines ``_embed``, ``_units`` and, where ``forward_features`` does more after the last block
    (a final norm or 1x1 convolution), ``_tail``."""
    state_kind = 'map'
    state_layout: str = 'NCHW'  # what the blocks pass: 'NCHW', 'NHWC' (Swin) or 'NLC' (tokens without a grid)
    fixed_input_size: bool = False  # the parent runs only at the input size it was built for (Swin's windows)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images to the map the first unit sees, exactly as the parent's ``forward_features`` (the stem); no rope."""
        raise NotImplementedError(f'{type(self).__name__}: every feature-map adapter defines _embed (see ResNetAdapter)')

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        """The blocks in the order ``forward_features`` runs them, each a tuple of modules applied in turn."""
        raise NotImplementedError(f'{type(self).__name__}: every feature-map adapter defines _units (see ResNetAdapter)')

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward_features`` does after the last unit (nothing by default)."""
        return x

    def _apply_block(
            self,
            blk: Tuple[nn.Module, ...],
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        for module in blk:
            x = module(x)
        return x

    def _has_cls(self) -> bool:
        return False
