""" Model cards of published checkpoints: card data from ``hub_cards/``, the results tables and the trade-off plot.

``render_card`` fills ``hub_cards/template.md`` (timm-style YAML front matter, details, usage, results, citation) from
the card data of a model name (``card_metadata``) and the evaluation JSON of ``python -m timm_exits.validate``.
A regression model (``task='regression'``) gets a regression card: outputs instead of classes, the card data's
``regression_usage``, per-exit MAE and RMSE (and per-image MAE and RMSE where the evaluation has them: ``image_mae`` /
``image_rmse`` in a row), each criterion's threshold sweep, budgets, the calibrated default with its tolerance, and
MAE against compute in the plot.
"""
import json
import logging
import shutil
import string
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from huggingface_hub import ModelCardData

import timm

from ..models._checkpoint import layout_args
from ..models.adapters import input_shape
from ..models._pretrained import hub_org, recipe_of

__all__ = ['CARDS_DIR', 'IMAGE_KEYS', 'PLOT_NAME', 'card_metadata', 'render_card']

PLOT_NAME = 'tradeoff.png'
CARDS_DIR = Path(__file__).resolve().parents[2] / 'hub_cards'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
IMAGE_KEYS = ('image_mae', 'image_rmse')  # regression rows: the error of each image's count (the sum over its crops)
_logger = logging.getLogger(__name__)


def _family(arch: str) -> str:
    return timm.models.model_entrypoint(arch).__module__.rsplit('.', 1)[-1]


def card_metadata(name: str, cards_dir: Union[str, Path] = CARDS_DIR) -> Dict[str, Any]:
    """Card data of ``name`` (``arch`` or ``arch.tag``): ``hub_cards/_{family}.json`` updated by ``{name}.json`` (or
    ``{arch}.json``); tags are joined."""
    cards_dir, arch = Path(cards_dir), name.split('.', 1)[0]
    data: Dict[str, Any] = {}
    for file in dict.fromkeys((f'_{_family(arch)}.json', f'{arch}.json', f'{name}.json')):
        path = cards_dir / file
        if path.is_file():
            extra = json.loads(path.read_text())
            tags = data.get('tags', []) + [t for t in extra.pop('tags', []) if t not in data.get('tags', [])]
            data.update(extra, tags=tags)
    if not data:
        raise FileNotFoundError(f'no model card data for {name} in {cards_dir}')
    return data


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _table(rows: Sequence[Dict[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> str:
    """Markdown table of ``rows``; ``columns`` are (header, key, format spec); a missing value shows as '-'."""
    lines = ['| ' + ' | '.join(c[0] for c in columns) + ' |', '|' + '---|' * len(columns)]
    return '\n'.join(lines + ['| ' + ' | '.join(_fmt(r.get(k), f) for _, k, f in columns) + ' |' for r in rows])


def _is_regression(evaluation: Optional[Dict[str, Any]]) -> bool:
    return (evaluation or {}).get('task') == 'regression'


def _curves(evaluation: Dict[str, Any], key: str) -> List[Tuple[str, List[Dict[str, Any]]]]:
    """``(criterion, rows)`` of a regression sweep (``thresholds``, ``budgeted_batch``: one list per criterion)."""
    value = evaluation.get(key) or {}
    return [(k, v) for k, v in value.items() if v] if isinstance(value, dict) else [('', value)] if value else []


def _regression_results(evaluation: Dict[str, Any]) -> str:
    """The results of a regression evaluation: per exit MAE and RMSE (per image too where recorded), each criterion's
    threshold sweep, budgets and the budgeted-batch protocol."""
    count = f' ({evaluation["num_images"]} samples)' if evaluation.get('num_images') else ''
    mean = f'; mean target {evaluation["target_mean"]:.4g}' if evaluation.get('target_mean') is not None else ''
    parts = [f'Evaluated on {evaluation.get("dataset", "the validation set")}{count} with '
             f'`python -m timm_exits.validate` (`{evaluation.get("model", "?")}`): mean absolute error (MAE) and root '
             f'mean square error (RMSE) in target units{mean}.']
    rows = [r for key in ('exits', 'budgets', 'thresholds', 'budgeted_batch') for _, rs in _curves(evaluation, key)
            for r in rs]
    per_image = [('Per-image MAE', 'image_mae', '.4f'), ('Per-image RMSE', 'image_rmse', '.4f')] \
        if any(r.get(k) is not None for r in rows for k in IMAGE_KEYS) else []
    if per_image:
        parts.append('Per-image figures score each image on the sum of its crops\' values against its total count '
                     '(TransCrowd\'s test protocol); the others score every sample (crop) alone.')
    err = [('MAE', 'mae', '.4f'), ('RMSE', 'rmse', '.4f'), *per_image]
    cost = ('Mean share of full FLOPs', 'mean_cost', '.3f')
    if evaluation.get('exits'):
        parts.append('Every image leaves at one exit (numbered by the block it follows); cost as a share of the full '
                     "model's FLOPs; an exit is practical when its MAE is lower than every earlier exit's.\n\n"
                     + _table(evaluation['exits'], [('Exit (block)', 'layer', 'g'), *err, ('Share of full FLOPs',
                              'cost', '.3f'), ('GFLOPs', 'gflops', '.2f'), ('Practical', 'practical', '')]))
    patience = evaluation.get('exit_patience')
    words = {'patience': f'leave when the last {patience + 1 if patience else "k + 1"} exits agree within the '
                         'threshold (target units)', 'uncertainty': "leave when the exit's predicted scale is <= the "
                                                                    'threshold (target units)'}
    for name, rs in _curves(evaluation, 'thresholds'):
        parts.append(f'Per-image early exit, criterion `{name}` ({words.get(name, "threshold")}: '
                     f'`model(x, threshold=t)`).\n\n' + _table(rs, [('Threshold', 'threshold', 'g'), *err, cost]))
    if evaluation.get('budgets'):
        parts.append('Compute budgets (`model(x, budget=b)`: the deepest exit that fits).\n\n'
                     + _table(evaluation['budgets'], [('Budget', 'budget', 'g'), *err, cost]))
    for name, rs in _curves(evaluation, 'budgeted_batch'):
        parts.append(f'Budgeted batch, criterion `{name}`: the threshold of lowest MAE whose mean cost fits (chosen on '
                     f'{evaluation.get("budgeted_batch_chosen_on", "this split")}).\n\n'
                     + _table(rs, [('Mean budget', 'mean_budget', 'g'), ('Threshold', 'threshold', 'g'), *err, cost]))
    return '\n\n'.join(parts)


def _results(evaluation: Optional[Dict[str, Any]]) -> str:
    if evaluation is None:
        return 'No evaluation was supplied with this upload.'
    if _is_regression(evaluation):
        return _regression_results(evaluation)
    count = f' ({evaluation["num_images"]} images)' if evaluation.get('num_images') else ''
    parts = [f'Evaluated on {evaluation.get("dataset", "the validation set")}{count} with '
             f'`python -m timm_exits.validate` (`{evaluation.get("model", "?")}`).']
    acc, cost = ('Top-1 (%)', 'accuracy', '.2f'), ('Mean share of full FLOPs', 'mean_cost', '.3f')
    sections = (
        ('exits', 'Every image leaves at one exit (numbered by the block it follows); cost as a share of the full '
                  "model's FLOPs; an exit is practical when it is more accurate than every earlier exit.",
         [('Exit (block)', 'layer', 'g'), acc, ('Share of full FLOPs', 'cost', '.3f'), ('GFLOPs', 'gflops', '.2f'),
          ('Latency (ms)', 'latency_ms', '.2f'), ('Practical', 'practical', '')]),
        ('thresholds', 'Per-image early exit at a threshold (`model(x, threshold=t)`).',
         [('Threshold', 'threshold', 'g'), acc, cost]),
        ('budgets', 'Compute budgets (`model(x, budget=b)`).', [('Budget', 'budget', 'g'), acc, cost]),
        ('keep_rates', 'Patch slimming at a keep rate (`model(x, keep_rate=r)`).',
         [('Keep rate', 'keep_rate', 'g'), acc, ('FLOPs ratio', 'flops_ratio', '.3f'), ('GFLOPs', 'gflops', '.2f'),
          ('Latency (ms)', 'latency_ms', '.2f')]),
    )
    parts += [f'{text}\n\n{_table(evaluation[key], cols)}' for key, text, cols in sections if evaluation.get(key)]
    return '\n\n'.join(parts)


def _calibration_text(calibration: Optional[Dict[str, Any]]) -> str:
    """The calibrated default (``timm_exits.calibrate``) in words, or '' without one."""
    if not calibration:
        return ''
    knobs = ', '.join(f'{k} {calibration[k]:g}' for k in ('keep_rate', 'threshold') if calibration.get(k) is not None)
    from ..calibrate import risk_description
    what = risk_description(calibration)
    if calibration.get('task') == 'regression' and calibration.get('criterion'):
        knobs += f' ({calibration["criterion"]})'
    return (f'\n\n**Calibrated default** (`python -m timm_exits.calibrate`, Learn-then-Test): {knobs or "full depth"}, '
            f'the model\'s default in eval mode. With probability at least 1 - delta = {1 - calibration["delta"]:g} '
            f'over the draw of the {calibration["n"]} calibration images, the share of {what} is at most epsilon = '
            f'{calibration["epsilon"]:g}.\n\n'
            + _table([calibration], [('epsilon', 'epsilon', 'g'), ('delta', 'delta', 'g'), ('n', 'n', 'g'),
                                     ('Empirical risk', 'empirical_risk', '.4f'),
                                     ('Mean share of full FLOPs', 'mean_cost', '.3f')]))


def _allowed_plot(evaluation: Dict[str, Any], allowed_dir: Optional[Union[str, Path]]) -> Optional[Path]:
    """The evaluation's plot file if it may be published: a regular PNG file whose real path (symlinks resolved) lies
    inside ``allowed_dir`` (the checkpoint's folder); None, with a warning, for anything else."""
    name = evaluation.get('plot')
    if not name:
        return None
    src = Path(evaluation.get('_dir', '.')) / str(name)
    real = src.resolve()
    root = Path(allowed_dir).resolve() if allowed_dir is not None else None
    if root is None or not real.is_relative_to(root):
        _logger.warning(f'evaluation plot {src} is not inside the checkpoint\'s folder {root}: not published; '
                        f'drawing the trade-off plot from the evaluation JSON instead')
        return None
    if not real.is_file():
        _logger.warning(f'evaluation plot {src} does not exist; drawing the trade-off plot here')
        return None
    with open(real, 'rb') as f:
        if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            _logger.warning(f'evaluation plot {src} is not a PNG file: not published; drawing the trade-off plot here')
            return None
    return real


def _plot(evaluation: Optional[Dict[str, Any]], out_dir: Path, allowed_dir: Optional[Union[str, Path]] = None) -> str:
    """Markdown for the trade-off plot: the evaluation's own plot copied when it is a PNG inside ``allowed_dir``
    (``_allowed_plot``), else drawn like Fig. 2 of 000_*.txt (accuracy against mean compute, exits marked, practical
    exits circled) with matplotlib, if installed (regression: MAE against mean compute, a sweep per criterion)."""
    if evaluation is None:
        return ''
    regression = _is_regression(evaluation)
    metric, alt = ('mae', 'MAE against compute') if regression else ('accuracy', 'Accuracy against compute')
    src = _allowed_plot(evaluation, allowed_dir)
    if src is not None:
        shutil.copyfile(src, out_dir / PLOT_NAME)
        return f'![{alt}]({PLOT_NAME})'
    exits = evaluation['exits']
    if regression:
        curves = [(f'{name} threshold sweep', rows, '-') for name, rows in _curves(evaluation, 'thresholds')] + [
            ('budget sweep', rows, '--') for _, rows in _curves(evaluation, 'budgets')]
    else:
        curves = [(f'{k[:-1]} sweep', evaluation[k], '-' if k == 'thresholds' else '--')
                  for k in ('thresholds', 'budgets') if evaluation[k]]
    rates = evaluation.get('keep_rates') or []
    if not (exits or curves or rates):
        return ''
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return '_No trade-off plot: matplotlib was not installed where this card was rendered._'
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for label, rows, style in curves:
        rows = sorted((r for r in rows if r.get('mean_cost') is not None and r.get(metric) is not None),
                      key=lambda r: r['mean_cost'])
        ax.plot([r['mean_cost'] for r in rows], [r[metric] for r in rows], style, marker='.', label=label)
    points = [r for r in exits if r.get('cost') is not None and r.get(metric) is not None]
    if points:
        ax.scatter([r['cost'] for r in points], [r[metric] for r in points], marker='s', color='k', label='exit')
        for r in points:
            ax.annotate(f'{r.get("layer")}', (r['cost'], r[metric]), textcoords='offset points', xytext=(4, -10))
        practical = [r for r in points if r.get('practical')]
        ax.scatter([r['cost'] for r in practical], [r[metric] for r in practical], s=180, facecolors='none',
                   edgecolors='C3', label='practical exit')
    rates = [r for r in rates if r.get('flops_ratio') is not None and r.get(metric) is not None]
    if rates:
        ax.plot([r['flops_ratio'] for r in rates], [r[metric] for r in rates], '-o', label='keep rate')
        for r in rates:
            ax.annotate(f'{r.get("keep_rate")}', (r['flops_ratio'], r[metric]), textcoords='offset points',
                        xytext=(4, -10))
    ax.set_xlabel("mean compute (share of the full model's FLOPs)")
    ax.set_ylabel('MAE (target units)' if regression else 'top-1 accuracy (%)')
    ax.grid(alpha=.3)
    ax.legend()
    fig.savefig(out_dir / PLOT_NAME, dpi=150, bbox_inches='tight')
    return f'![{alt}]({PLOT_NAME})'


def _layout_text(model: nn.Module) -> str:
    args = layout_args(model)
    if 'exit_layers' in args:
        exits = ', '.join(str(v) for v in args['exit_layers'])
        text = (f'exits after blocks {exits} and the final head (block {model.depth}), `{args["exit_head"]}` exit '
                f'heads, `{args["exit_criterion"]}` exit criterion')
        if args['exit_criterion'] == 'patience' and args.get('exit_patience') is not None:
            text += f' (patience {args["exit_patience"]})'
        if 'life_layer' in args:
            text += (f'; life regression after block {args["life_layer"]}, patches leave after blocks '
                     f'{", ".join(str(v) for v in args["prune_layers"])}, default keep rate {args.get("keep_rate")}')
        return text
    return (f'life regression after block {args["life_layer"]}, patches leave after blocks '
            f'{", ".join(str(v) for v in args["prune_layers"])}, default keep rate {args.get("keep_rate")}, '
            f'U = {args["U"]}')


def render_card(
        model: nn.Module,
        name: str,
        repo_id: str,
        evaluation: Optional[Dict[str, Any]] = None,
        plot: str = '',
        has_args: bool = False,
        cards_dir: Union[str, Path] = CARDS_DIR,
) -> str:
    """README.md of a published checkpoint: timm-style YAML front matter, details, usage, results and citation, from
    ``hub_cards/template.md`` and the card data of ``name``."""
    data, cfg = card_metadata(name, cards_dir), model.pretrained_cfg
    regression = getattr(model, 'task', 'classification') == 'regression'
    tags = [t for t in data['tags'] if not (regression and t == 'image-classification')] + (
        ['regression'] if regression and 'regression' not in data['tags'] else [])
    parent = cfg.get('hf_hub_id') or ''  # a mirrored tag's (or a converted model's) weights: its parent's repo
    own = parent == repo_id or parent.startswith(f'{hub_org()}/')
    base_model = data.get('base_model') or (parent.split('@')[0] if parent and not own else None)
    meta = ModelCardData(
        library_name='timm', license=data.get('license') or cfg.get('license'), tags=tags,
        datasets=data.get('datasets') or None, base_model=base_model,
        pipeline_tag=None if regression else 'image-classification')
    recipe = recipe_of(cfg)
    named = recipe is not None and cfg.get('hf_hub_id') == repo_id
    paper = cfg.get('paper_name') or data.get('paper_title', '-')
    paper_ids = cfg.get('paper_ids')
    if paper_ids:
        paper += ''.join(f' ([{p}](https://arxiv.org/abs/{p[6:]}))' if p.startswith('arXiv:') else f' ({p})'
                         for p in ([paper_ids] if isinstance(paper_ids, str) else paper_ids))
    size = input_shape(model)[1:]
    fields = dict(
        front_matter=meta.to_yaml(),
        repo_id=repo_id,
        title=data.get('title', name),
        description=data.get('description', ''),
        architecture=f'`{name.split(".", 1)[0]}`: {_layout_text(model)}',
        params=f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f}',
        input=(f'{size[0]} x {size[1]}, mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])}, crop_pct '
               f'{cfg.get("crop_pct", 1.):.4g} ({cfg.get("crop_mode", "center")}, {cfg.get("interpolation")})'),
        classes_label='Outputs' if regression else 'Classes',
        classes=(f'{model.num_classes} real value{"s" if model.num_classes != 1 else ""} per image '
                 "(task='regression')") if regression else
        f'{model.num_classes}' + (f' ({data["labels_note"]})' if data.get('labels_note') else ''),
        dataset=data.get('dataset', '-'),
        base_model=f'[{base_model}](https://huggingface.co/{base_model})' if base_model else '-',
        paper=paper,
        recipe=f'`{recipe}`' if recipe else '-',
        training_args='[training_args.json](training_args.json)' if has_args else '-',
        create_name=name if named else f'hf-hub:{repo_id}',
        hub_name=f'hf-hub:{repo_id}',
        usage='\n'.join(data.get('regression_usage' if regression else 'usage') or data.get('usage', [])),
        results=_results(evaluation) + _calibration_text(
            getattr(model, 'calibration', None) or (evaluation or {}).get('calibration')),
        plot=plot,
        citation=data.get('citation', ''),
    )
    return string.Template((Path(cards_dir) / 'template.md').read_text()).substitute(fields)
