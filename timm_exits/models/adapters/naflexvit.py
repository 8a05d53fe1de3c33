""" Adapter for timm's ``NaFlexVit`` on image batches (B, C, H, W), without rotary position embedding. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.naflexvit import NaFlexVit

from ._base import FeatureMapAdapter

__all__ = ['NaFlexVitAdapter']


class NaFlexVitAdapter(FeatureMapAdapter):
    """``NaFlexVit`` on a standard image batch: ``_forward_embeds`` (patch and position embedding, prefix tokens,
    pre-norm), then each block; the final norm is the tail. The state is tokens (B, P + N, C) with the
    ``num_prefix_tokens`` class/register tokens first. The NaFlex input (patches with coordinates and a validity
    mask) is not served, nor a model with rotary position embedding (no registered architecture has one: the rope
    depends on the patch grid, which a token state does not carry)."""
    parent_classes = (NaFlexVit,)
    timm_modules = ('naflexvit',)
    state_layout = 'NLC'

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.rope is not None:
            raise ValueError(
                f'{type(self).__name__}: a NaFlexVit with rotary position embedding is not served (its rope follows '
                f'the patch grid, which the token state does not carry)')
        embeds = self._forward_embeds(x, patch_coord=None, patch_valid=None, attn_mask=None)
        if embeds['attn_mask'] is not None:
            raise ValueError(f'{type(self).__name__}: an attention mask from image input is not served')
        return embeds['patches'], None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
