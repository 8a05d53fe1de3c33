""" Speed of the CNN multi-exit models (``<parent>_mexit`` on a feature-map adapter) against their timm parent.

    python benchmarks/cnn_speed.py [--models resnet50 efficientnet_b0 ...] [--rounds N] [--threads N] [--output F]

Method: that of ``timm_exits.benchmark`` (``time_interleaved``): every candidate of a group runs in the same process
on the same random batch, each round times every candidate once in an order that rotates from round to round, after
some warm-up rounds; per candidate the median over rounds is kept and what is reported are RATIOS of medians of one
run, which cancel most of the machine's drift. Weights are random (the multi-exit model gets the parent's), full size,
eager CPU, torch's default thread count unless ``--threads``: each candidate is timed as it runs in production.
Per model:

1. ``exit`` vs ``trunc`` (batch ``--batch-size``): every image forced by a budget (``budget`` = that exit's
   ``exit_costs`` value) to the exit k nearest the middle of the FLOPs, against the same modules written as plain code
   without the walker: ``exits[k](units[:k] applied to _embed(x))``. Reported: ``trunc_ms / exit_ms`` (target >= 0.95),
   with the parent's full time for context.
2. ``mixed`` (batch ``--mixed-batch-size``): the threshold at the median first-exit score of the batch, so about half
   the images leave at the first exit; measured speed-up over the parent against the ideal ``1 / mean(cost)`` of the
   per-image costs: efficiency = measured / ideal (target >= 0.95). Beside it the time ideal: ``oracle``, the same
   modules as plain code told in advance where each image leaves (each group of images runs the units to its exit and
   the exit heads it passes, nothing else): ``oracle_ms / mixed_ms`` is what the walker's decisions and compaction
   cost (target >= 0.95). The two ideals differ where a CNN's first blocks take a larger share of the time than of
   the FLOPs (wide, shallow maps run at fewer FLOPs per second on a CPU).
3. ``full`` vs ``parent`` (batch ``--batch-size``): time ratio (target <= 1.02) and the max abs difference of the
   logits (must be 0.0).

Targets are shown, never asserted. A model whose ``_mexit`` twin is not registered is skipped, saying so.
"""
import argparse
import json
import os
import platform
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's timm_exits

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import timm_exits  # noqa: E402,F401  (registers the models)
from timm_exits._files import atomic_write  # noqa: E402
from timm_exits.benchmark import _cell as benchmark_cell, mixed_setup, time_interleaved  # noqa: E402
from timm_exits.models.adapters import input_shape  # noqa: E402
from timm_exits.models.multi_exit_vit import MultiExitMixin, _key  # noqa: E402

DEFAULT_MODELS = ['resnet50', 'convnext_tiny', 'efficientnet_b0', 'swin_tiny_patch4_window7_224']
TARGETS = {'exit_vs_trunc': ('>=', 0.95), 'mixed_efficiency': ('>=', 0.95), 'mixed_vs_oracle': ('>=', 0.95),
           'full_vs_parent': ('<=', 1.02)}


def parent_name(name: str) -> str:
    return name[:-len('_mexit')] if name.endswith('_mexit') else name


def skip_reason(name: str) -> Optional[str]:
    """Why ``name`` cannot be benchmarked (None: it can)."""
    parent = parent_name(name)
    if not timm.is_model(parent):
        return f'{parent} is not a timm model'
    if f'{parent}_mexit' not in timm.list_models(f'{parent}_mexit'):
        return f'{parent}_mexit is not registered (no multi-exit twin on this branch)'
    return None


def build_models(name: str, img_size: Optional[int] = None) -> Tuple[nn.Module, MultiExitMixin]:
    """The timm parent and its multi-exit model with the same random weights, eval mode; ``img_size``: the size the
    multi-exit model counts its costs and sizes its exits at (default: the parent's)."""
    parent = parent_name(name)
    num_classes = timm.models.get_pretrained_cfg(parent).num_classes or 1000
    kwargs = {} if img_size is None else {'exit_input_size': (img_size, img_size)}
    ref = timm.create_model(parent, num_classes=num_classes).eval()
    model = timm.create_model(f'{parent}_mexit', num_classes=num_classes, **kwargs).eval()
    if not isinstance(model, MultiExitMixin) or model.state_kind != 'map':
        raise ValueError(f'{parent}_mexit is not a feature-map multi-exit model')
    model.load_state_dict({**model.state_dict(), **ref.state_dict()})
    return ref, model


def middle_exit(model: MultiExitMixin) -> Tuple[int, float]:
    """(k, exit_costs value) of the intermediate exit whose cost is nearest half of the parent's FLOPs."""
    pairs = list(zip(model.exit_layers, model.exit_costs))[:-1]
    return min(pairs, key=lambda p: abs(p[1] - 0.5))


def truncated(model: MultiExitMixin, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The parent cut after unit k with exit k's head, as plain code on the same modules (no walker)."""
    units, head = list(model._units())[:k], model.exits[_key(k)]

    def run(x: torch.Tensor) -> torch.Tensor:
        x = model._embed(x)[0]
        for unit in units:
            for module in unit:
                x = module(x)
        return head(x)
    return run


def oracle(model: MultiExitMixin, x: torch.Tensor, exit_layer: torch.Tensor) -> Callable[[], List[torch.Tensor]]:
    """The time ideal of a mixed batch: each group of images that leaves at exit k, known in advance, runs the units
    to k and the exit heads at or before k as plain code (the final group: every unit, the tail and the parent's
    head)."""
    units, layers, final = list(model._units()), list(model.exit_layers), model.exit_layers[-1]
    groups = [(k, x[exit_layer == k]) for k in layers if bool((exit_layer == k).any())]

    def run() -> List[torch.Tensor]:
        out = []
        for k, xs in groups:
            state = model._embed(xs)[0]
            for i, unit in enumerate(units[:k], 1):
                for module in unit:
                    state = module(state)
                if i in layers and i < final:
                    logits = model.exits[_key(i)](state)
            out.append(model.forward_head(model._tail(state)) if k == final else logits)
        return out
    return run


def _medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(v) for name, v in times.items()}


def benchmark_model(name: str, parent: nn.Module, model: MultiExitMixin, batch: int, mixed_batch: int,
                    rounds: int, warmup: int, seed: int = 0) -> Dict[str, Any]:
    """Time the three comparisons of one model; return medians (ms), raw times, ratios and checks."""
    shape = input_shape(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen)
    k, budget = middle_exit(model)
    trunc = truncated(model, k)
    forced = model.forward_dynamic(x, budget=budget)
    row: Dict[str, Any] = {
        'model': name, 'batch': batch, 'mixed_batch': mixed_batch, 'input_shape': list(shape),
        'exit_layers': list(model.exit_layers), 'exit_costs': [float(c) for c in model.exit_costs],
        'mid_exit': k, 'budget': float(budget),
        'forced_all_at_mid_exit': bool((forced.exit_layer == k).all()),
        'exit_vs_trunc_max_abs_diff': float((forced.logits - trunc(x)).abs().max()),
        'full_max_abs_diff': float((model(x) - parent(x)).abs().max()),
    }
    times = time_interleaved({
        'parent': lambda: parent(x),
        'trunc': lambda: trunc(x),
        'exit': lambda: model(x, budget=budget),
        'full': lambda: model(x),
    }, rounds, warmup)
    xm = torch.randn(mixed_batch, *shape, generator=gen)
    mixed = mixed_setup(model, xm)
    threshold = mixed['threshold']
    dynamic = model.forward_dynamic(xm, threshold=threshold)
    ideal = oracle(model, xm, dynamic.exit_layer)
    order = torch.cat([torch.nonzero(dynamic.exit_layer == k).flatten() for k in model.exit_layers])
    row['oracle_max_abs_diff'] = float((torch.cat(ideal()) - dynamic.logits[order]).abs().max())
    times_mixed = time_interleaved({
        'parent': lambda: parent(xm),
        'mixed': lambda: model(xm, threshold=threshold),
        'oracle': ideal,
    }, rounds, warmup)
    ms, ms_mixed = _medians(times), _medians(times_mixed)
    mixed['measured_speedup'] = ms_mixed['parent'] / ms_mixed['mixed']
    mixed['efficiency'] = mixed['measured_speedup'] / mixed['ideal_speedup']
    mixed['oracle_speedup'] = ms_mixed['parent'] / ms_mixed['oracle']
    mixed['vs_oracle'] = ms_mixed['oracle'] / ms_mixed['mixed']
    row.update({
        'times_ms': times, 'ms': ms, 'times_mixed_ms': times_mixed, 'ms_mixed': ms_mixed, 'mixed': mixed,
        'exit_vs_trunc': ms['trunc'] / ms['exit'],
        'exit_speedup': ms['parent'] / ms['exit'],
        'trunc_speedup': ms['parent'] / ms['trunc'],
        'mixed_efficiency': mixed['efficiency'],
        'mixed_vs_oracle': mixed['vs_oracle'],
        'full_vs_parent': ms['full'] / ms['parent'],
    })
    return row


def _cell(value: Optional[float], key: str = '', fmt: str = '.3f') -> str:
    """``timm_exits.benchmark``'s cell, against this benchmark's ``TARGETS``."""
    return benchmark_cell(value, key, fmt, TARGETS)


TABLE_HEAD = ['model', 'mid exit k (cost)', 'trunc/exit', 'ms parent', 'ms trunc', 'ms exit', 'mixed exit fractions',
              'mixed ideal (FLOPs)', 'mixed measured', 'mixed eff.', 'oracle speed-up', 'mixed/oracle', 'full/parent',
              'full max abs diff']


def markdown_table(rows: Sequence[Dict[str, Any]], skipped: Optional[Dict[str, str]] = None) -> str:
    """One line per model: the three comparisons' ratios and the medians behind comparison 1."""
    lines = ['| ' + ' | '.join(TABLE_HEAD) + ' |', '|' + '---|' * len(TABLE_HEAD)]
    for r in rows:
        ms, mixed = r['ms'], r['mixed']
        fractions = ' '.join(f'{layer}:{f:.2f}' for layer, f in mixed['exit_fractions'].items())
        cells = [
            r['model'], f"{r['mid_exit']} ({r['budget']:.3f})", _cell(r['exit_vs_trunc'], 'exit_vs_trunc'),
            *(_cell(ms[n], fmt='.1f') for n in ('parent', 'trunc', 'exit')), fractions,
            _cell(mixed['ideal_speedup']), _cell(mixed['measured_speedup']),
            _cell(r['mixed_efficiency'], 'mixed_efficiency'), _cell(mixed['oracle_speedup']),
            _cell(r['mixed_vs_oracle'], 'mixed_vs_oracle'), _cell(r['full_vs_parent'], 'full_vs_parent'),
            f"{r['full_max_abs_diff']:g}",
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    targets = ', '.join(f'{key} {op} {value}' for key, (op, value) in TARGETS.items())
    text = '\n'.join(lines) + f'\n\nTargets (not asserted; "!" marks a miss): {targets} (trunc/exit = exit_vs_trunc, ' \
                              'mixed/oracle = mixed_vs_oracle); full max abs diff must be 0.'
    for name, why in (skipped or {}).items():
        text += f'\nskipped {name}: {why}.'
    return text


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], prog='python benchmarks/cnn_speed.py')
    parser.add_argument('--models', nargs='+', default=None,
                        help=f'timm parents (or their "_mexit" twins); default {" ".join(DEFAULT_MODELS)}')
    parser.add_argument('--batch-size', type=int, default=32, help='batch of comparisons 1 and 3')
    parser.add_argument('--mixed-batch-size', type=int, default=64, help='batch of the mixed-exit comparison')
    parser.add_argument('--rounds', type=int, default=None, help='timed rounds (default 9, --quick 2)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed rounds first (default 2, --quick 1)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--img-size', type=int, default=None, help='input size (default: the parent\'s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default=None, help='also write every number to this JSON file')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: resnet10t (unless --models) at 64 px, batch 4, mixed batch 8, 2 rounds, '
                             '1 warm-up, 1 thread unless --threads')
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models or ['resnet10t']
        args.img_size = args.img_size or 64
        args.batch_size, args.mixed_batch_size = min(args.batch_size, 4), min(args.mixed_batch_size, 8)
        args.rounds = args.rounds or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.threads = args.threads or 1  # a smoke run on a busy CI machine: no OpenMP stalls
    args.models = args.models or list(DEFAULT_MODELS)
    args.rounds = 9 if args.rounds is None else args.rounds
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.rounds < 1 or args.warmup < 0 or args.batch_size < 1 or args.mixed_batch_size < 2:
        parser.error('--rounds >= 1, --warmup >= 0, --batch-size >= 1 and --mixed-batch-size >= 2 needed')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark, print the markdown table, optionally write JSON; return {'config', 'results', 'skipped',
    'table'}."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a caller's (a test's) process keeps its thread count


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    rows, skipped = [], {}
    with torch.inference_mode():
        for name in args.models:
            why = skip_reason(name)
            if why:
                skipped[name] = why
                print(f'skipping {name}: {why}', flush=True)
                continue
            parent, model = build_models(name, args.img_size)
            row = benchmark_model(name, parent, model, args.batch_size, args.mixed_batch_size, args.rounds,
                                  args.warmup, args.seed)
            rows.append(row)
            print(f'{name}: done (trunc/exit {row["exit_vs_trunc"]:.3f}, mixed eff. {row["mixed_efficiency"]:.3f}, '
                  f'mixed/oracle {row["mixed_vs_oracle"]:.3f}, '
                  f'full/parent {row["full_vs_parent"]:.3f}, full max abs diff {row["full_max_abs_diff"]:g})',
                  flush=True)
            if row['full_max_abs_diff'] != 0.0:
                print(f'WARNING: {name}: full depth differs from the parent by {row["full_max_abs_diff"]:g}')
            if not row['forced_all_at_mid_exit']:
                print(f'WARNING: {name}: budget {row["budget"]:g} did not send every image to exit {row["mid_exit"]}')
    table = markdown_table(rows, skipped)
    print()
    print(table)
    config = {**vars(args), 'torch': torch.__version__, 'timm': timm.__version__,
              'num_threads': torch.get_num_threads(),
              'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'targets': TARGETS}
    result = {'config': config, 'results': rows, 'skipped': skipped, 'table': table}
    if args.output:  # atomically: a killed run leaves no half-written file
        atomic_write(args.output, lambda tmp: open(tmp, 'w').write(json.dumps(result, indent=2)))
    return result


if __name__ == '__main__':
    main()
