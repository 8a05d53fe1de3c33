""" Adapter for timm's ``ConVit`` (ConViT): gated positional self-attention blocks, then self-attention with the
class token. """
from typing import Callable, List, Optional, Tuple

import torch
from timm.models.convit import ConVit

from ._base import FeatureMapAdapter

__all__ = ['ConVitAdapter']


class ConVitAdapter(FeatureMapAdapter):
    """``ConVit``: patch embed plus position embedding, then each block; the class token is prepended before block
    ``local_up_to_layer`` (the first self-attention block after the GPSA blocks), so the state is the patch tokens
    (B, N, C) up to there and (B, 1 + N, C) after, the class token first. The final norm is the tail. The position
    embedding is added without resampling, so the model runs only at the size it was built for."""
    parent_classes = (ConVit,)
    timm_modules = ('convit',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        if self.use_pos_embed:
            x = x + self.pos_embed
        return self.pos_drop(x), None

    def _prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        return [((self._prepend_cls, blk) if u == self.local_up_to_layer and self.cls_token is not None else (blk,))
                for u, blk in enumerate(self.blocks)]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
