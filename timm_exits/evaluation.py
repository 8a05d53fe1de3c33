""" Evaluation of a multi-exit or LifeRegress model: the numbers of ``eval.json`` and the threshold choice.

- multi-exit: each exit's accuracy, cost (share of the full model's FLOPs, torch's flop counter), GFLOPs, latency and
  whether it is practical (more accurate than every earlier exit, II-A of 001_*.txt); per-image early exit at a range
  of thresholds (accuracy against mean compute, MEViT Fig. 2, 000_*.txt); anytime accuracy under compute budgets;
  MSDNet's budgeted batch classification.
- LifeRegress: accuracy, FLOPs ratio, GFLOPs and latency at each keep rate rho (003_*.txt, Table III).
- ``choose_threshold``: the threshold that meets a largest accuracy drop (points against the full model) or a largest
  mean compute share.

Threshold results are simulated from one ``forward_exits`` pass: an image leaves at its first exit whose criterion
passes and pays the blocks up to it plus every exit head evaluated on the way, exactly what ``forward_dynamic`` does.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import timm

from .models._base import count_flops
from .models.adapters import input_shape
from .models.life_regress_vit import LifeRegressMixin
from .models.multi_exit_vit import MultiExitMixin

__all__ = [
    'DEFAULT_KEEP_RATES', 'DEFAULT_THRESHOLDS', 'accuracies', 'budget_table', 'budgeted_batch_table',
    'candidate_thresholds', 'choose_threshold', 'collect_outputs', 'collect_regression_outputs', 'evaluate',
    'evaluate_regression', 'image_errors', 'practical_exits', 'regression_budgeted_batch', 'regression_errors',
    'regression_exit_choice', 'regression_threshold_table', 'regression_thresholds', 'select_threshold',
    'threshold_table',
]

DEFAULT_KEEP_RATES = (1.0, 0.9, 0.8, 0.7)
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21)) + (0.99, 0.999)


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
    if getattr(model, 'task', None) == 'regression':
        raise ValueError('collect_outputs counts right answers of a classifier; this model was built with '
                         "task='regression': use collect_regression_outputs (MAE and RMSE)")
    was_training = model.training
    model.eval()
    correct, scores = [], []
    try:
        for x, y in tqdm(loader, desc=desc, unit='batch', disable=not progress, dynamic_ncols=True):
            x, y = x.to(device), y.to(device)
            with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                if isinstance(model, MultiExitMixin):
                    outs = model.forward_exits(x)
                    scores.append(torch.stack([
                        model.exit_scores(layer, z).float() for layer, z in zip(model.exit_layers, outs)]))
                elif isinstance(model, LifeRegressMixin):
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
        model: MultiExitMixin,
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
    x = torch.zeros(1, *input_shape(model), device=ref.device, dtype=ref.dtype)
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
    if getattr(model, 'task', None) == 'regression':  # MAE and RMSE instead of accuracy
        outputs = collect_regression_outputs(model, loader, device) if outputs is None else outputs
        return _with_calibration(model, evaluate_regression(model, outputs, model_name, dataset_name, budgets,
                                                            calib_outputs))
    outputs = collect_outputs(model, loader, device, keep_rates) if outputs is None else outputs
    correct = outputs['correct']
    accs = accuracies(correct)
    result: Dict[str, Any] = {'model': model_name, 'dataset': dataset_name, 'num_images': int(correct.shape[1])}
    ref = next(model.parameters())
    x = torch.randn(max(latency_batch, 1), *input_shape(model), device=ref.device, dtype=ref.dtype)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, MultiExitMixin):
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
        elif isinstance(model, LifeRegressMixin):
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
    return _with_calibration(model, result)


def _with_calibration(model: nn.Module, result: Dict[str, Any]) -> Dict[str, Any]:
    """``result`` with timm_exits.calibrate's choice (the model's default in eval mode), when the model has one."""
    if getattr(model, 'calibration', None):
        result['calibration'] = dict(model.calibration)
    return result


# --- regression (counting: TransCrowd's MAE and RMSE, 001_*.txt) -----------------------------------------------------

REGRESSION_CRITERIA = ('patience', 'uncertainty')


@torch.no_grad()
def collect_regression_outputs(
        model: MultiExitMixin,
        loader: DataLoader,
        device: torch.device,
        autocast: Optional[Callable] = None,
) -> Dict[str, torch.Tensor]:
    """Every exit's values and predicted scales for every image of ``loader`` (images, targets), one pass.

    Returns:
        ``{'values': (E, N, K), 'scales': (E, N, K), 'target': (N, K)}`` (float32, on the CPU); plus
        ``'image_ids': (N,)`` when the loader reads crops of whole images in order (a ``CountingDataset`` with a
        crop: TransCrowd's protocol), so that ``evaluate_regression`` also scores each image on the sum of its crops.

    Raises:
        ValueError: Not a ``task='regression'`` multi-exit model, or no images.
    """
    model = _unwrap(model)
    if getattr(model, 'task', None) != 'regression':
        raise ValueError(f"collect_regression_outputs needs a multi-exit model built with task='regression', got "
                         f"{type(model).__name__} (task={getattr(model, 'task', None)!r})")
    was_training = model.training
    model.eval()
    values, scales, targets = [], [], []
    try:
        for x, y in loader:
            with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                v, s = model.forward_exits_with_scale(x.to(device))
            values.append(torch.stack(v).float().cpu())
            scales.append(torch.stack(s).float().cpu())
            targets.append(y.float().reshape(len(y), -1).cpu())
    finally:
        model.train(was_training)
    if not targets or sum(len(t) for t in targets) == 0:
        raise ValueError('no images to evaluate: the dataset split is empty')
    out = {'values': torch.cat(values, 1), 'scales': torch.cat(scales, 1), 'target': torch.cat(targets)}
    ids = _crop_image_ids(loader)
    if ids is not None:
        if len(ids) != out['target'].shape[0]:
            raise ValueError(f'the loader gave {out["target"].shape[0]} crops, its dataset lists {len(ids)}')
        out['image_ids'] = ids
    return out


def _crop_image_ids(loader: DataLoader) -> Optional[torch.Tensor]:
    """(N,) image of each crop of ``loader``'s dataset when it cuts images into crops and is read in order (a
    sequential sampler, no drop of the last batch: ``timm_exits.data.make_loader``), else None (a shuffled loader's
    crops cannot be put back together per image)."""
    from torch.utils.data import SequentialSampler, Subset
    ds, rows = getattr(loader, 'dataset', None), None
    if isinstance(ds, Subset):  # a shard of the crops (calibration under torchrun)
        ds, rows = ds.dataset, list(ds.indices)
    if getattr(ds, 'crop', None) is None or getattr(ds, 'image_ids', None) is None:
        return None
    if not isinstance(getattr(loader, 'sampler', None), SequentialSampler) or getattr(loader, 'drop_last', False):
        return None
    ids = torch.as_tensor(list(ds.image_ids), dtype=torch.long)
    return ids if rows is None else ids[torch.as_tensor(rows, dtype=torch.long)]


def regression_errors(values: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    """(MAE, RMSE) of (N, K) ``values`` against ``target``, averaged over images and outputs (a count: K = 1);
    TransCrowd's code calls the RMSE 'MSE'."""
    err = values.double() - target.double()
    return float(err.abs().mean()), float(err.pow(2).mean().sqrt())


def image_errors(values: torch.Tensor, target: torch.Tensor, image_ids: torch.Tensor) -> Dict[str, float]:
    """TransCrowd's per-image MAE and RMSE: each image's count is the sum of its crops' ``values`` (N, K), against
    the sum of its crops' targets (its total count): ``{'image_mae', 'image_rmse'}``."""
    from .data import sum_by_image
    mae, rmse = regression_errors(sum_by_image(values.double(), image_ids), sum_by_image(target.double(), image_ids))
    return {'image_mae': mae, 'image_rmse': rmse}


def _per_image(outputs: Dict[str, torch.Tensor], values: torch.Tensor) -> Dict[str, float]:
    """``image_errors`` of (N, K) ``values`` when ``outputs`` hold crops (``'image_ids'``), else nothing."""
    ids = outputs.get('image_ids')
    return {} if ids is None else image_errors(values, outputs['target'], ids)


def regression_exit_choice(
        values: torch.Tensor,
        scales: torch.Tensor,
        criterion: str,
        threshold: float,
        patience: int = 1,
) -> torch.Tensor:
    """(N,) index of the exit each image leaves at, from every exit's ``values`` and ``scales`` (E, N, K), as
    ``forward_dynamic`` decides: 'patience' (PABEE: the counter of consecutive exits within ``threshold`` of the
    previous one reaches ``patience``) or 'uncertainty' (largest scale <= ``threshold``); the last exit answers the
    rest."""
    if criterion not in REGRESSION_CRITERIA:
        raise ValueError(f'criterion must be one of {list(REGRESSION_CRITERIA)}, got {criterion!r}')
    num_exits, n = values.shape[:2]
    if criterion == 'uncertainty':
        passes = scales.float().amax(-1) <= threshold
    else:
        passes = torch.zeros(num_exits, n, dtype=torch.bool)
        count = torch.zeros(n)
        for i in range(1, num_exits):
            agree = (values[i].float() - values[i - 1].float()).abs().amax(-1) <= threshold
            count = torch.where(agree, count + 1, torch.zeros_like(count))
            passes[i] = count >= patience
    passes[-1] = True
    return passes.to(torch.uint8).argmax(0)


def regression_threshold_table(
        outputs: Dict[str, torch.Tensor],
        path_costs: Sequence[float],
        criterion: str,
        thresholds: Sequence[float],
        patience: int = 1,
) -> List[Dict[str, float]]:
    """MAE and RMSE against mean cost for per-image early exit at each threshold (target units), simulated from
    ``collect_regression_outputs``: ``[{'threshold', 'mae', 'rmse', 'mean_cost'}]``, with crops (``'image_ids'``)
    each crop leaving on its own and ``'image_mae'``, ``'image_rmse'`` of the sums per image as well."""
    cols = torch.arange(outputs['target'].shape[0])
    costs = torch.tensor(list(path_costs), dtype=torch.float64)
    rows = []
    for t in thresholds:
        first = regression_exit_choice(outputs['values'], outputs['scales'], criterion, t, patience)
        chosen = outputs['values'][first, cols]
        mae, rmse = regression_errors(chosen, outputs['target'])
        rows.append({'threshold': float(t), 'mae': mae, 'rmse': rmse, **_per_image(outputs, chosen),
                     'mean_cost': float(costs[first].mean())})
    return rows


def regression_thresholds(outputs: Dict[str, torch.Tensor], criterion: str, levels: int = 24) -> List[float]:
    """Thresholds worth trying (target units): 0 and quantiles of the early exits' scales (uncertainty) or of the
    differences between consecutive exits (patience)."""
    v = outputs['values']
    if v.shape[0] < 2:
        return [0.]
    found = outputs['scales'][:-1].amax(-1) if criterion == 'uncertainty' else (v[1:] - v[:-1]).abs().amax(-1)
    q = torch.quantile(found.double().flatten(), torch.linspace(0, 1, levels, dtype=torch.float64))
    return sorted({0., *(round(float(x), 4) for x in q)})


def regression_budgeted_batch(
        outputs: Dict[str, torch.Tensor],
        path_costs: Sequence[float],
        criterion: str,
        mean_budgets: Sequence[float],
        patience: int = 1,
        calib: Optional[Dict[str, torch.Tensor]] = None,
) -> List[Dict[str, float]]:
    """Budgeted batch protocol (MSDNet's; budgeted inference, 001_*.txt) for regression: for each mean budget the
    threshold of lowest MAE whose mean cost on ``calib`` (default: this set) fits, and what it gives here."""
    calib = outputs if calib is None else calib
    rows = regression_threshold_table(calib, path_costs, criterion, regression_thresholds(calib, criterion), patience)
    out = []
    for budget in mean_budgets:
        ok = [r for r in rows if r['mean_cost'] <= budget + 1e-9]
        if not ok:
            continue
        chosen = min(ok, key=lambda r: (r['mae'], r['mean_cost']))['threshold']
        applied = regression_threshold_table(outputs, path_costs, criterion, [chosen], patience)[0]
        out.append({'mean_budget': float(budget), **applied})
    return out


def evaluate_regression(
        model: MultiExitMixin,
        outputs: Dict[str, torch.Tensor],
        model_name: str,
        dataset_name: str,
        budgets: Optional[Sequence[float]] = None,
        calib_outputs: Optional[Dict[str, torch.Tensor]] = None,
        patience: Optional[int] = None,
) -> Dict[str, Any]:
    """The evaluation JSON of a regression multi-exit model from ``collect_regression_outputs``: per exit MAE, RMSE,
    cost and whether it is practical (lower MAE than every earlier exit, II-A of 001_*.txt); MAE against mean cost
    for each criterion's threshold sweep (the threshold path's costs: the scale unit counted for 'uncertainty'); the
    deepest exit that fits each budget; the budgeted-batch protocol.

    With crops (``outputs['image_ids']``, TransCrowd's protocol) every row (exits, budgets, thresholds,
    budgeted_batch) also holds ``image_mae`` and ``image_rmse``: each image's count is the sum over its crops (each
    crop leaving at its own exit) against its total count, beside the per-crop ``mae`` / ``rmse``; ``num_images``
    counts images, ``num_crops`` the crops, ``target_mean`` is per crop and ``image_target_mean`` per image."""
    model = _unwrap(model)
    values, target = outputs['values'], outputs['target']
    errors = [regression_errors(v, target) for v in values]
    per_image = [_per_image(outputs, v) for v in values]
    maes = [e[0] for e in errors]
    patience = model.exit_patience if patience is None else patience
    costs = list(model.exit_costs)
    ids = outputs.get('image_ids')
    sizes = {'num_images': int(target.shape[0])} if ids is None else {
        'num_images': int(ids.unique().numel()), 'num_crops': int(target.shape[0]),
        'image_target_mean': float(target.double().sum() / ids.unique().numel())}
    result: Dict[str, Any] = {
        'model': model_name, 'dataset': dataset_name, 'task': 'regression', **sizes,
        'target_mean': float(target.double().mean()), 'exit_patience': patience,
        'exits': [{'layer': layer, 'mae': mae, 'rmse': rmse, **image, 'cost': cost,
                   'gflops': cost * model.full_flops / 1e9, 'practical': practical}
                  for layer, (mae, rmse), image, cost, practical in zip(
                      model.exit_layers, errors, per_image, costs,
                      [i == 0 or m < min(maes[:i]) for i, m in enumerate(maes)])],
    }
    grid = [round(0.1 * i, 1) for i in range(1, 11)] if budgets is None else list(budgets)
    result['budgets'] = [
        {'budget': float(b), 'mae': errors[fits[-1]][0], 'rmse': errors[fits[-1]][1], **per_image[fits[-1]],
         'mean_cost': costs[fits[-1]]}
        for b in sorted({*grid, *costs}) for fits in [[i for i, c in enumerate(costs) if c <= b + 1e-9]] if fits]
    criterion = model.exit_criterion
    result['thresholds'], result['budgeted_batch'] = {}, {}
    for name in REGRESSION_CRITERIA:
        model.set_exit_criterion(name)  # the threshold path's costs of this criterion (its unit counted)
        try:
            path = list(model.threshold_costs)
        finally:
            model.set_exit_criterion(criterion)
        result['thresholds'][name] = regression_threshold_table(
            outputs, path, name, regression_thresholds(outputs, name), patience)
        result['budgeted_batch'][name] = regression_budgeted_batch(
            outputs, path, name, [round(0.05 * i, 2) for i in range(6, 21)], patience, calib_outputs)
    result['budgeted_batch_chosen_on'] = 'this split' if calib_outputs is None else 'calibration split'
    result['plot'] = 'tradeoff.png'
    return result
