""" What the train.py hook costs the final classifier: timm's own ``train.py`` on scikit-learn's digits, the plain
parent against the multi-exit model, several seeds, from scratch and fine-tuned from a trained backbone.

    python benchmarks/train_py_accuracy.py --timm-dir /path/to/pytorch-image-models [--work output/train_py_accuracy]

``--timm-dir`` (or ``$TIMM_DIR``) is a pytorch-image-models checkout whose tag matches the installed timm
(``git clone --branch v$(python -c 'import timm; print(timm.__version__)')
https://github.com/huggingface/pytorch-image-models``): its ``train.py`` runs unchanged with ``--device-modules
timm_exits``. Steps, each resumable (a finished run is not rerun):
1. scikit-learn's bundled digits (1797 8x8 images, nothing downloaded) upsampled to 32 px and written as an
   ImageFolder, ``WORK/data/{train,validation}/<digit>/*.png`` (stratified 1400 / 397 split, fixed seed);
2. from scratch, every arm x every seed: the same train.py command (AdamW, cosine, ``--epochs``), only ``--model``
   and ``--model-kwargs`` differ between arms;
3. fine-tuning, every arm x every seed: from the plain parent's scratch checkpoint of that seed (train.py
   ``--pretrained --pretrained-path``: backbone trained; final head, exits and uncertainty units start untrained);
4. every run's ``last.pth.tar`` evaluated on the validation split with timm_exits code (timm's eval transform, as
   train.py validates), final head and every exit; a table of mean, std and min-max over seeds
   (``WORK/table.md``, ``WORK/results.json``).
An arm is ``NAME`` or ``NAME=k=v;k=v`` (multi-exit model kwargs added to the shared ones); ``plain`` is the parent.
At most ``--jobs`` trainings run at once, each with ``OMP_NUM_THREADS=--threads``, logging to ``WORK/runs/*/log.txt``.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's timm_exits, also in the evaluation done here
PARENT = 'deit_tiny_patch16_224'  # its pretrained cfg loads a plain file (vit_*'s augreg tags expect .npz)
MEXIT = 'deit_tiny_patch16_224_mexit'
# a 6-block ViT on 32 px digits (16 patches of 8 px, each 2x2 of the original pixels): minutes on one CPU core
SHARED_KWARGS = ['img_size=32', 'patch_size=8', 'depth=6', 'embed_dim=64', 'num_heads=2', 'mlp_ratio=2']
EXIT_KWARGS_LAYERS = (2, 3, 4, 5)
EXIT_KWARGS = [f'exit_layers={EXIT_KWARGS_LAYERS}'.replace(' ', '')]
HALF_DEPTH = 3
# digits are not mirror-symmetric, and a 0.08 crop of an 8x8 digit is noise: mild augmentation only
TRAIN_ARGS = [
    '--opt', 'adamw', '--weight-decay', '0.05', '--sched', 'cosine', '--warmup-epochs', '2', '-b', '64',
    '--hflip', '0', '--scale', '0.7', '1', '--ratio', '0.85', '1.15', '--color-jitter', '0', '--crop-pct', '1',
    '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5', '--img-size', '32', '--num-classes', '10',
    '--device', 'cpu', '-j', '1', '--no-prefetcher', '--log-interval', '1000', '--checkpoint-hist', '1',
]


def parse_arm(spec: str) -> Tuple[str, List[str]]:
    """``NAME`` or ``NAME=k=v;k=v`` -> (name, extra model kwargs)."""
    name, _, kwargs = spec.partition('=')
    if not name or not name.replace('_', '').replace('-', '').isalnum():
        raise ValueError(f'arm {spec!r}: the name must be letters, digits, "_" or "-"')
    extra = [k for k in kwargs.split(';') if k]
    if name == 'plain' and extra:
        raise ValueError(f'arm {spec!r}: the plain parent takes no extra model kwargs')
    return name, extra


def train_command(args: argparse.Namespace, arm: Tuple[str, List[str]], seed: int, out: str, experiment: str,
                  pretrained: Optional[str]) -> List[str]:
    name, extra = arm
    model, kwargs = (PARENT, SHARED_KWARGS) if name == 'plain' else (MEXIT, SHARED_KWARGS + EXIT_KWARGS + extra)
    cmd = [sys.executable, os.path.join(args.timm_dir, 'train.py'), '--device-modules', 'timm_exits',
           '--data-dir', args.data, '--model', model, '--model-kwargs', *kwargs, *TRAIN_ARGS, '--seed', str(seed),
           '--output', out, '--experiment', experiment]
    if pretrained:
        cmd += ['--pretrained', '--pretrained-path', pretrained, '--epochs', str(args.finetune_epochs),
                '--lr', str(args.finetune_lr)]
    else:
        cmd += ['--epochs', str(args.epochs), '--lr', str(args.lr)]
    return cmd


def export_weights(checkpoint: str, path: str) -> None:
    """A train.py checkpoint's ``state_dict`` as safetensors (the fine-tuning runs' ``--pretrained-path``)."""
    if os.path.exists(path):
        return
    import torch
    from safetensors.torch import save_file
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']
    tmp = path + '.tmp'
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def evaluate_run(args: argparse.Namespace, arm: Tuple[str, List[str]], run_dir: str) -> Dict[str, Any]:
    """Top-1 of the final head and of every exit of ``last.pth.tar`` on the validation split."""
    import torch
    import timm
    import timm_exits  # noqa: F401  (registers the models)
    from timm.data import create_dataset, create_transform
    from timm_exits.data import make_loader, resolve_data_cfg
    from timm_exits.models._checkpoint import read_checkpoint_args
    from timm_exits.evaluation import accuracies, collect_outputs
    name, extra = arm
    kwargs = dict(a.split('=', 1) for a in (SHARED_KWARGS if name == 'plain' else SHARED_KWARGS + EXIT_KWARGS + extra))
    kwargs = {k: _literal(v) for k, v in kwargs.items()}
    model = timm.create_model(PARENT if name == 'plain' else MEXIT, num_classes=10,
                              checkpoint_path=os.path.join(run_dir, 'last.pth.tar'), **kwargs)
    config = resolve_data_cfg(model, recorded=read_checkpoint_args(os.path.join(run_dir, 'last.pth.tar')))
    dataset = create_dataset('', root=args.data, split='validation', transform=create_transform(**config))
    correct = collect_outputs(model, make_loader(dataset, 256), torch.device('cpu'))['correct']
    accs = accuracies(correct)
    layers = list(getattr(model, 'exit_layers', [6]))
    return {'final': accs[-1], 'exits': dict(zip(map(str, layers), accs)), 'num_images': correct.shape[1]}


def _literal(value: str) -> Any:
    import ast
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def run_all(args: argparse.Namespace, jobs: List[Dict[str, Any]]) -> None:
    """Run the pending trainings, at most ``args.jobs`` at once; a run with a ``done`` marker is not rerun, an
    interrupted one restarts from scratch."""
    pending = [j for j in jobs if not os.path.exists(os.path.join(j['dir'], 'done'))]
    running: List[Tuple[Dict[str, Any], subprocess.Popen, Any]] = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            if job.get('needs') and not os.path.exists(job['needs']):
                export_weights(job['needs_checkpoint'], job['needs'])
            shutil.rmtree(job['dir'], ignore_errors=True)  # an interrupted run restarts clean
            os.makedirs(job['dir'])
            log = open(os.path.join(job['dir'], 'log.txt'), 'w')
            print(f'{time.strftime("%H:%M:%S")} start {job["label"]}', flush=True)
            running.append((job, subprocess.Popen(job['cmd'], stdout=log, stderr=subprocess.STDOUT, env=env,
                                                  cwd=job['dir']), log))
        time.sleep(2)
        for item in list(running):
            job, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            ok = proc.returncode == 0 and os.path.exists(os.path.join(job['dir'], job['label'], 'last.pth.tar'))
            print(f'{time.strftime("%H:%M:%S")} {"done" if ok else "FAILED"} {job["label"]}', flush=True)
            if ok:
                open(os.path.join(job['dir'], 'done'), 'w').close()
            else:
                failed.append(job['label'])
                # fine-tuning runs that start from this run's checkpoint cannot run
                pending = [j for j in pending if not j.get('needs_checkpoint', '').startswith(job['dir'] + os.sep)]
    if failed:
        raise SystemExit(f'error: {len(failed)} training run(s) failed, see their log.txt: {failed}')


def stats(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.
    return f'{statistics.mean(values):.1f} ± {std:.1f} ({min(values):.1f}-{max(values):.1f})'


def table(results: Dict[str, Dict[str, Dict[str, Any]]], arms: Sequence[Tuple[str, List[str]]],
          seeds: Sequence[int]) -> str:
    """Markdown: per phase and arm, mean ± std (min-max) over seeds of each exit's and the final head's top-1."""
    lines = []
    layers = [str(v) for v in (*EXIT_KWARGS_LAYERS, 6)]
    for phase, rows in results.items():
        lines += [f'{phase}: validation top-1 (%), mean ± std (min-max) over seeds {list(seeds)}', '',
                  '| arm | ' + ' | '.join(f'block {v}' + (' (final)' if v == '6' else '') for v in layers)
                  + ' | final - plain | half / final |', '|---|' + '---|' * (len(layers) + 2)]
        plain = [rows['plain'][str(s)]['final'] for s in seeds] if 'plain' in rows else None
        for name, _ in arms:
            runs = [rows[name][str(s)] for s in seeds if str(s) in rows.get(name, {})]
            if not runs:
                continue
            cells = []
            for v in layers:
                vals = [r['exits'][v] for r in runs if v in r['exits']]
                cells.append(stats(vals) if vals else '')
            gap = stats([r['final'] - p for r, p in zip(runs, plain)]) if plain and name != 'plain' else ''
            half = [r['exits'][str(HALF_DEPTH)] / max(r['final'], 1e-9) for r in runs if str(HALF_DEPTH) in r['exits']]
            ratio = f'{statistics.mean(half):.2f}' if half else ''
            lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {gap} | {ratio} |')
        lines.append('')
    return '\n'.join(lines)



def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--timm-dir', default=os.environ.get('TIMM_DIR', ''),
                        help='pytorch-image-models checkout (its train.py); default $TIMM_DIR')
    parser.add_argument('--work', default=os.path.join('output', 'train_py_accuracy'))
    parser.add_argument('--arms', nargs='+', default=['plain', 'mexit'], help='NAME or NAME=k=v;k=v (see above)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3])
    parser.add_argument('--epochs', type=int, default=30, help='epochs from scratch')
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--finetune-epochs', type=int, default=10, help='epochs of fine-tuning (0: none)')
    parser.add_argument('--finetune-lr', type=float, default=5e-4)
    parser.add_argument('--phases', nargs='+', default=['scratch', 'finetune'], choices=['scratch', 'finetune'])
    parser.add_argument('--jobs', type=int, default=2, help='trainings at once')
    parser.add_argument('--threads', type=int, default=1, help='OMP_NUM_THREADS of each training')
    args = parser.parse_args(argv)
    if not args.timm_dir or not os.path.isfile(os.path.join(args.timm_dir, 'train.py')):
        parser.error(f'--timm-dir={args.timm_dir!r} has no train.py; give a pytorch-image-models checkout whose tag '
                     'matches the installed timm (or set $TIMM_DIR)')
    for name, value in (('--epochs', args.epochs), ('--jobs', args.jobs), ('--threads', args.threads)):
        if value < 1:
            parser.error(f'{name}={value} must be at least 1')
    if args.finetune_epochs < 0:
        parser.error(f'--finetune-epochs={args.finetune_epochs} must be 0 or more')
    try:
        arms = [parse_arm(a) for a in args.arms]
    except ValueError as e:
        parser.error(str(e))
    if 'finetune' in args.phases and 'plain' not in [a[0] for a in arms]:
        parser.error('--phases finetune starts from the plain arm\'s scratch checkpoints: add plain to --arms')
    args.work = os.path.abspath(args.work)
    args.data = os.path.join(args.work, 'data')
    from timm_exits.data import write_digits_folder
    write_digits_folder(args.data)
    phases = [p for p in ('scratch', 'finetune') if p in args.phases and (p == 'scratch' or args.finetune_epochs)]
    jobs: List[Dict[str, Any]] = []
    for phase in phases:
        for seed in args.seeds:
            for arm in arms:
                label = f'{phase}-{arm[0]}-s{seed}'
                run_dir = os.path.join(args.work, 'runs', label)
                job = dict(label=label, dir=run_dir, arm=arm, seed=seed, phase=phase)
                pretrained = None
                if phase == 'finetune':
                    base = os.path.join(args.work, 'runs', f'scratch-plain-s{seed}')
                    pretrained = job['needs'] = os.path.join(base, 'backbone.safetensors')
                    job['needs_checkpoint'] = os.path.join(base, f'scratch-plain-s{seed}', 'last.pth.tar')
                job['cmd'] = train_command(args, arm, seed, run_dir, label, pretrained)
                jobs.append(job)
    start = time.time()
    scratch = [j for j in jobs if j['phase'] == 'scratch']
    run_all(args, scratch)
    if 'finetune' in phases:
        for seed in args.seeds:  # a fine-tuning run starts from the plain scratch run of its seed
            if not os.path.exists(os.path.join(args.work, 'runs', f'scratch-plain-s{seed}', 'done')):
                run_all(args, [j for j in jobs if j['label'] == f'scratch-plain-s{seed}'] or [])
        run_all(args, [j for j in jobs if j['phase'] == 'finetune'])
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for job in jobs:
        path = os.path.join(job['dir'], 'eval.json')
        if not os.path.exists(path):
            res = evaluate_run(args, job['arm'], os.path.join(job['dir'], job['label']))
            with open(path + '.tmp', 'w') as f:
                json.dump(res, f)
            os.replace(path + '.tmp', path)
        with open(path) as f:
            results.setdefault(job['phase'], {}).setdefault(job['arm'][0], {})[str(job['seed'])] = json.load(f)
    text = table(results, arms, args.seeds)
    command = shlex.join(['python', *sys.argv] if argv is None else argv)
    text += (f'\nScratch: {args.epochs} epochs, lr {args.lr}; fine-tuning: {args.finetune_epochs} epochs, lr '
             f'{args.finetune_lr}; arms: {args.arms}. Command: {command}\n')
    for name, data in (('table.md', text), ('results.json', json.dumps(
            dict(results=results, arms=args.arms, seeds=args.seeds, epochs=args.epochs, lr=args.lr,
                 finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr), indent=1))):
        with open(os.path.join(args.work, name + '.tmp'), 'w') as f:
            f.write(data)
        os.replace(os.path.join(args.work, name + '.tmp'), os.path.join(args.work, name))
    print(text)
    print(f'{(time.time() - start) / 60:.1f} min')


if __name__ == '__main__':
    main()
