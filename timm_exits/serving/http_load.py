""" The load generator over HTTP: the timm parent and its early-exit twin as Ray Serve deployments, called as users
call them (``pip install "timm-exits[serve]"``).

    python -m timm_exits.serving.http_load --model deit_tiny_patch16_224 --img-size 64 --requests 320 --rounds 3 \\
        --replicas 1 2 --output docs/serving_http.json

A local Ray instance on 127.0.0.1 serves four applications from the same weights (the models are passed to the
deployments): the parent and its ``_mexit`` twin (the threshold at which about half of the images leave at the first
exit), each with one and with two replicas (``ExitDeployment``: the same ``ExitScheduler`` batching for both). Clients
POST encoded image files (PNG) through Ray Serve's HTTP proxy: open-loop Poisson arrivals from a pool of
``--concurrency`` client threads (one keep-alive connection each), at shares of the parent's saturation throughput with
the same number of replicas, plus a burst of every request at once (saturation). The runs are interleaved (the order
rotates each round) and every figure is reported as its ratio to the parent with as many replicas in the same round,
then the median over rounds, as ``timm_exits.serving.load`` does in-process. Each replica runs ``--torch-threads``
threads (default: the machine's cores shared among the replicas), as a deployment on this machine would.
"""
import argparse
import copy
import http.client
import io
import json
import os
import statistics
import threading
import types
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

import torch

import timm

from .._files import atomic_write
from ..models import convert
from .load import _median_first_exit_score, run_load, summarise, table

__all__ = ['HttpClient', 'CONFIGS', 'main', 'measure']

CONFIGS = (('parent', 'http'), ('early', 'http'))


class HttpClient:
    """``submit(body, threshold)``: a ``Future`` of one POST of an image file to ``http://127.0.0.1:port{route}``,
    sent by a pool of ``concurrency`` threads with one keep-alive connection each; it resolves to the answer's
    ``exit_layer`` and ``cost`` (an error status raises)."""

    def __init__(self, port: int, route: str, concurrency: int = 64, timeout: float = 120.) -> None:
        self.port, self.route, self.timeout = port, route.rstrip('/') + '/', timeout
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix='http-client')
        self.local = threading.local()

    def _post(self, body: bytes, threshold: Optional[float]) -> types.SimpleNamespace:
        conn = getattr(self.local, 'conn', None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=self.timeout)
        query = '' if threshold is None else f'?threshold={threshold!r}'
        try:
            conn.request('POST', self.route + query, body=body, headers={'Content-Type': 'application/octet-stream'})
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            self.local.conn = None  # a dropped keep-alive connection: the next request opens a new one
            conn.close()
            raise
        if response.status != 200:
            raise RuntimeError(f'HTTP {response.status}: {payload[:200]!r}')
        answer = json.loads(payload)
        return types.SimpleNamespace(exit_layer=answer['exit_layer'], cost=answer['cost'])

    def submit(self, body: bytes, threshold: Optional[float] = None) -> Future:
        return self.pool.submit(self._post, body, threshold)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def encoded_images(count: int, img_size: int, seed: int) -> List[bytes]:
    """``count`` random RGB images of ``img_size`` px as PNG files (what a client uploads)."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (img_size, img_size, 3), generator=gen, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels, 'RGB').save(buf, format='PNG')
        out.append(buf.getvalue())
    return out


def _deploy(name: str, model: torch.nn.Module, replicas: int, threads: int, threshold: Optional[float],
            max_batch_size: int, max_wait_ms: float) -> None:
    from ray import serve
    from .ray import build_app
    args = dict(model=model, threshold=threshold, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                torch_threads=threads, top_k=1)
    # replicas take no logical CPU: the deployments of both models wait side by side, one runs at a time
    serve.run(build_app(args, num_replicas=replicas, ray_actor_options={'num_cpus': 0}), name=name,
              route_prefix=f'/{name}')


def _threshold(twin: torch.nn.Module, bodies: Sequence[bytes]) -> float:
    """The first exit's median criterion on the images as the endpoint preprocesses them."""
    from .ray import Preprocessor
    preprocess = Preprocessor(twin)
    return _median_first_exit_score(twin, torch.stack([preprocess(b) for b in bodies]))


def measure(model_name: str, img_size: int, num_classes: int, requests: int, rounds: int, loads: Sequence[float],
            replicas: Sequence[int], max_batch_size: int, max_wait_ms: float, max_seconds: float,
            concurrency: int = 64, torch_threads: Optional[int] = None, seed: int = 0,
            exit_layers: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Every (model, replicas) deployment at saturation and at each load, interleaved over ``rounds``; per replica
    count, ratios to the parent's in the same round and medians over rounds (``load.summarise``)."""
    import ray
    from ray import serve
    bodies = encoded_images(max(requests, 64), img_size, seed)
    torch.manual_seed(seed)
    parent = timm.create_model(model_name, img_size=img_size, num_classes=num_classes).eval()
    twin = convert(copy.deepcopy(parent), 'mexit', **({} if exit_layers is None else {'exit_layers': tuple(
        exit_layers)})).eval()  # the parent's weights, exits as the family places them
    threshold = _threshold(twin, bodies)
    models = {'parent': parent, 'early': twin}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # replicas: this checkout
    path = os.pathsep.join(p for p in (root, os.environ.get('PYTHONPATH')) if p)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace='timm_exits_load',
             runtime_env={'env_vars': {'PYTHONPATH': path}})
    try:
        port = _free_port()
        serve.start(http_options={'host': '127.0.0.1', 'port': port})
        threads = {r: torch_threads or max(1, (os.cpu_count() or 1) // r) for r in replicas}
        for r in replicas:
            for config, _ in CONFIGS:
                _deploy(f'{config}{r}', models[config], r, threads[r], threshold if config == 'early' else None,
                        max_batch_size, max_wait_ms)
        clients = {(c, r): HttpClient(port, f'/{c}{r}', concurrency) for c, _ in CONFIGS for r in replicas}
        try:
            runs, saturation = _rounds(clients, bodies, requests, rounds, loads, replicas, max_seconds, seed)
        finally:
            for client in clients.values():
                client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {str(r): summarise([x for x in runs if x['replicas'] == r], loads, CONFIGS) for r in replicas}
    return {'model': model_name, 'img_size': img_size, 'num_classes': num_classes, 'threshold': threshold,
            'exit_layers': list(twin.exit_layers), 'requests': requests, 'rounds': rounds,
            'loads': list(loads), 'replicas': list(replicas), 'torch_threads': threads, 'concurrency': concurrency,
            'max_batch_size': max_batch_size, 'max_wait_ms': max_wait_ms, 'cpu_count': os.cpu_count(),
            'parent_saturation_calibration': saturation, 'runs': runs, 'summary': summary}


def _rounds(clients: Dict[Any, HttpClient], bodies: Sequence[bytes], requests: int, rounds: int,
            loads: Sequence[float], replicas: Sequence[int], max_seconds: float, seed: int) -> tuple:
    def one(config: str, r: int, rate: Optional[float], run_seed: int, n: int = requests) -> Dict[str, Any]:
        return run_load(clients[config, r], bodies, rate, n, max_seconds, run_seed)

    for r in replicas:  # warm-up: every replica has loaded its model and run a few batches
        for config, _ in CONFIGS:
            one(config, r, None, 0, n=4 * r * 8)
    saturation = {r: statistics.median(one('parent', r, None, k)['throughput'] for k in range(2)) for r in replicas}
    runs: List[Dict[str, Any]] = []
    for rnd in range(rounds):
        for r in replicas:
            for k, load in enumerate([None, *loads]):
                order = CONFIGS[rnd % 2:] + CONFIGS[:rnd % 2]
                for config, _ in order:
                    out = one(config, r, None if load is None else load * saturation[r],
                              seed * 1000 + rnd * 10 + k)
                    out.update(config=config, replicas=r, round=rnd, load=load)
                    runs.append(out)
                    print(f'round {rnd} replicas {r} load {load or "saturation"} {config:6s} answered '
                          f'{out["answered"]:4d}/{out["submitted"]} throughput {out["throughput"]:7.1f}/s median '
                          f'{out["median_ms"]:8.1f} ms p99 {out["p99_ms"]:8.1f} ms', flush=True)
    return runs, {str(r): s for r, s in saturation.items()}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tables(result: Dict[str, Any], load: float) -> str:
    """One markdown table per replica count (``load.table``'s columns)."""
    return '\n\n'.join(f'{r} replica{"s" if r > 1 else ""} (HTTP):\n\n' + table(
        {'summary': result['summary'][str(r)]}, load, CONFIGS) for r in result['replicas'])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='deit_tiny_patch16_224', help='a timm parent with a _mexit twin')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--exit-layers', type=int, nargs='+', default=None, help="default: the family's")
    parser.add_argument('--requests', type=int, default=160, help='requests per run (bound)')
    parser.add_argument('--max-seconds', type=float, default=30., help='seconds of arrivals per run (bound)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--loads', type=float, nargs='+', default=[0.3, 0.5, 0.7],
                        help="offered loads, shares of the parent's saturation throughput (same replicas)")
    parser.add_argument('--report-load', type=float, default=0.7, help='the load of the latency ratios reported')
    parser.add_argument('--replicas', type=int, nargs='+', default=[1, 2], help='replica counts to compare')
    parser.add_argument('--concurrency', type=int, default=64, help='client threads (requests in flight at most)')
    parser.add_argument('--torch-threads', type=int, default=None,
                        help="each replica's torch threads (default: the cores shared among the replicas)")
    parser.add_argument('--max-batch-size', type=int, default=16)
    parser.add_argument('--max-wait-ms', type=float, default=5.)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default=None, help='JSON of every run and the summary')
    args = parser.parse_args(argv)
    for name in ('requests', 'rounds', 'max_batch_size', 'img_size', 'num_classes', 'concurrency'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if any(r < 1 for r in args.replicas) or len(set(args.replicas)) != len(args.replicas):
        parser.error(f'--replicas must be distinct counts >= 1, got {args.replicas}')
    if args.report_load not in args.loads:
        parser.error(f'--report-load {args.report_load:g} must be one of --loads {args.loads}')
    if any(not 0 < f for f in args.loads) or args.max_seconds <= 0:
        parser.error('--loads must be > 0 and --max-seconds > 0')
    result = measure(args.model, args.img_size, args.num_classes, args.requests, args.rounds, args.loads,
                     args.replicas, args.max_batch_size, args.max_wait_ms, args.max_seconds, args.concurrency,
                     args.torch_threads, args.seed, args.exit_layers)
    print(tables(result, args.report_load))
    if args.output:
        atomic_write(args.output, lambda tmp: open(tmp, 'w').write(json.dumps(result, indent=1)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
