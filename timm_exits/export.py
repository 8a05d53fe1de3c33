""" Staged ONNX export with real per-image early exit: ``python -m timm_exits.export``.

An ONNX graph has no data-dependent control flow, so a multi-exit model is exported the way MEViT (000_*.txt) shipped
its early exits: one graph per segment between exits, driven by a small runtime loop
(``timm_exits.runtime.ExitSession``) that removes the images that left before the next segment runs.

    python -m timm_exits.export --model NAME [--model-kwargs k=v ...] [--checkpoint FILE] --output DIR [--static]

A staged export writes, for exits e_1 < ... < e_K (the final classifier is e_K):

- ``segment_{k}.onnx``: ``segment_1`` maps images (B, C, H, W) to the tokens after block e_1 (embedding included),
  ``segment_k`` the tokens after block e_{k-1} to those after e_k;
- ``exit_{e_k}.onnx``: the tokens after block e_k to that exit's ``logits`` and ``score`` (the value the exit
  criterion compares with the threshold: max softmax, normalised entropy or MEViT's uncertainty, eq. 3 of 000_*.txt;
  a ``task='regression'`` model: its values and largest predicted scale, or zeros under 'patience', whose agreement
  with the previous exit the runtime checks, carrying each image's previous prediction and counter).
  Heads are separate graphs so that, as in eager ``forward_dynamic``, a head runs only where the runtime needs it and
  the reported cost is the compute really spent;
- ``manifest.json``: exit layers, costs, criterion, default threshold and budget, the size and export id of every
  file, and the preprocessing (input size, mean, std, crop_pct, crop_mode, interpolation) resolved as validate
  resolves it: a flag (timm validate.py's names), else what the checkpoint records, else the pretrained cfg.

``--static`` writes one graph, ``model.onnx``: a LifeRegress model at its keep rate (or ``--keep-rate`` /
``--budget``; LifeRegress is always exported this way), a multi-exit model at full depth or at a fixed ``--budget``
(every image leaves at the deepest exit that fits). Every graph has a dynamic batch axis.

The export is written into a temporary folder beside ``--output`` and renamed into place when complete, so a
killed export never looks like a finished one.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm

from ._files import atomic_dir
from .data import add_data_config_args, counting_record, data_config_flags, resolve_data_cfg
from .models._base import check_fraction
from .models._checkpoint import read_checkpoint_args
from .models.life_regress_vit import LifeRegressMixin
from .models.multi_exit_vit import MultiExitMixin

__all__ = ['FORMAT', 'MANIFEST', 'export_onnx', 'main']

FORMAT = 1
MANIFEST = 'manifest.json'
EXPORT_ID_KEY = 'timm_exits_export_id'
_logger = logging.getLogger(__name__)


class _Segment(nn.Module):
    """Blocks ``start`` .. ``stop`` - 1 (0-based) of a multi-exit model, the walker's segment
    (``MultiExitMixin._segment``); the first segment embeds the images. With slimming at ``keep_rate`` the segment
    also takes and returns the predicted lives and kept positions of the patches once they exist (LifeRegress,
    003_*.txt), and each block runs on its n_t patches of longest life. A rotary parent's (Eva) position embedding at
    the export size is a constant of every segment; a kept patch's rows are gathered in the graph."""

    def __init__(self, model: MultiExitMixin, start: int, stop: int, example: torch.Tensor,
                 keep_rate: Optional[float] = None) -> None:
        super().__init__()
        self.model, self.start, self.stop = model, start, stop
        with torch.no_grad():
            rope = model._embed(example[:1])[1]
        self.ropes = [model._block_rope(rope, i) for i in range(start, stop)]
        counts, self.mu, self.sigma = model._schedule(keep_rate, tuple(example.shape[-2:]))
        self.counts = None if counts[-1] == counts[0] else counts[start:stop]
        life = getattr(model, 'life_layer', -1)
        self.life_at = life - start if self.counts is not None and start <= life < stop else -1

    def forward(self, x: torch.Tensor, lives: Optional[torch.Tensor] = None,
                kept: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        if self.start == 0:
            x = self.model._embed(x)[0]
        out = self.model._segment(x, lives, kept, list(self.model._exit_blocks())[self.start:self.stop], self.ropes,
                                  self.counts, self.life_at, self.mu, self.sigma, None, None, None, None, None,
                                  with_head=False)[:3]
        return tuple(t for t in out if t is not None)


class _ExitHead(nn.Module):
    """Logits and criterion score of the exit after block ``layer`` (1-based), from that block's tokens."""

    def __init__(self, model: MultiExitMixin, layer: int) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor):
        model = self.model
        if getattr(model, 'task', 'classification') == 'regression':  # values, and the largest predicted scale
            features = model.exit_features(self.layer, x)
            values = model.exit_head_module(self.layer)(features)
            if model.criterion.learned:
                return values, model.exit_scale(self.layer, features).amax(-1)
            return values, values.new_zeros(values.shape[0]).float()  # patience compares values in the runtime
        logits = model._exit_logits(self.layer, x)
        return logits, model.exit_scores(self.layer, logits).float()


class _Static(nn.Module):
    """The whole model at a fixed setting: LifeRegress at ``keep_rate``, a multi-exit model at ``budget`` (or full
    depth; with slimming, at ``keep_rate`` too). No threshold: nothing depends on the data, so one graph is right for
    every input."""

    def __init__(self, model: nn.Module, keep_rate: Optional[float] = None, budget: Optional[float] = None) -> None:
        super().__init__()
        self.model, self.keep_rate, self.budget = model, keep_rate, budget

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, LifeRegressMixin):
            return self.model(x, keep_rate=self.keep_rate)
        if self.budget is None and self.keep_rate is None:
            return self.model.forward_head(self.model.forward_features(x))
        slim = {} if self.keep_rate is None else dict(keep_rate=self.keep_rate)
        return self.model.forward_dynamic(x, budget=self.budget, **slim).logits


def _export_graph(module: nn.Module, example: Union[torch.Tensor, Tuple[torch.Tensor, ...]], path: Path,
                  output_names: Sequence[str], export_id: str) -> None:
    """One ONNX graph of ``module`` with a dynamic batch axis shared by its inputs (``example``: one tensor, or the
    tensors a segment passes on: tokens, lives, kept positions) (torch.onnx's dynamo exporter: the TorchScript one
    gets LifeRegress's population std wrong), the export id in its metadata."""
    import onnx
    examples = example if isinstance(example, tuple) else (example,)
    params = ('x', 'lives', 'kept')[:len(examples)]
    batch = torch.export.Dim('batch', min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # exporter notes; the graphs are checked against eager by the tests
        torch.onnx.export(
            module, examples, str(path), input_names=['input', *params[1:]], output_names=list(output_names),
            dynamo=True, dynamic_shapes={p: {0: batch} for p in params}, verbose=False, external_data=False)
    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = EXPORT_ID_KEY, export_id
    onnx.save(graph, str(path))


def _file_info(folder: Path) -> Dict[str, Dict[str, Any]]:
    out = {}
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out[path.name] = {'bytes': path.stat().st_size, 'sha256': digest}
    return out


def export_onnx(
        model: nn.Module,
        output: Union[str, Path],
        model_name: str = '',
        static: bool = False,
        keep_rate: Optional[float] = None,
        budget: Optional[float] = None,
        data_config: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Export ``model`` (a multi-exit or LifeRegress model) to the new folder ``output``; see the module docstring.

    Args:
        model: The model, any weights; put in eval mode here.
        output: Folder to create; must not exist or be empty.
        model_name: Recorded in the manifest (default: the model's architecture).
        static: One graph at a fixed setting instead of staged segments (LifeRegress: always).
        keep_rate: Keep rate of a model with slimming (default: the model's): LifeRegress's static graph, or every
            segment of a model with exits and slimming (whose budget then picks the exit at run time).
        budget: Fixed compute budget of the static graph: LifeRegress picks its keep rate, a multi-exit model its exit.
        data_config: The preprocessing recorded in the manifest (``timm_exits.data.resolve_data_cfg``; default: the
            model's pretrained cfg); the graphs take its input size.

    Returns:
        The folder.
    """
    if not isinstance(model, (MultiExitMixin, LifeRegressMixin)):
        raise ValueError(f'--model must be a multi-exit or LifeRegress model, got {type(model).__name__}; a plain timm '
                         f'model exports with torch.onnx.export directly')
    out = Path(output).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f'--output {out} exists and is not empty; name a new folder')
    life = isinstance(model, LifeRegressMixin)
    both = isinstance(model, MultiExitMixin) and getattr(model, 'life', None) is not None  # exits and slimming
    if keep_rate is not None and not (life or both):
        raise ValueError('--keep-rate applies to LifeRegress models and models with exits and slimming only; a '
                         'multi-exit model takes --budget')
    keep_rate = None if keep_rate is None else check_fraction('keep_rate', keep_rate, low_open=True)
    budget = None if budget is None else check_fraction('budget', budget, low_open=True)
    if budget is not None and not (static or life):
        raise ValueError('--budget fixes the exit of a --static graph; a staged export takes the budget at run time '
                         '(ExitSession(...)(x, budget=b))')
    model = model.eval()
    name = model_name or (getattr(model, 'pretrained_cfg', {}) or {}).get('architecture') or type(model).__name__
    export_id = uuid.uuid4().hex
    data_config = resolve_data_cfg(model) if data_config is None else data_config
    example = torch.randn(2, *data_config['input_size'], dtype=next(model.parameters()).dtype)
    manifest: Dict[str, Any] = {
        'format': FORMAT, 'timm_exits_version': _version(), 'export_id': export_id, 'model': name,
        'family': 'liferegress' if life else 'mexit_liferegress' if both else 'mexit',
        'num_classes': model.num_classes,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }
    if getattr(data_config, 'counting', None):  # the graphs count one crop: cut images as the model was trained
        manifest['counting'] = counting_record(data_config.counting)
    if both and not (life or static):  # the staged graphs slim at one keep rate, the budget then picks the exit
        keep_rate = model.keep_rate if keep_rate is None else keep_rate
        manifest['keep_rate'] = keep_rate
    with atomic_dir(out) as tmp:
        if life or static:
            if life:
                keep_rate = model.resolve_keep_rate(keep_rate, budget)
                cost, layer = model.flops_ratio(keep_rate), None
            else:
                size = model._img_size(example)  # costs at the exported size (a CNN's may differ from its own)
                rate, layer = model._plan_budget(budget, keep_rate, False, size)
                cost = model._count_flops(size, rate)['costs'][model.exit_layers.index(layer)]
                keep_rate = rate if both else None
            _export_graph(_Static(model, keep_rate, budget if not life else None), example, tmp / 'model.onnx',
                          ['logits'], export_id)
            manifest.update(mode='static', graph='model.onnx', keep_rate=keep_rate, budget=budget, exit_layer=layer,
                            cost=cost)
        else:
            layers = list(model.exit_layers)
            segments, heads, x, start, names = [], [], (example,), 0, ['input']
            with torch.no_grad():
                for k, layer in enumerate(layers, 1):
                    seg = _Segment(model, start, layer, example, keep_rate)
                    passed = seg(*x)
                    outputs = ['tokens', 'lives_out', 'kept_out'][:len(passed)]  # the next segment's inputs, in order
                    _export_graph(seg, x, tmp / f'segment_{k}.onnx', outputs, export_id)
                    _export_graph(_ExitHead(model, layer), passed[0], tmp / f'exit_{layer}.onnx', ['logits', 'score'],
                                  export_id)
                    segments.append({'file': f'segment_{k}.onnx', 'blocks': [start + 1, layer], 'inputs': names,
                                     'outputs': outputs})
                    heads.append({'file': f'exit_{layer}.onnx', 'layer': layer})
                    x, names, start = passed, ['input', 'lives', 'kept'][:len(passed)], layer
            flops = model._count_flops(model._img_size(example), keep_rate)  # at the exported size
            manifest.update(
                mode='staged', exit_layers=layers, exit_costs=list(flops['costs']),
                threshold_costs=list(flops['threshold_costs']), criterion=model.exit_criterion,
                confident_high=model.exit_criterion == 'confidence', default_threshold=model.threshold,
                default_budget=model.budget, segments=segments, heads=heads, task=model.task,
                exit_patience=model.exit_patience)
        if getattr(model, 'calibration', None):  # timm_exits.calibrate's choice, the defaults above
            manifest['calibration'] = dict(model.calibration)
        manifest['files'] = _file_info(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _version() -> str:
    from . import __version__
    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m timm_exits.export``: see the module docstring."""
    from timm.utils import ParseKwargs
    parser = argparse.ArgumentParser(
        prog='python -m timm_exits.export',
        description='Export a multi-exit model as staged ONNX graphs (one per segment between exits, per-image early '
                    'exit at run time with timm_exits.runtime.ExitSession), or any timm-exits model as one static '
                    'graph (--static).')
    parser.add_argument('--model', required=True, help='registered model name (import timm_exits registers them)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='create_model kwargs k=v')
    parser.add_argument('--checkpoint', default='', help='weights: .safetensors or a training checkpoint')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--output', required=True, help='new (or empty) folder for the graphs and manifest.json')
    parser.add_argument('--static', action='store_true', help='one graph: full depth, a fixed --budget, or LifeRegress')
    parser.add_argument('--budget', type=float, default=None, help='fixed budget of a --static graph')
    parser.add_argument('--keep-rate', type=float, default=None, help='LifeRegress keep rate of the graph')
    add_data_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        parser.exit(2, f'error: --checkpoint {args.checkpoint} does not exist\n')
    try:
        model = timm.create_model(args.model, checkpoint_path=args.checkpoint or None, **kwargs)
        recorded = read_checkpoint_args(args.checkpoint) if args.checkpoint else None
        data_config = resolve_data_cfg(model, data_config_flags(args), recorded, use_train_size=args.use_train_size)
        _logger.info(f'preprocessing: {data_config.describe()}')
        out = export_onnx(model, args.output, args.model, args.static, args.keep_rate, args.budget, data_config)
    except ImportError as e:
        parser.exit(2, f'error: {e}; install the deploy extra: pip install "timm-exits[deploy]"\n')
    except (ValueError, RuntimeError, OSError) as e:
        parser.exit(2, f'error: {e}\n'.replace('\n', ' ').rstrip() + '\n')
    manifest = json.loads((out / MANIFEST).read_text())
    _logger.info(f'exported {args.model} ({manifest["mode"]}) to {out}: '
                 + ', '.join(f for f in manifest['files']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
