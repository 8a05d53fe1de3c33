""" Early-exit branches for Vision Transformer backbones.

Every branch reads the token sequence a block emits, ``(B, num_prefix_tokens + N, D)``, and returns logits. Each ends
in ``self.head`` (an ``nn.Linear``, replaced by ``reset_classifier``), so a checkpoint's classifiers can be found by
name like timm's own ``head``.

Types (``EXIT_HEADS``):
- ``linear``: MEViT's single fully-connected classifier on the [CLS] token (sec. 2.1, 000_*.txt). The residual stream
  is not normalised mid-network, so a LayerNorm precedes the layer.
- ``mlp``: MLP-EE, Norm then a three-layer MLP with two dropouts on the [CLS] token (sec. III, 001_*.txt).
- ``cnn_ignore`` / ``cnn_add`` / ``cnn_project``: CNN-*-EE, patch tokens back on their 2D grid, one 3x3 convolution,
  max pooling and the MLP; the [CLS] token is dropped, added to every patch, or concatenated to every patch (Fig. 4).
- ``vit``: ViT-EE, one Transformer encoder layer (timm's ``Block``), Norm, MLP on the [CLS] token (Fig. 3b).
- ``mixer``: MLP-Mixer-EE, one mixer layer (eqs. 3a-3b), global average pooling, MLP (Fig. 3c).
- ``resmlp``: ResMLP-EE, one ResMLP layer with affine norms (eqs. 4a-4c), global average pooling, MLP (Fig. 3d).

Feature-map types, for parents whose blocks pass a map (B, C, H, W) / (B, H, W, C), or tokens (B, N, C) of a parent that
is not a ViT (``layout``: 'NCHW', 'NHWC', 'NLC'):
- ``sdn``: Shallow-Deep Networks' internal classifier: alpha * maxpool + (1 - alpha) * avgpool of the map to at most
  4 x 4 (one learned scalar alpha), flattened, one Linear (Kaya et al., ICML 2019); tokens pool to one vector.
- ``pool_linear``: global average pooling, one Linear (the parent's own head shape).

On a parent without a class token (SigLIP, ``class_token=False``) "the [CLS] token" above is the mean of the patch
tokens (``pool='avg'``); the CNN-Add/Project branches need a real one and are refused there.

Seed 001 does not give the widths: the MLP's hidden layers and the convolution have ``embed_dim`` units, and max
pooling is global so the branch works at any grid size.
"""
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn as nn

from timm.models.mlp_mixer import Affine, MixerBlock, ResBlock
from timm.models.vision_transformer import Block

from ._base import is_fx_tracing

__all__ = ['CACHEABLE_EXIT_HEADS', 'EXIT_HEADS', 'MAP_EXIT_HEADS', 'TOKEN_EXIT_HEADS', 'ExitHead', 'create_exit_head']


class ExitHead(nn.Module):
    """Base of every branch: a subclass's ``forward_features`` makes a (B, F) vector, ``head`` maps it to logits."""
    fixed_grid: bool = False  # True: only runs at the patch grid it was built with
    cacheable: bool = False  # True: ``reading`` (no parameter of the branch in it) and ``from_reading`` split forward
    state: str = 'tokens'  # what it reads: a ViT's tokens ('tokens') or a feature map / plain token state ('map')

    def __init__(
            self,
            embed_dim: int,
            num_classes: int,
            num_features: int,
            num_prefix_tokens: int = 1,
            grid_size: Tuple[int, int] = (14, 14),
            pool: str = 'token',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if pool not in ('token', 'avg'):
            raise ValueError(f"pool must be 'token' ([CLS]) or 'avg' (mean of the patch tokens), got {pool!r}")
        self.pool = pool
        self.embed_dim = embed_dim
        self.num_features = num_features
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = tuple(grid_size)
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, device=device, dtype=dtype)

    def _summary(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, D) token a branch classifies: [CLS] (``pool='token'``) or the mean of the patch tokens."""
        return x[:, 0] if self.pool == 'token' else x[:, self.num_prefix_tokens:].mean(1)

    def reading(self, x: torch.Tensor) -> torch.Tensor:
        """What the branch reads of its input before any of its parameters acts, (B, R): ``from_reading`` of it is the
        branch's output, so a frozen backbone's readings can be kept and the branch trained on them (``cacheable``
        branches only)."""
        raise NotImplementedError(f'{type(self).__name__} uses its parameters on every token: it has no reading to '
                                  f'keep (cacheable branches: those with cacheable=True)')

    def from_reading(self, r: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits (or features with ``pre_logits``) from ``reading``'s (B, R) output; equals ``forward``."""
        raise NotImplementedError(f'{type(self).__name__} has no reading to start from')

    def _make_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        return nn.Linear(self.num_features, num_classes, device=device, dtype=dtype) if num_classes > 0 \
            else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final linear layer (same device and dtype as the branch)."""
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, device=ref.device, dtype=ref.dtype)
        self.head.train(self.training)

    def forward(
            self,
            x: torch.Tensor,
            pre_logits: bool = False,
            grid_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Logits (or the (B, F) features with ``pre_logits``) of tokens x; ``grid_size``: the patch grid of x when
        it differs from the one the branch was built for (``dynamic_img_size``)."""
        x = self.forward_features(x, grid_size)
        return x if pre_logits else self.head(x)


def _pre_logits_mlp(in_dim: int, hidden: int, drop: float, dd: Dict) -> nn.Sequential:
    """The first two dense layers (with their dropouts) of seed 001's three-layer MLP; ``head`` is the third."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, **dd), nn.GELU(), nn.Dropout(drop),
        nn.Linear(hidden, hidden, **dd), nn.GELU(), nn.Dropout(drop),
    )


class LinearExit(ExitHead):
    """MEViT branch: LayerNorm and one linear layer on the [CLS] token, f_i(h_i) of eq. (1), 000_*.txt."""

    def __init__(self, embed_dim: int, num_classes: int, drop: float = 0., device=None, dtype=None, **kwargs):
        super().__init__(embed_dim, num_classes, embed_dim, device=device, dtype=dtype, **kwargs)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, device=device, dtype=dtype)
        self.drop = nn.Dropout(drop)

    cacheable = True

    def forward_features(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.drop(self.norm(self._summary(x)))

    def reading(self, x: torch.Tensor) -> torch.Tensor:
        return self._summary(x)

    def from_reading(self, r: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        r = self.drop(self.norm(r))
        return r if pre_logits else self.head(r)


class MlpExit(ExitHead):
    """MLP-EE: Norm(P^b), then the three-layer MLP on the normalised [CLS] token (sec. III, 001_*.txt)."""

    def __init__(self, embed_dim: int, num_classes: int, drop: float = 0., device=None, dtype=None, **kwargs):
        super().__init__(embed_dim, num_classes, embed_dim, device=device, dtype=dtype, **kwargs)
        dd = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.mlp = _pre_logits_mlp(embed_dim, embed_dim, drop, dd)

    cacheable = True

    def forward_features(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.mlp(self.norm(self._summary(x)))

    def reading(self, x: torch.Tensor) -> torch.Tensor:
        return self._summary(x)

    def from_reading(self, r: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        r = self.mlp(self.norm(r))
        return r if pre_logits else self.head(r)


class CnnExit(ExitHead):
    """CNN-Ignore/Add/Project-EE: patches on their grid, 3x3 conv, max pooling, MLP (Fig. 4, 001_*.txt)."""
    cls_mode: str = 'ignore'

    def __init__(self, embed_dim: int, num_classes: int, drop: float = 0., device=None, dtype=None, **kwargs):
        super().__init__(embed_dim, num_classes, embed_dim, device=device, dtype=dtype, **kwargs)
        dd = dict(device=device, dtype=dtype)
        self.cls_mode = type(self).cls_mode  # an instance attribute: TorchScript does not see class attributes
        in_chs = 2 * embed_dim if self.cls_mode == 'project' else embed_dim
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.conv = nn.Conv2d(in_chs, embed_dim, kernel_size=3, padding=1, **dd)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.mlp = _pre_logits_mlp(embed_dim, embed_dim, drop, dd)

    def forward_features(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x = self.norm(x)
        cls, patches = x[:, :1], x[:, self.num_prefix_tokens:]
        if self.cls_mode == 'add':
            patches = patches + cls
        elif self.cls_mode == 'project':
            patches = torch.cat([patches, cls.expand_as(patches)], dim=-1)
        B, N, C = patches.shape
        H, W = self.grid_size if grid_size is None else grid_size
        patches = patches.transpose(1, 2).reshape(B, C, H, W)
        x = self.pool(self.act(self.conv(patches))).flatten(1)
        return self.mlp(x)


class CnnIgnoreExit(CnnExit):
    cls_mode = 'ignore'


class CnnAddExit(CnnExit):
    cls_mode = 'add'


class CnnProjectExit(CnnExit):
    cls_mode = 'project'


class VitExit(ExitHead):
    """ViT-EE: one Transformer encoder layer over all tokens, Norm, MLP on [CLS] (Fig. 3b, 001_*.txt)."""

    def __init__(
            self,
            embed_dim: int,
            num_classes: int,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            drop: float = 0.,
            device=None,
            dtype=None,
            **kwargs,
    ):
        super().__init__(embed_dim, num_classes, embed_dim, device=device, dtype=dtype, **kwargs)
        dd = dict(device=device, dtype=dtype)
        self.block = Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, **dd)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.mlp = _pre_logits_mlp(embed_dim, embed_dim, drop, dd)

    def forward_features(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.mlp(self._summary(self.norm(self.block(x))))


class _TokenMlpExit(ExitHead):
    """Shared body of the MLP-Mixer and ResMLP branches: one layer on the patch tokens, pooling, MLP. The token-mixing
    layer has a weight per patch, so the branch runs only at the grid it was built for."""
    fixed_grid = True
    block_cls: Type[nn.Module] = MixerBlock
    norm_cls: Type[nn.Module] = nn.LayerNorm

    def __init__(self, embed_dim: int, num_classes: int, drop: float = 0., device=None, dtype=None, **kwargs):
        super().__init__(embed_dim, num_classes, embed_dim, device=device, dtype=dtype, **kwargs)
        dd = dict(device=device, dtype=dtype)
        seq_len = self.grid_size[0] * self.grid_size[1]
        self.block = self.block_cls(embed_dim, seq_len, **dd)
        self.norm = self.norm_cls(embed_dim, **dd)
        self.mlp = _pre_logits_mlp(embed_dim, embed_dim, drop, dd)

    def forward_features(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x = self.norm(self.block(x[:, self.num_prefix_tokens:]))
        return self.mlp(x.mean(dim=1))


class MixerExit(_TokenMlpExit):
    """MLP-Mixer-EE: token mixing (eq. 3a) and channel mixing (eq. 3b), pooling, MLP (Fig. 3c, 001_*.txt)."""
    block_cls = MixerBlock
    norm_cls = nn.LayerNorm


class ResMlpExit(_TokenMlpExit):
    """ResMLP-EE: cross-patch (eq. 4a) and cross-channel (eq. 4b) sublayers, Aff norm (eq. 4c) (Fig. 3d, 001_*.txt)."""
    block_cls = ResBlock
    norm_cls = Affine


class _MapExit(ExitHead):
    """Base of the feature-map branches: the map (``layout`` 'NCHW', 'NHWC' or 'NLC') of ``embed_dim`` channels at
    ``grid_size`` (its spatial size at the model's input size) pooled to a (B, F) vector, then ``head``."""
    state = 'map'

    def __init__(self, embed_dim: int, num_classes: int, num_features: int, layout: str = 'NCHW',
                 grid_size: Tuple[int, int] = (1, 1), device=None, dtype=None, **kwargs) -> None:
        if layout not in ('NCHW', 'NHWC', 'NLC'):
            raise ValueError(f"layout must be 'NCHW', 'NHWC' or 'NLC', got {layout!r}")
        self.layout = layout
        super().__init__(embed_dim, num_classes, num_features, num_prefix_tokens=0, grid_size=grid_size,
                         device=device, dtype=dtype)

    def _nchw(self, x: torch.Tensor) -> torch.Tensor:
        """The state as (B, C, H, W); tokens (B, N, C) as (B, C, N, 1)."""
        if self.layout == 'NHWC':
            return x.permute(0, 3, 1, 2)
        if self.layout == 'NLC':
            return x.transpose(1, 2).unsqueeze(-1)
        return x


class SdnExit(_MapExit):
    """Shallow-Deep Networks' internal classifier: alpha * max + (1 - alpha) * avg pooling to at most 4 x 4 (the map
    itself when smaller; tokens to 1), flattened, one Linear (Kaya et al., ICML 2019). Adaptive pooling: the branch
    runs at any input size."""

    def __init__(self, embed_dim: int, num_classes: int, layout: str = 'NCHW', grid_size: Tuple[int, int] = (4, 4),
                 drop: float = 0., device=None, dtype=None, **kwargs) -> None:
        out = (1, 1) if layout == 'NLC' else (min(4, int(grid_size[0])), min(4, int(grid_size[1])))
        super().__init__(embed_dim, num_classes, embed_dim * out[0] * out[1], layout=layout, grid_size=grid_size,
                         device=device, dtype=dtype)
        self.out_size = out
        self.alpha = nn.Parameter(torch.full((1,), .5, device=device, dtype=dtype))
        self.drop = nn.Dropout(drop)

    cacheable = True

    def forward_features(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x = self._nchw(x)
        mx, avg = _adaptive_pools(x, self.out_size)
        return self.drop((self.alpha * mx + (1 - self.alpha) * avg).flatten(1))

    def reading(self, x: torch.Tensor) -> torch.Tensor:
        """The max and the average pooling, flattened side by side (B, 2F): alpha mixes them afterwards."""
        mx, avg = _adaptive_pools(self._nchw(x), self.out_size)
        return torch.cat([mx.flatten(1), avg.flatten(1)], 1)

    def from_reading(self, r: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        mx, avg = r.chunk(2, dim=1)
        r = self.drop(self.alpha * mx + (1 - self.alpha) * avg)
        return r if pre_logits else self.head(r)


def _adaptive_pools(x: torch.Tensor, out: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adaptive max and average pooling of x (B, C, H, W) to ``out``: plain pooling where the size divides, else
    adaptive pooling, written out window by window (the same windows) for an ONNX export, which has no adaptive max.
    Under ``torch.jit.script`` and ``torch.fx`` tracing (where the spatial size is not a Python int to branch on)
    adaptive pooling, which takes the same windows."""
    if torch.jit.is_scripting():
        return nn.functional.adaptive_max_pool2d(x, out), nn.functional.adaptive_avg_pool2d(x, out)
    return _eager_pools(x, out)


@torch.jit.unused
def _eager_pools(x: torch.Tensor, out: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    if is_fx_tracing():
        return nn.functional.adaptive_max_pool2d(x, out), nn.functional.adaptive_avg_pool2d(x, out)
    (h, w), (oh, ow) = x.shape[-2:], out
    if h % oh == 0 and w % ow == 0:
        kernel = (h // oh, w // ow)
        return nn.functional.max_pool2d(x, kernel), nn.functional.avg_pool2d(x, kernel)
    if not (torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.jit.is_tracing()):
        return nn.functional.adaptive_max_pool2d(x, out), nn.functional.adaptive_avg_pool2d(x, out)
    rows = [(i * h // oh, -(-(i + 1) * h // oh)) for i in range(oh)]
    cols = [(j * w // ow, -(-(j + 1) * w // ow)) for j in range(ow)]
    windows = [x[:, :, r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in cols]
    shape = (x.shape[0], x.shape[1], oh, ow)
    return (torch.stack([t.amax((2, 3)) for t in windows], -1).reshape(shape),
            torch.stack([t.mean((2, 3)) for t in windows], -1).reshape(shape))


class PoolLinearExit(_MapExit):
    """Global average pooling of the map (or the tokens), one Linear: the shape of the parent's own classifier."""

    def __init__(self, embed_dim: int, num_classes: int, layout: str = 'NCHW', grid_size: Tuple[int, int] = (1, 1),
                 drop: float = 0., device=None, dtype=None, **kwargs) -> None:
        super().__init__(embed_dim, num_classes, embed_dim, layout=layout, grid_size=grid_size, device=device,
                         dtype=dtype)
        self.drop = nn.Dropout(drop)

    cacheable = True

    def forward_features(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.drop(self._nchw(x).mean((2, 3)))

    def reading(self, x: torch.Tensor) -> torch.Tensor:
        return self._nchw(x).mean((2, 3))

    def from_reading(self, r: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        r = self.drop(r)
        return r if pre_logits else self.head(r)


EXIT_HEADS: Dict[str, Type[ExitHead]] = {
    'linear': LinearExit,
    'mlp': MlpExit,
    'cnn_ignore': CnnIgnoreExit,
    'cnn_add': CnnAddExit,
    'cnn_project': CnnProjectExit,
    'vit': VitExit,
    'mixer': MixerExit,
    'resmlp': ResMlpExit,
    'sdn': SdnExit,
    'pool_linear': PoolLinearExit,
}
TOKEN_EXIT_HEADS = tuple(k for k, v in EXIT_HEADS.items() if v.state == 'tokens')  # heads of a ViT's tokens
MAP_EXIT_HEADS = tuple(k for k, v in EXIT_HEADS.items() if v.state == 'map')  # heads of a feature map
CACHEABLE_EXIT_HEADS = tuple(k for k, v in EXIT_HEADS.items() if v.cacheable)  # a parameter-free reading comes first


def create_exit_head(
        name: str,
        embed_dim: int,
        num_classes: int,
        num_heads: int = 12,
        mlp_ratio: float = 4.,
        num_prefix_tokens: int = 1,
        grid_size: Tuple[int, int] = (14, 14),
        drop: float = 0.,
        pool: str = 'token',
        layout: Optional[str] = None,
        device=None,
        dtype=None,
) -> ExitHead:
    """Build one branch by name; ``exit_head`` must be one of ``EXIT_HEADS``; ``layout`` only for feature-map heads."""
    if name not in EXIT_HEADS:
        raise ValueError(f'exit_head={name!r} is not a known exit head; allowed: {sorted(EXIT_HEADS)}')
    cls = EXIT_HEADS[name]
    if cls.state == 'map':
        return cls(embed_dim, num_classes, layout=layout or 'NCHW', grid_size=grid_size, drop=drop, device=device,
                   dtype=dtype)
    kwargs = dict(num_prefix_tokens=num_prefix_tokens, grid_size=grid_size, drop=drop, pool=pool, device=device,
                  dtype=dtype)
    if cls is VitExit:
        kwargs.update(num_heads=num_heads, mlp_ratio=mlp_ratio)
    return cls(embed_dim, num_classes, **kwargs)
