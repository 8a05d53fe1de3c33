""" Load generator: the timm parent and three ways of serving its early-exit twin, under the same Poisson arrivals.

    python -m timm_exits.serving.load --model deit_tiny_patch16_224 --img-size 64 --requests 320 --rounds 3 \\
        --threads 1 --output docs/serving_load.json --plot docs/serving_load.png

In one process, on one model's weights, each configuration serves single-image requests through ``ExitScheduler``
(the same batching code, ``max_batch_size`` and ``max_wait_ms`` for all):

- ``parent``: the timm parent with ordinary dynamic batching (a batch answers when it is done);
- ``batched``: the early-exit twin (threshold below), ordinary dynamic batching (``policy='batch'``);
- ``early``: early answers, one batch at a time (``policy='early'``);
- ``refill``: early answers and segments refilled from new requests and other batches' survivors
  (``policy='continuous'``).

Arrivals are open-loop Poisson at fractions of the parent's measured saturation throughput, plus a burst of every
request at once (throughput at saturation). Bounded: ``--requests`` per run and ``--max-seconds`` per run; nothing
leaves the process. Configurations run interleaved (the order rotates each round) and every figure is reported as a
ratio to the parent of the same round, then the median over rounds. The threshold is set so that about half of the
images leave at the first exit (the median of the first exit's criterion on the images served).
"""
import argparse
import json
import math
import random
import statistics
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

import timm

from .._files import atomic_write
from ..benchmark import time_interleaved
from ..models import convert
from ..models.walker import ExitWalker
from . import ExitScheduler

__all__ = ['CONFIGS', 'main', 'measure', 'run_load']

CONFIGS = (('parent', 'batch'), ('batched', 'batch'), ('early', 'early'), ('refill', 'continuous'))


def run_load(scheduler: ExitScheduler, images: torch.Tensor, rate: Optional[float], requests: int,
             max_seconds: float, seed: int, threshold: Optional[float] = None) -> Dict[str, Any]:
    """Submit ``requests`` images (cycling over ``images``) at Poisson times of ``rate`` per second (None: all at
    once), for at most ``max_seconds``; per-request latencies (s), throughput (answers per second from the first
    submission to the last answer), mean cost and exits."""
    rng = random.Random(seed)
    latencies: List[Optional[float]] = [None] * requests
    answers: List[Any] = [None] * requests
    finished = threading.Event()
    lock = threading.Lock()
    count = [0, 0]  # submitted, done
    last = [0.]

    def done(i: int, t0: float, future: Any) -> None:
        now = time.perf_counter()
        with lock:
            latencies[i], last[0] = now - t0, max(last[0], now)
            answers[i] = None if future.exception() else future.result()
            count[1] += 1
            if count[1] == count[0] and submitting_over[0]:
                finished.set()

    submitting_over = [False]
    start = time.perf_counter()
    due = start
    for i in range(requests):
        if rate is not None:
            due += rng.expovariate(rate)
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        if time.perf_counter() - start > max_seconds:
            break
        t0 = time.perf_counter()
        future = scheduler.submit(images[i % len(images)], threshold=threshold)
        with lock:
            count[0] += 1
        future.add_done_callback(lambda f, i=i, t0=t0: done(i, t0, f))
    with lock:
        submitting_over[0] = True
        if count[1] == count[0]:
            finished.set()
    finished.wait(max_seconds * 4 + 60)
    got = [(lat, a) for lat, a in zip(latencies, answers) if lat is not None and a is not None]
    lat = sorted(x for x, _ in got)
    return {
        'submitted': count[0], 'answered': len(got), 'offered_rate': rate,
        'throughput': len(got) / (last[0] - start) if got else 0.,
        'median_ms': 1e3 * statistics.median(lat) if lat else math.nan,
        'p99_ms': 1e3 * lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else math.nan,
        'mean_cost': statistics.fmean(a.cost for _, a in got) if got else math.nan,
        'first_exit_share': statistics.fmean(float(a.exit_layer == min(x.exit_layer for _, x in got))
                                             for _, a in got) if got else math.nan,
    }


def _median_first_exit_score(model: torch.nn.Module, images: torch.Tensor) -> float:
    """The first exit's criterion on ``images``, its median: the threshold at which about half leave there."""
    walker: ExitWalker = model.exit_walker(threshold=1.)
    with torch.no_grad():
        step = walker.step(walker.start(images))
        scores = model.exit_scores(step.exit_layer, step.logits)
    return float(scores.median())


def measure(model_name: str, img_size: int, num_classes: int, requests: int, rounds: int, loads: Sequence[float],
            max_batch_size: int, max_wait_ms: float, max_seconds: float, seed: int = 0,
            exit_layers: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Every configuration at saturation and at each load (a fraction of the parent's saturation throughput),
    interleaved over ``rounds``; ratios to the parent of the same round, medians over rounds."""
    torch.manual_seed(seed)
    parent = timm.create_model(model_name, img_size=img_size, num_classes=num_classes).eval()
    kwargs = {} if exit_layers is None else {'exit_layers': tuple(exit_layers)}
    twin = convert(parent, 'mexit', **kwargs).eval()
    images = torch.randn(max(requests, 64), 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    threshold = _median_first_exit_score(twin, images)
    models = {'parent': parent, 'batched': twin, 'early': twin, 'refill': twin}

    def one(config: str, policy: str, rate: Optional[float], run_seed: int, n: int = requests) -> Dict[str, Any]:
        with ExitScheduler(models[config], max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                           policy=policy) as scheduler:
            out = run_load(scheduler, images, rate, n, max_seconds, run_seed, None if config == 'parent' else threshold)
        stats = scheduler.stats()
        out['images_per_segment'] = stats['rows'] / max(stats['segments'], 1)
        return out

    for config, policy in CONFIGS:  # warm-up: the FLOPs counted, the allocator's pools filled
        one(config, policy, None, 0, n=2 * max_batch_size)
    saturation = statistics.median(one('parent', 'batch', None, k)['throughput'] for k in range(2))
    rates = [None] + [f * saturation for f in loads]
    runs: List[Dict[str, Any]] = []
    overhead: List[float] = []
    for r in range(rounds):
        overhead.append(walk_overhead(parent, twin, images[:max_batch_size]))
        for k, rate in enumerate(rates):
            order = list(CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)])
            for config, policy in order:
                out = one(config, policy, rate, seed * 1000 + r * 10 + k)
                out.update(config=config, round=r, load=None if rate is None else loads[k - 1])
                runs.append(out)
                print(f'round {r} load {out["load"] or "saturation"} {config:8s} answered {out["answered"]:4d} '
                      f'throughput {out["throughput"]:7.1f}/s median {out["median_ms"]:8.1f} ms p99 '
                      f'{out["p99_ms"]:8.1f} ms mean cost {out["mean_cost"]:.3f}', flush=True)
    return {'model': model_name, 'img_size': img_size, 'num_classes': num_classes, 'exit_layers':
            list(twin.exit_layers), 'threshold': threshold, 'criterion': twin.exit_criterion, 'requests': requests,
            'rounds': rounds, 'loads': list(loads), 'max_batch_size': max_batch_size, 'max_wait_ms': max_wait_ms,
            'parent_saturation_calibration': saturation, 'torch_threads': torch.get_num_threads(),
            'walk_overhead': overhead, 'walk_flops': twin.threshold_costs[-1], 'runs': runs,
            'summary': summarise(runs, loads)}


def walk_overhead(parent: torch.nn.Module, twin: torch.nn.Module, x: torch.Tensor, reps: int = 5) -> float:
    """Time of one batch walked through every segment with every head (no image leaving before the last exit) over
    the parent's time on it, interleaved, median of ``reps``: the walk's fixed costs (its FLOPs are
    ``twin.threshold_costs[-1]`` of the parent's)."""
    with torch.no_grad():
        times = time_interleaved({'parent': lambda: parent(x), 'walk': lambda: twin.forward_dynamic(x, threshold=1.)},
                                 rounds=reps, warmup=0)
    return statistics.median(w / p for p, w in zip(times['parent'], times['walk']))


def summarise(runs: List[Dict[str, Any]], loads: Sequence[float],
              configs: Sequence[tuple] = CONFIGS) -> Dict[str, Any]:
    """Per configuration and load: the medians over rounds of each figure and of its ratio to the parent's."""
    out: Dict[str, Any] = {}
    for load in [None, *loads]:
        key = 'saturation' if load is None else f'{load:g}'
        out[key] = {}
        for config, _ in configs:
            mine = [r for r in runs if r['config'] == config and r['load'] == load]
            row: Dict[str, Any] = {}
            for figure in ('throughput', 'median_ms', 'p99_ms', 'mean_cost', 'first_exit_share', 'images_per_segment'):
                if figure not in mine[0]:
                    continue
                row[figure] = statistics.median(r[figure] for r in mine)
                ratios = []
                for r in mine:
                    base = next(p for p in runs if p['config'] == 'parent' and p['load'] == load
                                and p['round'] == r['round'])
                    if base[figure]:
                        ratios.append(r[figure] / base[figure])
                row[f'{figure}_ratio'] = statistics.median(ratios) if ratios else math.nan
            out[key][config] = row
    return out


def plot(result: Dict[str, Any], path: str) -> None:
    """Latency against offered load (median and p99) and throughput at saturation, each as a ratio to the parent."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    summary, loads = result['summary'], result['loads']
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    colours = {'parent': 'grey', 'batched': 'tab:orange', 'early': 'tab:blue', 'refill': 'tab:green'}
    for config, _ in CONFIGS:
        med = [summary[f'{f:g}'][config]['median_ms'] for f in loads]
        p99 = [summary[f'{f:g}'][config]['p99_ms'] for f in loads]
        a.plot(loads, med, 'o-', color=colours[config], label=f'{config} median')
        a.plot(loads, p99, 'x--', color=colours[config], alpha=.6, label=f'{config} p99')
    a.set_xlabel("offered load (share of the parent's saturation throughput)")
    a.set_ylabel('latency (ms)')
    a.set_yscale('log')
    a.grid(alpha=.3)
    a.legend(fontsize=7, ncol=2)
    sat = summary['saturation']
    names = [c for c, _ in CONFIGS]
    b.bar(names, [sat[c]['throughput_ratio'] for c in names], color=[colours[c] for c in names])
    bound = 1 / sat['refill']['mean_cost']
    b.axhline(bound, color='k', lw=1, label=f'FLOPs bound 1/mean cost = {bound:.2f}')
    b.axhline(0.9 * bound, color='k', lw=1, ls='--', label='0.9 x bound')
    b.set_ylabel("throughput at saturation / parent's")
    b.legend(fontsize=7)
    b.grid(alpha=.3, axis='y')
    fig.suptitle(f'{result["model"]} at {result["img_size"]} px, exits {result["exit_layers"]}, threshold '
                 f'{result["threshold"]:.4f}, batch <= {result["max_batch_size"]}, '
                 f'wait <= {result["max_wait_ms"]:g} ms', fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)


def table(result: Dict[str, Any], load: float, configs: Sequence[tuple] = CONFIGS) -> str:
    """A markdown table of the ratios to the parent: throughput at saturation, latency at ``load``."""
    sat, at = result['summary']['saturation'], result['summary'][f'{load:g}']
    lines = [f'| serving | throughput at saturation | median latency at {load:g} | p99 latency at {load:g} | '
             f'mean cost | first exit |', '|---|---|---|---|---|---|']
    for config, _ in configs:
        lines.append(f'| {config} | {sat[config]["throughput_ratio"]:.2f} ({sat[config]["throughput"]:.0f}/s) | '
                     f'{at[config]["median_ms_ratio"]:.2f} ({at[config]["median_ms"]:.0f} ms) | '
                     f'{at[config]["p99_ms_ratio"]:.2f} ({at[config]["p99_ms"]:.0f} ms) | '
                     f'{sat[config]["mean_cost"]:.3f} | {sat[config]["first_exit_share"]:.2f} |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='deit_tiny_patch16_224', help='a timm VisionTransformer / Eva parent')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--exit-layers', type=int, nargs='+', default=None, help='default: the family\'s')
    parser.add_argument('--requests', type=int, default=160, help='requests per run (bound)')
    parser.add_argument('--max-seconds', type=float, default=30., help='seconds of arrivals per run (bound)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--loads', type=float, nargs='+', default=[0.3, 0.5, 0.7, 0.85],
                        help="offered loads, shares of the parent's saturation throughput")
    parser.add_argument('--report-load', type=float, default=0.7, help='the load of the latency ratios reported')
    parser.add_argument('--max-batch-size', type=int, default=16)
    parser.add_argument('--max-wait-ms', type=float, default=5.)
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (1 keeps a shared machine\'s noise out of parallel regions)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default=None, help='JSON of every run and the summary')
    parser.add_argument('--plot', default=None, help='PNG of latency against load and throughput at saturation')
    args = parser.parse_args(argv)
    for name in ('requests', 'rounds', 'max_batch_size', 'img_size', 'num_classes'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.report_load not in args.loads:
        parser.error(f'--report-load {args.report_load:g} must be one of --loads {args.loads}')
    if any(not 0 < f for f in args.loads) or args.max_seconds <= 0:
        parser.error('--loads must be > 0 and --max-seconds > 0')
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.model, args.img_size, args.num_classes, args.requests, args.rounds, args.loads,
                     args.max_batch_size, args.max_wait_ms, args.max_seconds, args.seed, args.exit_layers)
    print(table(result, args.report_load))
    if args.output:
        atomic_write(args.output, lambda tmp: open(tmp, 'w').write(json.dumps(result, indent=1)))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
