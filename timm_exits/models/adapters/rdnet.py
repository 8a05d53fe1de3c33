""" Adapter for timm's ``RDNet`` (RDNet tiny..large). """
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.rdnet import DenseStage, RDNet

from ._base import FeatureMapAdapter

__all__ = ['RDNetAdapter']


def _dense(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One dense block on the concatenation ``x`` of the stage's features so far: its new features appended (the
    block concatenates its list input first, so it sees the very values the stage would give it)."""
    return torch.cat([x, block([x])], 1)


class RDNetAdapter(FeatureMapAdapter):
    """``RDNet``: stem, then the dense blocks of each dense stage, the map being the concatenation of the stage's
    features so far (what the stage returns after its last block); a stage's transition (norm, strided conv) goes
    with its first block. ``norm_pre`` (an identity unless the head has no norm) in ``_tail``."""
    parent_classes = (RDNet,)
    timm_modules = ('rdnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        units = []
        for stage in self.dense_stages:
            pre = []
            for layer in stage:
                if isinstance(layer, DenseStage):
                    blocks = [partial(_dense, blk) for blk in layer]
                    units.append((*pre, blocks[0]))
                    units.extend((blk,) for blk in blocks[1:])
                    pre = []
                else:
                    pre.append(layer)
            if pre:
                units.append(tuple(pre))
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(x)
