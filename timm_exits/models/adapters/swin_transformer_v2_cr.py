""" Adapter for timm's ``SwinTransformerV2Cr`` (Christoph's Swin-V2: tiny..giant, ns variants). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr, bchw_to_bhwc, bhwc_to_bchw

from ._base import FeatureMapAdapter, stage_units

__all__ = ['SwinTransformerV2CrAdapter']


class SwinTransformerV2CrAdapter(FeatureMapAdapter):
    """``SwinTransformerV2Cr``: patch embedding (which returns (B, C, H, W)), then the blocks of each stage (the
    stage's patch merging goes with its first block) on (B, H, W, C) maps: each stage permutes its input to channels
    last and its output back, views that cancel between stages, so the units pass (B, H, W, C) and ``_tail`` permutes
    back (there is no final norm). Fixed input size unless made with ``strict_img_size=False`` /
    ``dynamic_img_size=True``."""
    parent_classes = (SwinTransformerV2Cr,)
    timm_modules = ('swin_transformer_v2_cr',)
    state_layout = 'NHWC'

    @property
    @torch.jit.unused  # Python-side: a scripted model compiles its forward only
    def fixed_input_size(self) -> bool:
        return not getattr(self, 'dynamic_img_size', False)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return bchw_to_bhwc(self.patch_embed(x)), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return stage_units(self.stages)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return bhwc_to_bchw(x)
