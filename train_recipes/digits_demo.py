""" Offline demonstration on real data: scikit-learn's bundled digits (1797 8x8 grey images, upsampled to 32 px;
nothing is downloaded), small ViTs trained from scratch on this CPU with the recipes' trainer.

    python train_recipes/digits_demo.py [--output output/digits_demo] [--epochs 30] [--seeds 0 [1 ...]]
        [--runs backbone mevit end_to_end ...] [--no-resume] [--allow-changed-args]

Runs (each resumable, in its own folder), then a table (``table.md``, ``summary.json``):
(a) MEViT's sandwich rule + in-place distillation (000) against plain end-to-end training (001), exit by exit, and
    the final accuracy against the same backbone trained alone;
(b) LifeRegress two-stage (Algorithm 1) against single-stage training (003, Table IV) at rho 0.9 / 0.8 / 0.7, from
    the backbone of (a), with the untrained life predictor as the floor and, as a control, the backbone fine-tuned as
    long with the predictor left untrained;
(c) classifier-wise training (001) on that backbone: the final accuracy must not move, the backbone stays bit-identical;
(d) its exits on the frozen backbone against chance (10 %);
(e) ``mexit_liferegress``: exits and slimming in one model, from the MEViT run of (a), LifeRegress's two stages with
    the sandwich rule (``MEViTLifeRegressTask``), and ``mevit_finetune``, the MEViT run trained as many more epochs
    (``benchmarks/digits_combined_study.py`` compares them with slimming alone).
Splits: train 60 %, val 20 % (per-epoch validation, threshold choice), test 20 % (every number in the table).
With several ``--seeds`` each seed runs in ``OUTPUT/seed<N>/`` and ``seeds.md`` gives, per run and exit, the mean,
std and min-max over the seeds, and each objective's final accuracy minus the backbone's, seed by seed.
``--runs`` picks a subset (those that start from the backbone or MEViT run bring it along).
"""
import argparse
import dataclasses
import logging
import os
import statistics
import time
from typing import Any, Dict, List, Sequence

import torch
from safetensors.torch import load_file

import timm
from timm_exits.train import Recipe, RunError, Stage, train
from timm_exits._files import atomic_write, write_json
from timm_exits.data import DigitsDataset, make_loader
from timm_exits.evaluation import choose_threshold, collect_outputs, threshold_table

BACKBONE = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.)
LIFE = dict(life_layer=1, prune_layers=(2, 4, 5))  # depth 6: lives after block 1, patches leave after 2, 4 and 5
ADAMW = dict(opt='adamw', weight_decay=0.05, sched='cosine')


def recipes(out: str, epochs: int, seed: int) -> Dict[str, Recipe]:
    """Every run of the demo, in order; the classifier-wise and LifeRegress runs start from the backbone run."""
    base = Recipe(name='', model='test_vit_mexit', dataset='digits', num_classes=10, model_kwargs=BACKBONE,
                  test_split='test', batch_size=64, eval_batch_size=256, workers=0, seed=seed, latency_batch=64,
                  log_interval=1000, stages=[])
    scratch = dict(epochs=epochs, lr=2e-3, warmup_epochs=2, **ADAMW)
    short = max(epochs // 3, 1)
    backbone = os.path.join(out, 'backbone', 'model.safetensors')
    mevit = os.path.join(out, 'mevit', 'model.safetensors')
    life = dataclasses.replace(base, model='test_vit_liferegress', model_kwargs={**BACKBONE, **LIFE},
                               init_checkpoint=backbone)

    def life_stage(stage: str, epochs: int, lr: float, **kwargs: Any) -> Stage:
        return Stage('liferegress', epochs=epochs, lr=lr, task_kwargs=dict(stage=stage), name=stage, **kwargs, **ADAMW)

    def combined_stage(stage: str, epochs: int, lr: float) -> Stage:
        return Stage('mevit_liferegress', epochs=epochs, lr=lr, task_kwargs=dict(stage=stage, num_sampled=1),
                     name=stage, **ADAMW)

    return {
        'backbone': dataclasses.replace(base, name='backbone', model='vit_tiny_patch16_224',
                                        stages=[Stage('backbone', **scratch)]),
        'mevit': dataclasses.replace(base, name='mevit', stages=[
            Stage('mevit', task_kwargs=dict(num_sampled=1), **scratch)]),
        'end_to_end': dataclasses.replace(base, name='end_to_end', stages=[Stage('end_to_end', **scratch)]),
        'classifier_wise': dataclasses.replace(base, name='classifier_wise', init_checkpoint=backbone, stages=[
            Stage('classifier_wise', epochs=short, lr=2e-3, **ADAMW)]),
        'life_untrained': dataclasses.replace(life, name='life_untrained'),
        'life_backbone_only': dataclasses.replace(life, name='life_backbone_only', stages=[
            life_stage('backbone', 2 * short, 1e-4)]),
        'life_two_stage': dataclasses.replace(life, name='life_two_stage', stages=[
            life_stage('predictor', short, 1e-3), life_stage('backbone', short, 1e-4)]),
        'life_single_stage': dataclasses.replace(life, name='life_single_stage', stages=[
            life_stage('joint', 2 * short, 1e-4, part_lrs={'life': 1e-3})]),
        # exits and slimming in one model, from the MEViT run: LifeRegress's two stages with the sandwich rule
        'mexit_liferegress': dataclasses.replace(
            base, name='mexit_liferegress', model='test_vit_mexit_liferegress', model_kwargs={**BACKBONE, **LIFE},
            init_checkpoint=mevit, stages=[combined_stage('predictor', short, 1e-3),
                                           combined_stage('backbone', short, 1e-4)]),
        # its control: the MEViT run trained as many more epochs, at the second stage's learning rate
        'mevit_finetune': dataclasses.replace(base, name='mevit_finetune', init_checkpoint=mevit, stages=[
            Stage('mevit', epochs=2 * short, lr=1e-4, task_kwargs=dict(num_sampled=1), **ADAMW)]),
    }


def _threshold_choice(recipe: Recipe, out: str, max_drop: float = 1.) -> Dict[str, Any]:
    """MEViT's threshold for at most ``max_drop`` points below its full model, chosen on val, applied on test."""
    model = timm.create_model(recipe.model, num_classes=10, checkpoint_path=os.path.join(out, 'model.safetensors'),
                              **recipe.model_kwargs).eval()
    outputs = {s: collect_outputs(model, make_loader(DigitsDataset(s, 32), 256), torch.device('cpu'))
               for s in ('val', 'test')}
    choice = choose_threshold(model, outputs['val'], max_drop=max_drop)
    test = threshold_table(outputs['test']['scores'], outputs['test']['correct'], list(model.threshold_costs),
                           [choice['threshold']])[0]
    return {**choice, 'test_accuracy': test['accuracy'], 'test_mean_cost': test['mean_cost']}


def _backbone_unchanged(out: str) -> bool:
    """Whether every backbone tensor (and the final head) of the classifier-wise run equals the backbone run's."""
    before = load_file(os.path.join(out, 'backbone', 'model.safetensors'))
    after = load_file(os.path.join(out, 'classifier_wise', 'model.safetensors'))
    return all(torch.equal(v, after[k]) for k, v in before.items())


def summarize(results: Dict[str, Dict[str, Any]], out: str, seconds: float) -> str:
    """The demo's table as markdown (also written to ``table.md`` and ``summary.json``)."""
    mevit, e2e, cw = (results[k]['exits'] for k in ('mevit', 'end_to_end', 'classifier_wise'))
    alone = results['backbone']['accuracy']
    lines: List[str] = [
        f'(a) exit accuracy on the digits test split ({results["mevit"]["num_images"]} images), trained from scratch',
        '', '| exit (block) | cost | sandwich + in-place KL | end-to-end (final 2x) | classifier-wise |',
        '|---|---|---|---|---|']
    for m, e, c in zip(mevit, e2e, cw):
        lines.append(f'| {m["layer"]} | {m["cost"]:.3f} | {m["accuracy"]:.2f} | {e["accuracy"]:.2f} | '
                     f'{c["accuracy"]:.2f} |')
    lines.append(f'| backbone trained alone (final) | 1.000 | {alone:.2f} | {alone:.2f} | {alone:.2f} |')
    choice = _threshold_choice(results['_recipes']['mevit'], os.path.join(out, 'mevit'))
    lines += ['', f'MEViT, confidence threshold {choice["threshold"]:.3f} chosen on val for <= 1 point below its full '
              f'model: test accuracy {choice["test_accuracy"]:.2f} at mean cost {choice["test_mean_cost"]:.3f}.', '',
              '(b) LifeRegress from the backbone of (a): test accuracy; the control fine-tunes the backbone alone as '
              'long, the predictor left untrained', '',
              '| keep rate | FLOPs ratio | untrained predictor | control | single stage | two stages |',
              '|---|---|---|---|---|---|']
    runs = ('life_untrained', 'life_backbone_only', 'life_single_stage', 'life_two_stage')
    for rows in zip(*(results[k]['keep_rates'] for k in runs)):
        lines.append(f'| {rows[0]["keep_rate"]:g} | {rows[0]["flops_ratio"]:.3f} | '
                     + ' | '.join(f'{r["accuracy"]:.2f}' for r in rows) + ' |')
    unchanged = _backbone_unchanged(out)
    lines += ['', f'(c) classifier-wise: final accuracy {cw[-1]["accuracy"]:.2f} vs the backbone\'s {alone:.2f}; '
              f'backbone and final head bit-identical: {unchanged}.',
              '(d) its exits on the frozen backbone: ' + ', '.join(
                  f'block {c["layer"]}: {c["accuracy"]:.2f}' for c in cw[:-1]) + ' (chance: 10.00).', '',
              f'Total run time: {seconds / 60:.1f} min on {torch.get_num_threads()} threads.']
    table = '\n'.join(lines)
    summary = {k: v for k, v in results.items() if not k.startswith('_')}
    write_json({'results': summary, 'threshold_choice': choice, 'backbone_unchanged': unchanged,
                'minutes': seconds / 60}, os.path.join(out, 'summary.json'))
    with open(os.path.join(out, 'table.md'), 'w') as f:
        f.write(table + '\n')
    return table


def _spread(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.
    return f'{statistics.mean(values):.2f} ± {std:.2f} ({min(values):.2f}-{max(values):.2f})'


def _final_accuracy(result: Dict[str, Any]) -> float:
    return result['exits'][-1]['accuracy'] if result.get('exits') else result['accuracy']


def summarize_seeds(per_seed: Dict[int, Dict[str, Dict[str, Any]]], out: str) -> str:
    """Over seeds: mean ± std (min-max) of each multi-exit run's exits and the backbone's final accuracy (test split),
    and each objective's final minus the backbone's, paired by seed (``seeds.md``)."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    layers = max((r.get('exits') or [] for r in first.values()), key=len)
    lines = [f'Test accuracy (%) over seeds {seeds}: mean ± std (min-max)', '',
             '| run | ' + ' | '.join(f'exit {e["layer"]} ({e["cost"]:.3f})' for e in layers)
             + ' | final - backbone alone |', '|---|' + '---|' * (len(layers) + 1)]
    for name, result in first.items():
        if not isinstance(result, dict) or not (result.get('exits') or 'accuracy' in result):
            continue
        final = [_final_accuracy(per_seed[s][name]) for s in seeds]
        if len(result.get('exits') or []) == len(layers) > 1:
            cells = [_spread([per_seed[s][name]['exits'][i]['accuracy'] for s in seeds]) for i in range(len(layers))]
        else:
            cells = [''] * (len(layers) - 1) + [_spread(final)]
        gap = ''
        if 'backbone' in first and name != 'backbone':
            gap = _spread([f - _final_accuracy(per_seed[s]['backbone']) for f, s in zip(final, seeds)])
        lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {gap} |')
    table = '\n'.join(lines)
    write_json({str(s): r for s, r in per_seed.items()}, os.path.join(out, 'seeds.json'))

    def _write(path: str) -> None:
        with open(path, 'w') as f:
            f.write(table + '\n')

    atomic_write(os.path.join(out, 'seeds.md'), _write)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', default=os.path.join('output', 'digits_demo'))
    parser.add_argument('--epochs', type=int, default=30, help='epochs of the from-scratch runs (>= 1)')
    parser.add_argument('--seeds', '--seed', type=int, nargs='+', default=[0],
                        help='one or more seeds (>= 0); several run in OUTPUT/seed<N>/ and add seeds.md')
    parser.add_argument('--runs', nargs='+', default=None, help='a subset of the runs (default: all)')
    parser.add_argument('--no-resume', action='store_true', help='start every run over')
    parser.add_argument('--allow-changed-args', action='store_true',
                        help='continue runs in OUTPUT although they were started with another --epochs / --seed')
    args = parser.parse_args()
    names = list(recipes(args.output, 1, 0))
    if args.epochs < 1:
        parser.error(f'argument --epochs: {args.epochs} is not allowed: an integer >= 1')
    if min(args.seeds) < 0:
        parser.error(f'argument --seeds: {min(args.seeds)} is not allowed: integers >= 0')
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f'argument --seeds: {args.seeds} repeats a seed')
    unknown = sorted(set(args.runs or []) - set(names))
    if unknown:
        parser.error(f'argument --runs: {unknown} not known; allowed: {names}')
    wanted = set(args.runs or names)
    if wanted & {'classifier_wise', 'life_untrained', 'life_backbone_only', 'life_two_stage', 'life_single_stage'}:
        wanted.add('backbone')  # they start from the backbone run
    if wanted & {'mexit_liferegress', 'mevit_finetune'}:
        wanted.add('mevit')  # they start from the MEViT run
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    per_seed: Dict[int, Dict[str, Any]] = {}
    for seed in args.seeds:
        start = time.time()
        out = args.output if len(args.seeds) == 1 else os.path.join(args.output, f'seed{seed}')
        runs = {k: v for k, v in recipes(out, args.epochs, seed).items() if k in wanted}
        results: Dict[str, Any] = {'_recipes': runs}
        for name, recipe in runs.items():
            logging.info(f'== seed {seed}: {name}')
            try:
                results[name] = train(recipe, os.path.join(out, name), resume=not args.no_resume,
                                      allow_changed_args=args.allow_changed_args)
            except RunError as e:
                parser.error(f'run {name!r} (seed {seed}): {e}')
        per_seed[seed] = {k: v for k, v in results.items() if not k.startswith('_')}
        if wanted == set(names):
            print(summarize(results, out, time.time() - start))
    if len(args.seeds) > 1:
        print(summarize_seeds(per_seed, args.output))


if __name__ == '__main__':
    main()
