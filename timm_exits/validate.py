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
imagenet; downloads only with ``--dataset-download``).
"""
import argparse
import json
import logging
import math
import os
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import timm
from timm.data import create_transform, resolve_data_config
from timm.utils import ParseKwargs

from .models._base import UntrainedWeightsWarning, count_flops, new_parts_filter
from .models._checkpoint import (
    HIDDEN_LAYOUT, check_checkpoint_args, checkpoint_model_args, load_checkpoint_into, read_checkpoint, same_value,
)
from .models.life_regress_vit import LifeRegressVisionTransformer
from .models.multi_exit_vit import MultiExitVisionTransformer

_logger = logging.getLogger(__name__)

__all__ = [
    'DigitsDataset', 'accuracies', 'atomic_write', 'available_cpus', 'budget_table', 'budgeted_batch_table',
    'build_parser', 'build_transform', 'choose_threshold', 'collect_outputs', 'create_dataset', 'evaluate', 'main', 'make_loader', 'practical_exits',
    'plot_tradeoff', 'run', 'select_threshold', 'threshold_table', 'write_json',
]

DEFAULT_KEEP_RATES = (1.0, 0.9, 0.8, 0.7)
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21)) + (0.99, 0.999)

# torchvision class name and the constructor arguments of each split
TORCHVISION_DATASETS: Dict[str, Tuple[str, Dict[str, Dict[str, Any]]]] = {
    'cifar10': ('CIFAR10', {'train': dict(train=True), 'test': dict(train=False)}),
    'cifar100': ('CIFAR100', {'train': dict(train=True), 'test': dict(train=False)}),
    'flowers102': ('Flowers102', {s: dict(split=s) for s in ('train', 'val', 'test')}),
    'stanford_cars': ('StanfordCars', {s: dict(split=s) for s in ('train', 'test')}),
    'fgvc_aircraft': ('FGVCAircraft', {s: dict(split=s) for s in ('train', 'val', 'trainval', 'test')}),
    'imagenet': ('ImageNet', {s: dict(split=s) for s in ('train', 'val')}),
}


# --- files ----------------------------------------------------------------------------------------------------------

def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` then ``os.replace(tmp, path)``: readers (and a resumed run) never see half a file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON, atomically. A NaN or infinity (not JSON; readers turn it into null) is refused
    with a ValueError naming the file, before anything is written."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f'{path}: refusing to write a NaN or infinite value ({e})') from e

    def _write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, _write)


# --- data -----------------------------------------------------------------------------------------------------------

class DigitsDataset(Dataset):
    """scikit-learn's bundled digits (1797 real 8x8 grey images, 10 classes; nothing downloaded), upsampled.

    A fixed stratified split: 'train' 60 %, 'val' 20 %, 'test' 20 %. Images are (3, img_size, img_size) in [-1, 1]
    (mean = std = 0.5 of the test models' cfgs). ``transform`` (tensor to tensor) augments them.
    """
    splits = ('train', 'val', 'test')

    def __init__(self, split: str = 'train', img_size: int = 32, transform: Optional[Callable] = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        if split not in self.splits:
            raise ValueError(f'digits split={split!r} is not known; allowed: {list(self.splits)}')
        digits = load_digits()
        index = list(range(len(digits.target)))
        train, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=0)
        val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
        index = {'train': train, 'val': val, 'test': test}[split]
        images = torch.tensor(digits.images[index], dtype=torch.float32)[:, None] / 16.
        images = F.interpolate(images, size=(img_size, img_size), mode='bilinear', align_corners=False)
        self.images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        self.targets = torch.tensor(digits.target[index], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        image = self.images[i]
        return (image if self.transform is None else self.transform(image)), int(self.targets[i])


def build_transform(
        model: nn.Module,
        is_training: bool,
        resize_crop: int = 0,
        **aug: Any,
) -> Callable:
    """Image transform at the model's input size and normalisation: timm's ``create_transform`` (``aug`` are its
    arguments), or with ``resize_crop`` > 0 TransFG's: resize to ``resize_crop`` square, random (eval: centre) crop
    and flip, the augmentation MEViT follows (3.1, 000_*.txt)."""
    from torchvision import transforms as T
    input_size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    cfg = resolve_data_config({'input_size': input_size}, model=model)
    if resize_crop <= 0:
        return create_transform(**cfg, is_training=is_training, **aug)
    crop = T.RandomCrop(input_size[1:]) if is_training else T.CenterCrop(input_size[1:])
    flip = [T.RandomHorizontalFlip()] if is_training else []
    return T.Compose([
        T.Resize((resize_crop, resize_crop), interpolation=T.InterpolationMode.BILINEAR), crop, *flip,
        T.ToTensor(), T.Normalize(cfg['mean'], cfg['std'])])


def digits_augment() -> Callable:
    """Light augmentation for the digits tensors: shifts of up to 10 % and small rotations."""
    from torchvision import transforms as T
    return T.RandomAffine(degrees=10, translate=(0.1, 0.1), fill=-1.)


def create_dataset(
        name: str,
        split: str,
        model: nn.Module,
        is_training: bool,
        data_dir: str = '',
        download: bool = False,
        **transform_kwargs: Any,
) -> Dataset:
    """Dataset ``name`` ('digits', 'folder', 'torch/<name>'), split ``split``, transformed for ``model``.

    Nothing downloads unless ``download`` is set (torchvision datasets that support it).
    """
    if name == 'digits':
        return DigitsDataset(split, model.patch_embed.img_size[0], digits_augment() if is_training else None)
    transform = build_transform(model, is_training, **transform_kwargs)
    if name == 'folder':
        from torchvision.datasets import ImageFolder
        return ImageFolder(os.path.join(data_dir, split), transform=transform)
    key = name.split('/', 1)[1] if name.startswith('torch/') else ''
    if key not in TORCHVISION_DATASETS:
        raise ValueError(
            f'dataset={name!r} is not known; allowed: digits, folder, '
            f'{", ".join("torch/" + k for k in TORCHVISION_DATASETS)}')
    cls_name, splits = TORCHVISION_DATASETS[key]
    if split not in splits:
        raise ValueError(f'{name} has no split {split!r}; allowed: {list(splits)}')
    import torchvision.datasets
    kwargs = dict(splits[split], transform=transform)
    if key != 'imagenet':
        kwargs['download'] = download
    return getattr(torchvision.datasets, cls_name)(data_dir, **kwargs)


# --- evaluation -----------------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return timm.utils.unwrap_model(model)


@torch.no_grad()
def collect_outputs(
        model: nn.Module,
        loader: DataLoader,
        device: torch.device,
        keep_rates: Sequence[float] = DEFAULT_KEEP_RATES,
        autocast: Optional[Callable] = None,
        progress: bool = False,
        desc: str = 'eval',
) -> Dict[str, torch.Tensor]:
    """Per image, whether each exit (multi-exit), each keep rate (LifeRegress) or the output is right.

    Args:
        progress: Show a tqdm progress bar (batches) on stderr.
        desc: Label of the progress bar.

    Returns:
        ``{'correct': (K, N) bool}`` and, for a multi-exit model, ``'scores': (K, N)``, each exit's criterion value.

    Raises:
        ValueError: The loader yields no images (an accuracy over nothing is not a number).
    """
    from tqdm import tqdm
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    correct, scores = [], []
    try:
        for x, y in tqdm(loader, desc=desc, unit='batch', disable=not progress, dynamic_ncols=True):
            x, y = x.to(device), y.to(device)
            with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                if isinstance(model, MultiExitVisionTransformer):
                    outs = model.forward_exits(x)
                    scores.append(torch.stack([
                        model.exit_scores(layer, z).float() for layer, z in zip(model.exit_layers, outs)]))
                elif isinstance(model, LifeRegressVisionTransformer):
                    outs = [model(x, keep_rate=rate) for rate in keep_rates]
                else:
                    outs = [model(x)]
            correct.append(torch.stack([z.argmax(-1) == y for z in outs]).cpu())
    finally:
        model.train(was_training)
    if not correct or sum(c.shape[1] for c in correct) == 0:
        raise ValueError('no images to evaluate: the dataset split is empty')
    out = {'correct': torch.cat(correct, 1)}
    if scores:
        out['scores'] = torch.cat([s.cpu() for s in scores], 1)
    return out


def accuracies(correct: torch.Tensor) -> List[float]:
    """Top-1 accuracy in percent of each row of a (K, N) bool tensor."""
    return [100. * float(c.float().mean()) for c in correct]


def practical_exits(accs: Sequence[float]) -> List[bool]:
    """Practical exits (II-A, 001_*.txt): more accurate than every earlier exit."""
    return [i == 0 or acc > max(accs[:i]) for i, acc in enumerate(accs)]


def threshold_table(
        scores: torch.Tensor,
        correct: torch.Tensor,
        path_costs: Sequence[float],
        thresholds: Sequence[float],
        confident_high: bool = True,
) -> List[Dict[str, float]]:
    """Per-image early exit at each threshold, simulated: an image leaves at its first exit whose score passes
    (>= threshold if ``confident_high``, else <=), the last exit answering the rest.

    Args:
        scores: (E, N) criterion value of each exit for each image.
        correct: (E, N) whether each exit is right.
        path_costs: (E,) cost of leaving at each exit, the heads evaluated on the way included.
        thresholds: Thresholds to try.
        confident_high: Whether a higher score means more confident ('confidence' criterion).

    Returns:
        ``[{'threshold', 'accuracy' (percent), 'mean_cost'}]`` in the order of ``thresholds``.
    """
    cols = torch.arange(scores.shape[1])
    costs = torch.tensor(path_costs, dtype=torch.float64)
    rows = []
    for t in thresholds:
        passes = scores >= t if confident_high else scores <= t
        passes[-1] = True
        first = passes.to(torch.uint8).argmax(0)
        rows.append({
            'threshold': float(t),
            'accuracy': 100. * float(correct[first, cols].float().mean()),
            'mean_cost': float(costs[first].mean()),
        })
    return rows


def budget_table(accs: Sequence[float], costs: Sequence[float], budgets: Sequence[float]) -> List[Dict[str, float]]:
    """Anytime accuracy: under each budget the deepest exit whose cost fits answers every image (``forward(x,
    budget=b)``); budgets below the cheapest exit are left out."""
    rows = []
    for b in budgets:
        fits = [i for i, c in enumerate(costs) if c <= b + 1e-9]
        if fits:
            rows.append({'budget': float(b), 'accuracy': float(accs[fits[-1]]), 'mean_cost': float(costs[fits[-1]])})
    return rows


def candidate_thresholds(scores: torch.Tensor, levels: int = 256) -> List[float]:
    """Thresholds worth trying: the default grid and quantiles of the early exits' scores."""
    q = torch.linspace(0, 1, levels, dtype=torch.float64)
    found = torch.quantile(scores[:-1].double().flatten(), q) if scores.shape[0] > 1 else q
    return sorted({*DEFAULT_THRESHOLDS, *(round(float(v), 6) for v in found.clamp(0, 1))})


def select_threshold(
        rows: Sequence[Dict[str, float]],
        reference_accuracy: float,
        max_drop: Optional[float] = None,
        max_cost: Optional[float] = None,
) -> Dict[str, float]:
    """The row of ``threshold_table`` that meets a target.

    Args:
        rows: ``threshold_table`` rows.
        reference_accuracy: Accuracy (percent) of the full model, the final exit.
        max_drop: Largest accuracy drop in points: the cheapest row with accuracy >= reference - max_drop.
        max_cost: Largest mean compute share: the most accurate row with mean_cost <= max_cost.

    Raises:
        ValueError: Neither or both targets given, or no threshold meets the target.
    """
    if (max_drop is None) == (max_cost is None):
        raise ValueError('give exactly one of max_drop (accuracy points) and max_cost (share of the full FLOPs)')
    if max_drop is not None:
        ok = [r for r in rows if r['accuracy'] >= reference_accuracy - max_drop - 1e-9]
        key, what = (lambda r: (r['mean_cost'], -r['accuracy'])), f'an accuracy drop of at most {max_drop:g} points'
    else:
        ok = [r for r in rows if r['mean_cost'] <= max_cost + 1e-9]
        key, what = (lambda r: (-r['accuracy'], r['mean_cost'])), f'a mean cost of at most {max_cost:g}'
    if not ok:
        best = min(rows, key=lambda r: (-r['accuracy'], r['mean_cost'])) if max_drop is not None else \
            min(rows, key=lambda r: r['mean_cost'])
        raise ValueError(
            f'no threshold gives {what} (reference accuracy {reference_accuracy:.2f}); the closest: threshold '
            f'{best["threshold"]:g}, accuracy {best["accuracy"]:.2f}, mean cost {best["mean_cost"]:.4f}')
    return min(ok, key=key)


def budgeted_batch_table(
        scores: torch.Tensor,
        correct: torch.Tensor,
        path_costs: Sequence[float],
        mean_budgets: Sequence[float],
        confident_high: bool = True,
        calib: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> List[Dict[str, float]]:
    """Budgeted batch classification (MSDNet's protocol, anytime / budgeted inference of 001_*.txt): for each mean
    compute budget of the whole set, the threshold whose mean cost on ``calib`` (scores, correct; default: this set)
    fits it with the best accuracy, and what it gives here. Budgets that no threshold meets are left out.

    Returns:
        ``[{'mean_budget', 'threshold', 'accuracy' (percent), 'mean_cost'}]``: accuracy and mean cost on this set.
    """
    calib_scores, calib_correct = (scores, correct) if calib is None else calib
    rows = threshold_table(calib_scores, calib_correct, path_costs, candidate_thresholds(calib_scores),
                           confident_high)
    reference = accuracies(calib_correct)[-1]
    out = []
    for budget in mean_budgets:
        try:
            chosen = select_threshold(rows, reference, max_cost=budget)['threshold']
        except ValueError:
            continue
        applied = threshold_table(scores, correct, path_costs, [chosen], confident_high)[0]
        out.append({'mean_budget': float(budget), 'threshold': chosen, 'accuracy': applied['accuracy'],
                    'mean_cost': applied['mean_cost']})
    return out


def choose_threshold(
        model: MultiExitVisionTransformer,
        outputs: Dict[str, torch.Tensor],
        max_drop: Optional[float] = None,
        max_cost: Optional[float] = None,
) -> Dict[str, Any]:
    """The threshold of ``model.exit_criterion`` meeting a target on ``collect_outputs`` of a validation set.

    Returns:
        ``{'criterion', 'threshold', 'target_drop', 'target_cost', 'calib_accuracy', 'calib_mean_cost',
        'calib_full_accuracy'}``.
    """
    rows = threshold_table(outputs['scores'], outputs['correct'], list(model.threshold_costs),
                           candidate_thresholds(outputs['scores']), model.exit_criterion == 'confidence')
    full = accuracies(outputs['correct'])[-1]
    row = select_threshold(rows, full, max_drop, max_cost)
    return {'criterion': model.exit_criterion, 'threshold': row['threshold'], 'target_drop': max_drop,
            'target_cost': max_cost, 'calib_accuracy': row['accuracy'], 'calib_mean_cost': row['mean_cost'],
            'calib_full_accuracy': full}


def _full_flops(model: nn.Module) -> int:
    """FLOPs of one image through a plain model (no exits, no slimming), torch's flop counter."""
    ref = next(model.parameters())
    x = torch.zeros(1, model.patch_embed.proj.in_channels, *model.patch_embed.img_size, device=ref.device,
                    dtype=ref.dtype)
    was_training = model.training
    model.eval()
    flops = count_flops(model, x)[0]
    model.train(was_training)
    return flops


def _latencies(candidates: Dict[Any, Callable[[], Any]], batch: int, rounds: int = 5) -> Dict[Any, float]:
    """Median ms per image of each candidate, interleaved timing (``timm_exits.benchmark``)."""
    from .benchmark import time_interleaved
    with torch.inference_mode():
        times = time_interleaved(candidates, rounds=rounds, warmup=1)
    return {k: sorted(v)[len(v) // 2] / batch for k, v in times.items()}


def evaluate(
        model: nn.Module,
        loader: DataLoader,
        device: torch.device,
        model_name: str,
        dataset_name: str,
        keep_rates: Sequence[float] = DEFAULT_KEEP_RATES,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        budgets: Optional[Sequence[float]] = None,
        latency_batch: int = 0,
        outputs: Optional[Dict[str, torch.Tensor]] = None,
        calib_outputs: Optional[Dict[str, torch.Tensor]] = None,
) -> Dict[str, Any]:
    """The evaluation JSON of a multi-exit or LifeRegress model (see the module docstring for the schema).

    Args:
        outputs: ``collect_outputs`` already computed on ``loader`` (else computed here).
        latency_batch: Batch size of the latency timing (0: ``latency_ms`` is null).
        calib_outputs: ``collect_outputs`` of another split on which the budgeted-batch thresholds are chosen
            (default: chosen on ``loader``'s split itself, which flatters the accuracy).
    """
    model = _unwrap(model)
    outputs = collect_outputs(model, loader, device, keep_rates) if outputs is None else outputs
    correct = outputs['correct']
    accs = accuracies(correct)
    result: Dict[str, Any] = {'model': model_name, 'dataset': dataset_name, 'num_images': int(correct.shape[1])}
    ref = next(model.parameters())
    x = torch.randn(max(latency_batch, 1), model.patch_embed.proj.in_channels, *model.patch_embed.img_size,
                    device=ref.device, dtype=ref.dtype)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, MultiExitVisionTransformer):
            costs = list(model.exit_costs)
            lat = _latencies({i: (lambda c=c: model(x, budget=c)) for i, c in enumerate(costs)}, len(x)) \
                if latency_batch else {}
            result['exits'] = [
                {'layer': layer, 'accuracy': acc, 'cost': cost, 'gflops': cost * model.full_flops / 1e9,
                 'latency_ms': lat.get(i), 'practical': practical}
                for i, (layer, acc, cost, practical) in enumerate(
                    zip(model.exit_layers, accs, costs, practical_exits(accs)))]
            result['thresholds'] = threshold_table(
                outputs['scores'], correct, list(model.threshold_costs), thresholds,
                model.exit_criterion == 'confidence')
            grid = [round(0.1 * i, 1) for i in range(1, 11)] if budgets is None else list(budgets)
            result['budgets'] = budget_table(accs, costs, sorted({*grid, *costs}))
            # what an image no exit lets go costs with a threshold and no budget (above 1: more than the full model)
            result['worst_case_threshold_cost'] = model.worst_case_threshold_cost
            calib = None if calib_outputs is None else (calib_outputs['scores'], calib_outputs['correct'])
            result['budgeted_batch'] = budgeted_batch_table(
                outputs['scores'], correct, list(model.threshold_costs), [round(0.05 * i, 2) for i in range(6, 21)],
                model.exit_criterion == 'confidence', calib)
            result['budgeted_batch_chosen_on'] = 'this split' if calib_outputs is None else 'calibration split'
        elif isinstance(model, LifeRegressVisionTransformer):
            lat = _latencies({r: (lambda r=r: model(x, keep_rate=r)) for r in keep_rates}, len(x)) \
                if latency_batch else {}
            result['keep_rates'] = [
                {'keep_rate': float(rate), 'accuracy': acc, 'flops_ratio': model.flops_ratio(rate),
                 'gflops': model.flops(rate) / 1e9, 'latency_ms': lat.get(rate)}
                for rate, acc in zip(keep_rates, accs)]
        else:
            result['accuracy'] = accs[0]
            result['gflops'] = _full_flops(model) / 1e9
    finally:
        model.train(was_training)
    result['plot'] = 'tradeoff.png'
    return result


def plot_tradeoff(result: Dict[str, Any], path: str) -> None:
    """Accuracy against average compute (MEViT Fig. 2, 000_*.txt), practical exits circled (Fig. 5, 001_*.txt);
    for LifeRegress, accuracy against the FLOPs ratio at each keep rate. Written atomically."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    if 'exits' in result:
        ex = result['exits']
        th = sorted(result['thresholds'], key=lambda r: r['mean_cost'])
        ax.plot([r['mean_cost'] for r in th], [r['accuracy'] for r in th], '-', color='tab:blue', alpha=.8,
                label='per-image early exit (thresholds)')
        ax.plot([e['cost'] for e in ex], [e['accuracy'] for e in ex], 's', color='tab:orange', label='single exit')
        bb = result.get('budgeted_batch') or []
        if bb:
            ax.plot([r['mean_cost'] for r in bb], [r['accuracy'] for r in bb], 'x--', color='tab:red', alpha=.8,
                    label=f'budgeted batch (threshold chosen on {result.get("budgeted_batch_chosen_on", "?")})')
        prac = [e for e in ex if e['practical']]
        ax.plot([e['cost'] for e in prac], [e['accuracy'] for e in prac], 'o', ms=14, mfc='none', color='tab:green',
                label='practical exit')
        for e in ex:
            ax.annotate(str(e['layer']), (e['cost'], e['accuracy']), textcoords='offset points', xytext=(4, -10),
                        fontsize=8)
        ax.axhline(ex[-1]['accuracy'], ls='--', color='grey', lw=1, label='full model')
        ax.set_xlabel('average compute (share of the full model\'s FLOPs)')
    elif 'keep_rates' in result:
        kr = result['keep_rates']
        ax.plot([k['flops_ratio'] for k in kr], [k['accuracy'] for k in kr], 'o-', color='tab:blue')
        for k in kr:
            ax.annotate(f'rho={k["keep_rate"]:g}', (k['flops_ratio'], k['accuracy']), textcoords='offset points',
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel('FLOPs ratio to the full model')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title(f'{result["model"]} on {result["dataset"]} ({result["num_images"]} images)', fontsize=9)
    ax.grid(alpha=.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc='best')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)


# --- CLI ------------------------------------------------------------------------------------------------------------

def make_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Ordered evaluation loader."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


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
    parser.add_argument('--dataset', default='folder', help='digits, folder or torch/<name>')
    parser.add_argument('--data-dir', default='')
    parser.add_argument('--dataset-download', action='store_true', help='let torchvision download the dataset')
    parser.add_argument('--split', default='test', help='split evaluated')
    parser.add_argument('--resize-crop', type=_int_at_least(0), default=0,
                        help='TransFG eval transform: resize then centre crop')
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
    return parser


def _check_data(args: argparse.Namespace, split: str, flag: str) -> None:
    """Refuse an unknown dataset or split, naming the flag, before any model is built."""
    name = args.dataset
    if name == 'digits':
        if split not in DigitsDataset.splits:
            raise ValueError(f'{flag} {split!r} is not a split of digits; allowed: {list(DigitsDataset.splits)}')
    elif name == 'folder':
        folder = os.path.join(args.data_dir, split)
        if not os.path.isdir(folder):
            raise ValueError(
                f'{flag} {split!r}: --dataset folder reads an ImageFolder at --data-dir/{split}, and {folder!r} is not '
                f'a folder')
    else:
        key = name.split('/', 1)[1] if name.startswith('torch/') else ''
        if key not in TORCHVISION_DATASETS:
            raise ValueError(
                f'--dataset {name!r} is not known; allowed: digits, folder, '
                f'{", ".join("torch/" + k for k in TORCHVISION_DATASETS)}')
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
    if targets and not isinstance(model, MultiExitVisionTransformer):
        raise ValueError('--target-drop / --target-cost choose an early-exit threshold: a multi-exit model only')
    try:
        model = model.to(device).eval()
    except RuntimeError as e:
        raise ValueError(f'--device {args.device!r}: cannot move the model there ({e})') from e

    def loader(split: str) -> DataLoader:
        ds = create_dataset(args.dataset, split, model, False, args.data_dir, args.dataset_download,
                            **({'resize_crop': args.resize_crop} if args.dataset != 'digits' else {}))
        if len(ds) == 0:
            raise ValueError(f'--dataset {args.dataset} split {split!r} has no images')
        return make_loader(ds, args.batch_size, args.workers)

    progress = not args.no_progress
    test_loader = loader(args.split)
    outputs = collect_outputs(model, test_loader, device, args.keep_rates, progress=progress, desc=args.split)
    multi_exit = isinstance(model, MultiExitVisionTransformer)
    calib = collect_outputs(model, loader(args.calib_split), device, progress=progress, desc=args.calib_split) \
        if args.calib_split and multi_exit else None
    result = evaluate(model, test_loader, device, name, args.dataset, args.keep_rates,
                      latency_batch=args.latency_batch, outputs=outputs, calib_outputs=calib)
    try:
        plot_tradeoff(result, os.path.join(args.output, result['plot']))
    except ImportError:
        _logger.warning('warning: no trade-off plot: matplotlib is not installed (pip install matplotlib)')
        result.pop('plot')
    write_json(result, os.path.join(args.output, 'eval.json'))
    _logger.info(json.dumps({k: v for k, v in result.items() if k not in ('thresholds', 'budgets', 'budgeted_batch')},
                            indent=1))
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


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``python -m timm_exits.validate``: bad input prints one ``error: ...`` line and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        parser.exit(2, f'error: {" ".join(str(e).split())}\n')


if __name__ == '__main__':
    main()
