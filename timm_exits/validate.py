""" Evaluate a multi-exit or LifeRegress checkpoint on a dataset: ``python -m timm_exits.validate``.

timm's validate.py cannot load plugins and wants one output; this is the same evaluation the training recipes write:

- multi-exit: each exit's accuracy, cost (share of the full model's FLOPs, torch's flop counter), GFLOPs, latency and
  whether it is practical (more accurate than every earlier exit, II-A of 001_*.txt); per-image early exit at a range
  of thresholds (accuracy against mean compute, MEViT Fig. 2, 000_*.txt); anytime accuracy under compute budgets.
- LifeRegress: accuracy, FLOPs ratio, GFLOPs and latency at each keep rate rho (003_*.txt, Table III).
- ``--target-drop`` / ``--target-cost``: the threshold that meets a largest accuracy drop (points against the full
  model) or a largest mean compute share on ``--calib-split``, then what it gives on ``--split``.

Threshold results are simulated from one ``forward_exits`` pass: an image leaves at its first exit whose criterion
passes and pays the blocks up to it plus every exit head evaluated on the way, exactly what ``forward_dynamic`` does.

Datasets: ``digits`` (scikit-learn's bundled 8x8 digits, nothing downloaded), ``folder`` (an ImageFolder at
``data_dir/split``) or ``torch/<name>`` (torchvision: cifar10, cifar100, flowers102, stanford_cars, fgvc_aircraft,
imagenet; downloads only with ``--dataset-download``); counting sets for regression models: ``digits_count`` and
``counting``, cut into crops as the checkpoint records (``--count-crop`` / ``--count-resize`` override), with crops
scored per crop and per image (the sum of its crops: ``image_mae``, ``image_rmse``).
"""
import argparse
import json
import logging
import math
import os
import sys
import tempfile
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import timm
from timm.utils import ParseKwargs

from ._files import atomic_write, write_json
from .data import (  # noqa: F401  (re-exported: the names this module held)
    TORCHVISION_DATASETS, DigitsCountDataset, DigitsDataset, add_data_config_args, available_cpus, build_transform,
    create_dataset, data_config_flags, digits_augment, make_loader, resolve_data_cfg,
)
from .evaluation import (  # noqa: F401  (re-exported)
    DEFAULT_KEEP_RATES, DEFAULT_THRESHOLDS, accuracies, budget_table, budgeted_batch_table, candidate_thresholds,
    choose_threshold, collect_outputs, collect_regression_outputs, evaluate, practical_exits, select_threshold,
    threshold_table,
)
from .models._base import UntrainedWeightsWarning, new_parts_filter
from .models._checkpoint import (
    HIDDEN_LAYOUT, check_checkpoint_args, checkpoint_model_args, load_checkpoint_into, read_checkpoint, same_value,
)
from .models.multi_exit_vit import MultiExitMixin
from .plots import plot_tradeoff

_logger = logging.getLogger(__name__)

# The names this module held before the data, evaluation, plots and file modules were split off stay importable here.
__all__ = [
    'DigitsDataset', 'accuracies', 'atomic_write', 'available_cpus', 'budget_table', 'budgeted_batch_table',
    'build_parser', 'build_transform', 'choose_threshold', 'collect_outputs', 'create_dataset', 'evaluate', 'main',
    'make_loader', 'practical_exits', 'plot_tradeoff', 'run', 'select_threshold', 'threshold_table', 'write_json',
]


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be an integer >= {low}, got {text!r}')
        if value < low:
            raise argparse.ArgumentTypeError(f'must be an integer >= {low}, got {value}')
        return value
    return parse


def _number(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    allowed = f'a number in {"(" if low_open else "["}{low:g}, {high:g}]' if math.isfinite(high) else \
        f'a finite number {">" if low_open else ">="} {low:g}'

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {allowed}, got {text!r}')
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f'must be {allowed}, got {text}')
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m timm_exits.validate``."""
    parser = argparse.ArgumentParser(prog='python -m timm_exits.validate', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default=None,
                        help='timm model name (timm_exits registers its models); default: the one the checkpoint names')
    parser.add_argument('--checkpoint', default='', help='weights: .safetensors or a training checkpoint; the model '
                        'kwargs and num_classes it records are used unless given here')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='create_model kwargs k=v (win over the checkpoint\'s, except a conflicting layout)')
    parser.add_argument('--num-classes', type=_int_at_least(0), default=None,
                        help='default: the checkpoint\'s, else the model\'s')
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained tag instead of a checkpoint')
    parser.add_argument('--dataset', default='folder',
                        help='digits, folder, torch/<name>; counting sets (regression models): '
                        'digits_count[/<seed>] or counting (images with counts.csv or point files)')
    parser.add_argument('--data-dir', default='')
    parser.add_argument('--dataset-download', action='store_true', help='let torchvision download the dataset')
    parser.add_argument('--split', default='test', help='split evaluated')
    parser.add_argument('--resize-crop', type=_int_at_least(0), default=0,
                        help='TransFG eval transform: resize then centre crop')
    parser.add_argument('--in-chans', type=_int_at_least(1), default=None, help='image channels of the model')
    parser.add_argument('--batch-size', type=_int_at_least(1), default=64)
    workers = min(4, available_cpus())
    parser.add_argument('--workers', type=_int_at_least(0), default=workers,
                        help=f'data loading processes (default: {workers}, never above the CPUs available)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--keep-rates', type=_number(0., 1., low_open=True), nargs='+',
                        default=list(DEFAULT_KEEP_RATES), help='LifeRegress keep rates, each in (0, 1]')
    parser.add_argument('--latency-batch', type=_int_at_least(0), default=0,
                        help='time each exit / keep rate at this batch size')
    parser.add_argument('--output', default='eval', help='folder for eval.json, tradeoff.png, threshold.json')
    parser.add_argument('--calib-split', default='', help='split on which the threshold is chosen')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target-drop', type=_number(0.), default=None,
                        help='largest accuracy drop in points (>= 0)')
    target.add_argument('--target-cost', type=_number(0., 1., low_open=True), default=None,
                        help='largest mean share of the full FLOPs, in (0, 1]')
    add_data_config_args(parser)
    return parser


def _check_data(args: argparse.Namespace, split: str, flag: str) -> None:
    """Refuse an unknown dataset or split, naming the flag, before any model is built."""
    name = args.dataset
    if name == 'digits':
        if split not in DigitsDataset.splits:
            raise ValueError(f'{flag} {split!r} is not a split of digits; allowed: {list(DigitsDataset.splits)}')
    elif name.startswith('digits_count'):
        if split not in DigitsCountDataset.splits:
            raise ValueError(f'{flag} {split!r} is not a split of digits_count; allowed: '
                             f'{list(DigitsCountDataset.splits)}')
    elif name in ('folder', 'counting'):
        folder = os.path.join(args.data_dir, split)
        if not os.path.isdir(folder):
            raise ValueError(
                f'{flag} {split!r}: --dataset {name} reads '
                f'{"an ImageFolder" if name == "folder" else "a counting set"} at --data-dir/{split}, and {folder!r} '
                f'is not a folder')
    else:
        key = name.split('/', 1)[1] if name.startswith('torch/') else ''
        if key not in TORCHVISION_DATASETS:
            raise ValueError(
                f'--dataset {name!r} is not known; allowed: digits, folder, '
                f'{", ".join("torch/" + k for k in TORCHVISION_DATASETS)}, digits_count[/<seed>], counting')
        splits = TORCHVISION_DATASETS[key][1]
        if split not in splits:
            raise ValueError(f'{flag} {split!r} is not a split of {name}; allowed: {list(splits)}')


def _check_output(folder: str) -> None:
    """Create ``folder`` and make sure a file can be written there (before minutes of evaluation)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-test'):
            pass
    except OSError as e:
        raise ValueError(f'--output {folder!r} cannot be written: {e.strerror or e}') from e


def _model_arguments(
        args: argparse.Namespace,
        recorded: Optional[Dict[str, Any]],
) -> Tuple[str, Dict[str, Any]]:
    """Model name and create_model kwargs: the checkpoint's recorded ones, the command line's on top; a command line
    layout argument the weights cannot show that disagrees with the checkpoint's is an error."""
    ck_model, ck_kwargs, ck_classes = checkpoint_model_args(recorded)
    name = args.model or ck_model
    if not name:
        raise ValueError('--model is required: ' + (
            'the checkpoint does not name its model' if args.checkpoint else 'no --checkpoint to read it from'))
    kwargs = {k: v for k, v in ck_kwargs.items() if v is not None}
    for key, value in args.model_kwargs.items():
        if key in HIDDEN_LAYOUT and key in kwargs and not same_value(value, kwargs[key]):
            raise ValueError(
                f'--model-kwargs {key}={value!r} conflicts with the checkpoint, trained with {key}={kwargs[key]!r} (a '
                f'layout the weights cannot show); drop it or pass {key}={kwargs[key]!r}')
        kwargs[key] = value
    num_classes = args.num_classes if args.num_classes is not None else ck_classes
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if getattr(args, 'in_chans', None) is not None:
        kwargs['in_chans'] = args.in_chans
    if ck_kwargs or ck_classes is not None:
        taken = {k: v for k, v in kwargs.items() if k not in args.model_kwargs and not (
            k == 'num_classes' and args.num_classes is not None)}
        _logger.info(f'from the checkpoint: model {ck_model}, kwargs {taken}')
    return name, kwargs


def _create_model(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ValueError(
                f'--model {name!r} is not a registered model; list them with timm.list_models(\'*mexit*\') or '
                f'timm.list_models(\'*liferegress*\') after import timm_exits') from e
        raise
    except TypeError as e:  # an unknown keyword argument of the model's constructor
        raise ValueError(f'--model {name} with kwargs {kwargs}: {e}') from e


def _load_weights(model: nn.Module, path: str, state_dict: Dict[str, torch.Tensor],
                  recorded: Optional[Dict[str, Any]]) -> None:
    """Load the checkpoint strictly; one without the exits / life predictor (a plain backbone) loads its backbone
    through the pretrained filter, which warns that the new parts are untrained."""
    prefixes = getattr(model, 'new_prefixes', ())
    if prefixes and not any(k.startswith(prefixes) for k in state_dict):
        _logger.warning(f'warning: checkpoint {path} has no {model.new_parts_name}; loading its backbone only')
        check_checkpoint_args(model, recorded, f'checkpoint {path}')
        try:
            model.load_state_dict(new_parts_filter(state_dict, model), strict=True)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f'checkpoint {path} does not fit this model: {e}') from e
        return
    load_checkpoint_into(model, state_dict, recorded, path)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate as the command line asks (see ``main``); bad input raises ValueError / OSError naming the flag."""
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f'--device {args.device!r} is not a torch device; e.g. cpu, cuda, cuda:1, mps') from e
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {args.device!r}: CUDA is not available here; use --device cpu')
    for split, flag in ((args.split, '--split'), (args.calib_split, '--calib-split')):
        if split:
            _check_data(args, split, flag)
    _check_output(args.output)
    targets = args.target_drop is not None or args.target_cost is not None

    state_dict, recorded = None, None
    if args.checkpoint:
        try:
            state_dict, recorded = read_checkpoint(args.checkpoint, prefer_ema=True)
        except FileNotFoundError as e:
            raise ValueError(f'--checkpoint: {e}') from e
    name, kwargs = _model_arguments(args, recorded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', UntrainedWeightsWarning)
        model = _create_model(name, args.pretrained, kwargs)
        if state_dict is not None:
            _load_weights(model, args.checkpoint, state_dict, recorded)
    for w in caught:  # the untrained-parts warning in the CLI's log, once; any other warning as it came
        if issubclass(w.category, UntrainedWeightsWarning):
            _logger.warning(f'warning: {w.message}')
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if state_dict is None and not args.pretrained:
        _logger.warning(f'warning: {name} has random weights (neither --checkpoint nor --pretrained): the numbers '
                        f'below say nothing about a trained model')
    if targets and not isinstance(model, MultiExitMixin):
        raise ValueError('--target-drop / --target-cost choose an early-exit threshold: a multi-exit model only')
    if targets and getattr(model, 'task', None) == 'regression':
        raise ValueError("--target-drop / --target-cost are in accuracy points; a task='regression' model is judged "
                         "by MAE: read eval.json's 'thresholds' and 'budgeted_batch' (MAE against mean cost)")
    try:
        model = model.to(device).eval()
    except RuntimeError as e:
        raise ValueError(f'--device {args.device!r}: cannot move the model there ({e})') from e
    data_config = resolve_data_cfg(model, data_config_flags(args), recorded, use_train_size=args.use_train_size)
    _logger.info(f'preprocessing: {data_config.describe()}')

    def loader(split: str) -> DataLoader:
        ds = create_dataset(args.dataset, split, model, False, args.data_dir, args.dataset_download, data_config,
                            **({'resize_crop': args.resize_crop} if args.dataset != 'digits' else {}))
        if len(ds) == 0:
            raise ValueError(f'--dataset {args.dataset} split {split!r} has no images')
        return make_loader(ds, args.batch_size, args.workers)

    progress = not args.no_progress
    test_loader = loader(args.split)
    multi_exit = isinstance(model, MultiExitMixin)
    if getattr(model, 'task', None) == 'regression':  # MAE and RMSE per exit, patience and scale sweeps
        outputs = collect_regression_outputs(model, test_loader, device)
        calib = collect_regression_outputs(model, loader(args.calib_split), device) if args.calib_split else None
    else:
        outputs = collect_outputs(model, test_loader, device, args.keep_rates, progress=progress, desc=args.split)
        calib = collect_outputs(model, loader(args.calib_split), device, progress=progress, desc=args.calib_split) \
            if args.calib_split and multi_exit else None
    result = evaluate(model, test_loader, device, name, args.dataset, args.keep_rates,
                      latency_batch=args.latency_batch, outputs=outputs, calib_outputs=calib)
    result['data_config'] = {**data_config.record(), 'sources': data_config.sources}
    try:
        plot_tradeoff(result, os.path.join(args.output, result['plot']))
    except ImportError:
        _logger.warning('warning: no trade-off plot: matplotlib is not installed (pip install matplotlib)')
        result.pop('plot')
    write_json(result, os.path.join(args.output, 'eval.json'))
    _logger.info(json.dumps({k: v for k, v in result.items() if k not in (
        'thresholds', 'budgets', 'budgeted_batch', 'data_config')}, indent=1))
    worst = result.get('worst_case_threshold_cost', 0.)
    if worst > 1.:
        _logger.warning(f'warning: with a threshold and no budget, an image that no exit lets go costs {worst:.4f} of '
                        f'the full model (every block and every exit head): more than the full model; a budget caps it')
    if targets:
        choice = choose_threshold(model, outputs if calib is None else calib, args.target_drop, args.target_cost)
        applied = threshold_table(outputs['scores'], outputs['correct'], list(model.threshold_costs),
                                  [choice['threshold']], model.exit_criterion == 'confidence')[0]
        choice.update(split=args.split, accuracy=applied['accuracy'], mean_cost=applied['mean_cost'])
        write_json(choice, os.path.join(args.output, 'threshold.json'))
        _logger.info(f'threshold: {json.dumps(choice)}')
    return result


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
                argv: Optional[List[str]] = None) -> Any:
    """Parse ``argv`` and ``run`` it; bad input (ValueError, OSError, RuntimeError, ImportError) prints one ``error:
    ...`` line and exits with status 2 (validate, fit and calibrate)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        parser.exit(2, f'error: {" ".join(str(e).split())}\n')


def callable_module(name: str, function: Callable[..., Any]) -> None:
    """Make the module ``name`` callable as ``function`` (``timm_exits.fit(model, loader, ...)``,
    ``timm_exits.calibrate(model, loader, epsilon=, delta=)``)."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    sys.modules[name].__class__ = CallableModule


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``python -m timm_exits.validate``: bad input prints one ``error: ...`` line and exits with status 2."""
    return run_command(build_parser(), run, argv)


if __name__ == '__main__':
    main()
