""" Speed of the staged ONNX export on ONNX Runtime against the ONNX export of the timm parent:
``python -m timm_exits.benchmark_onnx``.

Same method as ``timm_exits.benchmark``: one process, one input, interleaved rounds in rotating order, ratios of
medians. Every graph is exported by torch.onnx's dynamo exporter and run by onnxruntime (CPU execution provider unless
``--providers``); weights are random, the early-exit model carries the parent's backbone weights. Each candidate runs
as it does in production: a single graph in one ``onnxruntime.InferenceSession`` with onnxruntime's default options
(what a user of the parent's graph gets), an export through ``ExitSession`` with its defaults (no thread-pool
spinning between segments); an untimed pause after every call (``--pause-ms``) lets a pool that spins after its run
go idle before the next candidate, as when each runs alone. Candidates per (parent, batch):

- ``parent``: the ONNX export of the timm parent; ``parent_nospin`` the same graph with spinning off (shown in ms).
- ``full``: ``ExitSession(...)(x)`` at full depth (no threshold, no budget): what the segment graphs and the loop cost.
- ``trunc{k}``: the ONNX export of timm's own backbone cut after block k, the first exit.
- ``exit{k}``: ``ExitSession(...)(x, budget=b)`` with the budget of exit k: every image leaves at block k.
- ``mixed`` (at ``--mixed-batch-size``): the threshold at the median exit-k score of the batch, about half the
  images leave at block k and the rest later; ideal speed-up 1 / mean(per-image FLOP share).
- ``slim{rho}`` (parents with a ``_liferegress`` model): the static LifeRegress export at keep rate rho; ideal speed-up
  1 / its FLOPs ratio; ``oracle{rho}``: the same blocks on the same token schedule keeping the first n_t patches (no
  life module, no top-k, no gather), exported the same way and run with ``ExitSession``'s options:
  ``slim/oracle`` is what the selection costs.
- ``both{rho}``: the staged export of ``<parent>_mexit_liferegress`` at keep rate rho, full depth (every segment,
  no exit head before the final one): exits and slimming on ONNX Runtime; ideal speed-up 1 / its FLOPs ratio.

Targets (shown, never asserted): full / parent (time) <= 1.05, exit/trunc >= 0.95, mixed efficiency (measured /
ideal) >= 0.90, slim/oracle >= 0.95, and LifeRegress's efficiency reported against the same parent graph.
"""
import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import timm

from .benchmark import build_models, mixed_setup, oracle_forward, time_interleaved, truncated_parent
from .export import _export_graph, export_onnx
from .models.adapters import input_shape

__all__ = ['benchmark_onnx', 'main']

TARGETS = {'full_vs_parent': ('<=', 1.05), 'exit_vs_trunc': ('>=', 0.95), 'mixed_efficiency': ('>=', 0.90),
           'slim_vs_oracle': ('>=', 0.95)}


class _Oracle(torch.nn.Module):
    """``benchmark_slim.oracle_forward`` on a fixed token schedule, as a module to export."""

    def __init__(self, model: torch.nn.Module, counts: Sequence[int]) -> None:
        super().__init__()
        self.model, self.counts = model, list(counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return oracle_forward(self.model, x, self.counts)


def _session(module: torch.nn.Module, example: torch.Tensor, path: Path, providers: Sequence[str],
             options: Any = None) -> Callable:
    """One graph in one session, with onnxruntime's default options unless ``options``."""
    import onnxruntime as ort
    if not path.exists():
        _export_graph(module.eval(), example, path, ['logits'], 'benchmark')
    sess = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    return lambda x: sess.run(None, {'input': x})[0]


def benchmark_onnx(
        name: str,
        batches: Sequence[int],
        mixed_batch: int,
        keep_rate: float,
        rounds: int,
        warmup: int,
        providers: Sequence[str],
        workdir: Path,
        seed: int = 0,
        pause_ms: float = 50.,
) -> List[Dict[str, Any]]:
    """Rows of ratios (and medians in ms) for the parent ``name``, one per batch size."""
    from .runtime import ExitSession, default_session_options
    parent, model = build_models(name)
    first = model.exit_layers[0]
    size = input_shape(model)
    example = torch.randn(2, *size)
    run_parent = _session(parent, example, workdir / f'{name}.onnx', providers)
    run_parent_nospin = _session(parent, example, workdir / f'{name}.onnx', providers, default_session_options())
    assert model.threshold is None, 'the full-depth candidate needs a model without a default threshold'
    run_trunc = _session(truncated_parent(parent, first), example, workdir / f'{name}_trunc.onnx', providers)
    staged = ExitSession(export_onnx(model, workdir / f'{name}_mexit', f'{name}_mexit'), providers=providers)
    slim, slim_ratio = None, None
    life_names = [n for n in (f'{name}_liferegress', name.replace('_patch16_224', '_liferegress')) if
                  timm.is_model(n)]
    if life_names:
        life = timm.create_model(life_names[0]).eval()
        life.load_state_dict({**life.state_dict(), **parent.state_dict()})
        slim = ExitSession(export_onnx(life, workdir / f'{name}_slim', keep_rate=keep_rate), providers=providers)
        slim_ratio = life.flops_ratio(keep_rate)
        run_oracle = _session(_Oracle(life, life.token_schedule(keep_rate)), example, workdir / f'{name}_oracle.onnx',
                              providers, default_session_options())
    both_model = timm.create_model(f'{name}_mexit_liferegress', num_classes=model.num_classes).eval()
    both_model.load_state_dict({**both_model.state_dict(), **parent.state_dict()}, strict=False)
    both = ExitSession(export_onnx(both_model, workdir / f'{name}_both', keep_rate=keep_rate), providers=providers)
    both_ratio = both_model.flops_ratio(keep_rate)
    budget = model.exit_costs[0]
    rows = []
    for batch in sorted({*batches, *([mixed_batch] if mixed_batch else [])}):
        gen = torch.Generator().manual_seed(seed + batch)
        xt = torch.randn(batch, *size, generator=gen)
        x = xt.numpy()
        row: Dict[str, Any] = {'model': name, 'batch': batch, 'exit_layer': first, 'providers': list(providers)}
        row['full_max_abs_diff'] = float(np.abs(run_parent(x) - staged(x).logits).max())
        candidates = {
            'parent': lambda: run_parent(x),
            'parent_nospin': lambda: run_parent_nospin(x),
            'full': lambda: staged(x),
            f'trunc{first}': lambda: run_trunc(x),
            f'exit{first}': lambda: staged(x, budget=budget),
        }
        if batch == mixed_batch:
            with torch.inference_mode():
                row['mixed'] = mixed_setup(model, xt)
            candidates['mixed'] = lambda: staged(x, threshold=row['mixed']['threshold'])
        if slim is not None:
            candidates[f'slim{keep_rate:g}'] = lambda: slim(x)
            candidates[f'oracle{keep_rate:g}'] = lambda: run_oracle(x)
        candidates[f'both{keep_rate:g}'] = lambda: both(x)
        times = time_interleaved(candidates, rounds, warmup, pause_ms / 1e3)
        ms = row['ms'] = {k: statistics.median(v) for k, v in times.items()}
        row['full_vs_parent'] = ms['full'] / ms['parent']
        row['exit_speedup'] = ms['parent'] / ms[f'exit{first}']
        row['trunc_speedup'] = ms['parent'] / ms[f'trunc{first}']
        row['exit_vs_trunc'] = row['exit_speedup'] / row['trunc_speedup']
        if 'mixed' in row:
            row['mixed']['measured_speedup'] = ms['parent'] / ms['mixed']
            row['mixed_efficiency'] = row['mixed']['measured_speedup'] / row['mixed']['ideal_speedup']
        if slim is not None:
            row['slim'] = {'keep_rate': keep_rate, 'flops_ratio': slim_ratio, 'ideal_speedup': 1 / slim_ratio,
                           'measured_speedup': ms['parent'] / ms[f'slim{keep_rate:g}']}
            row['slim']['efficiency'] = row['slim']['measured_speedup'] / row['slim']['ideal_speedup']
            row['slim']['vs_oracle'] = row['slim_vs_oracle'] = ms[f'oracle{keep_rate:g}'] / ms[f'slim{keep_rate:g}']
        row['both'] = {'keep_rate': keep_rate, 'flops_ratio': both_ratio, 'ideal_speedup': 1 / both_ratio,
                       'measured_speedup': ms['parent'] / ms[f'both{keep_rate:g}']}
        row['both']['efficiency'] = row['both']['measured_speedup'] / row['both']['ideal_speedup']
        rows.append(row)
        print(f'{name} batch {batch}: done', flush=True)
    return rows


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ['model', 'batch', 'full/parent', 'exit k', 'exit speed-up', 'trunc speed-up', 'exit/trunc', 'mixed ideal',
            'mixed measured', 'mixed eff.', 'slim rho', 'slim ideal', 'slim measured', 'slim eff.', 'slim/oracle',
            'both measured', 'both eff.', 'ms parent', 'ms parent no spin']

    def f(v: Optional[float], fmt: str = '.3f') -> str:
        return '-' if v is None else format(v, fmt)

    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        mixed, slim = r.get('mixed', {}), r.get('slim', {})
        lines.append('| ' + ' | '.join([
            r['model'], str(r['batch']), f(r['full_vs_parent']), str(r['exit_layer']), f(r['exit_speedup']),
            f(r['trunc_speedup']),
            f(r['exit_vs_trunc']), f(mixed.get('ideal_speedup')), f(mixed.get('measured_speedup')),
            f(r.get('mixed_efficiency')), f(slim.get('keep_rate'), 'g'), f(slim.get('ideal_speedup')),
            f(slim.get('measured_speedup')), f(slim.get('efficiency')), f(slim.get('vs_oracle')),
            f(r['both']['measured_speedup']), f(r['both']['efficiency']), f(r['ms']['parent'], '.1f'),
            f(r['ms']['parent_nospin'], '.1f')]) + ' |')
    targets = ', '.join(f'{k} {op} {v}' for k, (op, v) in TARGETS.items())
    return '\n'.join(lines) + f'\n\nTargets (not asserted): {targets}.'


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(prog='python -m timm_exits.benchmark_onnx',
                                     description=__doc__.split('\n\n')[0].replace('``', ''))
    parser.add_argument('--models', nargs='+', default=['deit_small_patch16_224'], help='timm parent names')
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 64])
    parser.add_argument('--mixed-batch-size', type=int, default=64, help='batch of the mixed-exit run (0: none)')
    parser.add_argument('--keep-rate', type=float, default=0.7, help='LifeRegress keep rate')
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--providers', nargs='+', default=['CPUExecutionProvider'], help='onnxruntime providers')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--pause-ms', type=float, default=50.,
                        help='untimed pause after every call, so that spinning thread pools are idle before the next')
    parser.add_argument('--json', default=None, help='also write every number to this JSON file')
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or min(args.batch_sizes) < 1 or args.mixed_batch_size < 0 or \
            not 0 <= args.pause_ms < float('inf'):
        parser.error('--rounds and --batch-sizes must be >= 1, --warmup, --mixed-batch-size and --pause-ms >= 0')
    if not 0 < args.keep_rate <= 1:
        parser.error(f'--keep-rate must be in (0, 1], got {args.keep_rate}')
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            name = name[:-len('_mexit')] if name.endswith('_mexit') else name
            rows += benchmark_onnx(name, args.batch_sizes, args.mixed_batch_size, args.keep_rate, args.rounds,
                                   args.warmup, args.providers, Path(work), args.seed, args.pause_ms)
    print()
    print(markdown_table(rows))
    if args.json:
        import onnxruntime
        config = {**vars(args), 'torch': torch.__version__, 'timm': timm.__version__,
                  'onnxruntime': onnxruntime.__version__, 'targets': TARGETS}
        Path(args.json).write_text(json.dumps({'config': config, 'results': rows}, indent=2))
    return rows


if __name__ == '__main__':
    main()
