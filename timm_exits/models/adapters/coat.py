""" Adapter for timm's ``CoaT`` with serial blocks only (CoaT-Lite); CoaT's parallel blocks are not served. """
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.coat import CoaT

from ._base import FeatureMapAdapter

__all__ = ['CoaTAdapter']


def _serial_block(patch_embed: nn.Module, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A serial block on the tokens (class token first) of the grid of ``patch_embed``."""
    return blk(x, size=patch_embed.grid_size)


def _enter(prev_embed: nn.Module, patch_embed: nn.Module, cls_token: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scale's entry: the previous scale's tokens less the class token as a map, patch embed, class token."""
    x = x[:, 1:, :].reshape(x.shape[0], *prev_embed.grid_size, -1).permute(0, 3, 1, 2).contiguous()
    x = patch_embed(x)
    return torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)


class CoaTAdapter(FeatureMapAdapter):
    """``CoaT`` without parallel blocks (CoaT-Lite): per scale its patch embed and class token (with the scale's
    first block), then each serial block; the state is the scale's tokens (B, 1 + H * W, C), the class token first.
    The tail is ``norm4``. The blocks take the grid the patch embeds were built for, so the model runs only at that
    size. CoaT's parallel blocks mix all four scales at once (four token tensors of two widths), so a model with
    them (coat_tiny, coat_mini, coat_small) is refused (ValueError)."""
    parent_classes = (CoaT,)
    timm_modules = ('coat',)
    state_layout = 'NLC'
    fixed_input_size = True

    def _check_serial(self) -> None:
        if self.parallel_blocks is not None or self.return_interm_layers:
            raise ValueError(
                f'{type(self).__name__}: CoaT with parallel blocks (or intermediate outputs) is not served: the '
                f'parallel blocks mix the four scales at once, which no single token state carries')

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        self._check_serial()
        x = self.patch_embed1(x)
        return torch.cat((self.cls_token1.expand(x.shape[0], -1, -1), x), dim=1), None

    def _scales(self) -> List[Tuple[nn.Module, torch.Tensor, nn.Module]]:
        scales = []
        for i in range(1, 5):
            patch_embed = getattr(self, f'patch_embed{i}')
            if patch_embed is None:
                break
            scales.append((patch_embed, getattr(self, f'cls_token{i}'), getattr(self, f'serial_blocks{i}')))
        return scales

    def _units(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
        self._check_serial()
        units: List[Tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = []
        prev_embed = None
        for patch_embed, cls_token, blocks in self._scales():
            first = () if prev_embed is None else (partial(_enter, prev_embed, patch_embed, cls_token),)
            units += [(first if j == 0 else ()) + (partial(_serial_block, patch_embed, blk),)
                      for j, blk in enumerate(blocks)]
            prev_embed = patch_embed
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm4(x) if len(self._scales()) == 4 else x
