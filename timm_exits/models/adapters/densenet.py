""" Adapter for timm's ``DenseNet`` (DenseNet-121/161/169/201/264, blur and deep-stem variants). """
from functools import partial
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.densenet import DenseBlock, DenseNet

from ._base import FeatureMapAdapter

__all__ = ['DenseNetAdapter']

Unit = Tuple[Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]], ...]


def _dense_step(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One DenseLayer on the concatenation so far, its new features appended (as DenseBlock concatenates them)."""
    return torch.cat([x, layer(x)], 1)


class DenseNetAdapter(FeatureMapAdapter):
    """``DenseNet``: stem (the modules of ``features`` before the first DenseBlock), then every DenseLayer (its
    input, the block's features so far, concatenated; a transition goes with the next block's first layer), then
    what follows the last block (norm5)."""
    parent_classes = (DenseNet,)
    timm_modules = ('densenet',)

    def _parts(self) -> Tuple[List[nn.Module], List[nn.Module], List[nn.Module]]:
        """``features`` split into the modules before, from the first to the last and after the dense blocks."""
        mods = list(self.features)
        at = [i for i, m in enumerate(mods) if isinstance(m, DenseBlock)]
        return mods[:at[0]], mods[at[0]:at[-1] + 1], mods[at[-1] + 1:]

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        for m in self._parts()[0]:
            x = m(x)
        return x, None

    def _units(self) -> List[Unit]:
        units: List[Unit] = []
        pending: List[nn.Module] = []  # transitions wait for the next block's first layer
        for m in self._parts()[1]:
            if isinstance(m, DenseBlock):
                for layer in m.values():
                    units.append((*pending, partial(_dense_step, layer)))
                    pending = []
            else:
                pending.append(m)
        return units

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._parts()[2]:
            x = m(x)
        return x
