""" Speed of LifeRegress patch slimming against its timm parent: ``python -m timm_exits.benchmark_slim``.

Same method as ``timm_exits.benchmark``: one process, one input, interleaved rounds in rotating order, medians, and
ratios of medians taken in the same run. Candidates per (model, batch, keep rate):

- ``parent``: the timm parent, ``parent(x)``.
- ``oracle``: the same blocks and token schedule n_t with a free token choice (the first n_t patches are kept, no
  life module, no top-k, no gather): the best any patch-slimming method with this schedule can do.
- ``slim``: the LifeRegress model, ``model(x, keep_rate=rho)``; with ``--family mexit_liferegress`` the model with
  exits and slimming at full depth, ``model(x, keep_rate=rho)`` (the same schedule; its exits are not evaluated).

``--compile`` compiles (inductor) the parent, the oracle and the model, warms each up (compilation not timed), then
times them the same way.

Reported: the counted FLOPs ratio, the speed-ups of ``oracle`` and ``slim`` over the parent, and ``slim/oracle``
(throughput; target >= 0.95, shown, never asserted).
"""
import argparse
import functools
import json
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import timm

from .benchmark import oracle_forward, time_interleaved
from .models.life_regress_vit import LifeRegressVisionTransformer

__all__ = ['main', 'oracle_forward']

TARGET = 0.95


def model_names(name: str, family: str = 'liferegress') -> Tuple[str, str]:
    """(timm parent, model of ``family``) of a parent (``*_patch16_224``) or a LifeRegress name (``*_liferegress``)."""
    if name.endswith('_liferegress') and not name.endswith('_mexit_liferegress'):
        name = name[:-len('_liferegress')] + '_patch16_224'
    if family == 'liferegress':
        return name, name.replace('_patch16_224', '_liferegress')
    return name, f'{name}_{family}'


def build_models(name: str, family: str = 'liferegress') -> Tuple[nn.Module, LifeRegressVisionTransformer]:
    """The timm parent and its slimming model (``*_patch16_224`` <-> ``*_liferegress``, or ``<parent>_<family>``),
    same backbone weights."""
    parent_name, slim_name = model_names(name, family)
    parent = timm.create_model(parent_name).eval()
    model = timm.create_model(slim_name).eval()
    model.load_state_dict({**model.state_dict(), **parent.state_dict()})
    return parent, model


def benchmark(parent: nn.Module, model: LifeRegressVisionTransformer, batch: int, keep_rate: float, rounds: int,
              warmup: int, seed: int = 0, compile: bool = False) -> Dict[str, Any]:
    """Time parent, oracle and slim on one random batch; return medians (ms) and ratios."""
    x = torch.randn(batch, model.in_chans, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))
    counts = model.token_schedule(keep_rate)
    run_parent, run_model = parent, model
    run_oracle = functools.partial(oracle_forward, model)
    if compile:
        model(x, keep_rate=keep_rate)  # costs and schedule counted eagerly, outside the compiled graph
        run_parent, run_model, run_oracle = (torch.compile(m) for m in (parent, model, run_oracle))
    times = time_interleaved({
        'parent': lambda: run_parent(x),
        'oracle': lambda: run_oracle(x, counts),
        'slim': lambda: run_model(x, keep_rate=keep_rate),
    }, rounds, warmup)
    ms = {name: statistics.median(v) for name, v in times.items()}
    return {
        'keep_rate': keep_rate, 'token_schedule': counts, 'flops_ratio': model.flops_ratio(keep_rate), 'ms': ms,
        'times_ms': times, 'oracle_speedup': ms['parent'] / ms['oracle'], 'slim_speedup': ms['parent'] / ms['slim'],
        'slim_vs_oracle': ms['oracle'] / ms['slim'],
        'efficiency': ms['parent'] / ms['slim'] * model.flops_ratio(keep_rate),  # measured speed-up x FLOPs share
        'keep_rate_1_max_abs_diff': float((model(x, keep_rate=1.) - parent(x)).abs().max()),
    }


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ['model', 'batch', 'rho', 'FLOPs ratio', 'oracle speed-up', 'slim speed-up', 'slim/oracle',
            'efficiency', 'ms parent', 'ms oracle', 'ms slim']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        miss = ' !' if r['slim_vs_oracle'] < TARGET else ''
        lines.append('| ' + ' | '.join([
            r['model'], str(r['batch']), f"{r['keep_rate']:g}", f"{r['flops_ratio']:.3f}",
            f"{r['oracle_speedup']:.3f}", f"{r['slim_speedup']:.3f}", f"{r['slim_vs_oracle']:.3f}{miss}",
            f"{r['efficiency']:.3f}",
            *(f"{r['ms'][k]:.1f}" for k in ('parent', 'oracle', 'slim'))]) + ' |')
    return '\n'.join(lines) + (f'\n\nTarget (not asserted; "!" marks a miss): slim/oracle >= {TARGET}. Efficiency: '
                               f'speed-up x FLOPs ratio (1: the time falls as the FLOPs).')


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Run the benchmark, print the markdown table, optionally write JSON; return the result rows."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], prog='python -m timm_exits.benchmark_slim')
    parser.add_argument('--models', nargs='+', default=['deit_small_patch16_224'],
                        help='timm parent names (deit_small_patch16_224) or LifeRegress names (deit_small_liferegress)')
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 32])
    parser.add_argument('--keep-rates', nargs='+', type=float, default=[0.7])
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None)
    parser.add_argument('--family', default='liferegress', choices=['liferegress', 'mexit_liferegress'],
                        help='slimming alone, or exits and slimming at full depth')
    parser.add_argument('--compile', action='store_true', help='torch.compile (inductor) every candidate')
    parser.add_argument('--quick', action='store_true', help='CI smoke test: deit_tiny, batches 1 2, 2 rounds')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.rounds, args.warmup = ['deit_tiny_patch16_224'], [1, 2], 2, 1
        args.threads = args.threads or 1
    known = set(timm.list_models())
    for name in args.models:
        if not all(n in known for n in model_names(name, args.family)):
            allowed = sorted(n for n in timm.list_models('*_liferegress') if not n.startswith('test_'))
            parser.error(f'--models {name}: no LifeRegress model for it; allowed: {allowed} or their parents')
    if args.rounds < 1 or args.warmup < 0 or min(args.batch_sizes) < 1 or not all(0 < r <= 1 for r in args.keep_rates):
        parser.error(f'--rounds must be >= 1, --warmup >= 0, --batch-sizes >= 1 and --keep-rates in (0, 1]; got '
                     f'{args.rounds}, {args.warmup}, {args.batch_sizes}, {args.keep_rates}')
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for name in args.models:
            parent, model = build_models(name, args.family)
            label = name + ('' if args.family == 'liferegress' else f' ({args.family})') + (
                ' (compiled)' if args.compile else '')
            for batch in args.batch_sizes:
                for rate in args.keep_rates:
                    rows.append({'model': label, 'batch': batch, **benchmark(
                        parent, model, batch, rate, args.rounds, args.warmup, args.seed, args.compile)})
                    print(f'{name} batch {batch} rho {rate}: done', flush=True)
    print()
    print(markdown_table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'config': vars(args), 'torch': torch.__version__, 'results': rows}, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
