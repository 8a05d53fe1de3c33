""" Adapter for timm's ``HighResolutionNet`` (HRNet classification models). """
from functools import partial
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models.hrnet import HighResolutionNet

from ._base import FeatureMapAdapter

__all__ = ['HighResolutionNetAdapter']

Unit = Tuple[Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]], ...]


def _branches(model: HighResolutionNet, x: torch.Tensor) -> torch.Tensor:
    """Stages 2..4 (parallel branches at several resolutions, a list between them) from layer1's output, and the
    classification aggregation (incre_modules, downsamp_modules, final_layer), as ``forward_features``."""
    yl = model.stage2([t(x) for t in model.transition1])
    for transition, stage in ((model.transition2, model.stage3), (model.transition3, model.stage4)):
        yl = stage([t(yl[-1]) if not isinstance(t, nn.Identity) else yl[i] for i, t in enumerate(transition)])
    y = model.incre_modules[0](yl[0])
    for i in range(1, len(model.incre_modules)):
        y = model.incre_modules[i](yl[i]) + model.downsamp_modules[i - 1].forward(y)
    return model.final_layer(y)


class HighResolutionNetAdapter(FeatureMapAdapter):
    """``HighResolutionNet``: stem (conv1 .. act2), then the blocks of layer1 (one map), then one unit of the
    multi-resolution stages 2..4 and the aggregation head (the state there is a list of branch maps, no single map
    to exit from)."""
    parent_classes = (HighResolutionNet,)
    timm_modules = ('hrnet',)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))), None

    def _units(self) -> List[Unit]:
        if self.incre_modules is None or self.downsamp_modules is None:
            raise ValueError('HighResolutionNet without the classification head: its features are a list of branches')
        return [(blk,) for blk in self.layer1] + [(partial(_branches, self),)]
