""" Calibration with a guarantee: ``timm_exits.calibrate(model, loader, epsilon=, delta=)`` and
``python -m timm_exits.calibrate``.

Chooses the cheapest early-exit threshold (multi-exit, every criterion), keep rate (LifeRegress) or (keep rate,
threshold) pair (both in one model) such that, over the draw of the calibration images,

    P(risk of the chosen point <= epsilon) >= 1 - delta,

where the risk is the share of images whose answer differs from the full model's (full depth, keep rate 1), or, with
labels and ``risk='accuracy_drop'``, the share that the full model gets right and the cheap point gets wrong (an upper
bound of the accuracy drop). Learn-then-Test (Angelopoulos et al.): one null hypothesis "risk(lambda_j) > epsilon" per
point of a grid fixed before the data is seen, a Hoeffding-Bentkus p-value from the calibration mean of each point's 0/1
loss, and fixed-sequence testing from the safest point toward cheaper ones, stopping at the first that is not rejected
(family-wise error control at delta: every rejected point is certified at once). Of the certified points the one with
the lowest mean cost on the calibration images is chosen. When not even the safest point is certified, the call refuses
and says how many images would be needed.

The p-values and the fixed-sequence procedure are MAPIE's (``mapie.risk_control``: ``compute_hoeffding_bentkus_p_value``
with ``binary=True``, LTT's tighter Bentkus term for a 0/1 loss, and ``control_fwer(..., 'fixed_sequence')``), a
maintained implementation of exactly these formulas; ``pip install 'timm-exits[calibrate]'``.

Grids (data-independent, safest first):
- thresholds: ``threshold_grid(criterion)``: for 'confidence' 1.0 down to 0 (dense near 1), for 'entropy' and
  'uncertainty' 0 up to 1; an image leaves at its first exit whose criterion passes, so each step lowers every image's
  cost;
- keep rates: 1.0 down to ``min_keep_rate`` in steps of 0.05 (rates with the same token schedule merged);
- pairs: the threshold grid with the keep rate lowered along it in equal steps, so each step loosens the threshold or
  lowers the keep rate and never tightens either: a cost-ordered path.

The result is recorded in the checkpoint (safetensors metadata ``timm_exits`` -> ``calibration``; loading it makes the
calibrated point the model's default in eval mode), ``calibration.json``, ``eval.json`` (``python -m
timm_exits.validate``), the model card and the ONNX manifest.
"""
import argparse
import json
import logging
import math
import os
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ._files import atomic_write, write_json
from .data import (
    NO_LABEL, add_data_config_args, available_cpus, create_dataset, data_config_flags, make_loader, resolve_data_cfg,
)
from .models._base import UntrainedWeightsWarning
from .validate import _int_at_least, callable_module, run_command
from .models._checkpoint import (
    CALIBRATION_KEY, METADATA_KEY, apply_calibration, checkpoint_model_args, load_checkpoint_into, read_checkpoint,
)
from .models.life_regress_vit import LifeRegressMixin
from .models.mexit_liferegress import MultiExitLifeRegressMixin
from .models.multi_exit_vit import MultiExitMixin

_logger = logging.getLogger(__name__)

__all__ = [
    'RISKS', 'CalibrationError', 'calibrate', 'calibrate_outputs', 'collect_calibration_outputs',
    'fixed_sequence_test', 'hb_p_values', 'images_needed', 'keep_rate_grid', 'ltt', 'main', 'pair_path',
    'point_losses', 'threshold_grid',
]

RISKS = ('disagreement', 'accuracy_drop')


class CalibrationError(ValueError):
    """No grid point can be certified for (epsilon, delta) with the images given; the message says how many more."""


def _mapie() -> Tuple[Any, Any]:
    try:
        from mapie.risk_control import control_fwer
        from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
    except ImportError as e:
        raise ImportError("calibration uses MAPIE's risk control: pip install 'timm-exits[calibrate]' (mapie)") from e
    return compute_hoeffding_bentkus_p_value, control_fwer


def check_level(name: str, value: Any) -> float:
    """``value`` as a float in the open interval (0, 1), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value < 1:
        raise ValueError(f'{name} must be a number in (0, 1), got {value!r}')
    return float(value)


# --- statistics -------------------------------------------------------------------------------------------------------

def _exact_rate(k: np.ndarray, n: int) -> np.ndarray:
    """k / n as floats whose ``ceil(n * r)`` is k again (MAPIE's Bentkus term takes ceil(n r_hat); k / n * n can be
    k + 1e-15, which would count one mismatch more)."""
    r = np.asarray(k, dtype=np.float64) / n
    for _ in range(4):
        over = np.ceil(n * r) > k
        if not over.any():
            break
        r = np.where(over, np.nextafter(r, 0.), r)
    return r


def hb_p_values(mismatches: Sequence[int], n: int, epsilon: float) -> np.ndarray:
    """Hoeffding-Bentkus p-values of the nulls "risk > epsilon" for 0/1 losses with ``mismatches`` ones of ``n``
    (LTT, Angelopoulos et al., Prop. 3 with the binomial Bentkus term of a 0/1 loss): min(exp(-n h1(min(r, epsilon),
    epsilon)), P(Binomial(n, epsilon) <= n r)), r = mismatches / n. MAPIE computes them."""
    hb, _ = _mapie()
    k = np.asarray(mismatches, dtype=np.int64)
    return np.asarray(hb(_exact_rate(k, n), int(n), float(epsilon), binary=True), dtype=np.float64)[:, 0]


def fixed_sequence_test(p_values: Sequence[float], delta: float) -> int:
    """How many leading hypotheses fixed-sequence testing at level ``delta`` rejects: it tests them in order, each at
    the full level, and stops at the first it cannot reject (MAPIE's ``control_fwer(p, delta, 'fixed_sequence')``)."""
    _, control_fwer = _mapie()
    rejected = np.asarray(control_fwer(np.asarray(p_values, dtype=np.float64), float(delta), 'fixed_sequence'))
    count = 0
    while count < len(rejected) and rejected[count] == count:
        count += 1
    return count


def ltt(losses: torch.Tensor, epsilon: float, delta: float) -> Tuple[int, np.ndarray]:
    """Learn-then-Test on a (G, n) 0/1 loss table, grid points in testing order (safest first).

    Returns:
        The number of leading points certified (each: risk <= epsilon, jointly with probability >= 1 - delta), and the
        p-values of every point.
    """
    epsilon, delta = check_level('epsilon', epsilon), check_level('delta', delta)
    n = int(losses.shape[1])
    if n == 0:
        raise ValueError('no calibration images')
    p = hb_p_values(losses.sum(1).cpu().numpy(), n, epsilon)
    return fixed_sequence_test(p, delta), p


def images_needed(epsilon: float, delta: float, rate: float = 0.) -> Optional[int]:
    """The fewest images with which a point whose observed loss rate is ``rate`` would be certified (p-value <=
    delta); None when ``rate`` >= epsilon (no number of images certifies it). At ``rate`` 0 it is
    ceil(log(delta) / log(1 - epsilon)) (e.g. 299 for epsilon 0.01, delta 0.05)."""
    epsilon, delta = check_level('epsilon', epsilon), check_level('delta', delta)
    if rate >= epsilon:
        return None

    def ok(n: int) -> bool:
        return float(hb_p_values([math.ceil(n * rate - 1e-9)], n, epsilon)[0]) <= delta

    hi = max(1, math.ceil(math.log(delta) / math.log1p(-epsilon)))
    while not ok(hi):
        hi *= 2
        if hi > 10 ** 9:
            return None
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if not ok(mid) else (lo, mid)
    return lo


# --- grids ------------------------------------------------------------------------------------------------------------

def threshold_grid(criterion: str) -> List[float]:
    """Thresholds from the safest to the loosest, fixed before any data: for 'confidence' (exit when max softmax >=
    t) 1.0 down to 0, dense near 1 (1 - 10^(-k/20), k = 0..80, and every 0.01); for 'entropy' / 'uncertainty' (exit when
    the score <= t) the mirror image, 0 up to 1."""
    values = {round(1 - 10 ** (-k / 20), 8) for k in range(81)} | {round(i / 100, 2) for i in range(101)}
    grid = sorted(values, reverse=True)
    return grid if criterion == 'confidence' else [round(1 - t, 8) for t in grid]


def keep_rate_grid(model: nn.Module, min_keep_rate: float = 0.3, step: float = 0.05) -> List[float]:
    """Keep rates 1.0, 1 - step, ... down to ``min_keep_rate``, the largest kept of rates with the same token
    schedule (they run the same model)."""
    rates, seen = [], set()
    k = 0
    while True:
        rate = round(1. - k * step, 6)
        if rate < min_keep_rate - 1e-9:
            break
        schedule = tuple(model.token_schedule(rate))
        if schedule not in seen:
            seen.add(schedule)
            rates.append(rate)
        k += 1
    return rates


def pair_path(keep_rates: Sequence[float], thresholds: Sequence[float]) -> List[Tuple[float, float]]:
    """(keep rate, threshold) pairs, cheaper step by step: the thresholds in order, the keep rate lowered through
    ``keep_rates`` in equal steps along them (never raised, the threshold never tightened)."""
    m, k = len(thresholds), len(keep_rates)
    return [(keep_rates[min(j * k // m, k - 1)], thresholds[j]) for j in range(m)]


# --- model outputs ----------------------------------------------------------------------------------------------------

def _family(model: nn.Module) -> str:
    if getattr(model, 'task', 'classification') == 'regression':
        raise ValueError("calibrate certifies the share of answers that differ from full depth, a classification "
                         "risk; a regression model (task='regression') chooses its patience or scale threshold from "
                         "validate's MAE sweep")
    if isinstance(model, MultiExitLifeRegressMixin):
        return 'mexit_liferegress'
    if isinstance(model, MultiExitMixin):
        return 'mexit'
    if isinstance(model, LifeRegressMixin):
        return 'liferegress'
    raise ValueError(f'model must be a timm-exits model (multi-exit, LifeRegress or both), got {type(model).__name__}')


@torch.no_grad()
def collect_calibration_outputs(
        model: nn.Module,
        loader: DataLoader,
        device: Optional[torch.device] = None,
        keep_rates: Optional[Sequence[float]] = None,
        progress: bool = False,
) -> Dict[str, Any]:
    """What calibration needs of every image, from one pass per keep rate (eval mode).

    Returns:
        ``{'family', 'labels' (N,) (-1: none), 'keep_rates'}`` and, per keep rate (a list; multi-exit alone: one
        entry at 1.0), ``'preds'`` (E, N) each exit's class and ``'scores'`` (E, N) each exit's criterion value
        (multi-exit), or ``'preds'`` (1, N) the answer at that keep rate (LifeRegress).
    """
    from tqdm import tqdm
    family = _family(model)
    device = device if device is not None else next(model.parameters()).device
    if family == 'mexit':
        rates = [1.]
    else:
        rates = list(keep_rates) if keep_rates is not None else keep_rate_grid(model, getattr(model, 'min_keep_rate',
                                                                                              0.3))
        if 1. not in rates:
            rates = [1.] + rates
    was_training = model.training
    model.eval()
    preds: List[List[torch.Tensor]] = [[] for _ in rates]
    scores: List[List[torch.Tensor]] = [[] for _ in rates]
    labels = []
    try:
        for x, y in tqdm(loader, desc='calibration', unit='batch', disable=not progress, dynamic_ncols=True):
            x = x.to(device)
            labels.append(torch.as_tensor(y).long().cpu())
            for i, rate in enumerate(rates):
                if family == 'liferegress':
                    preds[i].append(model(x, keep_rate=rate).argmax(-1)[None].cpu())
                    continue
                outs = model.forward_exits(x) if family == 'mexit' else model.forward_exits(x, keep_rate=rate)
                preds[i].append(torch.stack([z.argmax(-1) for z in outs]).cpu())
                scores[i].append(torch.stack([model.exit_scores(layer, z).float()
                                              for layer, z in zip(model.exit_layers, outs)]).cpu())
    finally:
        model.train(was_training)
    if not labels or sum(len(v) for v in labels) == 0:
        raise ValueError('no calibration images: the loader yields nothing')
    out: Dict[str, Any] = {'family': family, 'labels': torch.cat(labels), 'keep_rates': rates,
                           'preds': [torch.cat(p, 1) for p in preds]}
    if family != 'liferegress':
        out['scores'] = [torch.cat(s, 1) for s in scores]
    return out


def _first_exit(scores: torch.Tensor, threshold: float, confident_high: bool) -> torch.Tensor:
    """Per image, the index of the exit it leaves at (the last one answers the rest), as ``forward_dynamic``."""
    passes = scores >= threshold if confident_high else scores <= threshold
    passes[-1] = True
    return passes.to(torch.uint8).argmax(0)


def point_losses(
        outputs: Dict[str, Any],
        points: Sequence[Tuple[Optional[float], Optional[float]]],
        criterion: str = 'confidence',
        risk: str = 'disagreement',
        costs: Optional[Any] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """0/1 loss of every image at every (keep rate, threshold) point, and each point's mean cost.

    Args:
        outputs: ``collect_calibration_outputs``.
        points: (keep rate or None for 1, threshold or None for full depth) pairs.
        criterion: The exit criterion ('confidence' leaves at score >= t, the others at score <= t).
        risk: 'disagreement' (answer differs from the full model's at keep rate 1) or 'accuracy_drop' (the full
            model is right and the point is wrong; needs labels).
        costs: ``costs(keep_rate, threshold)`` -> per exit costs (multi-exit) or the cost (LifeRegress).

    Returns:
        (G, N) bool losses and (G,) float64 mean costs (zeros without ``costs``).
    """
    if risk not in RISKS:
        raise ValueError(f'risk={risk!r} is not known; allowed: {list(RISKS)}')
    rates = outputs['keep_rates']
    ref = outputs['preds'][rates.index(1.)][-1]
    labels = outputs['labels']
    if risk == 'accuracy_drop' and bool((labels == NO_LABEL).any()):
        raise ValueError(f"risk='accuracy_drop' needs a label for every image; {int((labels == NO_LABEL).sum())} of "
                         f'{len(labels)} have none')
    cols = torch.arange(ref.shape[0])
    losses, mean_costs = [], []
    for rate, t in points:
        i = rates.index(1. if rate is None else rate)
        preds = outputs['preds'][i]
        if t is None or 'scores' not in outputs:
            first = torch.full_like(ref, preds.shape[0] - 1)
        else:
            first = _first_exit(outputs['scores'][i], t, criterion == 'confidence')
        answer = preds[first, cols]
        loss = answer != ref if risk == 'disagreement' else (ref == labels) & (answer != labels)
        losses.append(loss)
        if costs is None:
            mean_costs.append(0.)
        else:
            c = torch.as_tensor(costs(rate, t), dtype=torch.float64).reshape(-1)
            mean_costs.append(float(c[first if len(c) > 1 else torch.zeros_like(first)].mean()))
    return torch.stack(losses), torch.tensor(mean_costs, dtype=torch.float64)


def _cost_function(model: nn.Module, family: str) -> Any:
    if family == 'mexit':
        return lambda rate, t: model.threshold_costs if t is not None else model.exit_costs
    if family == 'liferegress':
        return lambda rate, t: [model.flops_ratio(rate)]
    return lambda rate, t: model.threshold_costs_for(rate) if t is not None else model.exit_costs_for(rate)


def _points(model: nn.Module, family: str, outputs: Dict[str, Any], thresholds: Optional[Sequence[float]],
            keep_rates: Optional[Sequence[float]]) -> List[Tuple[Optional[float], Optional[float]]]:
    if family == 'mexit':
        return [(None, t) for t in (thresholds or threshold_grid(model.exit_criterion))]
    rates = [r for r in (keep_rates or outputs['keep_rates'])]
    rates = sorted(set(rates), reverse=True)
    if family == 'liferegress':
        return [(r, None) for r in rates if r < 1.]
    return pair_path(rates, list(thresholds or threshold_grid(model.exit_criterion)))


def calibrate_outputs(
        model: nn.Module,
        outputs: Dict[str, Any],
        epsilon: float,
        delta: float,
        risk: str = 'disagreement',
        thresholds: Optional[Sequence[float]] = None,
        keep_rates: Optional[Sequence[float]] = None,
) -> Dict[str, Any]:
    """``calibrate`` on outputs already collected (``collect_calibration_outputs``); see ``calibrate``."""
    epsilon, delta = check_level('epsilon', epsilon), check_level('delta', delta)
    family = outputs['family']
    points = _points(model, family, outputs, thresholds, keep_rates)
    criterion = getattr(model, 'exit_criterion', 'confidence')
    losses, costs = point_losses(outputs, points, criterion, risk, _cost_function(model, family))
    n = int(losses.shape[1])
    certified, p = ltt(losses, epsilon, delta)
    rates = losses.float().mean(1)
    if certified == 0:
        first = float(rates[0])
        need_zero = images_needed(epsilon, delta, 0.)
        need_seen = images_needed(epsilon, delta, first)
        seen = (f'; at the loss rate seen at the safest point ({first:.4f}) about {need_seen}' if need_seen else
                f'; the safest point already shows a loss rate of {first:.4f} >= epsilon, so no number of images '
                f'certifies it: raise epsilon')
        raise CalibrationError(
            f'no point can be certified with {n} images for epsilon={epsilon:g}, delta={delta:g} (safest point '
            f'{_describe(points[0])}: {int(losses[0].sum())} of {n} images count toward the risk, p-value '
            f'{p[0]:.3g} > delta): '
            f'at least {need_zero} images are needed even if no answer differs' + seen)
    best = min(range(certified), key=lambda j: (float(costs[j]), -j))
    rate, threshold = points[best]
    risk_hat, cost, p_best = float(rates[best]), float(costs[best]), float(p[best])
    full = float(_cost_function(model, family)(1. if family != 'mexit' else None, None)[-1])
    if cost >= full:  # the exit heads cost more than they save on these images: full depth is cheaper and exact
        _logger.warning(f'warning: the cheapest certified point ({_describe(points[best])}) costs {cost:.4f} of the '
                        f'full model on these images, more than full depth: keeping full depth')
        rate, threshold, risk_hat, cost, p_best = (None if family == 'mexit' else 1.), None, 0., full, 0.
    result: Dict[str, Any] = {
        'epsilon': epsilon, 'delta': delta, 'n': n, 'risk': risk, 'family': family,
        'criterion': criterion if family != 'liferegress' else None,
        'threshold': threshold, 'keep_rate': rate,
        'empirical_risk': risk_hat, 'mean_cost': cost, 'p_value': p_best,
        'certified_points': certified, 'grid_points': len(points),
        'method': 'Learn-then-Test: Hoeffding-Bentkus p-values (binary), fixed-sequence testing from the safest point '
                  f'(MAPIE {_mapie_version()})',
    }
    return {k: v for k, v in result.items() if v is not None or k in ('threshold', 'keep_rate')}


def _mapie_version() -> str:
    try:
        import mapie
        return mapie.__version__
    except (ImportError, AttributeError):
        return '?'


def _describe(point: Tuple[Optional[float], Optional[float]]) -> str:
    rate, t = point
    return ', '.join(x for x in (None if rate is None else f'keep rate {rate:g}',
                                 None if t is None else f'threshold {t:g}') if x)


def calibrate(
        model: nn.Module,
        loader: DataLoader,
        epsilon: float,
        delta: float,
        risk: str = 'disagreement',
        thresholds: Optional[Sequence[float]] = None,
        keep_rates: Optional[Sequence[float]] = None,
        device: Optional[torch.device] = None,
        apply: bool = True,
        progress: bool = False,
) -> Dict[str, Any]:
    """Choose the cheapest threshold / keep rate / (keep rate, threshold) whose risk is certified <= ``epsilon`` with
    probability >= 1 - ``delta`` over the draw of the calibration images (Learn-then-Test; module docstring).

    Args:
        model: A multi-exit, LifeRegress or combined timm-exits model.
        loader: Calibration images ``(x, y)``, y = -1 where there is no label; images not used to fit the model.
        epsilon: Allowed risk, in (0, 1): share of images whose answer differs from the full model's, or (with
            ``risk='accuracy_drop'``) that the full model gets right and the point wrong.
        delta: Allowed chance, in (0, 1), that the calibration draw was unlucky.
        risk: 'disagreement' (no labels needed) or 'accuracy_drop' (labels needed).
        thresholds: Threshold grid in testing order, safest first (default ``threshold_grid``).
        keep_rates: Keep rates, in (0, 1] (default ``keep_rate_grid``).
        apply: Make the chosen point the model's default (``model(x)`` in eval mode uses it) and set
            ``model.calibration``.

    Returns:
        ``{'epsilon', 'delta', 'n', 'risk', 'family', 'criterion', 'threshold', 'keep_rate', 'empirical_risk',
        'mean_cost', 'p_value', 'certified_points', 'grid_points', 'method'}``.

    Raises:
        CalibrationError: No point certified; the message names the images needed.
        ValueError: epsilon or delta outside (0, 1), an unknown risk, labels missing for 'accuracy_drop'.
    """
    epsilon, delta = check_level('epsilon', epsilon), check_level('delta', delta)
    if risk not in RISKS:
        raise ValueError(f'risk={risk!r} is not known; allowed: {list(RISKS)}')
    _mapie()
    _family(model)  # refuses what calibrate cannot serve, before the data is read
    if keep_rates is not None:
        bad = [r for r in keep_rates if not (isinstance(r, (int, float)) and 0 < r <= 1)]
        if bad:
            raise ValueError(f'keep_rates must be numbers in (0, 1], got {bad}')
    if thresholds is not None:
        bad = [t for t in thresholds if not (isinstance(t, (int, float)) and 0 <= t <= 1)]
        if bad or not thresholds:
            raise ValueError(f'thresholds must be a non-empty sequence of numbers in [0, 1], got {list(thresholds)}')
    rates = None if keep_rates is None else sorted({1., *(float(r) for r in keep_rates)}, reverse=True)
    outputs = collect_calibration_outputs(model, loader, device, rates, progress)
    result = calibrate_outputs(model, outputs, epsilon, delta, risk, thresholds, keep_rates)
    if apply:
        apply_calibration(model, result)
    return result


# --- command line -----------------------------------------------------------------------------------------------------

def _level(text: str) -> float:
    try:
        return check_level('value', float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a number in (0, 1), got {text!r}') from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m timm_exits.calibrate``."""
    parser = argparse.ArgumentParser(prog='python -m timm_exits.calibrate', description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help='model.safetensors (of python -m timm_exits.fit or a '
                        'recipe) or a training checkpoint that records its model')
    parser.add_argument('--model', default=None, help='model name, for a checkpoint that records none')
    parser.add_argument('--data-dir', default='', help='calibration images: a folder, nested (class folders: '
                        'labels) or flat (no labels); with --dataset folder / digits the dataset root')
    parser.add_argument('--dataset', default='images', help="'images' (default: the files of --data-dir), 'folder' "
                        "(ImageFolder at --data-dir/--split), 'digits' or 'torch/<name>'")
    parser.add_argument('--split', default='', help="split of --dataset ('' for images: --data-dir itself)")
    parser.add_argument('--fit-dir', default='', help='the images the exits were fitted on (refused if the two '
                        'folders share an image)')
    parser.add_argument('--epsilon', type=_level, required=True, help='allowed risk, in (0, 1)')
    parser.add_argument('--delta', type=_level, required=True, help='allowed chance of an unlucky draw, in (0, 1)')
    parser.add_argument('--risk', default='disagreement', choices=list(RISKS),
                        help='disagreement with the full model (no labels) or accuracy_drop (labels needed)')
    parser.add_argument('--batch-size', type=_int_at_least(1), default=64)
    workers = min(4, available_cpus())
    parser.add_argument('--workers', type=_int_at_least(0), default=workers)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--output', required=True, help='folder for calibration.json and model.safetensors')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    add_data_config_args(parser)
    return parser


def image_set(folder: str) -> Dict[str, str]:
    """Content hash -> path of every image file under ``folder`` (to find images two folders share)."""
    import hashlib
    from torchvision.datasets.folder import IMG_EXTENSIONS
    found = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(IMG_EXTENSIONS):
                path = os.path.join(dirpath, f)
                with open(path, 'rb') as fh:
                    found[hashlib.sha1(fh.read()).hexdigest()] = path
    return found


def check_disjoint(calib_dir: str, fit_dir: str) -> None:
    """Refuse calibration images that were also fitting images (same folder, one inside the other, or a file with the
    same content): the guarantee holds only for images the model did not learn from."""
    a, b = os.path.realpath(calib_dir), os.path.realpath(fit_dir)
    if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
        raise ValueError(f'--data-dir {calib_dir!r} and --fit-dir {fit_dir!r} overlap (one folder holds the other): '
                         'calibrate on images the exits were not fitted on')
    shared = set(image_set(a)) & set(image_set(b))
    if shared:
        example = image_set(a)[next(iter(shared))]
        raise ValueError(f'--data-dir {calib_dir!r} shares {len(shared)} image(s) with --fit-dir {fit_dir!r} (e.g. '
                         f'{example}): calibrate on images the exits were not fitted on')


def load_model(checkpoint: str, model_name: Optional[str] = None) -> Tuple[nn.Module, Dict[str, Any], str]:
    """The model a checkpoint records (name, kwargs, classes), its weights loaded; (model, recorded args, name)."""
    import timm
    try:
        state_dict, recorded = read_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise ValueError(f'--checkpoint: {e}') from e
    name, kwargs, num_classes = checkpoint_model_args(recorded)
    name = model_name or name
    if not name:
        raise ValueError(f'--model is required: checkpoint {checkpoint} does not name its model')
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UntrainedWeightsWarning)
        try:
            model = timm.create_model(name, **kwargs)
        except RuntimeError as e:
            raise ValueError(f'--model {name!r}: {e}') from e
    load_checkpoint_into(model, state_dict, recorded, checkpoint)
    return model, dict(recorded or {}), name


def write_calibrated(checkpoint: str, result: Dict[str, Any], path: str, name: str,
                     data_config: Optional[Dict[str, Any]] = None) -> None:
    """Copy ``checkpoint``'s weights to ``path`` (safetensors, atomically) with ``result`` in its metadata: the
    ``timm_exits`` JSON of a safetensors checkpoint (or model, kwargs and classes of another) plus ``calibration``
    and the ``data_config`` the calibration images were preprocessed with (the one later commands resolve to)."""
    from safetensors.torch import save_file
    state_dict, recorded = read_checkpoint(checkpoint)
    metadata: Dict[str, str] = {}
    if checkpoint.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(checkpoint, 'pt') as f:
            metadata = dict(f.metadata() or {})
        info = dict(recorded or {})
    else:
        _, kwargs, num_classes = checkpoint_model_args(recorded)
        info = {'model': name, 'model_kwargs': kwargs, 'num_classes': num_classes, 'format': 1}
    info['model'] = name
    info[CALIBRATION_KEY] = result
    if data_config is not None:
        info['data_config'] = data_config
    metadata[METADATA_KEY] = json.dumps(info, default=str)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def command_dataset(args: argparse.Namespace, model: nn.Module, recorded: Optional[Dict[str, Any]],
                    is_training: bool) -> Tuple[Any, Any]:
    """The dataset a command line names (``--dataset``, ``--data-dir``, ``--split``), preprocessed with the one data
    config resolution (its flags, else the checkpoint's record, else the pretrained cfg), and that resolution."""
    cfg = resolve_data_cfg(model, data_config_flags(args), recorded, use_train_size=args.use_train_size)
    _logger.info(f'preprocessing: {cfg.describe()}')
    try:
        ds = create_dataset(args.dataset, args.split, model, is_training, args.data_dir, data_config=cfg)
    except ValueError as e:
        raise ValueError(f'--data-dir: {e}') from e
    if len(ds) == 0:
        raise ValueError(f'--data-dir: no images in {args.dataset} {args.split!r}')
    return ds, cfg


def _folder(args: argparse.Namespace) -> str:
    """The image folder the command line names: --data-dir, or --data-dir/--split."""
    return os.path.join(args.data_dir, args.split) if args.split else args.data_dir


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Calibrate as the command line asks; bad input raises ValueError naming the flag, before anything is written."""
    from .train import _device_problem
    problem = _device_problem(args.device)
    if problem:
        raise ValueError(f'--device: {problem}')
    device = torch.device(args.device)
    _mapie()
    if args.dataset == 'images':
        if not args.data_dir:
            raise ValueError('--data-dir is required: the folder of calibration images')
        if not os.path.isdir(_folder(args)):
            raise ValueError(f'--data-dir {_folder(args)!r} is not a folder')
    if args.fit_dir:
        if not os.path.isdir(args.fit_dir):
            raise ValueError(f'--fit-dir {args.fit_dir!r} is not a folder')
        if args.dataset != 'images':
            raise ValueError('--fit-dir is compared with --dataset images only (the folders of both)')
        check_disjoint(_folder(args), args.fit_dir)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f'--output {args.output!r} is a file, not a folder')
    try:
        os.makedirs(args.output, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.output):
            pass
    except OSError as e:
        raise ValueError(f'--output {args.output!r} cannot be written ({e.strerror or e})') from e
    model, recorded, name = load_model(args.checkpoint, args.model)
    _family(model)
    model = model.to(device).eval()
    ds, cfg = command_dataset(args, model, recorded, False)
    if args.risk == 'accuracy_drop' and getattr(ds, 'labelled', True) is False:
        raise ValueError(f'--risk accuracy_drop needs labels: {args.data_dir!r} is a flat folder (no class folders); '
                         'use --risk disagreement or class folders')
    loader = make_loader(ds, args.batch_size, args.workers)
    result = calibrate(model, loader, args.epsilon, args.delta, risk=args.risk, device=device,
                       progress=not args.no_progress)
    calib = dict(result)
    result.update(model=name, checkpoint=os.path.abspath(args.checkpoint), data=f'{args.dataset}:{args.data_dir}'
                  + (f'/{args.split}' if args.split else ''), data_config=cfg.record())
    write_calibrated(args.checkpoint, calib, os.path.join(args.output, 'model.safetensors'), name, cfg.record())
    write_json(result, os.path.join(args.output, 'calibration.json'))
    _logger.info(json.dumps(result, indent=1))
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``python -m timm_exits.calibrate``: bad input prints one ``error: ...`` line and exits with status 2."""
    return run_command(build_parser(), run, argv)


callable_module(__name__, calibrate)

if __name__ == '__main__':
    main()
