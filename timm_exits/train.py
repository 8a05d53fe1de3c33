""" Shared trainer of the recipes in ``train_recipes/``: a recipe is a ``Recipe`` (model, data, stages), this runs it.

Each ``Stage`` trains with one objective of ``timm_exits.tasks`` (MEViT's sandwich rule, Bakhtiarnia's classifier-wise
or end-to-end, a LifeRegress stage, the backbone alone) and its own optimizer and schedule, so a recipe can chain
them (LifeRegress's Algorithm 1, 003_*.txt; seed 004's frozen-then-unfrozen epochs). Built from timm's pieces: models
(``create_model``), data (``create_transform``, ``Mixup``), criteria (``create_classification_loss``), optimizers
(``create_optimizer_v2``), schedules (``create_scheduler_v2``; torch's ``ReduceLROnPlateau`` for Bakhtiarnia's
plateau rule) and AMP loss scaling (``NativeScaler``).

Files of a run folder (every one written atomically: temp file + ``os.replace``):

- ``last.pth.tar``: the only file written during training, after every epoch: model, optimizer, schedule, AMP scaler,
  stage and epoch, the log rows so far, the recipe (``dataclasses.asdict``) and the data folder. It is the run's one
  source of truth; each epoch reseeds every RNG from (seed, stage, epoch), so a resumed run ends in the same state as
  an uninterrupted one.
- ``log.jsonl``: one row per epoch (training loss, validation accuracy of every exit or keep rate, lr, seconds),
  rewritten from the checkpoint's rows after each checkpoint and when a run starts: a kill loses no row, a resume
  adds none twice.
- The finished products, written by the final step in this order: ``model.safetensors`` (the final weights; loads
  with ``timm.create_model(..., checkpoint_path=...)``; safetensors metadata ``'timm_exits'``: JSON of model,
  model_kwargs, num_classes, the checkpoint's 0-based stage and epoch (-1, -1 for a recipe without stages) and
  ``format`` 1, ``data_config``: the preprocessing its evaluation used (with ``counting``, the crops of a counting
  recipe), which validate, fit, calibrate, export and hub push read back;
  ``'recipe'`` and ``'data_dir'``: the run's arguments), then ``eval.json`` (the schema of
  ``timm_exits.validate``) and ``tradeoff.png``. Starting to train removes them, so no reader sees weights of an
  unfinished run; the final step is idempotent: a rerun of a finished run (or of one killed during the final step)
  rewrites them from ``last.pth.tar`` when one is missing or the weights do not carry the checkpoint's (stage, epoch).
  ``eval.json`` only ever lies next to the weights it describes.
- Temporary files a kill leaves (``<file>.tmp<pid>``) are removed when the next run starts. A rerun with arguments
  that change the result (anything but workers, log interval, evaluation batch size, device) refuses and lists the
  differences, unless ``allow_changed_args``; ``resume=False`` starts over.

A run that would make no optimizer step (a batch larger than the training split, ``grad_accum`` above the batches of
an epoch) stops before training. One process, or DDP under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl on
CUDA): the data is sharded by ``DistributedSampler`` and rank 0 validates and writes.

``python -m timm_exits.train step-cost --model deit_tiny_patch16_224`` measures what a multi-exit training step costs
against plain fine-tuning of the timm parent (interleaved timing).
"""
import argparse
import dataclasses
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

import timm
from timm.data import Mixup
from timm.loss import create_classification_loss
from timm.optim import create_optimizer_v2, list_optimizers, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler, ParseKwargs, dispatch_clip_grad, random_seed
from timm.utils.distributed import init_distributed_device_so
from safetensors import safe_open
from safetensors.torch import save_file

from ._files import atomic_write, write_json
from .data import _is_int, _is_number, check_counting, create_dataset, make_loader, resolve_data_cfg
from .evaluation import accuracies, collect_outputs, collect_regression_outputs, evaluate, regression_errors
from .models._checkpoint import layout_args
from .models.adapters import input_shape
from .plots import plot_tradeoff
from .tasks import TASKS, create_task, in_parts

_logger = logging.getLogger(__name__)

__all__ = ['Recipe', 'RunError', 'Stage', 'build_model', 'build_optimizer', 'main', 'step_cost', 'train']

CHECKPOINT = 'last.pth.tar'
WEIGHTS = 'model.safetensors'
EVAL = 'eval.json'
PLOT = 'tradeoff.png'
LOG = 'log.jsonl'
PRODUCTS = (EVAL, PLOT, WEIGHTS)  # removal order: the evaluation never outlives the weights it describes
RUN_FILES = (CHECKPOINT, LOG) + PRODUCTS
METADATA_KEY = 'timm_exits'
METADATA_FORMAT = 1
SCHEDULES = ('cosine', 'step', 'plateau', 'none')
# Recipe fields that do not change the trained weights or the evaluation (not compared when a run resumes)
UNCOMPARED_FIELDS = ('name', 'workers', 'log_interval', 'eval_batch_size')


class RunError(ValueError):
    """A run that cannot start: bad output folder or device, zero optimizer steps, arguments that differ from the
    run found in the output folder. Raised before anything trains."""


def _require(owner: str, name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f'{owner}.{name}={value!r} is not allowed: {allowed}')


def _require_int(owner: str, name: str, value: Any, low: int, optional: bool = False) -> None:
    _require(owner, name, value, (optional and value is None) or (_is_int(value) and value >= low),
             f'an integer >= {low}' + (' or None' if optional else ''))


def _require_number(owner: str, name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
                    high_open: bool = True, optional: bool = False) -> None:
    ok = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    _require(owner, name, value, (optional and value is None) or ok,
             f'a finite number in {interval}' + (' or None' if optional else ''))


@dataclass
class Stage:
    """One training stage: an objective of ``timm_exits.tasks`` with its optimizer and schedule.

    Args:
        task: Key of ``timm_exits.tasks.TASKS`` ('mevit', 'end_to_end', 'classifier_wise', 'backbone', 'liferegress',
            'mevit_liferegress').
        epochs: Epochs of the stage.
        opt: timm optimizer name ('sgd' is SGD with Nesterov off: timm's 'momentum').
        lr: Learning rate.
        momentum: SGD momentum.
        weight_decay: Weight decay (not on biases, norms, embeddings: timm's param groups).
        sched: 'cosine' (per update, timm), 'step' (timm's multistep: lr x ``decay_rate`` at each epoch of
            ``decay_epochs``, 0-based, e.g. SDN's x0.1 at 15), 'plateau' (torch ``ReduceLROnPlateau`` on the
            validation metric) or 'none'.
        warmup_epochs: Linear warm-up epochs of the cosine schedule.
        min_lr: Floor of the cosine schedule.
        decay_epochs: Epochs (0-based) from which the 'step' schedule multiplies the lr by ``decay_rate`` once more
            (torch ``MultiStepLR`` milestones: ``(15,)`` runs epochs 0-14 at lr, 15 on at lr x decay_rate).
        decay_rate: LR factor of the 'step' schedule.
        plateau_factor: LR factor on a plateau.
        plateau_patience: Epochs without improvement before the factor applies.
        early_stop: Stop the stage after this many epochs without improvement (None: never).
        part_lrs: Learning rate of named model parts, e.g. ``{'life': 1e-5}``; the rest uses ``lr``.
        task_kwargs: Arguments of the task (``num_sampled``, ``stage``, ``train_head``, ...).
        name: Shown in logs.
    """
    task: str
    epochs: int
    opt: str = 'momentum'
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.
    sched: str = 'cosine'
    warmup_epochs: int = 0
    min_lr: float = 0.
    decay_epochs: Tuple[int, ...] = ()
    decay_rate: float = 0.1
    plateau_factor: float = 0.6
    plateau_patience: int = 2
    early_stop: Optional[int] = None
    part_lrs: Dict[str, float] = field(default_factory=dict)
    task_kwargs: Dict[str, Any] = field(default_factory=dict)
    name: str = ''

    def __post_init__(self) -> None:
        _require('Stage', 'task', self.task, self.task in TASKS, f'one of {sorted(TASKS)}')
        _require('Stage', 'sched', self.sched, self.sched in SCHEDULES, f'one of {list(SCHEDULES)}')
        _require_int('Stage', 'epochs', self.epochs, 1)
        opt = self.opt.lower() if isinstance(self.opt, str) else None
        _require('Stage', 'opt', self.opt, opt is not None and opt.split('lookahead_')[-1] in list_optimizers(),
                 'a timm optimizer name (timm.optim.list_optimizers())')
        _require_number('Stage', 'lr', self.lr, 0., low_open=True)
        _require_number('Stage', 'momentum', self.momentum, 0., 1.)
        _require_number('Stage', 'weight_decay', self.weight_decay, 0.)
        _require_int('Stage', 'warmup_epochs', self.warmup_epochs, 0)
        _require_number('Stage', 'min_lr', self.min_lr, 0.)
        _require('Stage', 'decay_epochs', self.decay_epochs, isinstance(self.decay_epochs, (list, tuple)) and all(
            _is_int(e) and e >= 1 for e in self.decay_epochs) and list(self.decay_epochs) == sorted(
                set(self.decay_epochs)), 'increasing epoch numbers >= 1 (0-based epochs of the lr decay)')
        _require('Stage', 'decay_epochs', self.decay_epochs, self.sched == 'step' or not self.decay_epochs,
                 "empty unless sched='step'")
        _require('Stage', 'decay_epochs', self.decay_epochs, self.sched != 'step' or bool(self.decay_epochs),
                 "at least one epoch with sched='step'")
        _require_number('Stage', 'decay_rate', self.decay_rate, 0., 1., low_open=True)
        _require_number('Stage', 'plateau_factor', self.plateau_factor, 0., 1., low_open=True)
        _require_int('Stage', 'plateau_patience', self.plateau_patience, 0)
        _require_int('Stage', 'early_stop', self.early_stop, 1, optional=True)
        _require('Stage', 'part_lrs', self.part_lrs, isinstance(self.part_lrs, dict) and all(
            isinstance(k, str) and _is_number(v) and v > 0 for k, v in self.part_lrs.items()),
                 'a dict of model part name to a finite learning rate > 0')
        _require('Stage', 'task_kwargs', self.task_kwargs, isinstance(self.task_kwargs, dict), 'a dict')
        _require('Stage', 'name', self.name, isinstance(self.name, str), 'a string')
        self.name = self.name or self.task


@dataclass
class Recipe:
    """A paper setting: model, data and training stages.

    Args:
        name: Recipe name (output folder default).
        model: timm model name.
        dataset: 'digits', 'folder' (ImageFolder at data_dir/split) or 'torch/<name>' (see ``timm_exits.validate``).
        stages: Training stages, in order.
        model_kwargs: ``create_model`` arguments (img_size, exit_layers, exit_head, ...).
        pretrained: Start from the model's pretrained tag (the backbone; new parts are initialised).
        init_checkpoint: Start from this plain timm checkpoint instead, loaded through the model's pretrained filter.
        num_classes: Classes of the dataset.
        train_split / val_split / test_split: Splits for training, per-epoch validation and the final evaluation.
        batch_size: Per process batch size; ``grad_accum`` micro-batches make one update.
        eval_batch_size: Validation batch size.
        smoothing / mixup / cutmix: timm's label smoothing and Mixup/CutMix.
        resize_crop: > 0: TransFG's resize-then-crop augmentation at this resize (MEViT, 000_*.txt), else timm's.
        data_config: Preprocessing that differs from the model's pretrained cfg (keys of timm's
            ``resolve_data_config``: ``input_size`` or ``img_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``,
            ``interpolation``); the whole resolution is recorded with the weights.
        aug: Other ``timm.data.create_transform`` arguments for training.
        clip_grad: Gradient norm clipping.
        amp: Mixed precision: float16 with loss scaling on CUDA, bfloat16 on CPU.
        seed: Seed of every RNG (reseeded per epoch).
        workers: DataLoader workers.
        keep_rates: LifeRegress keep rates evaluated.
        latency_batch: Batch size of the final evaluation's latency timing (0: no timing).
        log_interval: Steps between progress lines.
    """
    name: str
    model: str
    dataset: str
    stages: List[Stage]
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    init_checkpoint: str = ''
    num_classes: Optional[int] = None
    train_split: str = 'train'
    val_split: str = 'val'
    test_split: str = ''
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    smoothing: float = 0.
    mixup: float = 0.
    cutmix: float = 0.
    resize_crop: int = 0
    data_config: Dict[str, Any] = field(default_factory=dict)
    aug: Dict[str, Any] = field(default_factory=dict)
    clip_grad: Optional[float] = None
    amp: bool = False
    seed: int = 42
    workers: int = 4
    keep_rates: Tuple[float, ...] = (1.0, 0.9, 0.8, 0.7)
    latency_batch: int = 0
    log_interval: int = 20

    def __post_init__(self) -> None:
        _require('Recipe', 'name', self.name, isinstance(self.name, str), 'a string')
        _require('Recipe', 'model', self.model, isinstance(self.model, str) and timm.is_model(self.model),
                 'a registered timm model name (timm.list_models())')
        _require('Recipe', 'dataset', self.dataset, isinstance(self.dataset, str) and bool(self.dataset),
                 "'digits', 'folder' or 'torch/<name>'")
        _require('Recipe', 'stages', self.stages, isinstance(self.stages, (list, tuple)) and all(
            isinstance(st, Stage) for st in self.stages), 'a list of Stage')
        _require('Recipe', 'model_kwargs', self.model_kwargs, isinstance(self.model_kwargs, dict), 'a dict')
        _require('Recipe', 'pretrained', self.pretrained, isinstance(self.pretrained, bool), 'True or False')
        _require('Recipe', 'init_checkpoint', self.init_checkpoint, isinstance(self.init_checkpoint, str),
                 "a file path or ''")
        _require_int('Recipe', 'num_classes', self.num_classes, 1, optional=True)
        for name in ('batch_size', 'eval_batch_size', 'grad_accum', 'log_interval'):
            _require_int('Recipe', name, getattr(self, name), 1)
        for name in ('workers', 'resize_crop', 'latency_batch', 'seed'):
            _require_int('Recipe', name, getattr(self, name), 0)
        _require_number('Recipe', 'smoothing', self.smoothing, 0., 1.)
        _require_number('Recipe', 'mixup', self.mixup, 0.)
        _require_number('Recipe', 'cutmix', self.cutmix, 0.)
        _require_number('Recipe', 'clip_grad', self.clip_grad, 0., low_open=True, optional=True)
        _require('Recipe', 'aug', self.aug, isinstance(self.aug, dict), 'a dict')
        _require('Recipe', 'data_config', self.data_config, isinstance(self.data_config, dict), 'a dict')

        _require('Recipe', 'amp', self.amp, isinstance(self.amp, bool), 'True or False')
        _require('Recipe', 'keep_rates', self.keep_rates, isinstance(self.keep_rates, (list, tuple)) and bool(
            self.keep_rates) and all(_is_number(k) and 0 < k <= 1 for k in self.keep_rates),
                 'a non-empty sequence of numbers in (0, 1]')


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model: pretrained tag, or ``init_checkpoint`` through the pretrained filter (backbone loaded
    strictly, new parts from the file if it has them, else initialised with a warning), or random."""
    kwargs = dict(recipe.model_kwargs)
    if recipe.num_classes is not None:
        kwargs['num_classes'] = recipe.num_classes
    if recipe.init_checkpoint:
        kwargs['pretrained_cfg_overlay'] = dict(file=recipe.init_checkpoint)
    try:
        return timm.create_model(recipe.model, pretrained=recipe.pretrained or bool(recipe.init_checkpoint), **kwargs)
    except RunError:
        raise
    except (TypeError, ValueError) as e:  # a keyword the constructor does not take, or a value it refuses
        raise RunError(f'model {recipe.model} with model_kwargs {recipe.model_kwargs}: {e}') from e


_FAMILY_MODULES = {'multi_exit_vit': 'mexit', 'life_regress_vit': 'liferegress'}


def family_model(name: str, like: str) -> str:
    """``name`` as a model of ``like``'s family: a model of that family as it is, a timm parent (any architecture an
    adapter serves for that family, tag kept: ViTs and Eva, and for exits CNNs too) as its twin:
    ``vit_base_patch14_reg4_dinov2.lvd142m`` -> ``vit_base_patch14_reg4_dinov2_mexit.lvd142m``, ``resnet50.a1_in1k``
    -> ``resnet50_mexit.a1_in1k`` for a multi-exit recipe."""
    modules = timm.models._registry._model_to_module
    family = _FAMILY_MODULES.get(modules.get(timm.models.get_arch_name(like), ''))
    arch, tag = timm.models.split_model_name_tag(name)
    if family is None or modules.get(arch) in _FAMILY_MODULES:
        if family is not None and _FAMILY_MODULES[modules[arch]] != family:
            raise ValueError(f'--model: {name!r} is a {_FAMILY_MODULES[modules[arch]]} model; this recipe trains '
                             f'{family} models ({like}); give a {family} model or its timm parent')
        return name
    twin = f'{arch}_{family}'
    if twin not in modules:
        from .models.adapters import FAMILY_STATES, supported_parents
        raise ValueError(f'--model: {name!r} is neither a {family} model nor a timm parent of one (an architecture '
                         f'built on {supported_parents(FAMILY_STATES[family])}, e.g. vit_base_patch14_reg4_dinov2 -> '
                         f'vit_base_patch14_reg4_dinov2_{family})')
    return f'{twin}.{tag}' if tag else twin


def build_optimizer(model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    """timm optimizer over the parameters that train, with timm's weight-decay groups, split by ``part_lrs``."""
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    groups = []
    for group in param_groups_weight_decay(model, stage.weight_decay, no_weight_decay_list=no_decay):
        by_lr: Dict[Optional[float], List[nn.Parameter]] = {}
        for p in group['params']:
            name = names[id(p)]
            lr = next((v for k, v in stage.part_lrs.items() if in_parts(name, (k,))), None)
            by_lr.setdefault(lr, []).append(p)
        groups += [{**group, 'params': ps, **({} if lr is None else {'lr': lr})} for lr, ps in by_lr.items()]
    return create_optimizer_v2(groups, opt=stage.opt, lr=stage.lr, weight_decay=stage.weight_decay,
                               momentum=stage.momentum)


def _build_scheduler(optimizer: torch.optim.Optimizer, stage: Stage, updates_per_epoch: int) -> Any:
    if stage.sched == 'cosine':
        return create_scheduler_v2(
            optimizer, 'cosine', num_epochs=stage.epochs, warmup_epochs=stage.warmup_epochs, min_lr=stage.min_lr,
            step_on_epochs=False, updates_per_epoch=updates_per_epoch)[0]
    if stage.sched == 'step':  # timm's milestone m applies from epoch m - 1: shifted, the decay starts at the epoch named
        return create_scheduler_v2(
            optimizer, 'multistep', num_epochs=stage.epochs, decay_milestones=[e + 1 for e in stage.decay_epochs],
            decay_rate=stage.decay_rate, warmup_epochs=stage.warmup_epochs, min_lr=stage.min_lr,
            step_on_epochs=True)[0]
    if stage.sched == 'plateau':
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode='max', factor=stage.plateau_factor, patience=stage.plateau_patience)
    return None



# --- run folder -------------------------------------------------------------------------------------------------------

class _Absent:
    def __repr__(self) -> str:
        return '(absent)'


_ABSENT = _Absent()


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON values: tuples become lists, other objects their ``str``."""
    return json.loads(json.dumps(value, default=str))


def _fingerprint(recipe: Dict[str, Any], data_dir: str) -> Dict[str, Any]:
    """What a resumed run must share with the run in the folder: the recipe (``dataclasses.asdict``) without the
    fields that change neither weights nor evaluation, and the data folder of datasets read from disk."""
    fp = {k: v for k, v in _jsonable(recipe).items() if k not in UNCOMPARED_FIELDS}
    if not fp.get('data_config'):  # runs recorded before the field existed compare equal
        fp.pop('data_config', None)
    for stage in fp.get('stages') or []:  # runs recorded before the step schedule existed compare equal
        if isinstance(stage, dict) and not stage.get('decay_epochs') and stage.get('decay_rate', .1) == .1:
            stage.pop('decay_epochs', None)
            stage.pop('decay_rate', None)
    if fp.get('dataset') != 'digits':
        fp['data_dir'] = data_dir
    return fp


def _flatten(value: Any, prefix: str = '') -> Dict[str, Any]:
    if isinstance(value, dict) and value:
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f'{prefix}.{k}' if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f'{prefix}[{i}]'))
        return out
    return {prefix: value}


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``'stages[0].lr: 0.003 -> 0.01'`` for every leaf where ``new`` differs from ``old``."""
    a, b = _flatten(old), _flatten(new)
    keys = list(dict.fromkeys([*b, *a]))
    return [f'{k}: {a.get(k, _ABSENT)!r} -> {b.get(k, _ABSENT)!r}' for k in keys
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _device_problem(device: str) -> Optional[str]:
    """Why ``device`` cannot run here, or None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f'{device!r} is not a torch device (allowed: cpu, cuda, cuda:N, mps, ...)'
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            return f'{device!r}: CUDA is not available on this machine (use cpu)'
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f'{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)'
    if dev.type == 'mps' and not torch.backends.mps.is_available():
        return f'{device!r}: MPS is not available on this machine (use cpu)'
    return None


def _output_problem(output: str) -> Optional[str]:
    """Why ``output`` cannot hold a run (creating it if needed), or None."""
    if not output:
        return "'' is not a folder"
    if os.path.exists(output) and not os.path.isdir(output):
        return f'{output!r} is a file, not a folder'
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        return f'{output!r} cannot be created ({e.strerror or e})'
    try:
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as e:
        return f'{output!r} is not writable ({e.strerror or e})'
    return None


def _file_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a readable file, or None."""
    if not os.path.exists(path):
        return f'{path!r} does not exist'
    if not os.path.isfile(path):
        return f'{path!r} is not a file'
    return None


def _read_metadata(path: str) -> Optional[Dict[str, str]]:
    """The safetensors metadata of ``path`` (empty when unreadable), None when there is no file."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, 'pt') as f:
            return f.metadata() or {}
    except Exception:  # a foreign or damaged file is simply not this run's product
        return {}


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _resume_state(recipe: Recipe, output: str, data_dir: str, resume: bool,
                  allow_changed_args: bool) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """The checkpoint in ``output`` (None: none, or not resuming) and how the arguments differ from its run's (or,
    without a checkpoint, from those of its finished products); ``RunError`` on differences unless allowed."""
    if not resume:
        return None, []
    path = os.path.join(output, CHECKPOINT)
    state = torch.load(path, map_location='cpu', weights_only=True) if os.path.exists(path) else None
    if state is not None:
        source, old, old_dir = CHECKPOINT, state.get('recipe'), state.get('data_dir', '')
    else:
        meta = _read_metadata(os.path.join(output, WEIGHTS)) or {}
        source, old_dir = WEIGHTS, meta.get('data_dir', '')
        try:
            old = json.loads(meta['recipe']) if 'recipe' in meta else None
        except ValueError:
            old = None
    diffs = [] if old is None else _differences(
        _fingerprint(old, old_dir), _fingerprint(dataclasses.asdict(recipe), os.path.abspath(data_dir) if data_dir
                                                 else ''))
    if diffs and not allow_changed_args:
        raise RunError(
            f'{output!r} holds a run ({source}) with other arguments, resuming would mix them: ' + '; '.join(diffs)
            + '. Rerun with its arguments, allow_changed_args=True (--allow-changed-args) to continue it with '
            'these, or resume=False (--no-resume) to start over')
    if state is not None and state['stage'] >= len(recipe.stages):
        raise RunError(f'{path} ended stage {state["stage"] + 1}, the recipe has {len(recipe.stages)} stages: use '
                       'resume=False (--no-resume) to start over')
    return state, diffs


class _Run:
    """State of one training run on one process."""

    def __init__(self, recipe: Recipe, output: str, data_dir: str, device: str, download: bool,
                 compile_backend: str = '') -> None:
        self.recipe = recipe
        self.output = output
        self.data_dir = os.path.abspath(data_dir) if data_dir else ''
        info = init_distributed_device_so(device=device)
        self.device = torch.device(info['device'])
        self.rank, self.world_size, self.distributed = info['global_rank'], info['world_size'], info['distributed']
        self.primary = self.rank == 0
        self.compile_backend = compile_backend
        if self.primary:
            try:  # fail now, not after training, when the final plot cannot be drawn
                import matplotlib  # noqa: F401
            except ImportError as e:
                raise ImportError('the recipes plot with matplotlib: pip install "timm-exits[train]"') from e
        random_seed(recipe.seed, self.rank)
        self.model = build_model(recipe).to(self.device)
        counting = {}
        if recipe.dataset == 'counting':  # crops counted from points, alike in every split (TransCrowd)
            try:
                check_counting(recipe.aug.get('crop'), recipe.aug.get('resize'), ("aug['crop']", "aug['resize']"))
            except ValueError as e:
                raise RunError(f'Recipe {e}') from e
            counting = {'count_' + k: recipe.aug[k] for k in ('crop', 'resize') if recipe.aug.get(k) is not None}
        try:  # the counting protocol is recorded with the data config, so later commands cut the images alike
            self.data_config = resolve_data_cfg(self.model, {**recipe.data_config, **counting}, use_train_size=True,
                                                flags=False)
        except ValueError as e:
            raise RunError(f'Recipe {e}') from e
        self.log(f'preprocessing: {self.data_config.describe()}')
        data = dict(data_dir=data_dir, download=download, data_config=self.data_config)
        offline = recipe.dataset == 'digits' or recipe.dataset.startswith('digits_count')  # tensors, no transform
        if not offline and recipe.dataset != 'counting':
            data.update(resize_crop=recipe.resize_crop)
        self.regression = getattr(self.model, 'task', None) == 'regression'
        if self.regression and (recipe.mixup > 0 or recipe.cutmix > 0 or recipe.smoothing > 0):
            raise RunError("mixup, cutmix and smoothing mix class labels; a task='regression' model trains on real "
                           "targets: set them to 0")
        self.train_set = create_dataset(recipe.dataset, recipe.train_split, self.model, True, **data,
                                        **({} if offline or recipe.dataset == 'counting' else recipe.aug))
        self.val_loader = make_loader(create_dataset(recipe.dataset, recipe.val_split, self.model, False, **data),
                                      recipe.eval_batch_size, recipe.workers)
        test_split = recipe.test_split or recipe.val_split
        self.test_loader = self.val_loader if test_split == recipe.val_split else make_loader(
            create_dataset(recipe.dataset, test_split, self.model, False, **data), recipe.eval_batch_size,
            recipe.workers)
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                          seed=recipe.seed, drop_last=True)
        self.train_loader = DataLoader(self.train_set, batch_size=recipe.batch_size, sampler=self.sampler,
                                       num_workers=recipe.workers, drop_last=True)
        batches = len(self.train_loader)
        if recipe.stages and batches == 0:
            per_process = '' if self.world_size == 1 else f' ({len(self.sampler)} per process on {self.world_size})'
            raise RunError(
                f'batch_size={recipe.batch_size} makes no optimizer step: the {recipe.train_split!r} split has '
                f'{len(self.train_set)} images{per_process} and the last incomplete batch is dropped; allowed: '
                f'batch_size <= {len(self.sampler)}')
        if recipe.stages and recipe.grad_accum > batches:
            raise RunError(
                f'grad_accum={recipe.grad_accum} makes no optimizer step: an epoch has {batches} batches of '
                f'batch_size={recipe.batch_size}; allowed: grad_accum <= {batches}')
        self.updates_per_epoch = max(batches // recipe.grad_accum, 1)
        num_classes = self.model.num_classes
        mixup = recipe.mixup > 0 or recipe.cutmix > 0
        self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.smoothing,
                           num_classes=num_classes) if mixup else None
        # regression tasks take their loss ('l1' / 'mse') as a task argument
        self.criterion = None if self.regression else create_classification_loss(
            smoothing=recipe.smoothing, soft_targets=mixup)
        self.amp_dtype = (torch.float16 if self.device.type == 'cuda' else torch.bfloat16) if recipe.amp else None
        self.checkpoint = os.path.join(output, CHECKPOINT)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def log(self, msg: str) -> None:
        if self.primary:
            _logger.info(msg)

    def broadcast(self, value: Any) -> Any:
        """``value`` of rank 0 on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def validate(self) -> Tuple[Dict[str, float], float]:
        """Per exit (or keep rate) validation accuracy on rank 0, and their mean (the stage's metric), on all."""
        accs: Dict[str, float] = {}
        if self.primary and self.regression:  # per exit MAE; the metric (maximised) is minus their mean
            out = collect_regression_outputs(self.model, self.val_loader, self.device, self.autocast)
            accs = {str(k): regression_errors(v, out['target'])[0] for k, v in zip(self.model.exit_layers,
                                                                                   out['values'])}
        elif self.primary:
            out = collect_outputs(self.model, self.val_loader, self.device, self.recipe.keep_rates, self.autocast)
            labels = getattr(self.model, 'exit_layers', None) or (
                self.recipe.keep_rates if hasattr(self.model, 'life') else ('top1',))
            accs = {str(k): a for k, a in zip(labels, accuracies(out['correct']))}
        accs = self.broadcast(accs)
        return accs, (-1 if self.regression else 1) * sum(accs.values()) / len(accs)

    def train_epoch(self, task: nn.Module, optimizer, scheduler, scaler, stage: Stage, epoch: int) -> float:
        """One epoch of ``task``; returns the mean training loss."""
        recipe, accum = self.recipe, self.recipe.grad_accum
        task.train()
        num_updates = epoch * self.updates_per_epoch
        total, count, start = 0., 0, time.time()
        steps = self.updates_per_epoch * accum
        clip_params = [p for p in task.model.parameters() if p.requires_grad]
        for i, (x, y) in enumerate(self.train_loader):
            if i >= steps:
                break
            x, y = x.to(self.device), y.to(self.device)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            update = (i + 1) % accum == 0
            with task.no_sync() if self.distributed and not update else nullcontext():
                with self.autocast():
                    loss = task(x, y)['loss']
                if scaler is not None:
                    scaler(loss / accum, optimizer, clip_grad=recipe.clip_grad, parameters=clip_params,
                           need_update=update)
                else:
                    (loss / accum).backward()
                    if update:
                        if recipe.clip_grad is not None:
                            dispatch_clip_grad(clip_params, recipe.clip_grad)
                        optimizer.step()
            if update:
                optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                if stage.sched == 'cosine':
                    scheduler.step_update(num_updates)
            total, count = total + float(loss.detach()), count + 1
            if (i + 1) % recipe.log_interval == 0 or i + 1 == steps:
                rate = (i + 1) * x.shape[0] * self.world_size / (time.time() - start)
                self.log(f'[{stage.name}] epoch {epoch + 1}/{stage.epochs} step {i + 1}/{steps} '
                         f'loss {total / count:.4f} lr {optimizer.param_groups[0]["lr"]:.3g} {rate:.1f} img/s')
        return total / max(count, 1)

    def path(self, name: str) -> str:
        return os.path.join(self.output, name)

    def read_log(self) -> List[Dict[str, Any]]:
        """The rows of ``log.jsonl`` (a checkpoint of an earlier version does not hold them)."""
        if not os.path.exists(self.path(LOG)):
            return []
        rows = []
        with open(self.path(LOG)) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # the half line of a kill
                    pass
        return rows

    def write_log(self, rows: List[Dict[str, Any]]) -> None:
        """``log.jsonl`` from the checkpoint's rows (removed when there are none), atomically."""
        if not rows:
            _remove(self.path(LOG))
            return

        def write(tmp: str) -> None:
            with open(tmp, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in rows)
        atomic_write(self.path(LOG), write)

    def save(self, state: Dict[str, Any]) -> None:
        """The training checkpoint, then the log rebuilt from its rows, atomically, on rank 0."""
        if self.primary:
            model_state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            atomic_write(self.checkpoint, lambda tmp: torch.save({**state, 'state_dict': model_state}, tmp))
            self.write_log(state['log'])
        if self.distributed:
            dist.barrier()

    def run(self, resume: bool = True, stop_after: Optional[int] = None, allow_changed_args: bool = False,
            resumed: Optional[Tuple[Optional[Dict[str, Any]], List[str]]] = None) -> Optional[Dict[str, Any]]:
        """Train what is left, then the final step; ``resumed``: ``_resume_state``'s answer when already known."""
        recipe = self.recipe
        _require_int('train', 'stop_after', stop_after, 1, optional=True)
        state, diffs = resumed or _resume_state(recipe, self.output, self.data_dir, resume, allow_changed_args)
        if diffs:
            self.log(f'continuing {self.output} with changed arguments: ' + '; '.join(diffs))
        first_stage, rows, key = 0, [], (-1, -1)  # key: (stage, epoch) of the weights, (-1, -1): untrained
        if state is not None:
            si = state['stage']
            stage = recipe.stages[si]
            done = state['epoch'] + 1 >= stage.epochs or (
                stage.early_stop is not None and state['bad_epochs'] >= stage.early_stop)
            first_stage, rows, key = si + int(done), list(state['log']) if 'log' in state else self.read_log(), (
                si, state['epoch'])
            self.model.load_state_dict(state['state_dict'])
            self.log(f'resumed from {self.checkpoint}: stage {si + 1}, epoch {state["epoch"] + 1} done')
        finished = first_stage >= len(recipe.stages)
        if self.primary:
            for name in os.listdir(self.output):  # what a killed run left
                if any(name.startswith(f'{f}.tmp') for f in RUN_FILES):
                    _remove(self.path(name))
            if not resume:
                _remove(self.checkpoint)
            if not resume or not finished or diffs:  # training starts or the products may describe other arguments
                for name in PRODUCTS:
                    _remove(self.path(name))
            if state is not None and diffs:  # the checkpoint records the arguments the run continues with
                state.update(recipe=dataclasses.asdict(recipe), data_dir=self.data_dir)
                atomic_write(self.checkpoint, lambda tmp: torch.save(state, tmp))
            self.write_log(rows)
        if self.distributed:
            dist.barrier()
        if finished:
            self.log(f'{self.output}: training finished')
        epochs_run = 0
        for si in range(first_stage, len(recipe.stages)):
            stage = recipe.stages[si]
            task = create_task(stage.task, self.model, self.criterion, **stage.task_kwargs).to(self.device)
            optimizer = build_optimizer(task.model, stage)
            scheduler = _build_scheduler(optimizer, stage, self.updates_per_epoch)
            scaler = NativeScaler(self.device.type) if self.amp_dtype == torch.float16 else None
            if self.compile_backend:
                task.compile(backend=self.compile_backend)
            if self.distributed:
                task.prepare_distributed(device_ids=[self.device] if self.device.type == 'cuda' else None)
            first_epoch, best, bad = 0, None, 0
            if state is not None and state['stage'] == si:
                optimizer.load_state_dict(state['optimizer'])
                if scheduler is not None:
                    scheduler.load_state_dict(state['scheduler'])
                if scaler is not None and state.get('scaler'):
                    scaler.load_state_dict(state['scaler'])
                first_epoch, best, bad = state['epoch'] + 1, state['best'], state['bad_epochs']
            if stage.sched == 'cosine':
                scheduler.step_update(first_epoch * self.updates_per_epoch)
            elif stage.sched == 'step':
                scheduler.step(first_epoch)
            self.log(f'stage {si + 1}/{len(recipe.stages)} [{stage.name}]: {stage.epochs} epochs, '
                     f'{sum(p.numel() for p in task.model.parameters() if p.requires_grad)} trainable parameters')
            for epoch in range(first_epoch, stage.epochs):
                if stop_after is not None and epochs_run >= stop_after:
                    return None
                random_seed(recipe.seed + 1000 * si + epoch, self.rank)
                self.sampler.set_epoch(1000 * si + epoch)
                start = time.time()
                loss = self.train_epoch(task, optimizer, scheduler, scaler, stage, epoch)
                accs, metric = self.validate()
                if stage.sched == 'plateau':
                    scheduler.step(metric)
                elif stage.sched == 'step':
                    scheduler.step(epoch + 1)
                best, bad = (metric, 0) if best is None or metric > best + 1e-9 else (best, bad + 1)
                done = epoch + 1 == stage.epochs or (stage.early_stop is not None and bad >= stage.early_stop)
                rows.append({'stage': stage.name, 'epoch': epoch + 1, 'train_loss': loss,
                             'val_mae' if self.regression else 'val_accuracy': accs,
                             'metric': metric, 'lr': optimizer.param_groups[0]['lr'], 'seconds': time.time() - start})
                self.save({
                    'stage': si, 'epoch': epoch, 'stage_done': done, 'best': best, 'bad_epochs': bad,
                    'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict() if scheduler else None,
                    'scaler': scaler.state_dict() if scaler else None, 'log': rows,
                    'recipe': dataclasses.asdict(recipe), 'data_dir': self.data_dir,
                    'data_config': self.data_config.record()})
                key = (si, epoch)
                self.log(f'[{stage.name}] epoch {epoch + 1}/{stage.epochs}: loss {loss:.4f}, val '
                         f'{"MAE" if self.regression else "accuracy"} '
                         + ', '.join(f'{k}: {v:.2f}' for k, v in accs.items()) + f' ({rows[-1]["seconds"]:.0f} s)')
                epochs_run += 1
                if done and epoch + 1 < stage.epochs:
                    self.log(f'[{stage.name}] early stop: no improvement in {bad} epochs')
                if done:
                    break
            state = None
        return self.finish(key)

    def _recorded_kwargs(self) -> Dict[str, Any]:
        """The recipe's model kwargs, completed with the layout the weights cannot show and that training fixed
        (exit criterion, life layer, prune layers, U; not the inference defaults threshold, budget, keep rate), so
        that a load with another one is refused even when the recipe left it at its default."""
        try:
            layout = layout_args(self.model)
        except ValueError:  # a plain timm model (the backbone alone)
            layout = {}
        keys = ('exit_criterion', 'life_layer', 'prune_layers', 'U', 'task', 'exit_input_size')
        fixed = {k: layout[k] for k in keys if k in layout}
        return {**fixed, **self.recipe.model_kwargs}

    def metadata(self, key: Tuple[int, int]) -> Dict[str, str]:
        """safetensors metadata of the final weights: model, kwargs, classes and the checkpoint's (stage, epoch)."""
        info = {'model': self.recipe.model, 'model_kwargs': _jsonable(self._recorded_kwargs()),
                'num_classes': int(self.model.num_classes), 'stage': int(key[0]), 'epoch': int(key[1]),
                'format': METADATA_FORMAT, 'data_config': self.data_config.record()}
        return {METADATA_KEY: json.dumps(info), 'recipe': json.dumps(_jsonable(dataclasses.asdict(self.recipe))),
                'data_dir': self.data_dir}

    def finish(self, key: Tuple[int, int]) -> Optional[Dict[str, Any]]:
        """Final step on rank 0, idempotent: ``model.safetensors`` of the weights at ``key`` (the checkpoint's stage
        and epoch), then ``eval.json`` and ``tradeoff.png``; what is already there and matches is kept."""
        result = None
        if self.primary:
            expected = self.metadata(key)
            found = _read_metadata(self.path(WEIGHTS))
            try:
                same = found is not None and json.loads(found.get(METADATA_KEY, 'null')) == json.loads(
                    expected[METADATA_KEY]) and _fingerprint(json.loads(found.get('recipe', '{}')), found.get(
                        'data_dir', '')) == _fingerprint(dataclasses.asdict(self.recipe), self.data_dir)
            except ValueError:
                same = False
            if not same:
                for name in PRODUCTS:  # the evaluation goes first: it never lies next to other weights
                    _remove(self.path(name))
                model_state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
                atomic_write(self.path(WEIGHTS), lambda tmp: save_file(model_state, tmp, metadata=expected))
            if os.path.exists(self.path(EVAL)):
                with open(self.path(EVAL)) as f:
                    result = json.load(f)
            else:
                test = self.recipe.test_split or self.recipe.val_split
                out = collect_regression_outputs(self.model, self.test_loader, self.device, self.autocast) \
                    if self.regression else collect_outputs(self.model, self.test_loader, self.device,
                                                            self.recipe.keep_rates, self.autocast)
                result = evaluate(self.model, self.test_loader, self.device, self.recipe.model,
                                  f'{self.recipe.dataset}:{test}', self.recipe.keep_rates,
                                  latency_batch=self.recipe.latency_batch, outputs=out)
                result['data_config'] = {**self.data_config.record(), 'sources': self.data_config.sources}
                write_json(result, self.path(EVAL))
            plot = self.path(os.path.basename(result['plot']))
            if not os.path.exists(plot):
                plot_tradeoff(result, plot)
            if same:
                self.log(f'{self.path(WEIGHTS)} and {self.path(EVAL)} were up to date')
            else:
                self.log(f'weights written to {self.path(WEIGHTS)}, evaluation to {self.path(EVAL)}')
        if self.distributed:
            dist.barrier()
        return result


def train(
        recipe: Recipe,
        output: str,
        data_dir: str = '',
        device: str = 'cpu',
        resume: bool = True,
        download: bool = False,
        stop_after: Optional[int] = None,
        compile_backend: str = '',
        allow_changed_args: bool = False,
) -> Optional[Dict[str, Any]]:
    """Run ``recipe``, writing to ``output``; returns the evaluation (rank 0), or None when stopped early.

    Args:
        resume: Continue from ``output/last.pth.tar`` when it exists (a finished run only rewrites missing or
            outdated products); False starts over, removing what the folder holds of an earlier run.
        download: Let torchvision download the dataset.
        stop_after: Stop after this many epochs (>= 1) in this call (a time-limited job); the next call resumes.
        compile_backend: ``torch.compile`` the trainable module with this backend.
        allow_changed_args: Continue the run in ``output`` even if it was started with other arguments (else
            ``RunError`` lists the differences).

    Raises:
        RunError: The run cannot start (see the class); nothing was written.
    """
    _require_int('train', 'stop_after', stop_after, 1, optional=True)
    problem = _device_problem(device)
    if problem:
        raise RunError(f'device: {problem}')
    if recipe.init_checkpoint:
        problem = _file_problem(recipe.init_checkpoint)
        if problem:
            raise RunError(f'init_checkpoint: {problem}')
    problem = _output_problem(output)
    if problem:
        raise RunError(f'output: {problem}')
    resumed = _resume_state(recipe, output, data_dir, resume, allow_changed_args)
    try:
        run = _Run(recipe, output, data_dir, device, download, compile_backend)
        return run.run(resume=resume, stop_after=stop_after, resumed=resumed)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'{text} is not allowed: an integer >= {low}')
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'{text} is not allowed: a finite number > 0')
    return value


def main(recipes: Union[Recipe, Dict[str, Recipe]], argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """Command line of a recipe file: ``python train_recipes/<recipe>.py --data-dir DIR [--output DIR] ...``.

    Bad arguments, and runs that cannot start (``RunError``), print one ``error:`` line and exit with status 2."""
    variants = recipes if isinstance(recipes, dict) else {'default': recipes}
    parser = argparse.ArgumentParser(description='Train a timm_exits recipe (resumes from OUTPUT/last.pth.tar).')
    parser.add_argument('--variant', default=next(iter(variants)), choices=list(variants))
    parser.add_argument('--data-dir', default='', help='dataset root (torchvision root or ImageFolder root)')
    parser.add_argument('--dataset-download', action='store_true', help='let torchvision download the dataset')
    parser.add_argument('--output', default='', help='output folder (default: output/<recipe name>)')
    parser.add_argument('--epochs', type=_int_at_least(1), nargs='+', default=None, help='epochs of each stage')
    parser.add_argument('--lr', type=_positive_float, nargs='+', default=None, help='learning rate of each stage')
    parser.add_argument('--batch-size', type=_int_at_least(1), default=None)
    parser.add_argument('--grad-accum', type=_int_at_least(1), default=None, help='micro-batches per update')
    parser.add_argument('--workers', type=_int_at_least(0), default=None)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='mixed precision (float16 + loss scaling on CUDA)')
    parser.add_argument('--torchcompile', nargs='?', const='inductor', default='', help='torch.compile backend')
    parser.add_argument('--init-checkpoint', default=None, help='plain timm checkpoint to start from')
    parser.add_argument('--model', default=None,
                        help="another model of the recipe's family, or any timm ViT / Eva parent (tag allowed), "
                             'which trains as its twin (<parent>_mexit or <parent>_liferegress)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--latency-batch', type=_int_at_least(0), default=None)
    parser.add_argument('--no-resume', action='store_true',
                        help='start over even if OUTPUT holds a run (its checkpoint and products are removed)')
    parser.add_argument('--allow-changed-args', action='store_true',
                        help='continue the run in OUTPUT although it was started with other arguments')
    parser.add_argument('--stop-after', type=_int_at_least(1), default=None,
                        help='stop after N epochs (resume later)')
    args = parser.parse_args(argv)
    recipe = variants[args.variant]
    changes: Dict[str, Any] = {k: v for k, v in dict(
        batch_size=args.batch_size, grad_accum=args.grad_accum, workers=args.workers,
        init_checkpoint=args.init_checkpoint, latency_batch=args.latency_batch).items() if v is not None}
    if args.amp:
        changes['amp'] = True
    if args.model_kwargs:
        changes['model_kwargs'] = {**recipe.model_kwargs, **args.model_kwargs}
    if args.model:
        try:
            changes['model'] = family_model(args.model, recipe.model)
        except ValueError as e:
            parser.error(f'argument {e}')
    stages = recipe.stages
    for key in ('epochs', 'lr'):
        values = getattr(args, key)
        if values is not None:
            if len(values) != len(stages):
                parser.error(f'argument --{key}: one value per stage ({len(stages)}: '
                             f'{", ".join(s.name for s in stages)}), got {len(values)}: {" ".join(map(str, values))}')
            stages = [dataclasses.replace(s, **{key: v}) for s, v in zip(stages, values)]
    changes['stages'] = stages
    try:
        recipe = dataclasses.replace(recipe, **changes)
    except ValueError as e:
        parser.error(str(e))
    data_problem = None
    if recipe.dataset != 'digits' and not os.path.isdir(args.data_dir or '.'):
        data_problem = f'{args.data_dir!r} is not a folder (dataset {recipe.dataset} reads it)'
    for flag, problem in (('--device', _device_problem(args.device)),
                          ('--init-checkpoint', args.init_checkpoint and _file_problem(args.init_checkpoint)),
                          ('--data-dir', data_problem)):
        if problem:
            parser.error(f'argument {flag}: {problem}')
    output = args.output or os.path.join('output', recipe.name)
    problem = _output_problem(output)
    if problem:
        parser.error(f'argument --output: {problem}')
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    try:
        return train(recipe, output, args.data_dir, args.device, resume=not args.no_resume,
                     download=args.dataset_download, stop_after=args.stop_after, compile_backend=args.torchcompile,
                     allow_changed_args=args.allow_changed_args)
    except RunError as e:
        parser.error(str(e))


# --- step cost --------------------------------------------------------------------------------------------------------

def step_cost(model: str = 'deit_tiny_patch16_224', batch_size: int = 32, rounds: int = 8, warmup: int = 2,
              num_classes: int = 100) -> Dict[str, float]:
    """Median time of one training step (forward, backward, SGD step) of each objective, interleaved, as a ratio to
    plain fine-tuning of the timm parent: 'mevit' (``MEViTTask``), 'end_to_end', and 'hook' (timm's
    ``ClassificationTask`` on the multi-exit model: what timm's train.py runs). Random weights and data."""
    for name, value, low in (('batch_size', batch_size, 1), ('rounds', rounds, 1), ('warmup', warmup, 0),
                             ('num_classes', num_classes, 1)):
        _require_int('step_cost', name, value, low)
    from timm.task import ClassificationTask
    from .benchmark import time_interleaved
    torch.manual_seed(0)
    parent = timm.create_model(model, num_classes=num_classes)
    x = torch.randn(batch_size, *input_shape(parent))
    y = torch.randint(0, num_classes, (batch_size,))
    criterion = nn.CrossEntropyLoss()
    tasks = {'plain': ClassificationTask(parent, criterion, verbose=False)}
    for name in ('mevit', 'end_to_end', 'hook'):
        m = timm.create_model(f'{model}_mexit', num_classes=num_classes)
        m.load_state_dict({**m.state_dict(), **parent.state_dict()})
        tasks[name] = ClassificationTask(m, criterion, verbose=False) if name == 'hook' else \
            create_task(name, m, criterion)

    def step(task: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            task(x, y)['loss'].backward()
            optimizer.step()
        return run

    candidates = {}
    for name, task in tasks.items():
        task.train()
        candidates[name] = step(task, torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1e-4))
    times = time_interleaved(candidates, rounds=rounds, warmup=warmup)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {'ms_plain': median['plain'], **{f'{k}_vs_plain': v / median['plain'] for k, v in median.items()
                                             if k != 'plain'}}


def _step_cost_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog='python -m timm_exits.train step-cost',
                                     description=inspect.cleandoc(step_cost.__doc__).replace('``', ''))
    parser.add_argument('--model', default='deit_tiny_patch16_224', help='timm parent of a *_mexit model')
    parser.add_argument('--batch-size', type=_int_at_least(1), default=32)
    parser.add_argument('--rounds', type=_int_at_least(1), default=8, help='timed rounds')
    parser.add_argument('--threads', type=_int_at_least(0), default=0, help='torch threads (0: torch default)')
    args = parser.parse_args(argv)
    if not timm.is_model(f'{args.model}_mexit'):
        parser.error(f'argument --model: {args.model!r} has no multi-exit variant {args.model + "_mexit"!r}')
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(dict(model=args.model, batch_size=args.batch_size, threads=torch.get_num_threads(),
                          **step_cost(args.model, args.batch_size, args.rounds)), indent=1))


USAGE = ('usage: python -m timm_exits.train step-cost [-h] [--model M] [--batch-size B] [--rounds R] [--threads T]\n'
         '(recipes run as scripts: python train_recipes/<recipe>.py --help)\n')

if __name__ == '__main__':
    if sys.argv[1:2] == ['step-cost']:
        _step_cost_main(sys.argv[2:])
    elif sys.argv[1:2] in (['-h'], ['--help']):
        sys.stdout.write(USAGE)
    else:
        sys.stderr.write(USAGE + f'error: the command is step-cost, got {" ".join(sys.argv[1:]) or "nothing"}\n')
        raise SystemExit(2)
