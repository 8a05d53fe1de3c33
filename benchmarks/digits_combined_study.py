""" Does early exit plus patch slimming in one model pay? Accuracy against FLOPs on scikit-learn's digits, seeds.

    python benchmarks/digits_combined_study.py [--output output/digits_combined] [--epochs 30] [--seeds 0 1 2]
        [--docs docs] [--no-resume]

Three arms, each 30 + 20 epochs with the recipes' trainer (``train_recipes/digits_demo.py``'s set-up: 6 blocks, 64
patches, exits after blocks 3, 4, 5, lives after block 1, patches leave after blocks 2, 4, 5):

- exits alone: MEViT's sandwich rule from scratch (``mevit``, ``--epochs``), then as many more epochs of it as the
  other two arms' second part (``mevit_finetune``, lr 1e-4);
- slimming alone: the backbone from scratch (``backbone``), then LifeRegress's two stages (``life_two_stage``:
  predictor, then backbone);
- the combined model: ``mevit``'s weights, then LifeRegress's two stages with the sandwich rule on the soft-weighted
  tokens (``mexit_liferegress``, ``MEViTLifeRegressTask``).

Evaluated on the digits val and test splits (360 images each): exits alone at each exit and at thresholds; slimming
alone at keep rates 1.0 .. 0.5; the combined model at every (keep rate, exit) and (keep rate, threshold). Costs are
shares of the parent's FLOPs (torch's flop counter: ``exit_costs`` / ``threshold_costs_for`` / ``flops_ratio``).
Budgeted comparison (MSDNet's protocol): for each mean compute budget, every arm's configuration with the best val
accuracy among those whose val mean cost fits, reported on test; so no arm is tuned on the test split, and the
combined model's larger choice of configurations is not a free advantage. Every training run is resumable (a
finished run is not rerun); the evaluation is recomputed (seconds). Writes ``OUTPUT/seed<N>/study_points.json`` (every
configuration, val and test), ``DOCS/digits_combined_study.json`` (static points, budgeted choices per seed, the
summary) and ``DOCS/digits_combined_study.png`` (mean curves over seeds, one std shaded).
"""
import argparse
import importlib.util
import logging
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's timm_exits

import torch  # noqa: E402

import timm  # noqa: E402
from timm_exits._files import atomic_write, write_json  # noqa: E402
from timm_exits.data import DigitsDataset, make_loader  # noqa: E402
from timm_exits.evaluation import threshold_table  # noqa: E402
from timm_exits.train import RunError, train  # noqa: E402

RUNS = ('backbone', 'mevit', 'life_two_stage', 'mevit_finetune', 'mexit_liferegress')
ARMS = {'exits': 'exits alone (MEViT)', 'slim': 'slimming alone (LifeRegress)', 'combined': 'exits + slimming'}
KEEP_RATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
BUDGETS = tuple(round(0.05 * i, 2) for i in range(7, 21))
THRESHOLD_LEVELS = 48


def _digits_demo():
    path = os.path.join(REPO, 'train_recipes', 'digits_demo.py')
    spec = importlib.util.spec_from_file_location('digits_demo', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(recipe: Any, folder: str) -> torch.nn.Module:
    return timm.create_model(recipe.model, num_classes=10, checkpoint_path=os.path.join(folder, 'model.safetensors'),
                             **recipe.model_kwargs).eval()


@torch.no_grad()
def _exit_outputs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> Dict[str, torch.Tensor]:
    outs = model.forward_exits(x, **kwargs)
    return {'correct': torch.stack([z.argmax(-1) == y for z in outs]),
            'scores': torch.stack([model.exit_scores(layer, z).float() for layer, z in zip(model.exit_layers, outs)])}


def _thresholds(scores: torch.Tensor) -> List[float]:
    """Quantiles of the early exits' val scores, and 1.01 (every image to the final exit)."""
    q = torch.quantile(scores[:-1].double().flatten(), torch.linspace(0, 1, THRESHOLD_LEVELS, dtype=torch.float64))
    return sorted({round(float(v), 6) for v in q} | {1.01})


def _multi_exit_points(arm: str, model: torch.nn.Module, data: Dict[str, Any], rate: float = None) -> List[Dict]:
    """Every exit (all images there) and every threshold of one multi-exit model at one keep rate, val and test."""
    kwargs = {} if rate is None else dict(keep_rate=rate)
    outs = {s: _exit_outputs(model, *data[s], **kwargs) for s in ('val', 'test')}
    exit_costs = model.exit_costs if rate is None else model.exit_costs_for(rate)
    path_costs = model.threshold_costs if rate is None else model.threshold_costs_for(rate)
    keep = 1. if rate is None else rate
    points = []
    for k, layer in enumerate(model.exit_layers):
        points.append(dict(arm=arm, kind='exit', keep_rate=keep, exit=layer, **{
            f'{s}_{m}': v for s in ('val', 'test') for m, v in (
                ('accuracy', 100. * float(outs[s]['correct'][k].float().mean())), ('cost', exit_costs[k]))}))
    thresholds = _thresholds(outs['val']['scores'])
    rows = {s: threshold_table(outs[s]['scores'], outs[s]['correct'], list(path_costs), thresholds) for s in outs}
    for v, t in zip(rows['val'], rows['test']):
        points.append(dict(arm=arm, kind='threshold', keep_rate=keep, threshold=v['threshold'],
                           val_accuracy=v['accuracy'], val_cost=v['mean_cost'], test_accuracy=t['accuracy'],
                           test_cost=t['mean_cost']))
    return points


def evaluate_seed(demo: Any, out: str, epochs: int, seed: int) -> Dict[str, Any]:
    """Train (or find) the seed's runs and return every configuration's val and test accuracy and cost."""
    recipes = demo.recipes(out, epochs, seed)
    for name in RUNS:
        logging.info(f'== seed {seed}: {name}')
        train(recipes[name], os.path.join(out, name))
    with torch.no_grad():
        return _evaluate(recipes, out, seed)


def _evaluate(recipes: Dict[str, Any], out: str, seed: int) -> Dict[str, Any]:
    data = {}
    for split in ('val', 'test'):
        ds = DigitsDataset(split, 32)
        data[split] = (ds.images, ds.targets)
    exits = _load(recipes['mevit_finetune'], os.path.join(out, 'mevit_finetune'))
    slim = _load(recipes['life_two_stage'], os.path.join(out, 'life_two_stage'))
    combined = _load(recipes['mexit_liferegress'], os.path.join(out, 'mexit_liferegress'))
    backbone = _load(recipes['backbone'], os.path.join(out, 'backbone'))
    points = _multi_exit_points('exits', exits, data)
    for rate in KEEP_RATES:
        acc = {s: 100. * float((slim(x, keep_rate=rate).argmax(-1) == y).float().mean()) for s, (x, y) in data.items()}
        cost = slim.flops_ratio(rate)
        points.append(dict(arm='slim', kind='keep_rate', keep_rate=rate, val_accuracy=acc['val'], val_cost=cost,
                           test_accuracy=acc['test'], test_cost=cost))
        points += _multi_exit_points('combined', combined, data, rate)
    reference = {s: 100. * float((backbone(x).argmax(-1) == y).float().mean()) for s, (x, y) in data.items()}
    result = {'seed': seed, 'backbone_accuracy': reference, 'points': points,
              'schedules': {str(r): list(combined.token_schedule(r)) for r in KEEP_RATES}}
    write_json(result, os.path.join(out, 'study_points.json'))
    return result


def budgeted(points: Sequence[Dict[str, Any]], budgets: Sequence[float] = BUDGETS) -> Dict[str, List[Dict]]:
    """Per arm and mean compute budget: the configuration with the best val accuracy (then the lowest val cost) among
    those whose val cost fits, with its test accuracy and cost; a budget no configuration fits is left out."""
    out: Dict[str, List[Dict]] = {}
    for arm in ARMS:
        rows = []
        for budget in budgets:
            fits = [p for p in points if p['arm'] == arm and p['val_cost'] <= budget + 1e-9]
            if fits:
                best = min(fits, key=lambda p: (-p['val_accuracy'], p['val_cost']))
                rows.append({'budget': budget, **{k: v for k, v in best.items() if k != 'arm'}})
        out[arm] = rows
    return out


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.
    return f'{statistics.mean(values):.2f} ± {std:.2f}'


def static_table(per_seed: Dict[int, Dict[str, Any]], extra_epochs: int) -> List[str]:
    """Test accuracy of the fixed configurations (every image through the same path), mean ± std over seeds."""
    seeds = sorted(per_seed)

    def pick(seed: int, arm: str, kind: str, **match: Any) -> Dict[str, Any]:
        return next(p for p in per_seed[seed]['points'] if p['arm'] == arm and p['kind'] == kind and all(
            p.get(k) == v for k, v in match.items()))

    first = per_seed[seeds[0]]['points']
    layers = sorted({p['exit'] for p in first if p['arm'] == 'exits' and p['kind'] == 'exit'})
    lines = ['| configuration (test, every image the same path) | ' + ' | '.join(
        f'exit {layer}' if layer < layers[-1] else f'final ({layer})' for layer in layers) + ' |',
        '|---|' + '---|' * len(layers)]
    cells = []
    for layer in layers:
        p = [pick(s, 'exits', 'exit', exit=layer) for s in seeds]
        cells.append(f'{_mean_std([q["test_accuracy"] for q in p])} ({p[0]["test_cost"]:.3f})')
    lines.append(f'| exits alone (MEViT + {extra_epochs} epochs) | ' + ' | '.join(cells) + ' |')
    for rate in KEEP_RATES:
        cells = []
        for layer in layers:
            p = [pick(s, 'combined', 'exit', exit=layer, keep_rate=rate) for s in seeds]
            cells.append(f'{_mean_std([q["test_accuracy"] for q in p])} ({p[0]["test_cost"]:.3f})')
        lines.append(f'| exits + slimming, rho {rate:g} | ' + ' | '.join(cells) + ' |')
    lines += ['', '| slimming alone (LifeRegress, full depth) | ' + ' | '.join(f'rho {r:g}' for r in KEEP_RATES) + ' |',
              '|---|' + '---|' * len(KEEP_RATES)]
    cells = []
    for rate in KEEP_RATES:
        p = [pick(s, 'slim', 'keep_rate', keep_rate=rate) for s in seeds]
        cells.append(f'{_mean_std([q["test_accuracy"] for q in p])} ({p[0]["test_cost"]:.3f})')
    lines.append('| test accuracy (FLOPs share) | ' + ' | '.join(cells) + ' |')
    return lines


def budget_table(choices: Dict[int, Dict[str, List[Dict]]]) -> List[str]:
    """Budgeted comparison, test accuracy mean ± std over seeds (mean test cost)."""
    seeds = sorted(choices)
    lines = ['| mean budget | ' + ' | '.join(ARMS.values()) + ' |', '|---|' + '---|' * len(ARMS)]
    for budget in BUDGETS:
        cells = []
        for arm in ARMS:
            rows = [next((r for r in choices[s][arm] if r['budget'] == budget), None) for s in seeds]
            if any(r is None for r in rows):
                cells.append('–')
                continue
            cost = statistics.mean(r['test_cost'] for r in rows)
            cells.append(f'{_mean_std([r["test_accuracy"] for r in rows])} ({cost:.3f})')
        lines.append(f'| {budget:.2f} | ' + ' | '.join(cells) + ' |')
    return lines


def plot(choices: Dict[int, Dict[str, List[Dict]]], per_seed: Dict[int, Dict[str, Any]], path: str) -> None:
    """Mean test accuracy over seeds against the mean budget (one std shaded), and the fixed configurations."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    seeds = sorted(choices)
    colors = {'exits': 'tab:blue', 'slim': 'tab:orange', 'combined': 'tab:green'}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    ax = axes[0]
    for arm, label in ARMS.items():
        xs, mean, std = [], [], []
        for budget in BUDGETS:
            rows = [next((r for r in choices[s][arm] if r['budget'] == budget), None) for s in seeds]
            if any(r is None for r in rows):
                continue
            acc = [r['test_accuracy'] for r in rows]
            xs.append(statistics.mean(r['test_cost'] for r in rows))
            mean.append(statistics.mean(acc))
            std.append(statistics.stdev(acc) if len(acc) > 1 else 0.)
        ax.plot(xs, mean, 'o-', color=colors[arm], label=label, ms=3)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=colors[arm], alpha=.15)
    ax.set_title(f'budgeted (config chosen on val), test; mean ± std over seeds {seeds}', fontsize=9)
    ax.set_xlabel('mean test cost (share of the parent\'s FLOPs)')
    ax.set_ylabel('test top-1 accuracy (%)')
    ax = axes[1]
    first = per_seed[seeds[0]]['points']
    for arm, label in ARMS.items():
        kinds = ('keep_rate',) if arm == 'slim' else ('exit',)
        keys = sorted({(p['keep_rate'], p.get('exit')) for p in first if p['arm'] == arm and p['kind'] in kinds})
        xs, ys = [], []
        for rate, layer in keys:
            ps = [next(p for p in per_seed[s]['points'] if p['arm'] == arm and p['kind'] in kinds
                       and p['keep_rate'] == rate and p.get('exit') == layer) for s in seeds]
            xs.append(ps[0]['test_cost'])
            ys.append(statistics.mean(p['test_accuracy'] for p in ps))
        ax.plot(xs, ys, 'o' if arm != 'slim' else 's-', color=colors[arm], label=label, ms=4, alpha=.8)
    ax.set_title('fixed paths (every image the same exit / keep rate), test, mean over seeds', fontsize=9)
    ax.set_xlabel('cost (share of the parent\'s FLOPs)')
    for ax in axes:
        ax.grid(alpha=.3)
        ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', default=os.path.join('output', 'digits_combined'))
    parser.add_argument('--epochs', type=int, default=30, help='epochs of the from-scratch runs (>= 3)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--docs', default='docs', help='folder of the JSON and the plot')
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error(f'argument --epochs: {args.epochs} is not allowed: an integer >= 3')
    if min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        parser.error(f'argument --seeds: {args.seeds} is not allowed: distinct integers >= 0')
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    demo = _digits_demo()
    start = time.time()
    per_seed, choices = {}, {}
    for seed in args.seeds:
        try:
            per_seed[seed] = evaluate_seed(demo, os.path.join(args.output, f'seed{seed}'), args.epochs, seed)
        except RunError as e:
            parser.error(f'seed {seed}: {e}')
        choices[seed] = budgeted(per_seed[seed]['points'])
    lines = ['Fixed paths: test accuracy (%), mean ± std over seeds, (cost: share of the parent\'s FLOPs)', '',
             *static_table(per_seed, 2 * max(args.epochs // 3, 1)), '',
             'Budgeted (configuration chosen on val): test accuracy (%), mean ± std (mean test cost)', '',
             *budget_table(choices), '',
             'Backbone alone (final, test): ' + _mean_std([per_seed[s]['backbone_accuracy']['test'] for s in per_seed])]
    table = '\n'.join(lines)
    os.makedirs(args.docs, exist_ok=True)
    static = {s: [p for p in r['points'] if p['kind'] != 'threshold'] for s, r in per_seed.items()}
    write_json({'epochs': args.epochs, 'seeds': args.seeds, 'budgets': list(BUDGETS), 'keep_rates': list(KEEP_RATES),
                'schedules': per_seed[args.seeds[0]]['schedules'],
                'backbone_accuracy': {str(s): r['backbone_accuracy'] for s, r in per_seed.items()},
                'fixed_points': {str(s): v for s, v in static.items()},
                'budgeted': {str(s): v for s, v in choices.items()}, 'table': table,
                'minutes_this_call': (time.time() - start) / 60}, os.path.join(args.docs, 'digits_combined_study.json'))
    plot(choices, per_seed, os.path.join(args.docs, 'digits_combined_study.png'))
    print(table)


if __name__ == '__main__':
    main()
