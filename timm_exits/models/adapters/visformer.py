""" Adapter for timm's ``Visformer``. """
from functools import partial
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.visformer import Visformer

from ._base import FeatureMapAdapter

__all__ = ['VisformerAdapter']

Unit = Tuple[Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]], ...]


def _add_pos(model: Visformer, stage: int, x: torch.Tensor) -> torch.Tensor:
    """The position embedding of ``stage`` added (and dropped out) as ``forward_features`` does, if there is one."""
    pos = getattr(model, f'pos_embed{stage}')
    return x if pos is None else model.pos_drop(x + pos)


class VisformerAdapter(FeatureMapAdapter):
    """``Visformer``: stem (stem, patch_embed1, position embedding 1), then the blocks of stage1..stage3 (a stage's
    patch embedding and position embedding with its first block), then the final norm. The position embeddings are
    sized for the input size the model was built for."""
    parent_classes = (Visformer,)
    timm_modules = ('visformer',)
    fixed_input_size = True

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.stem is not None:
            x = self.stem(x)
        return _add_pos(self, 1, self.patch_embed1(x)), None

    def _units(self) -> List[Unit]:
        units: List[Unit] = [(blk,) for blk in self.stage1]
        for i, stage in ((2, self.stage2), (3, self.stage3)):
            embed = getattr(self, f'patch_embed{i}')
            first = () if embed is None else (embed, partial(_add_pos, self, i))
            units += [first + (blk,) if j == 0 else (blk,) for j, blk in enumerate(stage)]
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
