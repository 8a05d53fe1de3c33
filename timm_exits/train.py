""" Shared trainer of the recipes in ``train_recipes/``: a recipe is a ``Recipe`` (model, data, stages), this runs it.

Each ``Stage`` trains with one objective of ``timm_exits.tasks`` (MEViT's sandwich rule, Bakhtiarnia's classifier-wise
or end-to-end, a LifeRegress stage, the backbone alone) and its own optimizer and schedule, so a recipe can chain
them (LifeRegress's Algorithm 1, 003_*.txt; seed 004's frozen-then-unfrozen epochs). Built from timm's pieces: models
(``create_model``), data (``create_transform``, ``Mixup``), criteria (``create_classification_loss``), optimizers
(``create_optimizer_v2``), schedules (``create_scheduler_v2``; torch's ``ReduceLROnPlateau`` for Bakhtiarnia's
plateau rule) and AMP loss scaling (``NativeScaler``).

- Resumes after an interruption: ``last.pth.tar`` (model, optimizer, schedule, scaler, stage and epoch) is written
  atomically (temp file + ``os.replace``) after every epoch, and each epoch reseeds every RNG from (seed, stage, epoch),
  so a resumed run ends in the same state as an uninterrupted one.
- Logs progress, and after each epoch the validation accuracy of every exit (or keep rate) to the log and to
  ``log.jsonl``. At the end: ``model.safetensors`` (loads with ``timm.create_model(..., checkpoint_path=...)``),
  ``eval.json`` (the schema of ``timm_exits.validate``) and ``tradeoff.png``.
- One process, or DDP under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl on CUDA): the data is sharded by
  ``DistributedSampler`` and rank 0 validates and writes.

``python -m timm_exits.train step-cost --model deit_tiny_patch16_224`` measures what a multi-exit training step costs
against plain fine-tuning of the timm parent (interleaved timing).
"""
import argparse
import dataclasses
import json
import logging
import os
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
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler, ParseKwargs, dispatch_clip_grad, random_seed
from timm.utils.distributed import init_distributed_device_so
from safetensors.torch import save_file

from .tasks import TASKS, create_task, in_parts
from .validate import (
    accuracies, atomic_write, collect_outputs, create_dataset, evaluate, make_loader, plot_tradeoff, write_json,
)

_logger = logging.getLogger(__name__)

__all__ = ['Recipe', 'Stage', 'build_model', 'build_optimizer', 'main', 'step_cost', 'train']

CHECKPOINT = 'last.pth.tar'
SCHEDULES = ('cosine', 'plateau', 'none')


@dataclass
class Stage:
    """One training stage: an objective of ``timm_exits.tasks`` with its optimizer and schedule.

    Args:
        task: Key of ``timm_exits.tasks.TASKS`` ('mevit', 'end_to_end', 'classifier_wise', 'backbone', 'liferegress').
        epochs: Epochs of the stage.
        opt: timm optimizer name ('sgd' is SGD with Nesterov off: timm's 'momentum').
        lr: Learning rate.
        momentum: SGD momentum.
        weight_decay: Weight decay (not on biases, norms, embeddings: timm's param groups).
        sched: 'cosine' (per update, timm), 'plateau' (torch ``ReduceLROnPlateau`` on the validation metric) or 'none'.
        warmup_epochs: Linear warm-up epochs of the cosine schedule.
        min_lr: Floor of the cosine schedule.
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
    plateau_factor: float = 0.6
    plateau_patience: int = 2
    early_stop: Optional[int] = None
    part_lrs: Dict[str, float] = field(default_factory=dict)
    task_kwargs: Dict[str, Any] = field(default_factory=dict)
    name: str = ''

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f'task={self.task!r} is not known; allowed: {sorted(TASKS)}')
        if self.sched not in SCHEDULES:
            raise ValueError(f'sched={self.sched!r} is not known; allowed: {list(SCHEDULES)}')
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
    aug: Dict[str, Any] = field(default_factory=dict)
    clip_grad: Optional[float] = None
    amp: bool = False
    seed: int = 42
    workers: int = 4
    keep_rates: Tuple[float, ...] = (1.0, 0.9, 0.8, 0.7)
    latency_batch: int = 0
    log_interval: int = 20


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model: pretrained tag, or ``init_checkpoint`` through the pretrained filter (backbone loaded
    strictly, new parts from the file if it has them, else initialised with a warning), or random."""
    kwargs = dict(recipe.model_kwargs)
    if recipe.num_classes is not None:
        kwargs['num_classes'] = recipe.num_classes
    if recipe.init_checkpoint:
        kwargs['pretrained_cfg_overlay'] = dict(file=recipe.init_checkpoint)
    return timm.create_model(recipe.model, pretrained=recipe.pretrained or bool(recipe.init_checkpoint), **kwargs)


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
    if stage.sched == 'plateau':
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode='max', factor=stage.plateau_factor, patience=stage.plateau_patience)
    return None


class _Run:
    """State of one training run on one process."""

    def __init__(self, recipe: Recipe, output: str, data_dir: str, device: str, download: bool,
                 compile_backend: str = '') -> None:
        self.recipe = recipe
        self.output = output
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
        data = dict(data_dir=data_dir, download=download)
        if recipe.dataset != 'digits':
            data.update(resize_crop=recipe.resize_crop)
        self.train_set = create_dataset(recipe.dataset, recipe.train_split, self.model, True, **data,
                                        **({} if recipe.dataset == 'digits' else recipe.aug))
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
        self.updates_per_epoch = max(len(self.train_loader) // recipe.grad_accum, 1)
        num_classes = self.model.num_classes
        mixup = recipe.mixup > 0 or recipe.cutmix > 0
        self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.smoothing,
                           num_classes=num_classes) if mixup else None
        self.criterion = create_classification_loss(smoothing=recipe.smoothing, soft_targets=mixup)
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
        if self.primary:
            out = collect_outputs(self.model, self.val_loader, self.device, self.recipe.keep_rates, self.autocast)
            labels = getattr(self.model, 'exit_layers', None) or (
                self.recipe.keep_rates if hasattr(self.model, 'life') else ('top1',))
            accs = {str(k): a for k, a in zip(labels, accuracies(out['correct']))}
        accs = self.broadcast(accs)
        return accs, sum(accs.values()) / len(accs)

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

    def save(self, state: Dict[str, Any]) -> None:
        """Training checkpoint and the model's weights, atomically, on rank 0."""
        if self.primary:
            model_state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            atomic_write(self.checkpoint, lambda tmp: torch.save({'state_dict': model_state, **state}, tmp))
            atomic_write(os.path.join(self.output, 'model.safetensors'), lambda tmp: save_file(model_state, tmp))
        if self.distributed:
            dist.barrier()

    def run(self, resume: bool = True, stop_after: Optional[int] = None) -> Optional[Dict[str, Any]]:
        recipe = self.recipe
        state = torch.load(self.checkpoint, map_location='cpu', weights_only=True) \
            if resume and os.path.exists(self.checkpoint) else None
        if state is not None:
            self.model.load_state_dict(state['state_dict'])
            self.log(f'resumed from {self.checkpoint}: stage {state["stage"] + 1}, epoch {state["epoch"] + 1} done')
        first_stage = 0 if state is None else state['stage'] + int(state['stage_done'])
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
                best, bad = (metric, 0) if best is None or metric > best + 1e-9 else (best, bad + 1)
                done = epoch + 1 == stage.epochs or (stage.early_stop is not None and bad >= stage.early_stop)
                self.save({
                    'stage': si, 'epoch': epoch, 'stage_done': done, 'best': best, 'bad_epochs': bad,
                    'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict() if scheduler else None,
                    'scaler': scaler.state_dict() if scaler else None, 'recipe': dataclasses.asdict(recipe)})
                record = {'stage': stage.name, 'epoch': epoch + 1, 'train_loss': loss, 'val_accuracy': accs,
                          'metric': metric, 'lr': optimizer.param_groups[0]['lr'], 'seconds': time.time() - start}
                self.log(f'[{stage.name}] epoch {epoch + 1}/{stage.epochs}: loss {loss:.4f}, val accuracy '
                         + ', '.join(f'{k}: {v:.2f}' for k, v in accs.items()) + f' ({record["seconds"]:.0f} s)')
                if self.primary:
                    with open(os.path.join(self.output, 'log.jsonl'), 'a') as f:
                        f.write(json.dumps(record) + '\n')
                epochs_run += 1
                if done and epoch + 1 < stage.epochs:
                    self.log(f'[{stage.name}] early stop: no improvement in {bad} epochs')
                if done:
                    break
            state = None
        return self.finish()

    def finish(self) -> Optional[Dict[str, Any]]:
        """Final evaluation on rank 0: ``eval.json`` and ``tradeoff.png``."""
        result = None
        if self.primary:
            test = self.recipe.test_split or self.recipe.val_split
            out = collect_outputs(self.model, self.test_loader, self.device, self.recipe.keep_rates, self.autocast)
            result = evaluate(self.model, self.test_loader, self.device, self.recipe.model,
                              f'{self.recipe.dataset}:{test}', self.recipe.keep_rates,
                              latency_batch=self.recipe.latency_batch, outputs=out)
            write_json(result, os.path.join(self.output, 'eval.json'))
            plot_tradeoff(result, os.path.join(self.output, result['plot']))
            self.log(f'evaluation written to {os.path.join(self.output, "eval.json")}')
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
) -> Optional[Dict[str, Any]]:
    """Run ``recipe``, writing to ``output``; returns the evaluation (rank 0), or None when stopped early.

    Args:
        resume: Continue from ``output/last.pth.tar`` when it exists.
        download: Let torchvision download the dataset.
        stop_after: Stop after this many epochs in this call (a time-limited job); the next call resumes.
        compile_backend: ``torch.compile`` the trainable module with this backend.
    """
    os.makedirs(output, exist_ok=True)
    run = _Run(recipe, output, data_dir, device, download, compile_backend)
    try:
        return run.run(resume=resume, stop_after=stop_after)
    finally:
        if run.distributed and dist.is_initialized():
            dist.destroy_process_group()


def main(recipes: Union[Recipe, Dict[str, Recipe]], argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """Command line of a recipe file: ``python train_recipes/<recipe>.py --data-dir DIR [--output DIR] ...``."""
    variants = recipes if isinstance(recipes, dict) else {'default': recipes}
    parser = argparse.ArgumentParser(description='Train a timm_exits recipe (resumes from OUTPUT/last.pth.tar).')
    parser.add_argument('--variant', default=next(iter(variants)), choices=list(variants))
    parser.add_argument('--data-dir', default='', help='dataset root (torchvision root or ImageFolder root)')
    parser.add_argument('--dataset-download', action='store_true', help='let torchvision download the dataset')
    parser.add_argument('--output', default='', help='output folder (default: output/<recipe name>)')
    parser.add_argument('--epochs', type=int, nargs='+', default=None, help='epochs of each stage')
    parser.add_argument('--lr', type=float, nargs='+', default=None, help='learning rate of each stage')
    parser.add_argument('--batch-size', type=int, default=None)
    parser.add_argument('--grad-accum', type=int, default=None)
    parser.add_argument('--workers', type=int, default=None)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='mixed precision (float16 + loss scaling on CUDA)')
    parser.add_argument('--torchcompile', nargs='?', const='inductor', default='', help='torch.compile backend')
    parser.add_argument('--init-checkpoint', default=None, help='plain timm checkpoint to start from')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--latency-batch', type=int, default=None)
    parser.add_argument('--no-resume', action='store_true', help='start over even if OUTPUT/last.pth.tar exists')
    parser.add_argument('--stop-after', type=int, default=None, help='stop after N epochs (resume later)')
    args = parser.parse_args(argv)
    recipe = variants[args.variant]
    changes: Dict[str, Any] = {k: v for k, v in dict(
        batch_size=args.batch_size, grad_accum=args.grad_accum, workers=args.workers,
        init_checkpoint=args.init_checkpoint, latency_batch=args.latency_batch).items() if v is not None}
    if args.amp:
        changes['amp'] = True
    if args.model_kwargs:
        changes['model_kwargs'] = {**recipe.model_kwargs, **args.model_kwargs}
    stages = recipe.stages
    for key in ('epochs', 'lr'):
        values = getattr(args, key)
        if values is not None:
            if len(values) != len(stages):
                raise ValueError(f'--{key} needs one value per stage ({len(stages)}: '
                                 f'{[s.name for s in stages]}), got {values}')
            stages = [dataclasses.replace(s, **{key: v}) for s, v in zip(stages, values)]
    changes['stages'] = stages
    recipe = dataclasses.replace(recipe, **changes)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    output = args.output or os.path.join('output', recipe.name)
    return train(recipe, output, args.data_dir, args.device, resume=not args.no_resume,
                 download=args.dataset_download, stop_after=args.stop_after, compile_backend=args.torchcompile)


# --- step cost --------------------------------------------------------------------------------------------------------

def step_cost(model: str = 'deit_tiny_patch16_224', batch_size: int = 32, rounds: int = 8, warmup: int = 2,
              num_classes: int = 100) -> Dict[str, float]:
    """Median time of one training step (forward, backward, SGD step) of each objective, interleaved, as a ratio to
    plain fine-tuning of the timm parent: 'mevit' (``MEViTTask``), 'end_to_end', and 'hook' (timm's
    ``ClassificationTask`` on the multi-exit model: what timm's train.py runs). Random weights and data."""
    from timm.task import ClassificationTask
    from .benchmark import time_interleaved
    torch.manual_seed(0)
    parent = timm.create_model(model, num_classes=num_classes)
    x = torch.randn(batch_size, 3, *parent.patch_embed.img_size)
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
    parser = argparse.ArgumentParser(description=step_cost.__doc__.split('\n')[0])
    parser.add_argument('--model', default='deit_tiny_patch16_224', help='timm parent of a *_mexit model')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(dict(model=args.model, batch_size=args.batch_size, threads=torch.get_num_threads(),
                          **step_cost(args.model, args.batch_size, args.rounds)), indent=1))


if __name__ == '__main__':
    import sys
    if sys.argv[1:2] != ['step-cost']:
        raise SystemExit('usage: python -m timm_exits.train step-cost [--model M] [--batch-size B] [--rounds R]\n'
                         'recipes run as scripts: python train_recipes/<recipe>.py --help')
    _step_cost_main(sys.argv[2:])
