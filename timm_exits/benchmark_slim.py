""" Speed of LifeRegress patch slimming against its timm parent: ``python -m timm_exits.benchmark_slim``.

Same method as ``timm_exits.benchmark``: one process, one input, interleaved rounds in rotating order, medians, and
ratios of medians taken in the same run. Candidates per (model, batch, keep rate):

- ``parent``: the timm parent, ``parent(x)``.
- ``oracle``: the same blocks and token schedule n_t with a free token choice (the first n_t patches are kept, no
  life module, no top-k, no gather): the best any patch-slimming method with this schedule can do.
- ``slim``: the LifeRegress model, ``model(x, keep_rate=rho)``.

Reported: the counted FLOPs ratio, the speed-ups of ``oracle`` and ``slim`` over the parent, and ``slim/oracle``
(throughput; target >= 0.95, shown, never asserted).
"""
import argparse
import json
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import timm

from .benchmark import time_interleaved
from .models.life_regress_vit import LifeRegressVisionTransformer

__all__ = ['main', 'oracle_forward']

TARGET = 0.95


def oracle_forward(model: LifeRegressVisionTransformer, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """The model's blocks on the token schedule ``counts`` (n_t per block), keeping the first n_t patches (and, with
    a rotary parent, their rotary rows)."""
    npt = model.num_prefix_tokens
    x, rope_full = model._embed(x)
    rope = rope_full
    for i, blk in enumerate(model.blocks):
        x = model._apply_block(blk, x, model._block_rope(rope, i), None)
        if i + 1 < len(counts) and counts[i + 1] < counts[i]:
            x = x[:, :npt + counts[i + 1]]
            rope = model._keep_rope(rope_full, torch.arange(counts[i + 1], device=x.device).expand(x.shape[0], -1))
    return model.forward_head(model.norm(x))


def model_names(name: str) -> Tuple[str, str]:
    """(timm parent, LifeRegress model) of a parent (``*_patch16_224``) or a LifeRegress name (``*_liferegress``)."""
    if name.endswith('_liferegress'):
        return name[:-len('_liferegress')] + '_patch16_224', name
    return name, name.replace('_patch16_224', '_liferegress')


def build_models(name: str) -> Tuple[nn.Module, LifeRegressVisionTransformer]:
    """The timm parent and its LifeRegress model (``*_patch16_224`` <-> ``*_liferegress``), same backbone weights."""
    parent_name, slim_name = model_names(name)
    parent = timm.create_model(parent_name).eval()
    model = timm.create_model(slim_name).eval()
    model.load_state_dict({**model.state_dict(), **parent.state_dict()})
    return parent, model


def benchmark(parent: nn.Module, model: LifeRegressVisionTransformer, batch: int, keep_rate: float, rounds: int,
              warmup: int, seed: int = 0) -> Dict[str, Any]:
    """Time parent, oracle and slim on one random batch; return medians (ms) and ratios."""
    x = torch.randn(batch, model.in_chans, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))
    counts = model.token_schedule(keep_rate)
    times = time_interleaved({
        'parent': lambda: parent(x),
        'oracle': lambda: oracle_forward(model, x, counts),
        'slim': lambda: model(x, keep_rate=keep_rate),
    }, rounds, warmup)
    ms = {name: statistics.median(v) for name, v in times.items()}
    return {
        'keep_rate': keep_rate, 'token_schedule': counts, 'flops_ratio': model.flops_ratio(keep_rate), 'ms': ms,
        'times_ms': times, 'oracle_speedup': ms['parent'] / ms['oracle'], 'slim_speedup': ms['parent'] / ms['slim'],
        'slim_vs_oracle': ms['oracle'] / ms['slim'],
        'keep_rate_1_max_abs_diff': float((model(x, keep_rate=1.) - parent(x)).abs().max()),
    }


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ['model', 'batch', 'rho', 'FLOPs ratio', 'oracle speed-up', 'slim speed-up', 'slim/oracle',
            'ms parent', 'ms oracle', 'ms slim']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        miss = ' !' if r['slim_vs_oracle'] < TARGET else ''
        lines.append('| ' + ' | '.join([
            r['model'], str(r['batch']), f"{r['keep_rate']:g}", f"{r['flops_ratio']:.3f}",
            f"{r['oracle_speedup']:.3f}", f"{r['slim_speedup']:.3f}", f"{r['slim_vs_oracle']:.3f}{miss}",
            *(f"{r['ms'][k]:.1f}" for k in ('parent', 'oracle', 'slim'))]) + ' |')
    return '\n'.join(lines) + f'\n\nTarget (not asserted; "!" marks a miss): slim/oracle >= {TARGET}.'


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
    parser.add_argument('--quick', action='store_true', help='CI smoke test: deit_tiny, batches 1 2, 2 rounds')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.rounds, args.warmup = ['deit_tiny_patch16_224'], [1, 2], 2, 1
        args.threads = args.threads or 1
    known = set(timm.list_models())
    for name in args.models:
        if not all(n in known for n in model_names(name)):
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
            parent, model = build_models(name)
            for batch in args.batch_sizes:
                for rate in args.keep_rates:
                    rows.append({'model': name, 'batch': batch,
                                 **benchmark(parent, model, batch, rate, args.rounds, args.warmup, args.seed)})
                    print(f'{name} batch {batch} rho {rate}: done', flush=True)
    print()
    print(markdown_table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'config': vars(args), 'torch': torch.__version__, 'results': rows}, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
