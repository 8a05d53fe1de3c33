""" Does fitting exits without labels pay? Digits, several seeds, three ways to get exits on one trained backbone, each
calibrated with a guarantee.

    python benchmarks/digits_fit_study.py --timm-dir /path/to/pytorch-image-models [--seeds 0 1 2]

1. scikit-learn's digits (1797 images, 32 px PNGs) as an ImageFolder: ``train`` (1000 images) and ``validation`` (the
   other 797, never trained or fitted on); a plain 6-block ViT trained on ``train`` by timm's own ``train.py``, the
   command of ``benchmarks/train_py_accuracy.py`` (its ``plain`` arm, 30 epochs from scratch).
2. On that backbone, exits after blocks 2-5 (``linear`` heads) three ways, each ``--epochs`` epochs of AdamW with a
   cosine schedule on the ``train`` images (eval transform, no augmentation, batch 64):
   - ``fit``: ``timm_exits.fit`` without labels (distillation from the final output, T = 2), backbone frozen, cached;
   - ``classifier_wise``: ``ClassifierWiseTask`` with the labels, same frozen backbone (Bakhtiarnia's classifier-wise);
   - ``mevit``: MEViT's full training (``MEViTTask``: sandwich rule, in-place distillation, backbone and final head
     trained too) from the same backbone, at a tenth of the learning rate.
3. Per exit, top-1 on ``validation``; then ``--splits`` random splits of ``validation`` into calibration (``--calib``
   images) and test (the rest): ``timm_exits.calibrate``'s Learn-then-Test at each epsilon (delta 0.05) on the
   calibration part, and on the test part the certified threshold's mean cost and disagreement with the final answer,
   the share of splits where it exceeds epsilon, and of splits refused (no threshold certified).
4. Seconds per epoch, interleaved in one process (one thread), three rounds, median: ``fit`` without and with the cache,
   against a full training epoch (``mevit``) and the classifier-wise epoch.

Results: ``WORK/seed_<s>.json`` (resumable per seed), ``docs/digits_fit_study.json`` and ``docs/digits_fit_study.png``.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

EPSILONS = (0.01, 0.02, 0.05)
DELTA = 0.05
ARMS = ('fit', 'classifier_wise', 'mevit')


def _model(checkpoint: str):
    import timm
    import timm_exits  # noqa: F401
    from timm_exits.models._base import UntrainedWeightsWarning, new_parts_filter
    from train_py_accuracy import EXIT_KWARGS, MEXIT, SHARED_KWARGS, _literal
    kwargs = {k: _literal(v) for k, v in (a.split('=', 1) for a in SHARED_KWARGS + EXIT_KWARGS)}
    model = timm.create_model(MEXIT, num_classes=10, **kwargs)
    import torch
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UntrainedWeightsWarning)
        model.load_state_dict(new_parts_filter(state, model), strict=True)
    return model


def _loaders(model, data: str, batch_size: int = 64):
    import torch
    from torch.utils.data import DataLoader
    from timm_exits.data import ImageFiles, build_transform, resolve_data_cfg
    cfg = resolve_data_cfg(model, dict(crop_pct=1., mean=(.5,) * 3, std=(.5,) * 3), flags=False)  # train.py's
    transform = build_transform(model, False, data_config=cfg)
    train = ImageFiles(os.path.join(data, 'train'), transform)
    val = ImageFiles(os.path.join(data, 'validation'), transform)
    g = torch.Generator().manual_seed(0)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(val, batch_size=256, shuffle=False))


def _task_epochs(task, loader, epochs: int, lr: float, seed: int, timings: Optional[List[float]] = None) -> None:
    """``epochs`` epochs of a timm_exits task: AdamW (timm's decay groups), cosine per step."""
    import torch
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import random_seed
    optimizer = create_optimizer_v2([p for p in task.model.parameters() if p.requires_grad], opt='adamw', lr=lr,
                                    weight_decay=0.05)
    scheduler = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, step_on_epochs=False,
                                    updates_per_epoch=len(loader))[0]
    step = 0
    for epoch in range(epochs):
        random_seed(seed + epoch)
        task.train()
        start = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            task(x, y)['loss'].backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        if timings is not None:
            timings.append(time.perf_counter() - start)
    task.model.eval()


def train_arms(backbone: str, data: str, epochs: int, lr: float, seed: int) -> Dict[str, Any]:
    import torch
    import timm_exits
    from timm_exits.tasks import ClassifierWiseTask, MEViTTask
    out = {}
    base = _model(backbone)
    train, _ = _loaders(base, data)
    models = {}
    torch.manual_seed(seed)
    m = copy.deepcopy(base)
    rows = timm_exits.fit(m, train, epochs=epochs, lr=lr, cache=True, seed=seed)
    models['fit'] = m
    out['fit_log'] = rows
    torch.manual_seed(seed)
    m = copy.deepcopy(base)
    _task_epochs(ClassifierWiseTask(m), train, epochs, lr, seed)
    models['classifier_wise'] = m
    torch.manual_seed(seed)
    m = copy.deepcopy(base)
    _task_epochs(MEViTTask(m, num_sampled=1), train, epochs, lr / 10, seed)
    models['mevit'] = m
    frozen = {k: v for k, v in base.state_dict().items() if not k.startswith(base.new_prefixes)}
    for name in ('fit', 'classifier_wise'):
        sd = models[name].state_dict()
        out[f'{name}_backbone_identical'] = all(torch.equal(v, sd[k]) for k, v in frozen.items())
    out['models'] = models
    return out


def evaluate_arm(model, val_loader, splits: int, calib: int, seed: int) -> Dict[str, Any]:
    """Per exit top-1 on the validation images, then ``timm_exits.calibrate`` (``calibrate_outputs``) on ``splits``
    random calibration parts of them and the chosen threshold applied to the rest."""
    import logging
    import torch
    from timm_exits import calibrate as cal
    logging.getLogger('timm_exits.calibrate').setLevel(logging.ERROR)
    outputs = cal.collect_calibration_outputs(model, val_loader)
    preds, scores, labels = outputs['preds'][0], outputs['scores'][0], outputs['labels']
    accs = [100. * float((p == labels).float().mean()) for p in preds]
    costs = torch.tensor(model.threshold_costs, dtype=torch.float64)
    n = preds.shape[1]
    grid = cal.threshold_grid(model.exit_criterion)
    losses, grid_costs = cal.point_losses(outputs, [(None, t) for t in grid], model.exit_criterion,
                                          costs=lambda r, t: model.threshold_costs)
    pool_risk = dict(zip(grid, losses.float().mean(1).tolist()))  # the risk over all the validation images
    g = torch.Generator().manual_seed(1000 + seed)
    per_eps = {}
    for eps in EPSILONS:
        rows = []
        for _ in range(splits):
            perm = torch.randperm(n, generator=g)
            c, t = perm[:calib], perm[calib:]
            part = dict(outputs, labels=labels[c], preds=[preds[:, c]], scores=[scores[:, c]])
            # the choose-on-the-split rule (validate's --target-drop on the disagreement): the cheapest threshold
            # whose calibration disagreement is within epsilon
            rates = losses[:, c].float().mean(1)
            naive = min((j for j in range(len(grid)) if rates[j] <= eps), key=lambda j: (float(
                _mean_cost(scores[:, c], grid[j], costs, model.exit_criterion)), j))
            naive_row = {'naive_violation': pool_risk[grid[naive]] > eps,
                         'naive_cost': _mean_cost(scores[:, t], grid[naive], costs, model.exit_criterion)}
            try:
                chosen = cal.calibrate_outputs(model, part, eps, DELTA)
            except cal.CalibrationError:
                rows.append(dict(naive_row, refused=True))
                continue
            if chosen['threshold'] is None:  # full depth
                first = torch.full((len(t),), preds.shape[0] - 1)
            else:
                first = cal._first_exit(scores[:, t], chosen['threshold'], model.exit_criterion == 'confidence')
            answer = preds[first, t]
            rows.append(dict(naive_row, refused=False, threshold=chosen['threshold'], cost=float(costs[first].mean()),
                             disagreement=float((answer != preds[-1, t]).float().mean()),
                             accuracy=100. * float((answer == labels[t]).float().mean()),
                             violation=chosen['threshold'] is not None and pool_risk[chosen['threshold']] > eps))
        done = [r for r in rows if not r['refused']]
        per_eps[str(eps)] = {
            'refused': sum(r['refused'] for r in rows) / len(rows),
            # the guarantee's event: the chosen threshold's risk over the population the calibration images were
            # drawn from (all the validation images) above epsilon
            'violations': sum(r['violation'] for r in done) / max(len(done), 1),
            'test_part_above_epsilon': sum(r['disagreement'] > eps for r in done) / max(len(done), 1),
            'naive_violations': sum(r['naive_violation'] for r in rows) / len(rows),
            'naive_mean_cost': statistics.mean(r['naive_cost'] for r in rows),
            'mean_cost': statistics.mean(r['cost'] for r in done) if done else None,
            'disagreement': statistics.mean(r['disagreement'] for r in done) if done else None,
            'accuracy': statistics.mean(r['accuracy'] for r in done) if done else None,
            'full_accuracy': accs[-1]}
    return {'exit_layers': list(model.exit_layers), 'accuracy': accs, 'exit_costs': list(model.exit_costs),
            'calibration': per_eps}


def _mean_cost(scores, threshold: float, costs, criterion: str) -> float:
    from timm_exits.calibrate import _first_exit
    return float(costs[_first_exit(scores, threshold, criterion == 'confidence')].mean())


def time_epochs(backbone: str, data: str, rounds: int = 3) -> Dict[str, float]:
    """Median seconds of one epoch of each, interleaved: fit without cache, fit with cache (an epoch from the cache),
    classifier-wise, MEViT's full training."""
    import timm_exits
    from timm_exits.tasks import ClassifierWiseTask, MEViTTask
    base = _model(backbone)
    train, _ = _loaders(base, data)
    times: Dict[str, List[float]] = {k: [] for k in ('fit', 'fit_cached', 'classifier_wise', 'mevit')}
    for _ in range(rounds):
        times['fit'].append(timm_exits.fit(copy.deepcopy(base), train, epochs=1)[0]['seconds'])
        times['fit_cached'].append(timm_exits.fit(copy.deepcopy(base), train, epochs=2, cache=True)[1]['seconds'])
        _task_epochs(ClassifierWiseTask(copy.deepcopy(base)), train, 1, 1e-3, 0, times['classifier_wise'])
        _task_epochs(MEViTTask(copy.deepcopy(base), num_sampled=1), train, 1, 1e-4, 0, times['mevit'])
    return {k: statistics.median(v) for k, v in times.items()}


def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    path = os.path.join(args.work, f'seed_{seed}.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import train_py_accuracy as tpa
    label = f'scratch-plain-s{seed}'
    run_dir = os.path.join(args.work, 'runs', label)
    ns = argparse.Namespace(timm_dir=args.timm_dir, data=args.data, epochs=30, lr=2e-3, threads=args.threads,
                            jobs=1)
    job = dict(label=label, dir=run_dir, cmd=tpa.train_command(ns, ('plain', []), seed, run_dir, label, None))
    tpa.run_all(ns, [job])
    backbone = os.path.join(run_dir, label, 'last.pth.tar')
    trained = train_arms(backbone, args.data, args.epochs, args.lr, seed)
    _, val = _loaders(trained['models']['fit'], args.data)
    result = {'seed': seed, 'train_py_command': job['cmd'][1:], 'epochs': args.epochs, 'lr': args.lr,
              'fit_log': trained['fit_log'],
              'backbone_identical': {k: trained[f'{k}_backbone_identical'] for k in ('fit', 'classifier_wise')},
              'arms': {name: evaluate_arm(trained['models'][name], val, args.splits, args.calib, seed)
                       for name in ARMS},
              'seconds_per_epoch': time_epochs(backbone, args.data)}
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(path + '.tmp', path)
    return result


def _ms(values: Sequence[float], fmt: str = '.1f') -> str:
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    std = statistics.stdev(values) if len(values) > 1 else 0.
    return f'{statistics.mean(values):{fmt}} ± {std:{fmt}}'


def tables(results: List[Dict[str, Any]]) -> str:
    layers = results[0]['arms']['fit']['exit_layers']
    costs = results[0]['arms']['fit']['exit_costs']
    names = {'fit': 'fitted without labels (`timm_exits.fit`, frozen)', 'classifier_wise':
             'classifier-wise with labels (frozen)', 'mevit': "MEViT's full training (backbone trained too)"}
    lines = ['| exits on the train.py backbone | ' + ' | '.join(
        f'exit {v} ({c:.3f})' if v != layers[-1] else f'final ({c:.3f})' for v, c in zip(layers, costs)) + ' |',
        '|---|' + '---|' * len(layers)]
    for arm in ARMS:
        lines.append(f'| {names[arm]} | ' + ' | '.join(
            _ms([r['arms'][arm]['accuracy'][i] for r in results]) for i in range(len(layers))) + ' |')
    lines += ['', '| certified threshold, delta 0.05: mean test cost / test disagreement (%) / violations / '
              'refused | ' + ' | '.join(f'epsilon {e}' for e in EPSILONS) + ' |', '|---|' + '---|' * len(EPSILONS)]
    for arm in ARMS:
        cells, naive = [], []
        for e in EPSILONS:
            rows = [r['arms'][arm]['calibration'][str(e)] for r in results]
            dis = [100 * x['disagreement'] if x['disagreement'] is not None else None for x in rows]
            cells.append(f'{_ms([x["mean_cost"] for x in rows], ".3f")} / {_ms(dis, ".2f")} / '
                         f'{100 * statistics.mean(x["violations"] for x in rows):.1f} % / '
                         f'{100 * statistics.mean(x["refused"] for x in rows):.0f} %')
            naive.append(f'{_ms([x["naive_mean_cost"] for x in rows], ".3f")} / - / '
                         f'{100 * statistics.mean(x["naive_violations"] for x in rows):.1f} % / -')
        lines.append(f'| {names[arm]} | ' + ' | '.join(cells) + ' |')
        lines.append(f'| same exits, chosen on the split (`--target-drop` rule) | ' + ' | '.join(naive) + ' |')
    t = [r['seconds_per_epoch'] for r in results]
    lines += ['', '| seconds per epoch (1000 images, 1 thread, median of 3 interleaved rounds) | fit | fit, cached | '
              'classifier-wise | MEViT full training |', '|---|---|---|---|---|',
              '| mean ± std over seeds | ' + ' | '.join(_ms([x[k] for x in t], '.2f') for k in (
                  'fit', 'fit_cached', 'classifier_wise', 'mevit')) + ' |']
    return '\n'.join(lines)


def plot(results: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    layers = results[0]['arms']['fit']['exit_layers']
    costs = results[0]['arms']['fit']['exit_costs']
    for arm, marker in zip(ARMS, 'osd'):
        accs = [statistics.mean(r['arms'][arm]['accuracy'][i] for r in results) for i in range(len(layers))]
        a.plot(costs, accs, marker=marker, label=arm)
        pts = [(statistics.mean(r['arms'][arm]['calibration'][str(e)]['mean_cost'] for r in results),
                100 * statistics.mean(r['arms'][arm]['calibration'][str(e)]['disagreement'] for r in results), e)
               for e in EPSILONS if all(r['arms'][arm]['calibration'][str(e)]['mean_cost'] for r in results)]
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=arm)
        for x, y, e in pts if arm == 'fit' else ():
            b.annotate(f'epsilon {e}', (x, y), textcoords='offset points', xytext=(6, 6), fontsize=8)
    a.set(xlabel='exit cost (share of the full FLOPs)', ylabel='top-1 (%), validation', title='per exit, mean of seeds')
    b.set(xlabel='mean cost of the certified threshold', ylabel='test disagreement with the final answer (%)',
          title=f'Learn-then-Test, delta {DELTA}')
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--timm-dir', default=os.environ.get('TIMM_DIR', ''))
    parser.add_argument('--work', default=os.path.join('output', 'digits_fit_study'))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--splits', type=int, default=200)
    parser.add_argument('--calib', type=int, default=400)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--docs', default=os.path.join(REPO, 'docs'))
    args = parser.parse_args(argv)
    if not args.timm_dir or not os.path.isfile(os.path.join(args.timm_dir, 'train.py')):
        parser.error(f'--timm-dir={args.timm_dir!r} has no train.py (a pytorch-image-models checkout, or $TIMM_DIR)')
    import torch
    torch.set_num_threads(args.threads)
    args.work = os.path.abspath(args.work)
    args.data = os.path.join(args.work, 'data')
    os.makedirs(args.work, exist_ok=True)
    from timm_exits.data import write_digits_folder
    write_digits_folder(args.data, num_val=797)  # train 1000, validation 797
    start = time.time()
    results = [run_seed(args, s) for s in args.seeds]
    text = tables(results)
    print(text)
    summary = {'seeds': args.seeds, 'epochs': args.epochs, 'lr': args.lr, 'splits': args.splits,
               'calib': args.calib, 'delta': DELTA, 'epsilons': EPSILONS, 'table': text, 'results': results}
    with open(os.path.join(args.docs, 'digits_fit_study.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    plot(results, os.path.join(args.docs, 'digits_fit_study.png'))
    print(f'{(time.time() - start) / 60:.1f} min')


if __name__ == '__main__':
    main()
