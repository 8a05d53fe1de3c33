""" Peer comparison with earlyon (PyPI ``earlyon`` 0.3.0): each library's early-exit speed-up over its OWN parent.

    python benchmarks/earlyon_compare.py [--models resnet50 efficientnet_b0 mobilenetv2_100] [--rounds 5]
    python benchmarks/earlyon_compare.py --quick          # seconds: resnet18 at 64 px, batches 1 and 4, 1 round

Set-up, per model (random weights, 1000 classes):
- timm's parent gets random weights; torchvision's twin gets the SAME weights (copied in parameter order, every shape
  checked, outputs compared), so both backbones compute the same features.
- The exits sit after the same blocks in both: earlyon's own factory sites (ResNet-50 after layer1/2/3, EfficientNet-B0
  after features.3/.5, MobileNetV2 after features.3/.10), in timm-exits the adapter units ending at those blocks.
- Same kind of head in both: global average pool + one Linear (timm-exits' ``pool_linear``; for earlyon an
  ``nn.Sequential`` passed to its ``EarlyExitWrapper``, which takes any head module), with the SAME weights. The first
  head is random and rescaled so its logits have std ``--logit-std`` on the benchmark images (confidences spread); the
  later heads are zero (uniform softmax: they never fire), so a hard image runs to the final classifier in both.
- Criterion 'confidence' (max softmax >= threshold) in both, with one threshold: the median first-exit confidence of the
  benchmark images, so half of them are easy (leave at the first exit) and half are hard (full depth).

Timed (``timm_exits.benchmark.time_interleaved``: one process, interleaved rotating rounds, medians, ratios only):
- batch B (default 16): torchvision parent, earlyon ``forward_inference_batched`` (its only batched routing: the batch
  leaves together when EVERY image is confident), timm parent, timm-exits ``forward_dynamic`` (per-image exit, exited
  images leave the batch), and earlyon's per-image mode looped over the B images (``earlyon_loop``, vs the torchvision
  parent at batch B: what per-image exit costs with earlyon when images arrive as a batch);
- batch 1: every candidate called once per image over the same B images (torchvision parent, earlyon
  ``forward(mode='inference')``, timm parent, timm-exits ``forward_dynamic``).

earlyon is optional (``pip install timm-exits[compare]``): without it the timm-exits side runs alone, with a message.
"""
import argparse
import json
import platform
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torchvision

import timm_exits  # noqa: F401  (registers the *_mexit models)
from timm_exits.benchmark import time_interleaved

# timm parent -> (torchvision constructor, [(timm-exits unit, torchvision module earlyon hooks)]): earlyon's own sites
SPECS: Dict[str, Tuple[str, List[Tuple[int, str]]]] = {
    'resnet50': ('resnet50', [(3, 'layer1'), (7, 'layer2'), (13, 'layer3')]),
    'efficientnet_b0': ('efficientnet_b0', [(5, 'features.3'), (11, 'features.5')]),
    'mobilenetv2_100': ('mobilenet_v2', [(3, 'features.3'), (10, 'features.10')]),
    'resnet18': ('resnet18', [(4, 'layer2'), (6, 'layer3')]),  # --quick (earlyon's resnet18_ee sites)
}


def load_earlyon() -> Optional[Any]:
    """The earlyon package, or None (with a message) when it is not installed."""
    try:
        import earlyon
        from earlyon.core.wrappers import EarlyExitWrapper  # noqa: F401
    except ImportError:
        print('earlyon is not installed (pip install "timm-exits[compare]"): skipping the earlyon side', flush=True)
        return None
    return earlyon


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Load ``src``'s state into ``dst`` in parameter order (the two name their tensors differently); every shape
    must match."""
    a = [(k, v) for k, v in src.state_dict().items() if not k.endswith('num_batches_tracked')]
    b = [k for k, v in dst.state_dict().items() if not k.endswith('num_batches_tracked')]
    shapes_b = [dst.state_dict()[k].shape for k in b]
    if len(a) != len(b) or any(v.shape != s for (_, v), s in zip(a, shapes_b)):
        raise ValueError(f'{type(src).__name__} and {type(dst).__name__} do not line up tensor by tensor')
    missing, unexpected = dst.load_state_dict({kb: v for (_, v), kb in zip(a, b)}, strict=False)
    assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing)


def build(name: str, x: torch.Tensor, logit_std: float, earlyon: Optional[Any]) -> Dict[str, Any]:
    """Both parents (same weights), the timm-exits twin and (with earlyon) the earlyon wrapper, plus the threshold."""
    tv_name, sites = SPECS[name]
    torch.manual_seed(0)
    parent = timm.create_model(name).eval()
    model = timm.create_model(f'{name}_mexit', exit_layers=[u for u, _ in sites], exit_head='pool_linear').eval()
    model.load_state_dict({**model.state_dict(), **parent.state_dict()})
    tv = getattr(torchvision.models, tv_name)().eval()
    copy_weights(parent, tv)
    with torch.inference_mode():
        backbone_diff = float((tv(x) - parent(x)).abs().max())
        scale_ref = float(parent(x).abs().max())
        # first head random, rescaled to logit std `logit_std`; later heads zero (never confident)
        heads = [model.exits[str(u)].head for u, _ in sites]
        for h in heads:
            h.weight.zero_(), h.bias.zero_()
        heads[0].weight.normal_()
        logits0 = model.forward_exits(x)[0]
        heads[0].weight.mul_(logit_std / float(logits0.std()))
        scores = model.exit_scores(sites[0][0], model.forward_exits(x)[0])
    threshold = float(scores.float().quantile(0.5))
    built = {'parent': parent, 'model': model, 'tv': tv, 'threshold': threshold, 'sites': sites,
             'backbone_max_abs_diff': backbone_diff, 'backbone_max_abs': scale_ref,
             'first_exit_confidence': [float(s) for s in scores]}
    if earlyon is not None:
        built['eo'] = build_earlyon(tv, heads, sites, threshold, x.shape[-2:])
    return built


def build_earlyon(tv: nn.Module, heads: Sequence[nn.Linear], sites: Sequence[Tuple[int, str]], threshold: float,
                  size: Sequence[int]) -> nn.Module:
    """earlyon's ``EarlyExitWrapper`` on the torchvision parent: one pool + Linear head per site (copies of
    timm-exits' heads), the same threshold at every exit, confidence routing, temperature 1."""
    from earlyon.core.types import EarlyExitConfig, ExitPoint
    from earlyon.core.wrappers import EarlyExitWrapper
    points = [ExitPoint(f'e{i}', layer, h.in_features) for i, ((_, layer), h) in enumerate(zip(sites, heads))]
    eo_heads = {}
    for p, h in zip(points, heads):
        lin = nn.Linear(h.in_features, h.out_features)
        lin.load_state_dict(h.state_dict())
        eo_heads[p.name] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), lin)
    cfg = EarlyExitConfig(backbone=type(tv).__name__.lower(), num_classes=heads[0].out_features, exit_points=points,
                          confidence_thresholds=[threshold] * len(points), routing_policy='confidence')
    wrapper = EarlyExitWrapper(tv, eo_heads, lambda z: z, cfg, input_shape=(1, 3, *size)).eval()
    with warnings.catch_warnings():  # its one-time FLOPs analysis (a reused ReLU: a uniform estimate), untimed
        warnings.simplefilter('ignore')
        _ = wrapper.flops_estimate
    return wrapper


def check_routing(b: Dict[str, Any], x: torch.Tensor) -> Dict[str, Any]:
    """Where each image leaves in both libraries (batch 1 and batch B) and how far their logits differ."""
    model, first = b['model'], b['sites'][0][0]
    with torch.inference_mode():
        out = model.forward_dynamic(x, threshold=b['threshold'])
    tx_layers = out.exit_layer.tolist()
    info: Dict[str, Any] = {
        'threshold': b['threshold'],
        'easy_fraction': tx_layers.count(first) / len(tx_layers),
        'timm_exits_exit_layers': tx_layers,
        'timm_exits_mean_cost': float(out.cost.double().mean()),
        'timm_exits_ideal_speedup': 1. / float(out.cost.double().mean()),
        'exit_costs': list(model.exit_costs),
    }
    if 'eo' in b:
        units = [u for u, _ in b['sites']]
        eo_layers, max_diff = [], 0.
        for i in range(len(x)):
            r = b['eo'](x[i:i + 1], mode='inference')
            eo_layers.append(units[r.exit_taken] if r.exit_taken >= 0 else model.depth)
            max_diff = max(max_diff, float((r.prediction - out.logits[i:i + 1]).abs().max()))
        batched = b['eo'].forward_inference_batched(x)
        info.update({
            'earlyon_b1_exit_layers': eo_layers,
            'same_exits_b1': eo_layers == tx_layers,
            'logits_max_abs_diff_b1': max_diff,
            'earlyon_batched_exit_taken': batched.exit_taken,  # -1: the final classifier (no exit fired)
        })
    return info


def run_model(name: str, batch: int, rounds: int, warmup: int, img: int, logit_std: float,
              earlyon: Optional[Any]) -> Dict[str, Any]:
    """Build, check the routing, time batch ``batch`` and batch 1 (over the same ``batch`` images)."""
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1))
    b = build(name, x, logit_std, earlyon)
    model, parent, tv, t = b['model'], b['parent'], b['tv'], b['threshold']
    row: Dict[str, Any] = {'model': name, 'batch': batch, 'img_size': img, 'exit_units': [u for u, _ in b['sites']],
                           'earlyon_layers': [layer for _, layer in b['sites']],
                           'backbone_max_abs_diff': b['backbone_max_abs_diff'], **check_routing(b, x)}
    singles = [x[i:i + 1] for i in range(batch)]

    def each(fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        return lambda: [fn(s) for s in singles]

    big: Dict[str, Callable[[], Any]] = {
        'tv_parent': lambda: tv(x),
        'timm_parent': lambda: parent(x),
        'timm_exits': lambda: model.forward_dynamic(x, threshold=t),
    }
    one: Dict[str, Callable[[], Any]] = {
        'tv_parent': each(tv),
        'timm_parent': each(parent),
        'timm_exits': each(lambda s: model.forward_dynamic(s, threshold=t)),
    }
    if 'eo' in b:
        eo = b['eo']
        big['earlyon'] = lambda: eo.forward_inference_batched(x)
        big['earlyon_loop'] = each(lambda s: eo(s, mode='inference'))
        one['earlyon'] = each(lambda s: eo(s, mode='inference'))
    with torch.inference_mode():
        for key, cands in ((f'b{batch}', big), ('b1', one)):
            times = time_interleaved(cands, rounds, warmup)
            ms = {k: statistics.median(v) for k, v in times.items()}
            res = {'ms': ms, 'times_ms': times,
                   'timm_exits_speedup': ms['timm_parent'] / ms['timm_exits']}
            if 'earlyon' in ms:
                res['earlyon_speedup'] = ms['tv_parent'] / ms['earlyon']
                if 'earlyon_loop' in ms:
                    res['earlyon_loop_speedup'] = ms['tv_parent'] / ms['earlyon_loop']
            row[key] = res
            print(f'{name} {key}: ' + ', '.join(f'{k} {v:.1f} ms' for k, v in ms.items()), flush=True)
    return row


def _f(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:.2f}'


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """One line per model: easy share, ideal speed-up, both libraries' measured speed-ups at batch B and batch 1."""
    batch = rows[0]['batch'] if rows else 16
    head = ['model', 'exits (timm units / earlyon modules)', 'easy', 'ideal', f'timm-exits b{batch}',
            f'earlyon b{batch} (all-or-nothing)', f'earlyon per-image loop vs tv b{batch}', 'timm-exits b1',
            'earlyon b1', f'ahead at b{batch}', 'not behind at b1', 'same exits b1']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        big, one = r[f'b{r["batch"]}'], r['b1']
        eo_big, eo_one = big.get('earlyon_speedup'), one.get('earlyon_speedup')
        ahead = '-' if eo_big is None else ('yes' if big['timm_exits_speedup'] > eo_big else 'NO')
        not_behind = '-' if eo_one is None else ('yes' if one['timm_exits_speedup'] >= eo_one else 'NO')
        cells = [r['model'], f"{','.join(map(str, r['exit_units']))} / {','.join(r['earlyon_layers'])}",
                 f"{r['easy_fraction']:.2f}", _f(r['timm_exits_ideal_speedup']), _f(big['timm_exits_speedup']),
                 _f(eo_big), _f(big.get('earlyon_loop_speedup')), _f(one['timm_exits_speedup']), _f(eo_one),
                 ahead, not_behind, str(r.get('same_exits_b1', '-'))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['resnet50', 'efficientnet_b0', 'mobilenetv2_100'],
                        choices=sorted(SPECS))
    parser.add_argument('--batch', type=int, default=16, help='the batch size (batch 1 runs over these images)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first')
    parser.add_argument('--logit-std', type=float, default=4., help='std of the first exit\'s logits on the images')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    parser.add_argument('--json', default=None, help='also write every number to this JSON file')
    parser.add_argument('--quick', action='store_true', help='smoke test: resnet18, 64 px, batch 4, 1 round, no warm-up')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.img_size, args.batch, args.rounds, args.warmup = ['resnet18'], 64, 4, 1, 0
    if args.batch < 2 or args.rounds < 1 or args.warmup < 0:
        parser.error('--batch must be >= 2, --rounds >= 1, --warmup >= 0')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    earlyon = load_earlyon()
    rows = [run_model(n, args.batch, args.rounds, args.warmup, args.img_size, args.logit_std, earlyon)
            for n in args.models]
    print()
    print(markdown_table(rows))
    if args.json:
        config = {**vars(args), 'torch': torch.__version__, 'torchvision': torchvision.__version__,
                  'timm': timm.__version__, 'earlyon': getattr(earlyon, '__version__', None) if earlyon else None,
                  'num_threads': torch.get_num_threads(), 'python': sys.version.split()[0],
                  'machine': platform.machine()}
        Path(args.json).write_text(json.dumps({'config': config, 'results': rows}, indent=2))
    return rows


if __name__ == '__main__':
    main()
