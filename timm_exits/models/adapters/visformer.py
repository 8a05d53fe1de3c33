""" Adapter for timm's ``Visformer``: convolutional and attention blocks on a (B, C, H, W) map in three stages. """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.visformer import Visformer

from ._base import FeatureMapAdapter

__all__ = ['VisformerAdapter']


def _enter(model: nn.Module, n: int, x: torch.Tensor) -> torch.Tensor:
    """Stage ``n``'s patch embed plus its position embedding (and dropout), as ``forward_features``."""
    patch_embed, pos_embed = getattr(model, f'patch_embed{n}'), getattr(model, f'pos_embed{n}')
    if patch_embed is not None:
        x = patch_embed(x)
        if pos_embed is not None:
            x = model.pos_drop(x + pos_embed)
    return x


class VisformerAdapter(FeatureMapAdapter):
    """``Visformer``: the stem, then the blocks of stage1..stage3 (a stage's patch embed and position embedding go
    with its first block); the final (batch) norm is the tail. The state is a (B, C, H, W) map. The position
    embeddings are added without resampling, so the model runs only at the size it was built for."""
    parent_classes = (Visformer,)
    timm_modules = ('visformer',)
    state_layout = 'NCHW'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.stem is not None:
            x = self.stem(x)
        return x, None

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        units: List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = []
        lead: Tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
        for n in (1, 2, 3):
            lead += (partial(_enter, self, n),)
            for blk in getattr(self, f'stage{n}'):
                units.append(lead + (blk,))
                lead = ()
        if lead:
            units.append(lead)
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
