""" Adapter for timm's ``SelecSls`` (SelecSLS-42/60/84). """
from operator import itemgetter
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.selecsls import SelecSls

from ._base import FeatureMapAdapter

__all__ = ['SelecSlsAdapter']

Unit = Tuple[Union[nn.Module, Callable], ...]


class SelecSlsAdapter(FeatureMapAdapter):
    """``SelecSls``: stem, then one unit per run of blocks that starts at an ``is_first`` block (blocks pass [x, skip]
    and the skip lives from a first block to the next, so only there the state is one map: the unit ends by taking
    x, as ``from_seq`` does), then the head convolutions (``head``, in ``forward_features``)."""
    parent_classes = (SelecSls,)
    timm_modules = ('selecsls',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.stem(x), None

    def _units(self) -> List[Unit]:
        assert self.from_seq.mode == 'index' and self.from_seq.index == 0, 'SelecSls: from_seq must take x'
        runs: List[List[nn.Module]] = []
        for blk in self.features:
            if blk.is_first or not runs:
                runs.append([])
            runs[-1].append(blk)
        return [(*run, itemgetter(0)) for run in runs]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
