""" Adapter for timm's ``VOLO``: outlooker then transformer blocks on a (B, H, W, C) grid, then class attention. """
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.volo import VOLO

from ._base import FeatureMapAdapter

__all__ = ['VoloAdapter']


class VoloAdapter(FeatureMapAdapter):
    """``VOLO``: patch embed to a (B, H, W, C) grid, then each block of the stages of ``network`` (a Downsample goes
    with the next stage's first block; the position embedding and its dropout go before the block at
    ``network[2]``, as ``forward_tokens``). The tail flattens the grid to tokens, runs ``forward_cls`` (the class
    token prepended, through ``post_network``) and the final norm. No prefix token in the state. The position
    embedding is added without resampling, so the model runs only at the size it was built for."""
    parent_classes = (VOLO,)
    timm_modules = ('volo',)
    state_layout = 'NHWC'
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.patch_embed(x).permute(0, 2, 3, 1), None

    def _add_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(x + self.pos_embed)

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        units: List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = []
        lead: Tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
        for idx, module in enumerate(self.network):
            if idx == 2 and self.pos_embed is not None:
                lead += (self._add_pos_embed,)
            if isinstance(module, nn.Sequential):
                units += [lead + (module[0],)] + [(blk,) for blk in module[1:]]
                lead = ()
            else:  # a Downsample between two stages
                lead += (module,)
        if lead:
            units.append(lead)
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.post_network is not None:
            x = self.forward_cls(x)
        return self.norm(x)
