""" Anytime inference on the digits demo model: the accuracy reached when the caller's deadline passes.

    python benchmarks/anytime_deadlines.py --checkpoint output/digits_demo/seed0/mevit/model.safetensors

The checkpoint is a multi-exit model trained on scikit-learn's digits (``python train_recipes/digits_demo.py --runs
mevit`` writes one; its model and layout are read from the file). First the full-depth forward of one batch of the
digits test split is timed (median of ``--rounds``), then the whole test split runs through ``forward_dynamic(x,
deadline_ms=d)`` for deadlines at fractions of that time (and with ``--threshold``, a confident image leaves before
the deadline): per deadline, the accuracy, the share of images answering at each exit, the mean cost (share of the
full model's FLOPs) and the measured time over the full-depth time. The deadline is a wall clock, so which exit
answers depends on the machine and its load; the accuracy at each exit does not (printed first, from
``forward_anytime``: what a caller who stops after exit k keeps).
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's timm_exits

import torch  # noqa: E402

import timm  # noqa: E402
import timm_exits  # noqa: E402,F401  (registers the models)
from timm_exits._files import atomic_write  # noqa: E402
from timm_exits.data import DigitsDataset  # noqa: E402
from timm_exits.models._checkpoint import checkpoint_model_args, read_checkpoint  # noqa: E402


def load(path: str) -> torch.nn.Module:
    """The multi-exit model of a recipes' checkpoint (model name and layout from its metadata), in eval mode."""
    _, recorded = read_checkpoint(path)
    name, kwargs, num_classes = checkpoint_model_args(recorded)
    if not name:
        raise SystemExit(f'error: {path} does not name its model; use a model.safetensors of the recipes\' trainer')
    model = timm.create_model(name, checkpoint_path=path, num_classes=num_classes, **kwargs).eval()
    if not hasattr(model, 'forward_anytime'):
        raise SystemExit(f'error: {path} holds a {type(model).__name__}, not a multi-exit model')
    return model


def full_time_ms(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> float:
    """Median wall time of the full-depth forward of batch x."""
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def run(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int, fractions: List[float],
        threshold: Optional[float], rounds: int) -> Dict[str, Any]:
    batches = [(images[i:i + batch], targets[i:i + batch]) for i in range(0, len(images), batch)]
    out: Dict[str, Any] = {'exit_layers': list(model.exit_layers), 'threshold': threshold, 'batch_size': batch}
    with torch.no_grad():
        correct = {layer: 0 for layer in model.exit_layers}
        for x, y in batches:
            for step in model.forward_anytime(x):  # no threshold: every image reaches every exit
                correct[step.exit_layer] += int((step.logits.argmax(-1) == y[step.rows]).sum())
        out['anytime_accuracy'] = {str(k): 100. * v / len(images) for k, v in correct.items()}
        full = full_time_ms(model, batches[0][0], rounds)
        out['full_ms_per_batch'] = full
        rows = []
        for fraction in fractions:
            deadline = fraction * full
            hits, layers, costs, elapsed = 0, [], [], 0.
            for x, y in batches:
                start = time.perf_counter()
                res = model.forward_dynamic(x, threshold=threshold, deadline_ms=deadline)
                elapsed += time.perf_counter() - start
                hits += int((res.logits.argmax(-1) == y).sum())
                layers += res.exit_layer.tolist()
                costs += res.cost.tolist()
            share = {str(k): round(layers.count(k) / len(layers), 3) for k in model.exit_layers}
            rows.append(dict(deadline_fraction=fraction, deadline_ms=round(deadline, 3),
                             accuracy=100. * hits / len(images), answered_at=share,
                             mean_cost=statistics.fmean(costs),
                             time_vs_full=elapsed * 1e3 / (full * len(batches))))
        out['deadlines'] = rows
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help='model.safetensors of a multi-exit digits run')
    parser.add_argument('--split', default='test', choices=['train', 'val', 'test'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--deadlines', type=float, nargs='+', default=[0., .25, .5, .75, 1., 1.5],
                        help='deadlines as fractions of the full-depth time of one batch')
    parser.add_argument('--threshold', type=float, default=None)
    parser.add_argument('--rounds', type=int, default=20, help='timed full-depth rounds')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--json', default='', help='also write the result here')
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        parser.error(f'argument --checkpoint: {args.checkpoint!r} is not a file')
    if args.batch_size < 1 or any(d < 0 for d in args.deadlines):
        parser.error('argument --batch-size must be >= 1 and --deadlines >= 0')
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint)
    data = DigitsDataset(args.split, model.patch_embed.img_size[0])
    result = run(model, data.images, data.targets, args.batch_size, args.deadlines, args.threshold, args.rounds)
    print('accuracy at each exit (forward_anytime, stop after exit k):',
          ', '.join(f'{k}: {v:.2f}' for k, v in result['anytime_accuracy'].items()))
    print(f"full depth: {result['full_ms_per_batch']:.2f} ms per batch of {args.batch_size}")
    print('| deadline (x full) | ms | accuracy | answered at exit | mean cost | time / full |')
    print('|---|---|---|---|---|---|')
    for r in result['deadlines']:
        where = ', '.join(f'{k}: {v:.2f}' for k, v in r['answered_at'].items() if v)
        print(f"| {r['deadline_fraction']:g} | {r['deadline_ms']:.2f} | {r['accuracy']:.2f} | {where} | "
              f"{r['mean_cost']:.3f} | {r['time_vs_full']:.2f} |")
    if args.json:  # atomically: a killed run leaves no half-written file
        atomic_write(args.json, lambda tmp: open(tmp, 'w').write(json.dumps(result, indent=2)))
    return result


if __name__ == '__main__':
    main()
