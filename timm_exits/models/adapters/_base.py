""" What a mechanism (exits, life slimming) needs from a parent model class, in one small interface.

A parent adapter is a mixin placed between a mechanism and a timm model class: ``class M(Mechanism, Adapter, Parent)``.
The mechanisms call only these methods and the attributes every timm ViT has (``blocks``, ``patch_embed``, ``norm``,
``forward_head``, ``num_prefix_tokens``, ``embed_dim``, ``dynamic_img_size``), so a new parent class needs one adapter.
"""
import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['FeatureMapAdapter', 'ParentAdapter', 'eval_mode', 'stage_units']


class ParentAdapter:
    """Interface of a parent adapter; the defaults fit a ViT without rotary position embeddings."""
    state_kind = 'tokens'  # what the blocks pass: 'tokens' (B, N, D) or 'map' (a feature map, FeatureMapAdapter)
    parent_classes: Tuple[type, ...] = ()  # timm classes (and their subclasses) this adapter serves
    timm_modules: Tuple[str, ...] = ()  # timm modules whose registered architectures are built on those classes

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images to the tokens the first block sees, exactly as the parent's ``forward_features``, and the rotary
        position embedding of the patches (None without one)."""
        raise NotImplementedError(f'{type(self).__name__}: every parent adapter defines _embed (see VitAdapter)')

    def _block_rope(self, rope: Optional[torch.Tensor], index: int) -> Optional[torch.Tensor]:
        """The rotary embedding block ``index`` (0-based) receives."""
        return rope

    def _keep_rope(self, rope: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
        """The rotary embedding of the patches at positions ``keep`` (B, n) of the full grid, per image."""
        return rope

    def _keep_block_rope(self, rope: Optional[torch.Tensor], keep: torch.Tensor) -> Optional[torch.Tensor]:
        """The rotary embedding one block receives (``_block_rope``) for the patches at positions ``keep`` (B, n)."""
        return rope

    def _apply_block(
            self,
            blk: nn.Module,
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """One block on tokens x, as the parent runs it (``attn_mask``: additive, broadcast over heads)."""
        raise NotImplementedError(f'{type(self).__name__}: every parent adapter defines _apply_block (see VitAdapter)')

    def _script_block(
            self,
            index: int,
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``_apply_block`` of block ``index`` under ``torch.jit.script``, which passes no module as an argument."""
        raise NotImplementedError(f'{type(self).__name__}: every parent adapter defines _script_block (see VitAdapter)')

    def _has_cls(self) -> bool:
        """Whether the first token is a class token."""
        return getattr(self, 'cls_token', None) is not None

    # --- what the walker, the cost model and the exits read (ViT defaults) -----------------------------------------

    def _exit_blocks(self) -> Sequence[Any]:
        """The blocks exits can follow, in order; ``_apply_block`` runs one."""
        return self.blocks

    def _final(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The parent's answer from the last block's state: the rest of ``forward_features``, then ``forward_head``."""
        return self.forward_head(self.norm(x), pre_logits=pre_logits)

    def _input_size(self) -> Tuple[int, int]:
        """(H, W) the model is built for: costs are counted and exit heads sized at it."""
        return tuple(self.patch_embed.img_size)

    def _in_chans(self) -> int:
        """Input channels of the images: the patch embedding's first convolution's (a hybrid's backbone stem's)."""
        first = next((m for m in self.patch_embed.modules() if isinstance(m, nn.Conv2d)), None)
        return first.in_channels if first is not None else self.patch_embed.proj.in_channels

    @property
    @torch.jit.unused  # Python-side: a scripted model compiles its forward only
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of the images the model is built for (what its costs are counted at)."""
        return (self._in_chans(), *self._input_size())

    def _grid_at(self, img_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        """Patch grid of images of ``img_size`` when it may differ from the model's (``dynamic_img_size``), else
        None."""
        return self.patch_embed.dynamic_feat_size(img_size) if self.dynamic_img_size else None

    def _patches_at(self, img_size: Tuple[int, int]) -> int:
        """Patches of an image of ``img_size`` (the model's count unless ``dynamic_img_size``)."""
        if self.dynamic_img_size:
            h, w = self.patch_embed.dynamic_feat_size(img_size)
            return h * w
        return self.patch_embed.num_patches

    def _exit_head_args(self, layer: int, pool: str) -> Dict[str, Any]:
        """``create_exit_head`` arguments of the exit after block ``layer`` (1-based), the [CLS] reading ``pool``."""
        blk = self.blocks[0]
        fc2 = getattr(getattr(blk, 'mlp', None), 'fc2', None)
        return dict(
            embed_dim=self.embed_dim,
            num_heads=getattr(getattr(blk, 'attn', None), 'num_heads', None) or getattr(blk, 'num_heads', 1),
            mlp_ratio=fc2.in_features / self.embed_dim if isinstance(fc2, nn.Linear) else 4.,
            num_prefix_tokens=self.num_prefix_tokens,
            pool=pool,
            grid_size=self.patch_embed.grid_size,
        )


class FeatureMapAdapter(ParentAdapter):
    """Interface of an adapter for a parent whose blocks pass a feature map, (B, C, H, W) or (B, H, W, C) (Swin), or
    tokens (B, N, C) of a parent that is not a timm ViT (``state_layout``). The parent's ``forward_features(x)`` is
    ``_tail(u_n(...u_1(_embed(x)[0])))`` where u_1..u_n are ``_units()`` (each a tuple of modules run in order: a
    stage's downsampling goes with its first block), bit for bit; the final answer is ``forward_head(forward_features(x))``. Exits follow units, numbered
    1..n. An adapter defines ``_embed``, ``_units`` and, where ``forward_features`` does more after the last block
    (a final norm or 1x1 convolution), ``_tail``."""
    state_kind = 'map'
    state_layout: str = 'NCHW'  # what the blocks pass: 'NCHW', 'NHWC' (Swin) or 'NLC' (tokens without a grid)
    fixed_input_size: bool = False  # the parent runs only at the input size it was built for (Swin's windows)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images to the map the first unit sees, exactly as the parent's ``forward_features`` (the stem); no rope."""
        raise NotImplementedError(
            f'{type(self).__name__}: every feature-map adapter defines _embed (see ResNetAdapter)')

    def _units(self) -> List[Tuple[nn.Module, ...]]:
        """The blocks in the order ``forward_features`` runs them, each a tuple of modules applied in turn."""
        raise NotImplementedError(
            f'{type(self).__name__}: every feature-map adapter defines _units (see ResNetAdapter)')

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward_features`` does after the last unit (nothing by default)."""
        return x

    def _apply_block(
            self,
            blk: Tuple[nn.Module, ...],
            x: torch.Tensor,
            rope: Optional[torch.Tensor],
            attn_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        for module in blk:
            x = module(x)
        return x

    def _has_cls(self) -> bool:
        return False

    def _exit_blocks(self) -> Sequence[Any]:
        return self._units()

    def _final(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.forward_head(self._tail(x), pre_logits=pre_logits)

    def _input_size(self) -> Tuple[int, int]:
        return tuple(self.exit_input_size)

    def _in_chans(self) -> int:
        """The stem's first convolution's (or linear patch embedding's) input channels."""
        first = next(m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        return first.in_channels if isinstance(first, nn.Conv2d) else getattr(self, 'in_chans', 3)

    def _grid_at(self, img_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        return None

    def _patches_at(self, img_size: Tuple[int, int]) -> int:
        return 1  # no patch slimming on a feature map: one unit of 'patches' that never drops

    def _exit_head_args(self, layer: int, pool: str) -> Dict[str, Any]:
        """The map after unit ``layer``: its channels and spatial size at the model's input size."""
        shape = self._state_shapes()[layer - 1]
        if self.state_layout == 'NCHW':
            channels, grid = shape[1], shape[2:]
        elif self.state_layout == 'NHWC':
            channels, grid = shape[-1], shape[1:3]
        else:
            channels, grid = shape[-1], (shape[1], 1)
        return dict(embed_dim=int(channels), grid_size=tuple(int(v) for v in grid), layout=self.state_layout)

    def _state_shapes(self) -> List[Tuple[int, ...]]:
        """Shape of the state after each unit, for one image at the model's input size (the parent run once, eval
        mode, no grad; kept until the model changes size)."""
        key = ('shapes', self._input_size())
        if key not in self._flops:
            ref = next(self.parameters())
            x = torch.zeros(1, self._in_chans(), *self._input_size(), device=ref.device, dtype=ref.dtype)
            shapes = []
            with torch.no_grad(), eval_mode(self):
                x = self._embed(x)[0]
                for unit in self._units():
                    x = self._apply_block(unit, x, None, None)
                    shapes.append(tuple(x.shape))
            self._flops[key] = shapes
        return self._flops[key]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (no BatchNorm statistics updated, no dropout), every module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def stage_units(stages: Sequence[nn.Module]) -> List[Tuple[nn.Module, ...]]:
    """The units of stages that each run ``downsample`` then ``blocks`` (ConvNeXt-like): the downsampling goes with
    the stage's first block, every other block is a unit of its own."""
    units: List[Tuple[nn.Module, ...]] = []
    for stage in stages:
        blocks = list(stage.blocks)
        units.append((stage.downsample, blocks[0]))
        units.extend((blk,) for blk in blocks[1:])
    return units
