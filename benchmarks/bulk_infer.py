""" Images per second of bulk inference (``timm_exits.infer``): the early-exit twin against its timm parent through
the same command, and the Ray Data path against the in-process one.

    python benchmarks/bulk_infer.py [--images 512] [--rounds 3] [--no-ray] [--output F]

DeiT-Ti at 64 px, as in the serving study (``timm_exits.serving.load``): random weights, the twin carries the
parent's; a folder of ``--images`` PNG files; the twin's checkpoint records a calibrated threshold at the median
first-exit score of these images, so about half of them leave at the first exit. Every candidate is a whole
``timm_exits.infer`` call (reading the files, preprocessing, the model, writing the Parquet parts and the output),
each round runs every candidate once in rotating order; medians over rounds, and ratios of one run:

- ``speedup`` = twin images/s / parent images/s, against the FLOPs bound 1 / mean cost (the twin's summary):
  ``efficiency`` = speedup / bound (target >= 0.9); timed as the whole command (model loading included) and over
  the images only (``images_per_s`` of the summary: first image read to last part written);
- ``ray_vs_local`` = the twin's images/s on Ray Data (one actor with ``--threads`` threads, default every CPU; a
  Ray started once beforehand) / its images/s in-process (target >= 0.8).

Targets are shown, never asserted.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's timm_exits

import numpy as np  # noqa: E402
import torch  # noqa: E402

import timm  # noqa: E402
import timm_exits  # noqa: E402
from timm_exits.data import available_cpus, build_transform, resolve_data_cfg  # noqa: E402
from timm_exits.models import convert  # noqa: E402
from timm_exits.serving.load import _median_first_exit_score  # noqa: E402

TARGETS = {'efficiency': ('>=', 0.9), 'ray_vs_local': ('>=', 0.8)}


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` PNG files of smooth random images (a few coarse blobs, upsampled) at ``size`` px."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f'{i:06d}.png')


def save(model: torch.nn.Module, path: Path, name: str, kwargs: Dict[str, Any], extra: Optional[Dict] = None) -> str:
    from safetensors.torch import save_file
    meta = {'model': name, 'model_kwargs': kwargs, 'num_classes': model.num_classes, **(extra or {})}
    save_file(model.state_dict(), str(path), metadata={'timm_exits': json.dumps(meta)})
    return str(path)


def setup(work: Path, model_name: str, img_size: int, num_classes: int, images: int) -> Dict[str, Any]:
    """The image folder, the parent's checkpoint and the twin's (calibrated: half the images at the first exit)."""
    torch.manual_seed(0)
    parent = timm.create_model(model_name, img_size=img_size, num_classes=num_classes).eval()
    twin = convert(copy.deepcopy(parent), 'mexit').eval()  # convert changes the model it is given
    write_images(work / 'images', images, img_size)
    from PIL import Image
    transform = build_transform(twin, False, data_config=resolve_data_cfg(twin))
    files = sorted((work / 'images').iterdir())
    x = torch.stack([transform(Image.open(f).convert('RGB')) for f in files])
    threshold = _median_first_exit_score(twin, x)
    kwargs = {'img_size': img_size}
    return {'images': str(work / 'images'), 'threshold': threshold, 'exit_layers': list(twin.exit_layers),
            'parent': save(parent, work / 'parent.safetensors', model_name, kwargs),
            'twin': save(twin, work / 'twin.safetensors', f'{model_name}_mexit', kwargs,
                         {'calibration': {'threshold': threshold}})}


def run_rounds(cands: Dict[str, Dict[str, Any]], images: str, work: Path, rounds: int) -> Dict[str, Any]:
    """Each candidate's ``infer`` call per round, in rotating order: seconds and its summary."""
    names = list(cands)
    times: Dict[str, List[float]] = {n: [] for n in names}
    rates: Dict[str, List[float]] = {n: [] for n in names}
    summaries: Dict[str, Any] = {}
    for r in range(rounds + 1):  # round 0 warms up (imports, the allocator, Ray's workers)
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            summaries[name] = timm_exits.infer(data=images, output=work / f'{name}.parquet', overwrite=True,
                                               progress=False, **cands[name])
            if r:
                times[name].append(time.perf_counter() - start)
                rates[name].append(summaries[name]['images_per_s'])
            print(f'round {r} {name}: {time.perf_counter() - start:.2f} s', flush=True)
    return {'seconds': times, 'rates': rates, 'summaries': summaries}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='deit_tiny_patch16_224')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--images', type=int, default=512)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=0, help='image reading processes of the in-process path')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=0,
                        help='torch threads of every candidate (0: torch\'s default in-process, every CPU on Ray); 1 '
                        'keeps a shared machine\'s noise out of parallel regions')
    parser.add_argument('--no-ray', action='store_true', help='leave the Ray Data path out')
    parser.add_argument('--quick', action='store_true', help='48 images, 1 round (a check that it runs)')
    parser.add_argument('--output', default=None, help='write every number to this JSON file')
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 48, 1
    cpus = available_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = setup(work, args.model, args.img_size, args.num_classes, args.images)
        common = {'batch_size': args.batch_size, 'part_size': 256, 'torch_threads': args.threads}
        cands = {'parent': {'checkpoint': data['parent'], 'workers': args.workers, **common},
                 'twin': {'checkpoint': data['twin'], 'workers': args.workers, **common}}
        if not args.no_ray:
            import ray
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={'env_vars': {'PYTHONPATH': REPO}})
            cands['twin_ray'] = {'checkpoint': data['twin'], 'ray': True, 'ray_actors': 1,
                                 **common, 'torch_threads': args.threads or cpus}
        try:
            out = run_rounds(cands, data['images'], work, args.rounds)
        finally:
            if not args.no_ray:
                ray.shutdown()
    per_s = {n: args.images / statistics.median(s) for n, s in out['seconds'].items()}
    steady = {n: statistics.median(r) for n, r in out['rates'].items()}
    twin = out['summaries']['twin']
    first = str(data['exit_layers'][0])
    result = {'config': {**vars(args), 'cpus': cpus, 'torch': torch.__version__, 'timm': timm.__version__,
                         'torch_threads': torch.get_num_threads(), 'targets': TARGETS},
              'threshold': data['threshold'], 'exit_layers': data['exit_layers'], 'images_per_s': per_s,
              'seconds': out['seconds'], 'summaries': out['summaries'],
              'first_exit_share': twin['per_exit'].get(first, 0) / twin['answered'], 'mean_cost': twin['mean_cost'],
              'flops_bound': 1 / twin['mean_cost'], 'speedup': per_s['twin'] / per_s['parent'],
              'steady_images_per_s': steady, 'steady_speedup': steady['twin'] / steady['parent']}
    result['efficiency'] = result['speedup'] / result['flops_bound']
    result['steady_efficiency'] = result['steady_speedup'] / result['flops_bound']
    if 'twin_ray' in per_s:
        result['ray_vs_local'] = per_s['twin_ray'] / per_s['twin']
        result['steady_ray_vs_local'] = steady['twin_ray'] / steady['twin']
    print(table(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


def table(r: Dict[str, Any]) -> str:
    """The markdown table: the whole command, then the images only."""
    lines = ['| timed | images | first-exit share | FLOPs bound | parent img/s | twin img/s | speed-up | efficiency '
             '| twin Ray img/s | Ray / in-process |', '|' + '---|' * 10]
    for label, pre in (('whole command', ''), ('images only', 'steady_')):
        ips = r[pre + 'images_per_s']
        ray = f"{ips['twin_ray']:.1f} | {r[pre + 'ray_vs_local']:.3f}" if 'twin_ray' in ips else '- | -'
        lines.append(f"| {label} | {r['config']['images']} | {r['first_exit_share']:.3f} | {r['flops_bound']:.3f} | "
                     f"{ips['parent']:.1f} | {ips['twin']:.1f} | {r[pre + 'speedup']:.3f} | "
                     f"{r[pre + 'efficiency']:.3f} | {ray} |")
    targets = ', '.join(f'{k} {op} {v}' for k, (op, v) in TARGETS.items())
    return '\n'.join([*lines, '', f'Targets (not asserted): {targets}.'])

if __name__ == '__main__':
    main()
