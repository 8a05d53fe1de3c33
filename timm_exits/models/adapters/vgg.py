""" Adapter for timm's ``VGG`` (VGG-11/13/16/19, with and without batch norm). """
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vgg import VGG

from ._base import FeatureMapAdapter

__all__ = ['VGGAdapter']


class VGGAdapter(FeatureMapAdapter):
    """``VGG``: ``features`` cut before every convolution (a max pool goes with the convolution after it): the first
    convolution (with its norm and activation) is the stem, the others are units, a last max pool is the tail;
    pre_logits (the ConvMlp) and the head are in ``forward_head``."""
    parent_classes = (VGG,)
    timm_modules = ('vgg',)

    def _groups(self) -> List[List[nn.Module]]:
        """``features`` in runs that start at a max pool or at a convolution not preceded by one."""
        groups: List[List[nn.Module]] = []
        prev = None
        for m in self.features:
            if isinstance(m, nn.MaxPool2d) or (isinstance(m, nn.Conv2d) and not isinstance(prev, nn.MaxPool2d)):
                groups.append([])
            groups[-1].append(m)
            prev = m
        return groups

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        for m in self._groups()[0]:
            x = m(x)
        return x, None

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        groups = self._groups()[1:]
        return [tuple(g) for g in groups if any(isinstance(m, nn.Conv2d) for m in g)]

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        last = self._groups()[-1]
        if not any(isinstance(m, nn.Conv2d) for m in last):
            for m in last:
                x = m(x)
        return x
