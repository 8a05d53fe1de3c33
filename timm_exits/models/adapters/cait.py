""" Adapter for timm's ``Cait`` (CaiT): patch tokens through the self-attention blocks, then class attention. """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.cait import Cait

from ._base import FeatureMapAdapter

__all__ = ['CaitAdapter']


class CaitAdapter(FeatureMapAdapter):
    """``Cait``: patch embed plus position embedding, then each block of ``blocks`` on the patch tokens (B, N, C),
    without the class token (it only joins in the class-attention blocks). The tail is ``forward_cls`` (the class
    token through ``blocks_token_only``, prepended) and the final norm. The position embedding is added without
    resampling, so the model runs only at the size it was built for."""
    parent_classes = (Cait,)
    timm_modules = ('cait',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.pos_drop(self.patch_embed(x) + self.pos_embed), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self.blocks]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
        return self.norm(x)
