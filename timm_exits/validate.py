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
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import timm
from timm.data import create_transform, resolve_data_config
from timm.utils import ParseKwargs

from .models._base import count_flops
from .models.life_regress_vit import LifeRegressVisionTransformer
from .models.multi_exit_vit import MultiExitVisionTransformer

_logger = logging.getLogger(__name__)

__all__ = [
    'DigitsDataset', 'accuracies', 'atomic_write', 'build_transform', 'budget_table', 'choose_threshold',
    'collect_outputs', 'create_dataset', 'evaluate', 'make_loader', 'practical_exits',
    'plot_tradeoff', 'select_threshold', 'threshold_table', 'write_json',
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
    """Write ``obj`` as indented JSON, atomically."""
    def _write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
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
) -> Dict[str, torch.Tensor]:
    """Per image, whether each exit (multi-exit), each keep rate (LifeRegress) or the output is right.

    Returns:
        ``{'correct': (K, N) bool}`` and, for a multi-exit model, ``'scores': (K, N)``, each exit's criterion value.
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    correct, scores = [], []
    try:
        for x, y in loader:
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
) -> Dict[str, Any]:
    """The evaluation JSON of a multi-exit or LifeRegress model (see the module docstring for the schema).

    Args:
        outputs: ``collect_outputs`` already computed on ``loader`` (else computed here).
        latency_batch: Batch size of the latency timing (0: ``latency_ms`` is null).
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


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help='timm model name (timm_exits registers its models)')
    parser.add_argument('--checkpoint', default='', help='weights: .safetensors or a training checkpoint')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained tag instead of a checkpoint')
    parser.add_argument('--dataset', default='folder', help='digits, folder or torch/<name>')
    parser.add_argument('--data-dir', default='')
    parser.add_argument('--dataset-download', action='store_true', help='let torchvision download the dataset')
    parser.add_argument('--split', default='test', help='split evaluated')
    parser.add_argument('--resize-crop', type=int, default=0, help='TransFG eval transform: resize then centre crop')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--keep-rates', type=float, nargs='+', default=list(DEFAULT_KEEP_RATES))
    parser.add_argument('--latency-batch', type=int, default=0, help='time each exit / keep rate at this batch size')
    parser.add_argument('--output', default='eval', help='folder for eval.json, tradeoff.png, threshold.json')
    parser.add_argument('--calib-split', default='', help='split on which the threshold is chosen')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target-drop', type=float, default=None, help='largest accuracy drop in points')
    target.add_argument('--target-cost', type=float, default=None, help='largest mean share of the full FLOPs')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')

    device = torch.device(args.device)
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    model = timm.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint or None,
                              **kwargs).to(device).eval()

    def loader(split: str) -> DataLoader:
        ds = create_dataset(args.dataset, split, model, False, args.data_dir, args.dataset_download,
                            **({'resize_crop': args.resize_crop} if args.dataset != 'digits' else {}))
        return make_loader(ds, args.batch_size, args.workers)

    os.makedirs(args.output, exist_ok=True)
    test_loader = loader(args.split)
    outputs = collect_outputs(model, test_loader, device, args.keep_rates)
    result = evaluate(model, test_loader, device, args.model, args.dataset, args.keep_rates,
                      latency_batch=args.latency_batch, outputs=outputs)
    write_json(result, os.path.join(args.output, 'eval.json'))
    plot_tradeoff(result, os.path.join(args.output, result['plot']))
    _logger.info(json.dumps({k: v for k, v in result.items() if k not in ('thresholds', 'budgets')}, indent=1))
    if args.target_drop is not None or args.target_cost is not None:
        if not isinstance(model, MultiExitVisionTransformer):
            raise ValueError('--target-drop / --target-cost choose an early-exit threshold: a multi-exit model only')
        calib = collect_outputs(model, loader(args.calib_split), device) if args.calib_split else outputs
        choice = choose_threshold(model, calib, args.target_drop, args.target_cost)
        applied = threshold_table(outputs['scores'], outputs['correct'], list(model.threshold_costs),
                                  [choice['threshold']], model.exit_criterion == 'confidence')[0]
        choice.update(split=args.split, accuracy=applied['accuracy'], mean_cost=applied['mean_cost'])
        write_json(choice, os.path.join(args.output, 'threshold.json'))
        _logger.info(f'threshold: {json.dumps(choice)}')
    return result


if __name__ == '__main__':
    main()
