""" Speed of the multi-exit ViTs against their timm parent: ``python -m timm_exits.benchmark``.

Method: every candidate runs in the same process on the same input, and the timing is interleaved: each round times
every candidate once, in an order that rotates from round to round, after some warm-up rounds. Per candidate the
median over rounds is kept, and what is reported are RATIOS of medians taken in the same run, which cancel most of
the machine's drift (clock, cache, other load). Weights are random (the multi-exit model gets the parent's backbone
weights), which does not change the speed. Candidates per (model, batch):

- ``parent``: the timm parent, ``parent(x)``.
- ``parent_trunc{k}``: timm's own backbone cut after block k, the first exit (``prune_intermediate_layers``, norm and
  head kept): the reference speed of stopping at block k.
- ``exit{k}``: the multi-exit model with a budget that sends every image out at block k.
- ``full``: the multi-exit model at full depth, which must give the parent's logits (checked, max abs diff reported).
- ``mixed`` (at ``--mixed-batch-size`` only): per-image early exit with the threshold at the median exit-k score of
  the batch, so about half the images leave at block k. Its ideal speed-up is 1 / mean(per-image FLOP share).

Targets (shown, never asserted: timings depend on the machine): exit/trunc speed-up ratio >= 0.97, full/parent time
<= 1.02, mixed efficiency (measured / ideal speed-up) >= 0.95. On a small or shared VM, ``--threads 1`` gives much
steadier numbers than torch's default thread count (a descheduled OpenMP worker stalls the whole op).
"""
import argparse
import copy
import json
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from .models.multi_exit_vit import MultiExitMixin, MultiExitVisionTransformer
from .models.adapters import input_shape

__all__ = ['benchmark_model', 'main', 'oracle_forward', 'time_interleaved']

TARGETS = {'exit_vs_trunc': ('>=', 0.97), 'full_vs_parent': ('<=', 1.02), 'mixed_efficiency': ('>=', 0.95)}


def time_interleaved(
        candidates: Dict[str, Callable[[], Any]],
        rounds: int,
        warmup: int,
        pause_s: float = 0.,
) -> Dict[str, List[float]]:
    """Per candidate, its time in ms in each timed round; each round runs all candidates once, in rotating order.
    ``pause_s``: an untimed sleep after every call, so that thread pools which spin after a run (ONNX Runtime's by
    default) are idle again before the next candidate starts, as when each runs alone."""
    names = list(candidates)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            candidates[name]()
            elapsed = (time.perf_counter() - start) * 1e3
            if r >= warmup:
                times[name].append(elapsed)
            if pause_s:
                time.sleep(pause_s)
    return times


def truncated_parent(parent: nn.Module, depth: int) -> nn.Module:
    """Copy of ``parent`` with only its first ``depth`` blocks, final norm and head kept."""
    trunc = copy.deepcopy(parent)
    trunc.prune_intermediate_layers(indices=[depth - 1], prune_norm=False, prune_head=False)
    if trunc.num_classes != parent.num_classes or not isinstance(trunc.head, nn.Linear):  # head reset by timm
        trunc = copy.deepcopy(parent)
        trunc.blocks = parent.blocks[:depth]
    assert len(trunc.blocks) == depth
    return trunc


def oracle_forward(model: nn.Module, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
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


def build_models(name: str) -> Tuple[nn.Module, MultiExitMixin]:
    """The timm parent and its multi-exit model with the same (random) backbone weights, both in eval mode. ``name``
    is the parent or the multi-exit model (``..._mexit``). A feature backbone (DINOv2, SigLIP, EVA02 pre-training
    tags: ``num_classes=0``) gets a 1000-class head, since exits classify."""
    parent_name = name[:-len('_mexit')] if name.endswith('_mexit') else name
    num_classes = timm.models.get_pretrained_cfg(parent_name).num_classes or 1000
    parent = timm.create_model(parent_name, num_classes=num_classes).eval()
    model = timm.create_model(f'{parent_name}_mexit', num_classes=num_classes).eval()
    assert isinstance(model, MultiExitMixin)
    model.load_state_dict({**model.state_dict(), **parent.state_dict()})
    return parent, model


def mixed_setup(model: MultiExitVisionTransformer, x: torch.Tensor) -> Dict[str, Any]:
    """Threshold at the median first-exit score of ``x`` and what one dynamic pass with it does per image."""
    first = model.exit_layers[0]
    scores = model.exit_scores(first, model.forward_exits(x)[0])
    threshold = float(scores.float().quantile(0.5))
    out = model.forward_dynamic(x, threshold=threshold)
    layers, mean_cost = out.exit_layer.tolist(), float(out.cost.double().mean())
    return {
        'threshold': threshold,
        'exit_fractions': {str(k): layers.count(k) / len(layers) for k in model.exit_layers if k in layers},
        'mean_cost': mean_cost,
        'ideal_speedup': 1. / mean_cost,
    }


def benchmark_model(
        parent: nn.Module,
        model: MultiExitVisionTransformer,
        batch: int,
        rounds: int,
        warmup: int,
        mixed: bool,
        seed: int = 0,
        compile_backend: str = '',
) -> Dict[str, Any]:
    """Time every candidate on one random batch; return medians (ms), raw times and the ratios. With
    ``compile_backend`` every candidate (parent, truncated parent, multi-exit model) is ``torch.compile``d and
    warmed up (compiled) before the timing."""
    first = model.exit_layers[0]
    exit_name, trunc_name = f'exit{first}', f'parent_trunc{first}'
    gen = torch.Generator().manual_seed(seed + batch)
    x = torch.randn(batch, *input_shape(model), generator=gen)
    trunc = truncated_parent(parent, first)
    budget = model.exit_costs[0]
    run_parent, run_trunc, run_model = (
        (torch.compile(m, backend=compile_backend) for m in (parent, trunc, model)) if compile_backend
        else (parent, trunc, model))
    row: Dict[str, Any] = {
        'exit_layer': first, 'full_max_abs_diff': float((run_model(x) - run_parent(x)).abs().max()),
        'worst_case_threshold_cost': model.worst_case_threshold_cost, 'compiled': compile_backend or None,
    }
    candidates = {
        'parent': lambda: run_parent(x),
        trunc_name: lambda: run_trunc(x),
        exit_name: lambda: run_model(x, budget=budget),
        'full': lambda: run_model(x),
    }
    if mixed:
        row['mixed'] = mixed_setup(model, x)
        candidates['mixed'] = lambda: run_model(x, threshold=row['mixed']['threshold'])
    if compile_backend:  # compile (and for the mixed batch, see every segment's sizes) before anything is timed
        for run in candidates.values():
            for _ in range(3):
                run()
    row['times_ms'] = time_interleaved(candidates, rounds, warmup)
    ms = row['ms'] = {name: statistics.median(v) for name, v in row['times_ms'].items()}
    row['exit_speedup'] = ms['parent'] / ms[exit_name]
    row['trunc_speedup'] = ms['parent'] / ms[trunc_name]
    row['exit_vs_trunc'] = row['exit_speedup'] / row['trunc_speedup']
    row['full_vs_parent'] = ms['full'] / ms['parent']
    if mixed:
        row['mixed']['measured_speedup'] = ms['parent'] / ms['mixed']
        efficiency = row['mixed']['measured_speedup'] / row['mixed']['ideal_speedup']
        row['mixed_efficiency'] = row['mixed']['efficiency'] = efficiency
    return row


def _cell(value: Optional[float], key: str = '', fmt: str = '.3f',
          targets: Optional[Dict[str, Tuple[str, float]]] = None) -> str:
    """Formatted number, marked with '!' when it misses the target of ``key`` (in ``targets``, default this
    benchmark's ``TARGETS``)."""
    if value is None:
        return '-'
    op, target = (TARGETS if targets is None else targets).get(key, (None, None))
    miss = op is not None and not (value >= target if op == '>=' else value <= target)
    return f'{value:{fmt}}' + (' !' if miss else '')


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """One line per (model, batch): ratios first, then the raw medians in ms."""
    head = [
        'model', 'batch', 'exit k', 'exit speed-up', 'trunc speed-up', 'exit/trunc', 'full/parent', 'mixed ideal',
        'mixed measured', 'mixed eff.', 'exit fractions', 'ms parent', 'ms trunc', 'ms exit', 'ms full', 'ms mixed']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        k, ms, mixed = r['exit_layer'], r['ms'], r.get('mixed', {})
        fractions = ' '.join(f'{layer}:{f:.2f}' for layer, f in mixed.get('exit_fractions', {}).items()) or '-'
        cells = [
            r['model'], str(r['batch']), str(k), _cell(r['exit_speedup']), _cell(r['trunc_speedup']),
            _cell(r['exit_vs_trunc'], 'exit_vs_trunc'), _cell(r['full_vs_parent'], 'full_vs_parent'),
            _cell(mixed.get('ideal_speedup')), _cell(mixed.get('measured_speedup')),
            _cell(r.get('mixed_efficiency'), 'mixed_efficiency'), fractions,
            *(_cell(ms.get(name), fmt='.1f') for name in ('parent', f'parent_trunc{k}', f'exit{k}', 'full', 'mixed')),
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    targets = ', '.join(f'{key} {op} {value}' for key, (op, value) in TARGETS.items())
    worst = {r['model']: r['worst_case_threshold_cost'] for r in rows if 'worst_case_threshold_cost' in r}
    notes = ''.join(
        f'\n{name}: with a threshold and no budget an image no exit lets go costs {cost:.3f} of the full model'
        + (' (MORE than the full model: set a budget to cap it)' if cost > 1 else '') + '.'
        for name, cost in worst.items())
    table = '\n'.join(lines) + f'\n\nTargets (not asserted; "!" marks a miss): {targets}.'
    return table + ('\n' + notes if notes else '')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line; ``--quick`` replaces models, batches and rounds by a seconds-long smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], prog='python -m timm_exits.benchmark')
    parser.add_argument('--models', nargs='+', default=['deit_small_patch16_224', 'vit_base_patch16_224'],
                        help='timm parent names or their multi-exit models ("..._mexit"); both are built')
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 32])
    parser.add_argument('--mixed-batch-size', type=int, default=64, help='batch of the mixed-exit run (0: none)')
    parser.add_argument('--rounds', type=int, default=10, help='timed rounds')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, help='also write every number to this JSON file')
    parser.add_argument('--compile', nargs='?', const='inductor', default='', metavar='BACKEND',
                        help='torch.compile every candidate (parent, truncated parent, multi-exit model) with this '
                             'backend (default inductor) and time the compiled code')
    parser.add_argument('--quick', action='store_true',
                        help='CI smoke test: vit_tiny_patch16_224, batches 1 4, mixed batch 8, 3 rounds, <= 1 warm-up, '
                             '1 thread unless --threads')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.mixed_batch_size, args.rounds = ['vit_tiny_patch16_224'], [1, 4], 8, 3
        args.warmup, args.threads = min(args.warmup, 1), args.threads or 1  # 1 thread: no OpenMP stalls on busy CI
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f'--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}')
    if min(args.batch_sizes) < 1 or args.mixed_batch_size < 0:
        parser.error(f'--batch-sizes must be >= 1 and --mixed-batch-size >= 0, got {args.batch_sizes} and '
                     f'{args.mixed_batch_size}')
    known = {n for n in timm.list_models('*_mexit') if timm.is_model(n[:-len('_mexit')]) and not n.startswith('test_')}
    for name in args.models:
        parent = name[:-len('_mexit')] if name.endswith('_mexit') else name
        if f'{parent}_mexit' not in known:
            parser.error(f'--models {name}: no multi-exit model for it; allowed: {sorted(known)} or their parents')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Run the benchmark, print the markdown table, optionally write JSON; return the result rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    batches = [(b, False) for b in args.batch_sizes if b != args.mixed_batch_size]
    batches += [(args.mixed_batch_size, True)] if args.mixed_batch_size > 0 else []
    rows = []
    with torch.inference_mode():
        for name in args.models:
            parent, model = build_models(name)
            for batch, mixed in batches:
                row = benchmark_model(parent, model, batch, args.rounds, args.warmup, mixed, seed=args.seed,
                                      compile_backend=args.compile)
                rows.append({'model': name, 'batch': batch, **row})
                diff = row['full_max_abs_diff']
                print(f'{name} batch {batch}: done (full vs parent max abs diff {diff:.1e})', flush=True)
                if diff > 1e-4:
                    print(f'WARNING: {name} batch {batch}: full-depth output differs from the parent by {diff:.2e}')
    print()
    print(markdown_table(rows))
    if args.json:
        config = {**vars(args), 'torch': torch.__version__, 'timm': timm.__version__,
                  'num_threads': torch.get_num_threads(), 'targets': TARGETS}
        with open(args.json, 'w') as f:
            json.dump({'config': config, 'results': rows}, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
