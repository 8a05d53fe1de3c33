""" Counting with early exit, offline: a tiny multi-exit ViT regressor on ``digits_count`` canvases, over seeds.

    python benchmarks/digits_count_study.py [--output output/digits_count] [--epochs 10] [--seeds 0 1 2]
        [--fit-epochs 10] [--docs docs] [--no-resume] [--quick]

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

Does label-free fitting pay (``DOCS/digits_count_exit_sets.json``)? On the same trained backbone and final head, two
exit sets: ``trained`` (the exits trained end to end above, with the counts) and ``fitted`` (fresh exits and scale
units fitted by ``timm_exits.fit`` on the train canvases without their counts: L1 to the frozen model's own final
count, Laplace NLL for the scales, ``--fit-epochs`` cached epochs). Per exit, test MAE and RMSE; then certified
thresholds (``timm_exits.calibrate``'s Learn-then-Test, tolerance 0.5 glyph, epsilon 0.05 and 0.1, delta 0.1, risks
``disagreement`` and ``error_growth``, criteria ``uncertainty`` and ``patience`` 1) chosen on the val canvases (neither
trained, fitted nor tested on) and applied to test: the threshold, the mean cost on val and test, the share of test
canvases whose early count is more than 0.5 from the full model's (violation), whose absolute error grows by more
than 0.5, and the test MAE. Every test canvas's exit values and the exit each chosen point sends it to are saved, so
each figure can be recomputed. ``--quick``: small splits (128 / 120 / 120), one epoch, seed 0, for the test.
"""
import argparse
import contextlib
import logging
import os
import statistics
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's timm_exits

import numpy as np  # noqa: E402
import torch  # noqa: E402

import timm  # noqa: E402
import timm_exits  # noqa: E402
from timm_exits._files import atomic_write, write_json  # noqa: E402
from timm_exits.calibrate import (  # noqa: E402
    CalibrationError, calibrate_outputs, collect_calibration_outputs, point_table,
)
from timm_exits.data import DigitsCountDataset, make_loader  # noqa: E402
from timm_exits.evaluation import (  # noqa: E402
    collect_regression_outputs, regression_budgeted_batch, regression_errors, regression_exit_choice,
    regression_threshold_table, regression_thresholds,
)
from timm_exits.train import Recipe, Stage, train  # noqa: E402

MODEL = 'vit_tiny_patch16_224_mexit'
MODEL_KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2., task='regression',
                    exit_layers=[2, 3, 4, 5], exit_head='mlp', exit_criterion='uncertainty')
BUDGETS = tuple(round(0.05 * i, 2) for i in range(7, 21))
TOLERANCE = 0.5  # glyphs: an early count further than this from the full model's is a violation
EPSILONS = (0.05, 0.1)
DELTA = 0.1
RISKS = ('disagreement', 'error_growth')
CRITERIA = (('uncertainty', 'uncertainty', 1), ('patience1', 'patience', 1))  # (name, criterion, patience)
EXIT_SETS = ('trained', 'fitted')
QUICK_SIZES = {'train': 128, 'val': 120, 'test': 120}


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


def evaluate_seed(out: str, epochs: int, seed: int, resume: bool, fit_epochs: Optional[int] = None
                  ) -> Dict[str, Any]:
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
    if fit_epochs is not None:
        model.set_exit_criterion(MODEL_KWARGS['exit_criterion'])
        row['exit_sets'] = exit_sets(model, seed, fit_epochs)
    return row


class _NoCounts(torch.utils.data.Dataset):
    """A dataset's images with NaN for every target: what ``timm_exits.fit`` sees is the images alone."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, float]:
        return self.dataset[i][0], float('nan')


def fitted_twin(model: torch.nn.Module, seed: int, epochs: int) -> Tuple[torch.nn.Module, List[Dict[str, Any]]]:
    """``model``'s backbone and final head with fresh exits and scale units, fitted without counts on the train
    canvases (``timm_exits.fit``: L1 to the frozen final count, Laplace NLL for the scales, cached)."""
    torch.manual_seed(seed)
    twin = timm.create_model(MODEL, num_classes=1, **MODEL_KWARGS)
    frozen = {k: v for k, v in model.state_dict().items() if not k.startswith(twin.new_prefixes)}
    twin.load_state_dict({**twin.state_dict(), **frozen})
    loader = torch.utils.data.DataLoader(_NoCounts(DigitsCountDataset('train', seed=seed)), batch_size=64,
                                         shuffle=True, generator=torch.Generator().manual_seed(seed))
    log = timm_exits.fit(twin, loader, epochs=epochs, lr=2e-3, loss='l1', cache=True, seed=seed)
    twin.eval()
    same = all(torch.equal(v, twin.state_dict()[k]) for k, v in frozen.items())
    if not same:
        raise RuntimeError('fit changed the backbone or the final head')
    return twin, log


def _f32(t: torch.Tensor) -> str:
    """float32 values in one line, each the shortest decimal that reads back to the same float32 (compact, exact:
    ``np.array(text.split(), dtype=np.float32)``)."""
    return ' '.join(str(v) for v in t.float().numpy().ravel())


def certified_point(model: torch.nn.Module, val: Dict[str, Any], test: Dict[str, Any], criterion: str,
                    patience: int, epsilon: float, risk: str) -> Dict[str, Any]:
    """Learn-then-Test's threshold on ``val`` (``calibrate_outputs``) and what it does on ``test``: mean cost, the
    share of images whose count is more than ``TOLERANCE`` from the full model's (violation) or whose absolute error
    grows by more than that, the MAE, and each image's exit (a string of exit indices)."""
    model.set_exit_criterion(criterion, patience)
    row: Dict[str, Any] = {'epsilon': epsilon, 'delta': DELTA, 'risk': risk, 'tolerance': TOLERANCE}
    try:
        found = calibrate_outputs(model, val, epsilon, DELTA, risk, tolerance=TOLERANCE)
    except CalibrationError as e:
        return dict(row, refused=str(e))
    t = found['threshold']
    values, scales, target = test['values'][0], test['scales'][0], test['labels']
    n = values.shape[1]
    first = (torch.full((n,), values.shape[0] - 1, dtype=torch.long) if t is None
             else regression_exit_choice(values, scales, criterion, t, patience))
    costs = (lambda rate, th: model.threshold_costs if th is not None else model.exit_costs)
    tables = {r: point_table(test, [(None, t)], criterion, r, costs, (TOLERANCE, 0.), patience) for r in RISKS}
    answer = values[first, torch.arange(n)]
    return dict(row, threshold=t, val_mean_cost=found['mean_cost'], val_risk=found['empirical_risk'],
                p_value=found['p_value'], certified_points=found['certified_points'],
                test_mean_cost=float(tables['disagreement'][1].mean()),
                test_violation=float(tables['disagreement'][0].double().mean()),
                test_error_growth=float(tables['error_growth'][0].double().mean()),
                test_mae=regression_errors(answer, target)[0],
                costs=list(model.threshold_costs if t is not None else model.exit_costs),
                exit=''.join(str(int(i)) for i in first))


def exit_sets(model: torch.nn.Module, seed: int, fit_epochs: int) -> Dict[str, Any]:
    """The trained and the label-free fitted exit sets on one backbone: per exit test MAE / RMSE, and the certified
    points of every criterion, epsilon and risk (calibrated on val, applied to test), with the per-image values."""
    twin, log = fitted_twin(model, seed, fit_epochs)
    loaders = {s: make_loader(DigitsCountDataset(s, seed=seed), 250) for s in ('val', 'test')}
    out: Dict[str, Any] = {'seed': seed, 'fit_log': log, 'sets': {}}
    for name, m in (('trained', model), ('fitted', twin)):
        outs = {s: collect_calibration_outputs(m, loader, torch.device('cpu')) for s, loader in loaders.items()}
        test = outs['test']
        exits = [{'layer': k, 'mae': e[0], 'rmse': e[1], 'cost': c} for k, e, c in zip(
            m.exit_layers, (regression_errors(v, test['labels']) for v in test['values'][0]), m.exit_costs)]
        points = [dict(certified_point(m, outs['val'], test, crit, pat, eps, risk), criterion=cname)
                  for cname, crit, pat in CRITERIA for risk in RISKS for eps in EPSILONS]
        m.set_exit_criterion(MODEL_KWARGS['exit_criterion'])
        out['sets'][name] = {'exits': exits, 'points': points,
                             'test_values': [_f32(v) for v in test['values'][0][..., 0]]}
        out['test_target'] = _f32(test['labels'][:, 0])
    return out


def exit_sets_summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and std over seeds of every exit's MAE / RMSE and of every certified point's figures, per exit set."""
    def ms(values: List[float]) -> List[float]:
        values = [v for v in values if v is not None and v == v]
        return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.] if values else []
    out: Dict[str, Any] = {}
    for name in EXIT_SETS:
        sets = [r['sets'][name] for r in rows]
        exits = [{'layer': e['layer'], 'cost': e['cost'], 'mae': ms([s['exits'][i]['mae'] for s in sets]),
                  'rmse': ms([s['exits'][i]['rmse'] for s in sets])} for i, e in enumerate(sets[0]['exits'])]
        points = []
        for i, p in enumerate(sets[0]['points']):
            seen = [s['points'][i] for s in sets]
            ok = [q for q in seen if 'refused' not in q]
            points.append({k: p[k] for k in ('criterion', 'risk', 'epsilon', 'delta', 'tolerance')} | {
                'refused': len(seen) - len(ok), 'thresholds': [q['threshold'] for q in ok]} | {
                k: ms([q[k] for q in ok]) for k in ('val_mean_cost', 'test_mean_cost', 'test_violation',
                                                   'test_error_growth', 'test_mae')})
        out[name] = {'exits': exits, 'points': points}
    return out


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


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--output', default=os.path.join(REPO, 'output', 'digits_count'))
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--fit-epochs', type=int, default=10, help='epochs of the label-free fit (0: no exit sets)')
    parser.add_argument('--docs', default=os.path.join(REPO, 'docs'))
    parser.add_argument('--no-resume', action='store_true')
    parser.add_argument('--quick', action='store_true', help='128 / 120 / 120 canvases, one epoch of each, seed 0')
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    for name in ('epochs', 'fit_epochs'):
        if getattr(args, name) < (0 if name == 'fit_epochs' else 1):
            parser.error(f'--{name.replace("_", "-")} must be >= {0 if name == "fit_epochs" else 1}, got '
                         f'{getattr(args, name)}')
    if args.quick:
        args.epochs, args.fit_epochs, args.seeds = 1, 1, [0]
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.getLogger('timm_exits.calibrate').setLevel(logging.ERROR)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    os.makedirs(args.docs, exist_ok=True)
    with mock.patch.dict(DigitsCountDataset.sizes, QUICK_SIZES) if args.quick else contextlib.nullcontext():
        return _run(args)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    rows: List[Dict[str, Any]] = []
    sets: List[Dict[str, Any]] = []
    fit_epochs = args.fit_epochs or None
    for seed in args.seeds:  # the documents are rewritten after every seed: a stopped study leaves what it measured
        rows.append(evaluate_seed(args.output, args.epochs, seed, not args.no_resume, fit_epochs))
        if 'exit_sets' in rows[-1]:
            sets.append(rows[-1].pop('exit_sets'))
        result = {'model': MODEL, 'model_kwargs': MODEL_KWARGS, 'epochs': args.epochs, 'seeds': rows,
                  'summary': summary(rows)}
        write_json(result, os.path.join(args.docs, 'digits_count_study.json'))
        plot(rows, os.path.join(args.docs, 'digits_count_study.png'))
        print(json_summary(result['summary']), flush=True)
        if sets:
            exits = {'command': ' '.join(['python benchmarks/digits_count_study.py', *args.argv]), 'model': MODEL, 'model_kwargs': MODEL_KWARGS, 'epochs': args.epochs,
                     'fit_epochs': args.fit_epochs, 'quick': args.quick, 'sizes': dict(DigitsCountDataset.sizes),
                     'tolerance': TOLERANCE, 'delta': DELTA, 'seeds': sets, 'summary': exit_sets_summary(sets)}
            write_json(exits, os.path.join(args.docs, 'digits_count_exit_sets.json'))
    print(markdown(result))
    if sets:
        print(exit_sets_markdown(exits))
    return {'study': result, 'exit_sets': exits if sets else None}


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


def exit_sets_markdown(result: Dict[str, Any]) -> str:
    """The README's tables of the two exit sets: per-exit test MAE / RMSE, then the certified points."""
    s, seeds = result['summary'], [r['seed'] for r in result['seeds']]

    def f(v: List[float], d: int = 3) -> str:
        return (f'{v[0]:.{d}f}' + (f' +- {v[1]:.{d}f}' if len(seeds) > 1 else '')) if v else 'n/a'
    lines = [f'Test MAE / RMSE (glyphs), seeds {seeds}, same backbone and final head:', '',
             '| exit (after block) | cost | trained MAE | trained RMSE | fitted (no labels) MAE | fitted RMSE |',
             '|---|---|---|---|---|---|']
    for t, g in zip(s['trained']['exits'], s['fitted']['exits']):
        lines.append(f'| {t["layer"]} | {t["cost"]:.3f} | {f(t["mae"])} | {f(t["rmse"])} | {f(g["mae"])} | '
                     f'{f(g["rmse"])} |')
    lines += ['', f'Certified thresholds (tolerance {result["tolerance"]} glyph, delta {result["delta"]}, chosen on '
              'val, figures on test):', '',
              '| exits | criterion | risk | epsilon | threshold | mean cost (val / test) | test violation | '
              'test error growth | test MAE |', '|---|---|---|---|---|---|---|---|---|']
    for name in EXIT_SETS:
        for p in s[name]['points']:
            ts = ', '.join('full depth' if t is None else f'{t:.3g}' for t in p['thresholds']) or 'refused'
            lines.append(f'| {name} | {p["criterion"]} | {p["risk"]} | {p["epsilon"]} | {ts} | '
                         f'{f(p["val_mean_cost"])} / {f(p["test_mean_cost"])} | {f(p["test_violation"])} | '
                         f'{f(p["test_error_growth"])} | {f(p["test_mae"])} |')
    return '\n'.join(lines)


def json_summary(s: Dict[str, Any]) -> str:
    import json
    return json.dumps(s, indent=1)


if __name__ == '__main__':
    main()
