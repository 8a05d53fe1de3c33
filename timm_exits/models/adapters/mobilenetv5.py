""" Adapter for timm's ``MobileNetV5`` (the Gemma 3n vision tower with a classifier). """
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.mobilenetv5 import MobileNetV5

from ._base import FeatureMapAdapter

__all__ = ['MobileNetV5Adapter', 'REFUSED']

REFUSED: Dict[str, str] = {
    'MobileNetV5Encoder': 'an encoder without a classifier: its forward_head raises NotImplementedError',
}
Unit = Tuple[Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]], ...]


def _fuse(model: MobileNetV5, first: int, x: torch.Tensor) -> torch.Tensor:
    """Stages ``first``.. of ``blocks`` on x (the output of feature ``first``) and the multi-scale fusion of the
    features ``msfa_indices`` name, as ``forward_features`` gathers them."""
    feats = [x] if first in model.msfa_indices else []
    for idx in range(first + 1, len(model.blocks) + 1):
        x = model.blocks[idx - 1](x)
        if idx in model.msfa_indices:
            feats.append(x)
    return model.msfa(feats)


class MobileNetV5Adapter(FeatureMapAdapter):
    """``MobileNetV5``: stem (conv_stem), then every block of the stages before the first feature the multi-scale
    fusion (msfa) takes, then one unit of the later stages and the fusion (it takes several stages' maps; without
    msfa every block is a unit); global pool and head convolutions in ``forward_head``."""
    parent_classes = (MobileNetV5,)
    timm_modules = ('mobilenetv5',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.conv_stem(x), None

    def _units(self) -> List[Unit]:
        if self.msfa is None:
            return [(blk,) for stage in self.blocks for blk in stage]
        first = min(self.msfa_indices)  # feature 0 is the stem, feature i the output of stage i - 1
        units: List[Unit] = [(blk,) for stage in list(self.blocks)[:first] for blk in stage]
        return units + [(partial(_fuse, self, first),)]
