""" Calibration with a guarantee: ``timm_exits.calibrate(model, loader, epsilon=, delta=)`` and
``python -m timm_exits.calibrate``.

Chooses the cheapest early-exit threshold (multi-exit, every criterion, classification and regression), keep rate
(LifeRegress) or (keep rate, threshold) pair (both in one model) such that, over the draw of the calibration images,

    P(risk of the chosen point <= epsilon) >= 1 - delta,

where the risk is the share of images whose answer differs from the full model's (full depth, keep rate 1), or, with
labels and ``risk='accuracy_drop'``, the share that the full model gets right and the cheap point gets wrong (an upper
bound of the accuracy drop). For a regression model (``task='regression'``) an answer "differs" when some output is
more than ``tolerance + tolerance_rel * |full value|`` from the full model's (numpy's ``isclose`` rule, target units),
and with labels ``risk='error_growth'`` counts the images whose absolute error grows by more than that.
Learn-then-Test (Angelopoulos et al.): one null hypothesis "risk(lambda_j) > epsilon" per point of a grid fixed before
the data is seen, a Hoeffding-Bentkus p-value from the calibration mean of each point's 0/1 loss, and fixed-sequence
testing from the safest point toward cheaper ones, stopping at the first that is not rejected (family-wise error
control at delta: every rejected point is certified at once). Of the certified points the one with the lowest mean cost
on the calibration images is chosen. When not even the safest point is certified, the call refuses and says how many
images would be needed.

The p-values and the fixed-sequence procedure are MAPIE's (``mapie.risk_control``: ``compute_hoeffding_bentkus_p_value``
with ``binary=True``, LTT's tighter Bentkus term for a 0/1 loss, and ``control_fwer(..., 'fixed_sequence')``), a
maintained implementation of exactly these formulas; ``pip install 'timm-exits[calibrate]'``.

Grids (data-independent, safest first):
- thresholds: ``threshold_grid(criterion, task)``: for 'confidence' 1.0 down to 0 (dense near 1), for 'entropy' and
  'uncertainty' 0 up to 1; for regression ('patience', 'uncertainty': target units) 0, then 10^(k/20) from 1e-4 up to
  1e4; an image leaves at its first exit whose criterion passes, so each step lowers every image's cost;
- keep rates: 1.0 down to ``min_keep_rate`` in steps of 0.05 (rates with the same token schedule merged);
- pairs: the threshold grid with the keep rate lowered along it in equal steps, so each step loosens the threshold or
  lowers the keep rate and never tightens either: a cost-ordered path.

Order of testing (``order=``). ``'fixed'`` tests the one path above at the full delta. ``'learned'`` (the default for
exits + slimming, whose grid has two knobs) lets the data choose the path without losing the guarantee (LTT's learn
step plus Bonferroni): the calibration images are split at random (seeded), ``learn_share`` (0.3) of them choose, among
candidate paths fixed in advance (the threshold path at each keep rate, the keep-rate path at full depth, the pair
path), the one whose certified point would be cheapest (p-values at the rates seen, for the other part's size), which
is then tested on the other 0.7 at delta / 2; the pair path and the threshold path at keep rate 1 are tested on all the
images at delta / 4 each. Every point any of the three certifies is certified (union bound: the chance that one of them
certifies a point whose risk exceeds epsilon is at most delta / 2 + delta / 4 + delta / 4), so the chosen point is never
dearer than either fixed path would certify alone at its delta / 4 on the same images. One-knob families have one path,
which 'learned' leaves as it is.

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
from numbers import Real
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ._files import atomic_write, write_json
from .data import (
    NO_LABEL, add_data_config_args, available_cpus, create_dataset, data_config_flags, make_loader, resolve_data_cfg,
    sum_by_image,
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
    'LEARN_SHARE', 'ORDERS', 'REGRESSION_RISKS', 'RISKS', 'CalibrationError', 'calibrate', 'calibrate_outputs',
    'check_risk', 'check_tolerance', 'collect_calibration_outputs', 'fixed_sequence_test', 'hb_p_values',
    'images_needed', 'keep_rate_grid', 'learned_path', 'ltt', 'main', 'pair_path', 'point_losses', 'point_table',
    'risk_description', 'risks_for', 'search', 'threshold_grid',
]

RISKS = ('disagreement', 'accuracy_drop')  # of classification models
REGRESSION_RISKS = ('disagreement', 'error_growth')  # of task='regression' models (a tolerance in target units)
ORDERS = ('fixed', 'learned')
LEARN_SHARE = 0.3  # share of the calibration images the learn step chooses the path on (order='learned')
LEARNED_DELTA = 0.5  # share of delta of the learned path; the fixed paths share the rest equally


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


def risks_for(task: str) -> Tuple[str, ...]:
    """The risks calibration certifies for models of ``task`` ('classification' or 'regression')."""
    return REGRESSION_RISKS if task == 'regression' else RISKS


def check_risk(task: str, risk: Any) -> str:
    """``risk`` if it is a risk of ``task``'s models, else a ValueError naming what is allowed."""
    allowed = risks_for(task)
    if risk not in allowed:
        other = 'classification' if task == 'regression' else 'regression'
        why = f' (a risk of task={other!r} models)' if risk in risks_for(other) else ''
        raise ValueError(f'risk={risk!r} is not a risk of task={task!r} models{why}; allowed: {list(allowed)}')
    return risk


def check_tolerance(task: str, tolerance: Any = None, tolerance_rel: Any = None) -> Optional[Tuple[float, float]]:
    """(tolerance, tolerance_rel) of a regression model, each a finite number >= 0 (a missing one is 0; at least one
    is needed); None for classification, which takes neither (an answer differs or it does not)."""
    if task != 'regression':
        if tolerance is not None or tolerance_rel is not None:
            raise ValueError('tolerance / tolerance_rel are for task=\'regression\' models (values in target units); '
                             'a classification answer differs or it does not: leave them out')
        return None
    if tolerance is None and tolerance_rel is None:
        raise ValueError('tolerance is required for a task=\'regression\' model: tolerance= (target units) and / or '
                         'tolerance_rel= (a share of the full model\'s value), each a finite number >= 0')
    out = []
    for name, value in (('tolerance', tolerance), ('tolerance_rel', tolerance_rel)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < math.inf):
            unit = 'target units' if name == 'tolerance' else "a share of the full model's value"
            raise ValueError(f'{name} must be a finite number >= 0 ({unit}), got {value!r}')
        out.append(0. if value is None else float(value))
    return out[0], out[1]


def risk_description(calibration: Dict[str, Any]) -> str:
    """What the certified risk of a calibration result counts, in words (the card says it)."""
    risk = calibration.get('risk', 'disagreement')
    if calibration.get('task') != 'regression':
        return ("images whose answer differs from the full model's" if risk == 'disagreement' else
                'images the full model gets right and the early answer wrong')
    atol, rtol = calibration.get('tolerance', 0.), calibration.get('tolerance_rel', 0.)
    allowed = ' + '.join([f'{atol:g}'] * bool(atol or not rtol) + [f'{rtol:g} x |full value|'] * bool(rtol))
    return (f"images whose early value differs from the full model's by more than {allowed} (target units)"
            if risk == 'disagreement' else
            f"images whose absolute error grows by more than {allowed} (target units) over the full model's")


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

def threshold_grid(criterion: str, task: str = 'classification') -> List[float]:
    """Thresholds from the safest to the loosest, fixed before any data: for 'confidence' (exit when max softmax >=
    t) 1.0 down to 0, dense near 1 (1 - 10^(-k/20), k = 0..80, and every 0.01); for 'entropy' / 'uncertainty' (exit when
    the score <= t) the mirror image, 0 up to 1. Regression ('patience': consecutive exits agree within t;
    'uncertainty': the largest predicted scale <= t; target units): 0, then 10^(k/20) for k = -80..80 (1e-4 to 1e4)."""
    if task == 'regression':
        return [0.] + [float(f'{10 ** (k / 20):.6g}') for k in range(-80, 81)]
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
    if isinstance(model, MultiExitLifeRegressMixin):
        return 'mexit_liferegress'
    if isinstance(model, MultiExitMixin):
        return 'mexit'
    if isinstance(model, LifeRegressMixin):
        return 'liferegress'
    raise ValueError(f'model must be a timm-exits model (multi-exit, LifeRegress or both), got {type(model).__name__}')


def _task(model: nn.Module) -> str:
    return getattr(model, 'task', 'classification')


def _regression_exits(model: nn.Module, x: torch.Tensor, rate: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every exit's values and predicted scales (E, B, K) at keep rate ``rate``, as ``forward_dynamic`` computes them:
    at keep rate 1 ``forward_exits_with_scale``, below it the slimmed walk's tokens at each exit (``ExitWalker``)."""
    if rate >= 1.:  # (a slimming model's own default keep rate may be lower: ask for 1)
        kwargs = {'keep_rate': 1.} if isinstance(model, MultiExitLifeRegressMixin) else {}
        values, scales = model.forward_exits_with_scale(x, **kwargs)
        return torch.stack(values).float(), torch.stack(scales).float()
    from .models.walker import WalkState
    walker = model._walker(model._img_size(x), None, None, rate, every_head=True)
    state, values, scales = walker.start(x), [], []
    for layer in model.exit_layers:
        tokens, lives, kept = walker._segment_to(state, layer, False, None)[:3]
        features = model.exit_features(layer, tokens, walker.grid)
        values.append(model.exit_head_module(layer)(features).float())
        scales.append(model.exit_scale(layer, features))
        state = WalkState(layer, state.rows, tokens, lives, kept, state.criterion)
    return torch.stack(values), torch.stack(scales)


def _batch_outputs(model: nn.Module, family: str, x: torch.Tensor, rate: float) -> Tuple[torch.Tensor, ...]:
    """One batch at one keep rate: (answers, scores) per exit; answers (E, B) classes or (E, B, K) values, scores the
    criterion's (E, B) (classification) or the predicted scales (E, B, K) (regression); LifeRegress: (1, B)."""
    if family == 'liferegress':
        return (model(x, keep_rate=rate).argmax(-1)[None],)
    if _task(model) == 'regression':
        return _regression_exits(model, x, rate)
    outs = model.forward_exits(x) if family == 'mexit' else model.forward_exits(x, keep_rate=rate)
    return (torch.stack([z.argmax(-1) for z in outs]),
            torch.stack([model.exit_scores(layer, z).float() for layer, z in zip(model.exit_layers, outs)]))


@torch.no_grad()
def collect_calibration_outputs(
        model: nn.Module,
        loader: DataLoader,
        device: Optional[torch.device] = None,
        keep_rates: Optional[Sequence[float]] = None,
        progress: bool = False,
        index: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """What calibration needs of every image, from one pass per keep rate (eval mode). Under ``torch.distributed``
    (``torchrun``) each process reads its shard of the images (``index``: each of its images' place in the whole
    set, in the loader's order) and the table is gathered in that order, the same as one process would build.

    Returns:
        ``{'family', 'task', 'labels', 'keep_rates'}`` and, per keep rate (a list; multi-exit alone: one entry at 1.0):
        classification: ``'preds'`` (E, N) each exit's class and ``'scores'`` (E, N) each exit's criterion value
        (multi-exit), or ``'preds'`` (1, N) the answer at that keep rate (LifeRegress), labels (N,) (-1: none);
        regression: ``'values'`` and ``'scales'`` (E, N, K) of every exit, labels (N, K) float.
    """
    from tqdm import tqdm
    family, task = _family(model), _task(model)
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
    parts: List[List[List[torch.Tensor]]] = [[] for _ in rates]
    labels = []
    try:
        for x, y in tqdm(loader, desc='calibration', unit='batch', disable=not progress, dynamic_ncols=True):
            x = x.to(device)
            y = torch.as_tensor(y)
            labels.append(y.float().reshape(len(y), -1).cpu() if task == 'regression' else y.long().cpu())
            for i, rate in enumerate(rates):
                parts[i].append([t.cpu() for t in _batch_outputs(model, family, x, rate)])
    finally:
        model.train(was_training)
    if not labels or sum(len(v) for v in labels) == 0:
        raise ValueError('no calibration images: the loader yields nothing')
    out: Dict[str, Any] = {'family': family, 'task': task, 'labels': torch.cat(labels), 'keep_rates': rates}
    names = ('values', 'scales') if task == 'regression' else ('preds', 'scores')
    for k, name in enumerate(names[:len(parts[0][0])]):
        out[name] = [torch.cat([batch[k] for batch in p], 1) for p in parts]
    if task == 'regression':
        from .evaluation import _crop_image_ids
        ids = _crop_image_ids(loader)
        if ids is not None:  # crops of whole images (the counting protocol): the risk counts images, not crops
            out['image_ids'] = ids
    if index is not None and len(index) != len(out['labels']):
        raise ValueError(f'index names {len(index)} images, the loader gave {len(out["labels"])}')
    return gather_outputs(out, index) if dist.is_available() and dist.is_initialized() else out


def gather_outputs(out: Dict[str, Any], index: Optional[Sequence[int]]) -> Dict[str, Any]:
    """Every process's calibration outputs in one table, rows in the order of ``index`` (each process's images'
    places in the whole set; all of them must cover 0 .. N-1 once)."""
    if index is None:
        raise ValueError('under torch.distributed each process needs the index of its images in the whole set')
    mine = {k: v for k, v in out.items() if k in ('labels', 'values', 'scales', 'preds', 'scores', 'image_ids')}
    parts: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (torch.as_tensor(list(index), dtype=torch.long), mine))
    where = torch.cat([p[0] for p in parts])
    order = where.argsort()
    if not torch.equal(where[order], torch.arange(len(where))):
        raise ValueError(f'the processes\' images do not cover the set once: {len(where)} rows, places '
                         f'{where.min().item()}..{where.max().item()} with repeats or gaps')
    merged = dict(out, labels=torch.cat([p[1]['labels'] for p in parts])[order])
    if any('image_ids' in p[1] for p in parts):
        if not all('image_ids' in p[1] for p in parts):
            raise ValueError('some processes read crops of whole images and others not')
        merged['image_ids'] = torch.cat([p[1]['image_ids'] for p in parts])[order]
    for name in mine.keys() - {'labels', 'image_ids'}:
        merged[name] = [torch.cat([p[1][name][i] for p in parts], 1)[:, order] for i in range(len(mine[name]))]
    return merged


def _first_exit(scores: torch.Tensor, threshold: float, confident_high: bool) -> torch.Tensor:
    """Per image, the index of the exit it leaves at (the last one answers the rest), as ``forward_dynamic``."""
    passes = scores >= threshold if confident_high else scores <= threshold
    passes[-1] = True
    return passes.to(torch.uint8).argmax(0)


def _losses_at(outputs: Dict[str, Any], i: int, first: torch.Tensor, risk: str,
               tolerance: Optional[Tuple[float, float]]) -> torch.Tensor:
    """(N,) 0/1 loss of every image answering at exit ``first`` (N,) at keep rate number ``i``."""
    rates, labels = outputs['keep_rates'], outputs['labels']
    if outputs.get('task') == 'regression':
        values, ref = outputs['values'][i], outputs['values'][rates.index(1.)][-1]
        answer = values[first, torch.arange(ref.shape[0])].double()
        ref, target = ref.double(), labels.double()
        ids = outputs.get('image_ids')
        if ids is not None:  # crops: an image's count is the sum of its crops' (each left at its own exit)
            answer, ref, target = (sum_by_image(v, ids) for v in (answer, ref, target))
        allowed = tolerance[0] + tolerance[1] * ref.abs()
        if risk == 'disagreement':
            return ((answer - ref).abs() > allowed).any(-1)
        return ((answer - target).abs() - (ref - target).abs() > allowed).any(-1)
    ref = outputs['preds'][rates.index(1.)][-1]
    answer = outputs['preds'][i][first, torch.arange(ref.shape[0])]
    return answer != ref if risk == 'disagreement' else (ref == labels) & (answer != labels)


def _check_labels(outputs: Dict[str, Any], risk: str) -> None:
    labels = outputs['labels']
    if outputs.get('task') == 'regression':
        ref = outputs['values'][0][-1]
        if risk == 'error_growth' and (labels.shape != ref.shape or bool(labels.isnan().any())
                                       or bool((labels == NO_LABEL).all())):
            raise ValueError(f"risk='error_growth' needs a target for every image ({tuple(ref.shape)}, no NaN); got "
                             f'labels of shape {tuple(labels.shape)}'
                             + (' with NaN' if bool(labels.isnan().any()) else '')
                             + (' that are all -1 (no label)' if bool((labels == NO_LABEL).all()) else ''))
    elif risk == 'accuracy_drop' and bool((labels == NO_LABEL).any()):
        raise ValueError(f"risk='accuracy_drop' needs a label for every image; {int((labels == NO_LABEL).sum())} of "
                         f'{len(labels)} have none')


def point_table(
        outputs: Dict[str, Any],
        points: Sequence[Tuple[Optional[float], Optional[float]]],
        criterion: str = 'confidence',
        risk: str = 'disagreement',
        costs: Optional[Any] = None,
        tolerance: Optional[Tuple[float, float]] = None,
        patience: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """0/1 loss and cost of every image at every (keep rate, threshold) point.

    Args:
        outputs: ``collect_calibration_outputs``.
        points: (keep rate or None for 1, threshold or None for full depth) pairs.
        criterion: The exit criterion (classification: 'confidence' leaves at score >= t, the others at score <= t;
            regression: 'patience' or 'uncertainty', as ``forward_dynamic`` decides).
        risk: 'disagreement' (answer differs from the full model's at keep rate 1) or, with labels,
            'accuracy_drop' (classification: the full model is right and the point wrong) or 'error_growth'
            (regression: the absolute error grows by more than the tolerance).
        costs: ``costs(keep_rate, threshold)`` -> per exit costs (multi-exit) or the cost (LifeRegress).
        tolerance: Regression: (tolerance, tolerance_rel): an output differs when it is more than ``tolerance +
            tolerance_rel * |full value|`` away.
        patience: Regression 'patience' criterion's count.

    Returns:
        (G, N) bool losses and (G, N) float64 costs (zeros without ``costs``).
    """
    from .evaluation import regression_exit_choice
    regression = outputs.get('task') == 'regression'
    check_risk('regression' if regression else 'classification', risk)
    if regression and tolerance is None:
        raise ValueError("tolerance is required for a task='regression' model")
    _check_labels(outputs, risk)
    rates = outputs['keep_rates']
    n = len(outputs['labels'])
    losses, image_costs = [], []
    for rate, t in points:
        i = rates.index(1. if rate is None else rate)
        num_exits = outputs['values' if regression else 'preds'][i].shape[0]
        if t is None or ('scores' not in outputs and not regression):
            first = torch.full((n,), num_exits - 1, dtype=torch.long)
        elif regression:
            first = regression_exit_choice(outputs['values'][i], outputs['scales'][i], criterion, t, patience)
        else:
            first = _first_exit(outputs['scores'][i], t, criterion == 'confidence')
        losses.append(_losses_at(outputs, i, first, risk, tolerance))
        if costs is None:
            image_costs.append(torch.zeros(n, dtype=torch.float64))
        else:
            c = torch.as_tensor(costs(rate, t), dtype=torch.float64).reshape(-1)
            image_costs.append(c[first.long() if len(c) > 1 else torch.zeros_like(first).long()])
    ids = outputs.get('image_ids')
    if ids is not None:  # crops: an image's cost is its crops' mean (crops of one size)
        crops = sum_by_image(torch.ones(len(ids), dtype=torch.float64), ids)
        image_costs = [sum_by_image(c, ids) / crops for c in image_costs]
    return torch.stack(losses), torch.stack(image_costs)


def point_losses(
        outputs: Dict[str, Any],
        points: Sequence[Tuple[Optional[float], Optional[float]]],
        criterion: str = 'confidence',
        risk: str = 'disagreement',
        costs: Optional[Any] = None,
        tolerance: Optional[Tuple[float, float]] = None,
        patience: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``point_table`` with each point's mean cost: (G, N) bool losses and (G,) float64 mean costs."""
    losses, image_costs = point_table(outputs, points, criterion, risk, costs, tolerance, patience)
    return losses, image_costs.mean(1)


def _cost_function(model: nn.Module, family: str) -> Any:
    if family == 'mexit':
        return lambda rate, t: model.threshold_costs if t is not None else model.exit_costs
    if family == 'liferegress':
        return lambda rate, t: [model.flops_ratio(rate)]
    return lambda rate, t: model.threshold_costs_for(rate) if t is not None else model.exit_costs_for(rate)


Path = Tuple[str, List[Tuple[Optional[float], Optional[float]]]]


def _paths(model: nn.Module, family: str, outputs: Dict[str, Any], thresholds: Optional[Sequence[float]],
           keep_rates: Optional[Sequence[float]]) -> Tuple[List[Path], List[Path]]:
    """The data-independent paths, safest point first: (the fixed paths, the learn step's candidates). Multi-exit:
    the threshold grid; LifeRegress: the keep rates; both: the pair path (``pair_path``) and the thresholds at the
    highest keep rate, and as candidates the thresholds at each keep rate (its slimmed full depth first), the keep
    rates at full depth and the pair path."""
    task = _task(model)
    grid = list(thresholds) if thresholds is not None else threshold_grid(getattr(model, 'exit_criterion', ''), task)
    if family == 'mexit':
        path = ('thresholds', [(None, t) for t in grid])
        return [path], [path]
    rates = sorted(set(keep_rates or outputs['keep_rates']), reverse=True)
    if family == 'liferegress':
        path = ('keep rates', [(r, None) for r in rates if r < 1.])
        return [path], [path]
    pair = ('pair path', pair_path(rates, grid))
    if len(rates) == 1:
        return [pair], [pair]
    fixed = [pair, (f'thresholds at keep rate {rates[0]:g}', [(rates[0], t) for t in grid])]
    candidates = [(f'thresholds at keep rate {r:g}', [(r, None)] + [(r, t) for t in grid]) for r in rates]
    return fixed, candidates + [('keep rates at full depth', [(r, None) for r in rates]), pair]


def learned_path(losses: torch.Tensor, costs: torch.Tensor, candidates: Sequence[Sequence[int]], epsilon: float,
                 delta: float, n_test: int) -> int:
    """LTT's learn step: which of ``candidates`` (grid indices, safest first) would certify the cheapest point, judged
    on the learning images (``losses``, ``costs``: (G, n) of them): along each path, fixed-sequence testing at level
    ``delta`` of the p-values that ``n_test`` images would give at the loss rates seen here; of the points it would
    certify, the lowest mean cost here. Returns the index of the path (the first of equals)."""
    hb, _ = _mapie()
    rates, mean_costs = losses.double().mean(1).numpy(), costs.double().mean(1).numpy()
    best, best_cost = 0, math.inf
    for k, path in enumerate(candidates):
        idx = np.asarray(path)
        p = np.asarray(hb(_exact_rate(np.round(rates[idx] * n_test), n_test), int(n_test), float(epsilon),
                          binary=True), dtype=np.float64)[:, 0]
        passed = fixed_sequence_test(p, delta)
        cost = float(mean_costs[idx[:passed]].min()) if passed else math.inf
        if cost < best_cost:
            best, best_cost = k, cost
    return best


def search(
        losses: torch.Tensor,
        costs: torch.Tensor,
        fixed: Sequence[Tuple[str, Sequence[int]]],
        candidates: Sequence[Tuple[str, Sequence[int]]] = (),
        epsilon: float = 0.05,
        delta: float = 0.1,
        order: str = 'fixed',
        learn_share: float = LEARN_SHARE,
        seed: int = 0,
) -> Dict[str, Any]:
    """Which grid points are certified, jointly with probability >= 1 - delta (module docstring).

    Args:
        losses, costs: (G, N) 0/1 losses and costs of every grid point on every calibration image.
        fixed: Named paths of grid indices, safest first, fixed before the data: 'fixed' tests the first at delta;
            'learned' tests each on all the images at an equal share of (1 - LEARNED_DELTA) delta.
        candidates: 'learned': the paths the learn step chooses among on ``learn_share`` of the images (a random
            split, ``seed``); the chosen one is tested on the other images at LEARNED_DELTA delta.
        order: 'fixed' or 'learned' ('learned' with fewer than two candidates: 'fixed').

    Returns:
        ``{'order', 'certified': grid indices, 'p': {index: p-value of the test that certified it at the lowest
        p}, 'tests': [{'path', 'delta', 'n', 'points', 'certified'}]}``.
    """
    epsilon, delta = check_level('epsilon', epsilon), check_level('delta', delta)
    if order not in ORDERS:
        raise ValueError(f'order={order!r} is not known; allowed: {list(ORDERS)}')
    n = int(losses.shape[1])
    if n == 0:
        raise ValueError('no calibration images')
    learned = order == 'learned' and len(candidates) > 1
    runs: List[Tuple[str, Sequence[int], float, Optional[torch.Tensor]]] = []
    if learned:
        learn_share = check_level('learn_share', learn_share)
        if n < 2:
            raise ValueError(f"order='learned' splits the calibration images in two: {n} is too few")
        n_learn = min(max(int(round(learn_share * n)), 1), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        learn, test = perm[:n_learn], perm[n_learn:]
        d_learned = LEARNED_DELTA * delta
        k = learned_path(losses[:, learn], costs[:, learn], [c[1] for c in candidates], epsilon, d_learned, len(test))
        runs += [(name, path, (1 - LEARNED_DELTA) * delta / len(fixed), None) for name, path in fixed]
        runs.append((f'learned: {candidates[k][0]}', candidates[k][1], d_learned, test))
    else:
        runs.append((fixed[0][0], fixed[0][1], delta, None))
    certified: Dict[int, float] = {}
    tests = []
    for name, path, level, images in runs:
        table = losses[list(path)] if images is None else losses[list(path)][:, images]
        passed, p = ltt(table, epsilon, level)
        for j in range(passed):
            certified[path[j]] = min(certified.get(path[j], 1.), float(p[j]))
        tests.append({'path': name, 'delta': level, 'n': int(table.shape[1]), 'points': len(path),
                      'certified': passed, 'first_p_value': float(p[0]), 'first_losses': int(table[0].sum())})
    return {'order': 'learned' if learned else 'fixed', 'certified': sorted(certified), 'p': certified,
            'tests': tests}


def calibrate_outputs(
        model: nn.Module,
        outputs: Dict[str, Any],
        epsilon: float,
        delta: float,
        risk: str = 'disagreement',
        thresholds: Optional[Sequence[float]] = None,
        keep_rates: Optional[Sequence[float]] = None,
        tolerance: Optional[float] = None,
        tolerance_rel: Optional[float] = None,
        order: Optional[str] = None,
        learn_share: float = LEARN_SHARE,
        seed: int = 0,
) -> Dict[str, Any]:
    """``calibrate`` on outputs already collected (``collect_calibration_outputs``); see ``calibrate``."""
    epsilon, delta = check_level('epsilon', epsilon), check_level('delta', delta)
    family, task = outputs['family'], outputs.get('task', 'classification')
    check_risk(task, risk)
    tol = check_tolerance(task, tolerance, tolerance_rel)
    order = _default_order(family) if order is None else order
    fixed, candidates = _paths(model, family, outputs, thresholds, keep_rates)
    candidates = candidates if order == 'learned' else []
    paths = fixed + candidates
    points = list(dict.fromkeys(pt for _, path in paths for pt in path))
    index = {pt: j for j, pt in enumerate(points)}
    criterion = getattr(model, 'exit_criterion', 'confidence')
    patience = getattr(model, 'exit_patience', 1)
    losses, image_costs = point_table(outputs, points, criterion, risk, _cost_function(model, family), tol, patience)
    found = search(losses, image_costs, [(name, [index[pt] for pt in path]) for name, path in fixed],
                   [(name, [index[pt] for pt in path]) for name, path in candidates], epsilon, delta, order,
                   learn_share, seed)
    n, rates, costs = int(losses.shape[1]), losses.double().mean(1), image_costs.mean(1)
    if not found['certified']:
        raise CalibrationError(_refusal(found['tests'][0], fixed[0][1][0], n, epsilon, delta))
    best = min(found['certified'], key=lambda j: (float(costs[j]), -j))
    rate, threshold = points[best]
    risk_hat, cost, p_best = float(rates[best]), float(costs[best]), found['p'][best]
    full = float(_cost_function(model, family)(1. if family != 'mexit' else None, None)[-1])
    if cost >= full:  # the exit heads cost more than they save on these images: full depth is cheaper and exact
        _logger.warning(f'warning: the cheapest certified point ({_describe(points[best])}) costs {cost:.4f} of the '
                        f'full model on these images, more than full depth: keeping full depth')
        rate, threshold, risk_hat, cost, p_best = (None if family == 'mexit' else 1.), None, 0., full, 0.
    result: Dict[str, Any] = {
        'epsilon': epsilon, 'delta': delta, 'n': n, 'risk': risk, 'family': family, 'task': task,
        'criterion': criterion if family != 'liferegress' else None,
        'exit_patience': patience if task == 'regression' and criterion == 'patience' else None,
        'tolerance': None if tol is None else tol[0], 'tolerance_rel': None if tol is None else tol[1],
        'threshold': threshold, 'keep_rate': rate,
        'empirical_risk': risk_hat, 'mean_cost': cost, 'p_value': p_best,
        'certified_points': len(found['certified']), 'grid_points': len(points), 'order': found['order'],
        'learn_share': learn_share if found['order'] == 'learned' else None, 'tests': found['tests'],
        'method': 'Learn-then-Test: Hoeffding-Bentkus p-values (binary), fixed-sequence testing from the safest point '
                  f'(MAPIE {_mapie_version()})' + (', the path chosen on a split of the images, Bonferroni over the '
                                                   'paths tested' if found['order'] == 'learned' else ''),
    }
    return {k: v for k, v in result.items() if v is not None or k in ('threshold', 'keep_rate')}


def _default_order(family: str) -> str:
    """'learned' where the grid has two knobs (exits + slimming), else 'fixed' (one path: nothing to choose)."""
    return 'learned' if family == 'mexit_liferegress' else 'fixed'


def _refusal(test: Dict[str, Any], safest: Tuple[Optional[float], Optional[float]], n: int, epsilon: float,
             delta: float) -> str:
    """Why nothing was certified, and how many images would be needed (at the first path's share of delta)."""
    level, m, k, p = test['delta'], test['n'], test['first_losses'], test['first_p_value']
    first = k / m
    need_zero = images_needed(epsilon, level, 0.)
    need_seen = images_needed(epsilon, level, first)
    seen = (f'; at the loss rate seen at the safest point ({first:.4f}) about {need_seen}' if need_seen else
            f'; the safest point already shows a loss rate of {first:.4f} >= epsilon, so no number of images '
            f'certifies it: raise epsilon')
    share = '' if level == delta else f' (the {test["path"]} tested at delta share {level:g} on {m} images)'
    return (f'no point can be certified with {n} images for epsilon={epsilon:g}, delta={delta:g}{share} (safest point '
            f'{_describe(safest)}: {k} of {m} images count toward the risk, p-value {p:.3g} > delta): '
            f'at least {need_zero} images are needed even if no answer differs' + seen)


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
        tolerance: Optional[float] = None,
        tolerance_rel: Optional[float] = None,
        order: Optional[str] = None,
        learn_share: float = LEARN_SHARE,
        seed: int = 0,
        index: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Choose the cheapest threshold / keep rate / (keep rate, threshold) whose risk is certified <= ``epsilon`` with
    probability >= 1 - ``delta`` over the draw of the calibration images (Learn-then-Test; module docstring).

    Args:
        model: A multi-exit, LifeRegress or combined timm-exits model (classification, or ``task='regression'``).
        loader: Calibration images ``(x, y)``, y = -1 where there is no label (regression: the targets); images not
            used to fit the model.
        epsilon: Allowed risk, in (0, 1): share of images whose answer differs from the full model's, or (with
            ``risk='accuracy_drop'``) that the full model gets right and the point wrong, or (regression,
            ``risk='error_growth'``) whose absolute error grows by more than the tolerance.
        delta: Allowed chance, in (0, 1), that the calibration draw was unlucky.
        risk: Classification: 'disagreement' (no labels needed) or 'accuracy_drop' (labels needed); regression:
            'disagreement' or 'error_growth' (targets needed).
        thresholds: Threshold grid in testing order, safest first (default ``threshold_grid``).
        keep_rates: Keep rates, in (0, 1] (default ``keep_rate_grid``).
        apply: Make the chosen point the model's default (``model(x)`` in eval mode uses it) and set
            ``model.calibration``.
        tolerance: Regression (required, or ``tolerance_rel``): an output differs from the full model's when it is
            more than ``tolerance + tolerance_rel * |full value|`` away; target units, a finite number >= 0.
        tolerance_rel: Regression: the relative part of the tolerance, a finite number >= 0.
        order: 'fixed' (the one path, safest first) or 'learned' (the path chosen on ``learn_share`` of the images,
            Bonferroni with the fixed paths; module docstring); default 'learned' for exits + slimming, else 'fixed'.
        learn_share: 'learned': the share of the calibration images, in (0, 1), the path is chosen on.
        seed: 'learned': the seed of the random split.
        index: Under ``torch.distributed``: the places in the whole set of this process's images, in ``loader``'s
            order (``collect_calibration_outputs``); the statistics run once on the gathered table.

    Returns:
        ``{'epsilon', 'delta', 'n', 'risk', 'family', 'task', 'criterion', 'threshold', 'keep_rate',
        'empirical_risk', 'mean_cost', 'p_value', 'certified_points', 'grid_points', 'order', 'tests', 'method'}``
        (regression: also 'tolerance', 'tolerance_rel' and, for 'patience', 'exit_patience'; 'learned':
        'learn_share'); 'tests' lists each path tested with its share of delta, images and points certified.

    Raises:
        CalibrationError: No point certified; the message names the images needed.
        ValueError: epsilon or delta outside (0, 1), a risk or tolerance the model's task does not take, labels
            missing for 'accuracy_drop' / 'error_growth'.
    """
    epsilon, delta = check_level('epsilon', epsilon), check_level('delta', delta)
    _family(model)  # refuses what calibrate cannot serve, before the data is read
    task = _task(model)
    check_risk(task, risk)
    check_tolerance(task, tolerance, tolerance_rel)
    if order is not None and order not in ORDERS:
        raise ValueError(f'order={order!r} is not known; allowed: {list(ORDERS)}')
    check_level('learn_share', learn_share)
    _mapie()
    _check_grid_args(task, thresholds, keep_rates)
    rates = None if keep_rates is None else sorted({1., *(float(r) for r in keep_rates)}, reverse=True)
    outputs = collect_calibration_outputs(model, loader, device, rates, progress, index)
    result = calibrate_outputs(model, outputs, epsilon, delta, risk, thresholds, keep_rates, tolerance, tolerance_rel,
                               order, learn_share, seed)
    if apply:
        apply_calibration(model, result)
    return result


def _check_grid_args(task: str, thresholds: Optional[Sequence[float]], keep_rates: Optional[Sequence[float]]) -> None:
    if keep_rates is not None:
        bad = [r for r in keep_rates if not (isinstance(r, (int, float)) and 0 < r <= 1)]
        if bad:
            raise ValueError(f'keep_rates must be numbers in (0, 1], got {bad}')
    if thresholds is not None:
        high = math.inf if task == 'regression' else 1
        bad = [t for t in thresholds if not (isinstance(t, (int, float)) and 0 <= t <= high and t < math.inf)]
        if bad or not thresholds:
            allowed = 'finite numbers >= 0 (target units)' if task == 'regression' else 'numbers in [0, 1]'
            raise ValueError(f'thresholds must be a non-empty sequence of {allowed}, got {list(thresholds)}')


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
    parser.add_argument('--risk', default='disagreement', choices=list(dict.fromkeys(RISKS + REGRESSION_RISKS)),
                        help='disagreement with the full model (no labels), or with labels accuracy_drop '
                        '(classification) / error_growth (regression)')
    parser.add_argument('--tolerance', type=float, default=None,
                        help="regression models: how far (target units) a value may be from the full model's before "
                        'it counts as different (or, for error_growth, how much the absolute error may grow)')
    parser.add_argument('--tolerance-rel', type=float, default=None,
                        help="regression models: the tolerance's share of the full model's value (numpy's isclose: "
                        'tolerance + tolerance_rel x |full value|)')
    parser.add_argument('--order', default=None, choices=list(ORDERS),
                        help='fixed: the one path safest first; learned: the path chosen on --learn-share of the '
                        'images, with the fixed paths (default: learned for exits + slimming, else fixed)')
    parser.add_argument('--learn-share', type=_level, default=LEARN_SHARE,
                        help=f'--order learned: the share of the images the path is chosen on (default {LEARN_SHARE})')
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
    task = _task(model)
    try:
        check_risk(task, args.risk)
        check_tolerance(task, args.tolerance, args.tolerance_rel)
    except ValueError as e:
        raise ValueError(f'--{str(e).replace("tolerance_rel", "tolerance-rel")}') from e
    ds, cfg = command_dataset(args, model, recorded, False)
    if args.risk in ('accuracy_drop', 'error_growth') and getattr(ds, 'labelled', True) is False:
        raise ValueError(f'--risk {args.risk} needs labels: {args.data_dir!r} is a flat folder (no class folders); '
                         'use --risk disagreement or class folders')
    from timm.utils.distributed import init_distributed_device_so
    info = init_distributed_device_so(device=args.device)  # under torchrun: one shard of the images per process
    rank, world = info['global_rank'], info['world_size']
    if len(ds) < world:
        raise ValueError(f'--data-dir: {len(ds)} images for {world} processes; each needs at least one')
    index = list(range(rank, len(ds), world)) if info['distributed'] else None
    model = model.to(torch.device(info['device'])).eval()
    loader = make_loader(ds if index is None else Subset(ds, index), args.batch_size, args.workers)
    result = calibrate(model, loader, args.epsilon, args.delta, risk=args.risk, device=torch.device(info['device']),
                       progress=not args.no_progress and rank == 0, tolerance=args.tolerance,
                       tolerance_rel=args.tolerance_rel, order=args.order, learn_share=args.learn_share, index=index)
    calib = dict(result)
    result.update(model=name, checkpoint=os.path.abspath(args.checkpoint), data=f'{args.dataset}:{args.data_dir}'
                  + (f'/{args.split}' if args.split else ''), data_config=cfg.record(), processes=world)
    if rank == 0:
        write_calibrated(args.checkpoint, calib, os.path.join(args.output, 'model.safetensors'), name, cfg.record())
        write_json(result, os.path.join(args.output, 'calibration.json'))
        _logger.info(json.dumps(result, indent=1))
    if info['distributed']:
        dist.barrier()  # the files are written before any process returns
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``python -m timm_exits.calibrate``: bad input prints one ``error: ...`` line and exits with status 2."""
    return run_command(build_parser(), run, argv)


callable_module(__name__, calibrate)

if __name__ == '__main__':
    main()
