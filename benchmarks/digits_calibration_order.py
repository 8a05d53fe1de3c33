""" Does learning the order of testing pay? Certified (keep rate, threshold) of an exits + slimming model on digits.

    python benchmarks/digits_calibration_order.py [--draws 50] [--docs docs]

A plain 6-block ViT (64 wide, 16 patches of 8 px) trained with labels on scikit-learn's digits ``train`` split (25
epochs, AdamW 2e-3, cosine), loaded into its ``_mexit_liferegress`` twin (exits after blocks 2-5), whose exits and life
predictor ``timm_exits.fit`` fits without labels (15 epochs). Two models: that one ("fitted"), and the same with its
life predictor back at its initial weights ("unfitted slimming"), where slimming alone already changes answers.
On the 719 ``val`` + ``test`` images, ``--draws`` random draws of 400 calibration images; for each draw
``timm_exits.calibrate`` (epsilon 0.05, delta 0.1, disagreement) three ways: the fixed pair path (``order='fixed'``),
exits alone (``keep_rates=[1.0]``) and the learned order (the default). Reported: the mean cost of the chosen point (a
share of the parent's FLOPs) on the calibration images and over all 719, how often its disagreement over the 719 (the
population the draws come from) exceeds epsilon, and how often nothing was certified. Writes
``DOCS/digits_calibration_order.json``; about 5 minutes on 2 shared cores.
"""
import argparse
import copy
import logging
import os
import statistics
import sys
import warnings
from typing import Any, Dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's timm_exits

import torch  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset  # noqa: E402

import timm  # noqa: E402
import timm_exits  # noqa: E402
from timm_exits import calibrate as cal  # noqa: E402
from timm_exits._files import write_json  # noqa: E402
from timm_exits.data import DigitsDataset  # noqa: E402
from timm_exits.models._base import UntrainedWeightsWarning, new_parts_filter  # noqa: E402

KWARGS = dict(img_size=32, patch_size=8, depth=6, embed_dim=64, num_heads=2, mlp_ratio=2, num_classes=10)
EPSILON, DELTA, CALIB = 0.05, 0.1, 400
ARMS = {'fixed pair path': dict(order='fixed'), 'exits alone (keep_rates=[1.0])': dict(keep_rates=[1.0]),
        'learned order (default)': dict()}


def make_models(seed: int = 0) -> Dict[str, torch.nn.Module]:
    """The backbone trained with labels, its twin's exits and life predictor fitted without, and the twin again
    with the life predictor at its initial weights."""
    torch.manual_seed(seed)
    plain = timm.create_model('deit_tiny_patch16_224', **KWARGS)
    train = DigitsDataset('train')
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(plain.parameters(), lr=2e-3, weight_decay=0.05)
    epochs = 25
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    plain.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(plain(x), y).backward()
            opt.step()
            sched.step()
    model = timm.create_model('deit_tiny_patch16_224_mexit_liferegress', exit_layers=(2, 3, 4, 5), **KWARGS)
    initial_life = copy.deepcopy(model.life.state_dict())
    with warnings.catch_warnings():  # the new parts are fitted next
        warnings.simplefilter('ignore', UntrainedWeightsWarning)
        model.load_state_dict(new_parts_filter(plain.state_dict(), model), strict=False)
    timm_exits.fit(model, loader, epochs=15, lr=2e-3, seed=seed)
    unfitted = copy.deepcopy(model)
    unfitted.life.load_state_dict(initial_life)
    brief = copy.deepcopy(unfitted)
    timm_exits.fit(brief, loader, epochs=1, lr=2e-3, seed=seed)
    return {'fitted': model.eval(), 'slimming fitted 1 epoch': brief.eval(), 'unfitted slimming': unfitted.eval()}


def study(model: torch.nn.Module, draws: int) -> Dict[str, Any]:
    ds = ConcatDataset([DigitsDataset('val'), DigitsDataset('test')])
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    out = cal.collect_calibration_outputs(model, DataLoader(TensorDataset(x, y), batch_size=256))
    n = len(y)
    ref = out['preds'][0][-1]
    alone = {f'{r:g}': float((p[-1] != ref).float().mean()) for r, p in zip(out['keep_rates'], out['preds'])}
    costs = cal._cost_function(model, 'mexit_liferegress')
    rows: Dict[str, list] = {k: [] for k in ARMS}
    g = torch.Generator().manual_seed(1)
    for _ in range(draws):
        idx = torch.randperm(n, generator=g)[:CALIB]
        part = dict(out, labels=out['labels'][idx], preds=[p[:, idx] for p in out['preds']],
                    scores=[s[:, idx] for s in out['scores']])
        for arm, kwargs in ARMS.items():
            try:
                r = cal.calibrate_outputs(model, part, EPSILON, DELTA, **kwargs)
            except cal.CalibrationError:
                rows[arm].append(None)
                continue
            loss, cost = cal.point_table(out, [(r['keep_rate'], r['threshold'])], model.exit_criterion, costs=costs)
            rows[arm].append({'keep_rate': r['keep_rate'], 'threshold': r['threshold'], 'cost': r['mean_cost'],
                              'population_cost': float(cost.mean()), 'violation': float(loss.float().mean()) > EPSILON})
    summary = {}
    for arm, found in rows.items():
        done = [r for r in found if r]
        summary[arm] = {'mean_cost': statistics.mean(r['cost'] for r in done) if done else None,
                        'population_cost': statistics.mean(r['population_cost'] for r in done) if done else None,
                        'violations': sum(r['violation'] for r in done), 'refused': len(found) - len(done),
                        'first_draw': found[0]}
    return {'disagreement_at_full_depth_by_keep_rate': alone, 'arms': summary, 'draws': draws}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--draws', type=int, default=50)
    parser.add_argument('--docs', default=os.path.join(REPO, 'docs'))
    args = parser.parse_args()
    logging.getLogger('timm_exits.calibrate').setLevel(logging.ERROR)
    torch.set_num_threads(1)
    result = {name: study(model, args.draws) for name, model in make_models().items()}
    result.update(epsilon=EPSILON, delta=DELTA, calibration_images=CALIB)
    write_json(result, os.path.join(args.docs, 'digits_calibration_order.json'))
    for name, r in result.items():
        if isinstance(r, dict):
            print(name, r['disagreement_at_full_depth_by_keep_rate'])
            for arm, s in r['arms'].items():
                print(f'  {arm:32s} {s["mean_cost"]:.3f} / {s["population_cost"]:.3f}  violations {s["violations"]}'
                      f'/{args.draws}  refused {s["refused"]}')


if __name__ == '__main__':
    main()
