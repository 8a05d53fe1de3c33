""" Offline demo: a multi-exit DeiT built through timm, its exits, their counted costs, and per-image early exit.

    python -m timm_exits.demo [--model deit_tiny_patch16_224_mexit] [--batch-size 16]

Nothing is downloaded: the weights are random, so the exits' answers mean nothing; what the demo shows is the
mechanics (full depth equals the timm parent, budgets cap the compute, thresholds send each image its own way).
"""
import argparse
from collections import Counter
from typing import List, Optional

import torch

import timm

from .models.multi_exit_vit import MultiExitVisionTransformer
from .models.adapters import input_shape


def _spread(model: MultiExitVisionTransformer) -> None:
    """Random exits are all near-uniform; sharpen them so that a threshold splits the batch as trained exits would."""
    with torch.no_grad():
        for exit_head in model.exits.values():
            exit_head.head.weight.mul_(50.)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='deit_tiny_patch16_224_mexit')
    parser.add_argument('--batch-size', type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model = timm.create_model(args.model).eval()
    parent = timm.create_model(args.model.replace('_mexit', '')).eval()
    parent.load_state_dict({k: v for k, v in model.state_dict().items() if k in parent.state_dict()})
    _spread(model)
    x = torch.randn(args.batch_size, *input_shape(model))

    print(f'{args.model}: exits after blocks {model.exit_layers} ({model.exit_head_types[0]} heads)')
    print('exit cost (share of the full model, torch flop counter):')
    print('  ' + '  '.join(f'{layer}: {cost:.3f}' for layer, cost in zip(model.exit_layers, model.exit_costs)))
    with torch.inference_mode():
        diff = (model(x) - parent(x)).abs().max().item()
        print(f'full depth vs timm {args.model.replace("_mexit", "")}: max |diff| = {diff:.2e}')
        for budget in (model.exit_costs[0], 0.75, 1.0):
            out = model.forward_dynamic(x, budget=budget)
            print(f'budget={budget:.3f}: every image exits at block {out.exit_layer[0].item()}, '
                  f'cost {out.cost.max().item():.3f}')
        for threshold in (0.5, 0.9, 0.99):
            out = model.forward_dynamic(x, threshold=threshold)
            taken = dict(sorted(Counter(out.exit_layer.tolist()).items()))
            print(f'threshold={threshold}: images per exit {taken}, mean cost {out.cost.mean().item():.3f}')


if __name__ == '__main__':
    main()
