""" Does early exit pay on CNNs? Digits, a small ResNet and a small ConvNeXt trained plainly, exits fitted on the frozen
backbone with and without labels, each calibrated with a guarantee.

    python benchmarks/digits_cnn_study.py [--seed 0] [--threads 2] [--quick]

1. scikit-learn's digits at 32 px (``timm_exits.data.DigitsDataset``'s fixed stratified split): ``train`` (1078
   images), ``val`` (359: the calibration split) and ``test`` (360: every number reported; never trained, fitted or
   calibrated on).
2. Two plain timm parents, no exits: ``resnet18`` narrowed to ``channels=(32, 64, 128, 256)`` and ``convnext_atto``
   narrowed to ``dims=(24, 48, 96, 192)`` (both from scratch, 32 px: their stems take it to 8 x 8, the last stage
   to 1 x 1). Each trained by a simple loop here, the plain parent's cross-entropy: AdamW (lr 2e-3, weight decay
   0.05), cosine per step, batch 64, ``--plain-epochs`` epochs, no augmentation.
3. ``timm_exits.convert(parent, 'mexit', exit_input_size=(32, 32))``: SDN exit heads after the units nearest 15..90 %
   of the parent's FLOPs, confidence criterion (the defaults). On that frozen backbone, two ways, ``--epochs`` each,
   on the ``train`` images, batch 64:
   - ``fit``: ``timm_exits.fit`` with its default settings (no labels: distillation from the final output, T = 2;
     AdamW lr 1e-3, cosine per step; no cache);
   - ``labels``: the labelled IC-only objective of ``train_recipes/sdn_ic_only.py`` (``ClassifierWiseTask`` with
     ``exit_weight=1, uncertainty_weight=0``: each exit's cross-entropy with the labels, backbone frozen, BatchNorm
     statistics untouched) under fit's optimizer and schedule (AdamW lr 1e-3, weight decay 0.05, cosine per step).
4. Per exit, top-1 on ``test``. ``timm_exits.calibrate`` (Learn-then-Test, disagreement with the final answer, delta
   0.1) at each epsilon on ``val``; the certified threshold then applied to ``test``: mean cost (share of the parent's
   FLOPs at 32 px, every exit head on the way counted), top-1 and disagreement with the final answer.
5. Seconds per epoch, median over the epochs of each (one process, ``--threads`` threads).

Results: ``docs/digits_cnn_study.json`` (``--json``) and a markdown table on stdout.
"""
import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EPSILONS = (0.01, 0.02, 0.05)
DELTA = 0.1
SIZE = (32, 32)
MODELS = {
    'resnet18': dict(channels=(32, 64, 128, 256)),
    'convnext_atto': dict(dims=(24, 48, 96, 192)),
}
WAYS = ('fit', 'labels')
QUICK = (16, 40)  # --quick: train images, calibration / test images
WAY_NAMES = {'fit': 'no labels (`timm_exits.fit`)', 'labels': 'labels (IC-only)'}


def _digits(split: str, n: Optional[int] = None):
    from timm_exits.data import DigitsDataset
    ds = DigitsDataset(split, SIZE)
    if n is not None:
        ds.images, ds.targets = ds.images[:n], ds.targets[:n]
    return ds


def _loader(ds, shuffle: bool, seed: int = 0, batch_size: int = 64):
    import torch
    from torch.utils.data import DataLoader
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


def _epochs(params, step, loader, epochs: int, lr: float, seed: int, on_train=None) -> List[float]:
    """``epochs`` epochs of ``step(x, y) -> loss``: AdamW (weight decay 0.05), timm's cosine schedule per step.
    Returns the seconds of each epoch."""
    import torch
    from timm.scheduler import create_scheduler_v2
    from timm.utils import random_seed
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    scheduler = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, step_on_epochs=False,
                                    updates_per_epoch=len(loader))[0]
    seconds, n = [], 0
    for epoch in range(epochs):
        random_seed(seed + epoch)
        if on_train is not None:
            on_train()
        start = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            step(x, y).backward()
            optimizer.step()
            n += 1
            scheduler.step_update(n)
        seconds.append(time.perf_counter() - start)
    return seconds


def train_plain(name: str, kwargs: Dict[str, Any], train, epochs: int, lr: float, seed: int):
    """The plain timm parent (no exits), its own cross-entropy."""
    import timm
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs)
    seconds = _epochs(model.parameters(), lambda x, y: F.cross_entropy(model(x), y), train, epochs, lr, seed,
                      on_train=model.train)
    return model.eval(), seconds


def _top1(model, loader) -> float:
    import torch
    right = n = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x).argmax(-1) == y).sum())
            n += len(y)
    return 100. * right / n


def fit_exits(base, way: str, train, epochs: int, seed: int):
    """A copy of ``base`` (a frozen-backbone twin) with its exits fitted one way; the per-epoch log and seconds."""
    import torch
    import timm_exits
    from timm_exits.tasks import ClassifierWiseTask
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if way == 'fit':
        rows = timm_exits.fit(model, train, epochs=epochs, seed=seed)  # default lr, temperature, no labels, no cache
        return model, [r['seconds'] for r in rows], [{k: r[k] for k in ('epoch', 'loss', 'agreement')} for r in rows]
    task = ClassifierWiseTask(model, exit_weight=1., uncertainty_weight=0.)  # sdn_ic_only's objective
    losses: List[float] = []

    def step(x, y):
        loss = task(x, y)['loss']
        losses.append(float(loss.detach()))
        return loss
    seconds = _epochs([p for p in model.parameters() if p.requires_grad], step, train, epochs, 1e-3, seed,
                      on_train=task.train)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    per = len(losses) // epochs
    return model, seconds, [{'epoch': e + 1, 'loss': statistics.mean(losses[e * per:(e + 1) * per])}
                            for e in range(epochs)]


def evaluate(model, calib_loader, test_loader) -> Dict[str, Any]:
    """Per exit top-1 on test; per epsilon the threshold certified on the calibration split, applied to test."""
    import torch
    from timm_exits import calibrate as cal
    logging.getLogger('timm_exits.calibrate').setLevel(logging.ERROR)
    calib = cal.collect_calibration_outputs(model, calib_loader)
    test = cal.collect_calibration_outputs(model, test_loader)
    preds, scores, labels = test['preds'][0], test['scores'][0], test['labels']
    costs = torch.tensor(model.threshold_costs_at(SIZE), dtype=torch.float64)
    out: Dict[str, Any] = {'accuracy': [100. * float((p == labels).float().mean()) for p in preds], 'certified': {}}
    for eps in EPSILONS:
        try:
            chosen = cal.calibrate_outputs(model, calib, eps, DELTA)
        except cal.CalibrationError as e:
            out['certified'][str(eps)] = {'refused': True, 'reason': str(e), 'threshold': None, 'mean_cost': None,
                                          'accuracy': None, 'disagreement': None}
            continue
        if chosen['threshold'] is None:  # full depth: no exit head runs
            first = torch.full((preds.shape[1],), preds.shape[0] - 1)
            cost = float(model.exit_costs_at(SIZE)[-1])
        else:
            first = cal._first_exit(scores, chosen['threshold'], model.exit_criterion == 'confidence')
            cost = float(costs[first].mean())
        answer = preds[first, torch.arange(preds.shape[1])]
        out['certified'][str(eps)] = {
            'refused': False, 'threshold': chosen['threshold'], 'calibration_risk': chosen['empirical_risk'],
            'calibration_cost': chosen['mean_cost'], 'mean_cost': cost,
            'accuracy': 100. * float((answer == labels).float().mean()),
            'disagreement': float((answer != preds[-1]).float().mean()),
            'exit_shares': torch.bincount(first, minlength=preds.shape[0]).div(len(first)).tolist()}
    return out


def run_model(name: str, kwargs: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    import timm_exits
    n_train, n_eval = QUICK if args.quick else (None, None)
    train = _loader(_digits('train', n_train), True, args.seed, batch_size=16 if args.quick else 64)
    calib = _loader(_digits('val', n_eval), False, batch_size=256)
    test = _loader(_digits('test', n_eval), False, batch_size=256)
    plain, plain_seconds = train_plain(name, kwargs, train, args.plain_epochs, args.plain_lr, args.seed)
    plain_top1 = _top1(plain, test)
    base = timm_exits.convert(copy.deepcopy(plain), 'mexit', exit_input_size=SIZE).eval()
    frozen = {k: v.clone() for k, v in base.state_dict().items() if not k.startswith(base.new_prefixes)}
    result = {'kwargs': {k: list(v) for k, v in kwargs.items()},
              'params_m': sum(p.numel() for p in plain.parameters()) / 1e6,
              'plain': {'epochs': args.plain_epochs, 'lr': args.plain_lr, 'test_accuracy': plain_top1,
                        'seconds_per_epoch': statistics.median(plain_seconds)},
              'exit_layers': list(base.exit_layers), 'exit_costs': list(base.exit_costs_at(SIZE)),
              'threshold_costs': list(base.threshold_costs_at(SIZE)), 'ways': {}}
    for way in WAYS:
        model, seconds, log = fit_exits(base, way, train, args.epochs, args.seed)
        sd = model.state_dict()
        with torch.no_grad():
            x = test.dataset.images[:16]
            same_final = torch.equal(model(x), plain(x))
        result['ways'][way] = {
            'epochs': args.epochs, 'seconds_per_epoch': statistics.median(seconds), 'seconds': seconds, 'log': log,
            'backbone_identical': all(torch.equal(v, sd[k]) for k, v in frozen.items()),
            'final_output_identical': same_final, **evaluate(model, calib, test)}
        print(f'{name} {way}: exits {[round(a, 1) for a in result["ways"][way]["accuracy"]]}, '
              f'{statistics.median(seconds):.1f} s/epoch', flush=True)
    return result


def _cell(c: Dict[str, Any]) -> str:
    if c['refused']:
        return 'refused'
    t = 'full depth' if c['threshold'] is None else f"t {c['threshold']:.2f}"
    return f"{t}: {c['mean_cost']:.2f} / {c['accuracy']:.1f} / {100 * c['disagreement']:.1f}"


def table(summary: Dict[str, Any]) -> str:
    lines = ['| model (plain top-1, s / plain epoch) | exits | top-1 per exit (%), cost in brackets | '
             's / epoch (min) | ' + ' | '.join(f'epsilon {e}' for e in EPSILONS) + ' |',
             '|---|---|---|---|' + '---|' * len(EPSILONS)]
    for name, r in summary['models'].items():
        first = True
        for way in WAYS:
            w = r['ways'][way]
            accs = ', '.join(f'{a:.1f} ({c:.2f})' for a, c in zip(w['accuracy'], r['exit_costs']))
            label = (f"{name} {','.join(f'{k}={tuple(v)}' for k, v in r['kwargs'].items())} "
                     f"({r['plain']['test_accuracy']:.1f} %, {r['plain']['seconds_per_epoch']:.1f} s)") if first else ''
            seconds = f"{w['seconds_per_epoch']:.1f} ({min(w['seconds']):.1f})"
            lines.append(f"| {label} | {WAY_NAMES[way]} | {accs} | {seconds} | "
                         + ' | '.join(_cell(w['certified'][str(e)]) for e in EPSILONS) + ' |')
            first = False
    lines.append('')
    lines.append(f"Test split ({summary['test_images']} images); thresholds certified by `timm_exits.calibrate` on the "
                 f"calibration split ({summary['calibration_images']} images), delta {DELTA}; each epsilon cell: "
                 'threshold: mean cost (share of the parent\'s FLOPs) / top-1 (%) / disagreement with the final answer '
                 f"(%) on the test split. Seed {summary['seed']}; seconds per epoch: median (fastest) "
                 f"of the epochs, {summary['threads']} threads.")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--plain-epochs', type=int, default=8)
    parser.add_argument('--plain-lr', type=float, default=2e-3)
    parser.add_argument('--epochs', type=int, default=10, help='epochs of fit and of the labelled way (fit\'s default)')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: 1 epoch each, 16 train / 40 calibration / 40 test images')
    parser.add_argument('--json', default=os.path.join(REPO, 'docs', 'digits_cnn_study.json'))
    args = parser.parse_args(argv)
    if args.quick:
        args.plain_epochs = args.epochs = 1
    import torch
    torch.set_num_threads(args.threads)
    start = time.time()
    results = {name: run_model(name, MODELS[name], args) for name in args.models}
    summary = {'command': 'python benchmarks/digits_cnn_study.py' + (' ' + ' '.join(argv) if argv else
                                                                     ' '.join([''] + sys.argv[1:])).rstrip(),
               'seed': args.seed, 'quick': args.quick, 'threads': args.threads, 'img_size': list(SIZE),
               'epsilons': list(EPSILONS), 'delta': DELTA, 'epochs': args.epochs,
               'train_images': len(_digits('train', QUICK[0] if args.quick else None)),
               'calibration_images': len(_digits('val', QUICK[1] if args.quick else None)),
               'test_images': len(_digits('test', QUICK[1] if args.quick else None)),
               'models': results}
    summary['table'] = table(summary)
    summary['minutes'] = (time.time() - start) / 60
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump(summary, f, indent=1)
    print(summary['table'])
    print(f"{summary['minutes']:.1f} min")
    return summary


if __name__ == '__main__':
    main()
