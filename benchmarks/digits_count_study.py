""" Counting with early exit, offline: a tiny multi-exit ViT regressor on ``digits_count`` canvases, over seeds.

    python benchmarks/digits_count_study.py [--output output/digits_count] [--epochs 10] [--seeds 0 1 2]
        [--docs docs] [--no-resume]

The task (``timm_exits.data.DigitsCountDataset``): 32 x 32 canvases of 1-8 scikit-learn digits glyphs (never
overlapping) of classes 0, 1, 4 and 7; the target is the number of 0s. Glyphs are split by index between train, val
and test, and every split is fixed by the seed (3000 / 1000 / 1000 canvases). Two trivial predictors say what the
benchmark measures: the training mean, and a least-squares line on the total ink of a canvas.

The model: ``vit_tiny_patch16_224_mexit`` cut to 32 px, patch 8 (16 patches, a glyph spans up to four), 6 blocks of
width 64, MLP-EE exits (001_*.txt) after blocks 2-5, ``task='regression'``, one output; trained from scratch with the recipes' trainer
(``regression_end_to_end``: L1, the final term weighted twice each early exit, each exit's scale fitted by a Laplace
NLL on detached values; AdamW, cosine). Evaluated on test: per-exit MAE and RMSE, MAE against mean cost for PABEE's
patience (1 and 2), for the predicted scale and for budgets (the deepest exit that fits), and the budgeted-batch
protocol (thresholds chosen on val). Writes ``OUTPUT/seed<N>/`` (the run), ``DOCS/digits_count_study.json`` and
``DOCS/digits_count_study.png``.
"""
import argparse
import logging
import os
import statistics
import sys
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's timm_exits

import numpy as np  # noqa: E402
import torch  # noqa: E402

import timm  # noqa: E402
from timm_exits._files import atomic_write, write_json  # noqa: E402
from timm_exits.data import DigitsCountDataset, make_loader  # noqa: E402
from timm_exits.evaluation import (  # noqa: E402
    collect_regression_outputs, regression_budgeted_batch, regression_errors, regression_threshold_table,
    regression_thresholds,
)
from timm_exits.train import Recipe, Stage, train  # noqa: E402

MODEL = 'vit_tiny_patch16_224_mexit'
MODEL_KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2., task='regression',
                    exit_layers=[2, 3, 4, 5], exit_head='mlp', exit_criterion='uncertainty')
BUDGETS = tuple(round(0.05 * i, 2) for i in range(7, 21))


def recipe(seed: int, epochs: int) -> Recipe:
    return Recipe(
        name=f'digits_count_seed{seed}', model=MODEL, dataset=f'digits_count/{seed}', num_classes=1,
        model_kwargs=dict(MODEL_KWARGS), batch_size=64, eval_batch_size=250, workers=0, seed=seed, test_split='test',
        stages=[Stage('regression_end_to_end', epochs, opt='adamw', lr=2e-3, weight_decay=.05, sched='cosine',
                      warmup_epochs=1, task_kwargs=dict(loss='l1', nll='laplace'))])


def trivial(seed: int) -> Dict[str, float]:
    """Test MAE of the training mean and of a least-squares line on a canvas's total ink."""
    tr, te = DigitsCountDataset('train', seed=seed), DigitsCountDataset('test', seed=seed)
    y, yt = tr.targets.double().numpy(), te.targets.double().numpy()
    w = np.linalg.lstsq(np.stack([tr.ink.double().numpy(), np.ones(len(y))], 1), y, rcond=None)[0]
    return {'mean': float(np.abs(yt - y.mean()).mean()),
            'ink_line': float(np.abs(te.ink.double().numpy() * w[0] + w[1] - yt).mean())}


def evaluate_seed(out: str, epochs: int, seed: int, resume: bool) -> Dict[str, Any]:
    folder = os.path.join(out, f'seed{seed}')
    rec = recipe(seed, epochs)
    train(rec, folder, resume=resume)
    model = timm.create_model(MODEL, num_classes=1, checkpoint_path=os.path.join(folder, 'model.safetensors'),
                              **MODEL_KWARGS).eval()
    outs = {s: collect_regression_outputs(model, make_loader(DigitsCountDataset(s, seed=seed), 250),
                                          torch.device('cpu')) for s in ('val', 'test')}
    test = outs['test']
    row: Dict[str, Any] = {'seed': seed, 'trivial': trivial(seed)}
    row['exits'] = [{'layer': k, 'mae': m, 'rmse': r, 'cost': c} for k, (m, r), c in zip(
        model.exit_layers, (regression_errors(v, test['target']) for v in test['values']), model.exit_costs)]
    curves: Dict[str, List[Dict[str, float]]] = {}
    for name, criterion, patience in (('patience1', 'patience', 1), ('patience2', 'patience', 2),
                                      ('uncertainty', 'uncertainty', 1)):
        model.set_exit_criterion(criterion, patience)
        path = list(model.threshold_costs)
        taus = regression_thresholds(outs['val'], criterion, 32)
        curves[name] = regression_threshold_table(test, path, criterion, taus, patience)
        row[f'budgeted_{name}'] = regression_budgeted_batch(test, path, criterion, BUDGETS, patience, outs['val'])
    row['thresholds'] = curves
    row['budgets'] = [{'budget': b, 'mae': e['mae'], 'mean_cost': e['cost']} for b in BUDGETS for e in [
        ([e for e in row['exits'] if e['cost'] <= b + 1e-9] or [None])[-1]] if e is not None]
    return row


def _at_budget(rows: List[Dict[str, float]], budget: float) -> float:
    ok = [r for r in rows if r['mean_budget'] == budget]
    return ok[0]['mae'] if ok else float('nan')


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    def ms(values: List[float]) -> List[float]:
        values = [v for v in values if v == v]
        return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.] if values else []
    out: Dict[str, Any] = {
        'trivial_mean_mae': ms([r['trivial']['mean'] for r in rows]),
        'trivial_ink_line_mae': ms([r['trivial']['ink_line'] for r in rows]),
        'exits': [{'layer': e['layer'], 'cost': e['cost'], 'mae': ms([r['exits'][i]['mae'] for r in rows]),
                   'rmse': ms([r['exits'][i]['rmse'] for r in rows])} for i, e in enumerate(rows[0]['exits'])],
    }
    for budget in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f'mean_budget_{budget}'] = {name: ms([_at_budget(r[f'budgeted_{name}'], budget) for r in rows])
                                        for name in ('patience1', 'patience2', 'uncertainty')}
        out[f'mean_budget_{budget}']['budget'] = ms([
            ([b['mae'] for b in r['budgets'] if b['budget'] <= budget + 1e-9] or [float('nan')])[-1] for r in rows])
    return out


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for name, color in (('patience1', 'tab:blue'), ('patience2', 'tab:cyan'), ('uncertainty', 'tab:purple')):
        for i, r in enumerate(rows):
            bb = r[f'budgeted_{name}']
            ax.plot([b['mean_cost'] for b in bb], [b['mae'] for b in bb], '.-', color=color, alpha=.7,
                    label=f'{name} (threshold chosen on val)' if i == 0 else None)
    for i, r in enumerate(rows):
        ax.plot([e['cost'] for e in r['exits']], [e['mae'] for e in r['exits']], 's', color='tab:orange',
                label='single exit (budget)' if i == 0 else None)
    ax.axhline(statistics.mean(r['trivial']['ink_line'] for r in rows), ls=':', color='grey', label='ink line')
    ax.axhline(statistics.mean(r['trivial']['mean'] for r in rows), ls='--', color='grey', label='training mean')
    ax.set_xlabel("mean compute (share of the full model's FLOPs)")
    ax.set_ylabel('test MAE (glyphs)')
    ax.set_title(f'digits_count, seeds {[r["seed"] for r in rows]}', fontsize=9)
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--output', default=os.path.join(REPO, 'output', 'digits_count'))
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--docs', default=os.path.join(REPO, 'docs'))
    parser.add_argument('--no-resume', action='store_true')
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows: List[Dict[str, Any]] = []
    os.makedirs(args.docs, exist_ok=True)
    for seed in args.seeds:  # the documents are rewritten after every seed: a stopped study leaves what it measured
        rows.append(evaluate_seed(args.output, args.epochs, seed, not args.no_resume))
        result = {'model': MODEL, 'model_kwargs': MODEL_KWARGS, 'epochs': args.epochs, 'seeds': rows,
                  'summary': summary(rows)}
        write_json(result, os.path.join(args.docs, 'digits_count_study.json'))
        plot(rows, os.path.join(args.docs, 'digits_count_study.png'))
        print(json_summary(result['summary']), flush=True)
    print(markdown(result))


def markdown(result: Dict[str, Any]) -> str:
    """The README's tables: per-exit test MAE (mean +- std over seeds) and MAE at mean budgets."""
    s, seeds = result['summary'], [r['seed'] for r in result['seeds']]

    def f(v: List[float]) -> str:
        return f'{v[0]:.3f} +- {v[1]:.3f}' if v else 'n/a'
    lines = [f'Test MAE (glyphs), mean +- std over seeds {seeds}; trivial predictors: training mean '
             f'{f(s["trivial_mean_mae"])}, least-squares line on total ink {f(s["trivial_ink_line_mae"])}.', '',
             '| exit (after block) | cost | MAE | RMSE |', '|---|---|---|---|']
    lines += [f'| {e["layer"]} | {e["cost"]:.3f} | {f(e["mae"])} | {f(e["rmse"])} |' for e in s['exits']]
    lines += ['', '| mean budget | budget (deepest exit that fits) | patience 1 | patience 2 | uncertainty (scale) |',
              '|---|---|---|---|---|']
    for budget in (0.5, 0.6, 0.7, 0.8, 0.9):
        row = s[f'mean_budget_{budget}']
        lines.append(f'| {budget} | {f(row["budget"])} | {f(row["patience1"])} | {f(row["patience2"])} | '
                     f'{f(row["uncertainty"])} |')
    return '\n'.join(lines)


def json_summary(s: Dict[str, Any]) -> str:
    import json
    return json.dumps(s, indent=1)


if __name__ == '__main__':
    main()
