""" Adapter for timm's ``SwinTransformer`` (Swin-T/S/B/L, Swin-S3). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer

from ._base import FeatureMapAdapter, stage_units

__all__ = ['SwinTransformerAdapter']


class SwinTransformerAdapter(FeatureMapAdapter):
    """``SwinTransformer``: patch embedding, then the blocks of each stage (the stage's patch merging goes with its
    first block) on (B, H, W, C) maps, the final norm in ``_tail``. The attention masks are built for the input size
    unless the model was made with ``strict_img_size=False`` / ``dynamic_img_size=True``."""
    parent_classes = (SwinTransformer,)
    timm_modules = ('swin_transformer',)
    state_layout = 'NHWC'

    @property
    @torch.jit.unused  # Python-side: a scripted model compiles its forward only
    def fixed_input_size(self) -> bool:
        return not getattr(self, 'dynamic_img_size', False)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.patch_embed(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.layers)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
