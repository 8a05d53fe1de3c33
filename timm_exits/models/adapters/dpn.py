""" Adapter for timm's ``DPN`` (Dual Path Networks). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.dpn import DPN, DualPathBlock

from ._base import FeatureMapAdapter

__all__ = ['DPNAdapter']


class DPNAdapter(FeatureMapAdapter):
    """``DPN``: stem (the modules of ``features`` before the first DualPathBlock), then every DualPathBlock (they
    pass one concatenated map), then the final norm and activation (``conv5_bn_ac``)."""
    parent_classes = (DPN,)
    timm_modules = ('dpn',)

    def _parts(self) -> Tuple[List[nn.Module], List[nn.Module], List[nn.Module]]:
        """``features`` split into the modules before, at and after the dual path blocks."""
        mods = list(self.features)
        at = [i for i, m in enumerate(mods) if isinstance(m, DualPathBlock)]
        return mods[:at[0]], mods[at[0]:at[-1] + 1], mods[at[-1] + 1:]

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        for m in self._parts()[0]:
            x = m(x)
        return x, None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        return [(blk,) for blk in self._parts()[1]]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._parts()[2]:
            x = m(x)
        return x
