""" Fine-tuned timm-exits checkpoints on the Hugging Face Hub: named models, publishing and loading.

Download. Named models (``vit_b16_mexit_cars``, ``vit_b16_mexit_aircraft``, ``deit_small_liferegress.in1k``) carry a
pretrained cfg pointing at ``{org}/{name}`` on the Hub, ``org`` from the ``TIMM_EXITS_HUB_ORG`` environment variable
(read when ``timm_exits`` is imported, default ``timm-exits``), so ``timm.create_model(name, pretrained=True)`` loads
their ``model.safetensors`` through timm. Until a repo holds weights that load raises ``MissingWeightsError`` naming the
repo and the recipe that trains them. ``create_model('hf-hub:ORG/REPO', pretrained=True)`` and
``create_model('local-dir:PATH', pretrained=True)`` rebuild the exact exit / life layout from the exported
``config.json`` (its ``model_args``) and load the weights strictly.

Publishing::

    python -m timm_exits.hub push CHECKPOINT --model NAME [--repo ORG/NAME] [--eval eval.json] [--local-dir DIR]
        [--no-upload]

builds ``NAME``, loads the checkpoint strictly (another exit / life layout is refused), exports timm's ``config.json``
and ``model.safetensors`` (``save_for_hf``), ``training_args.json`` and a ``README.md`` rendered from ``hub_cards/``
(results table and trade-off plot from the evaluation JSON of ``python -m timm_exits.validate``) into a temporary
folder that is renamed into place only when complete, then uploads it with ``HfApi.upload_folder``. The export holds
only files push wrote, plus the evaluation's plot if it is a PNG inside the checkpoint's folder (symlinks resolved);
a plot anywhere else is ignored with a warning and drawn again from the JSON.
"""
import argparse
import functools
import json
import logging
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.errors import (
    EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
)
from safetensors import SafetensorError

import timm
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg, save_for_hf

from ..models._checkpoint import check_checkpoint_args, layout_args, read_checkpoint

__all__ = [
    'CARDS_DIR', 'DEFAULT_HUB_ORG', 'HUB_ORG_ENV', 'MissingWeightsError', 'card_metadata',
    'explain_missing_weights', 'export', 'hub_org', 'layout_args', 'main', 'published_cfg', 'published_models', 'push',
    'read_checkpoint', 'recipe_of', 'render_card',
]

HUB_ORG_ENV = 'TIMM_EXITS_HUB_ORG'
DEFAULT_HUB_ORG = 'timm-exits'
WEIGHTS_NAME = 'model.safetensors'
PLOT_NAME = 'tradeoff.png'
RECIPE_NOTE = 'recipe: '
CARDS_DIR = Path(__file__).resolve().parents[2] / 'hub_cards'
_NOT_FOUND = (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, OfflineModeIsEnabled)
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_logger = logging.getLogger(__name__)


class MissingWeightsError(RuntimeError):
    """A named model's Hub repo holds no weights (yet); the message names the repo and the recipe producing them."""


# --- named models: cfgs and the download side ------------------------------------------------------------------------

def hub_org() -> str:
    """Hub organisation of the named models: ``$TIMM_EXITS_HUB_ORG``, default ``timm-exits``."""
    return os.environ.get(HUB_ORG_ENV) or DEFAULT_HUB_ORG


def published_cfg(cfg_fn: Callable[..., Dict[str, Any]], name: str, recipe: str, **kwargs: Any) -> Dict[str, Any]:
    """Pretrained cfg of weights published as ``{hub_org()}/{name}`` (its model.safetensors), the training command
    ``recipe`` kept as a note (the marker ``explain_missing_weights`` looks for)."""
    hub = dict(hf_hub_id=f'{hub_org()}/{name}', hf_hub_filename=WEIGHTS_NAME, notes=(RECIPE_NOTE + recipe,))
    return cfg_fn(**hub, **kwargs)


def recipe_of(cfg: Any) -> Optional[str]:
    """The recipe note of a pretrained cfg (dict or ``PretrainedCfg``), None for cfgs of unpublished weights."""
    notes = cfg.get('notes') if isinstance(cfg, dict) else getattr(cfg, 'notes', None)
    return next((n[len(RECIPE_NOTE):] for n in notes or () if n.startswith(RECIPE_NOTE)), None)


def published_models() -> List[str]:
    """Every registered ``name`` / ``name.tag`` whose weights are published by this package (a recipe note)."""
    return [name for name in timm.list_pretrained() if recipe_of(get_pretrained_cfg(name))]


def _weights_location(cfg: Any) -> str:
    if cfg.source == 'local-dir' or (cfg.file and not cfg.hf_hub_id):
        return f'{cfg.file}'
    if cfg.hf_hub_id:
        return f"Hugging Face Hub repo '{cfg.hf_hub_id}' ({cfg.hf_hub_filename or WEIGHTS_NAME})"
    return f'{cfg.url}'


def _missing_reason(error: Exception, filename: str) -> str:
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return 'not in the local cache, and the Hub is unreachable or HF_HUB_OFFLINE is set'
    if isinstance(error, RevisionNotFoundError):
        return 'the revision does not exist'
    if isinstance(error, RepositoryNotFoundError):
        return 'the repo does not exist yet (or is private)'
    return f'the repo has no {filename} yet'


def explain_missing_weights(create_fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Wrap a family's ``_create_*``: a pretrained load of published weights that are not on the Hub raises
    ``MissingWeightsError`` with the repo and the recipe (never a bare 404 or a random init), and an unreadable
    safetensors file raises a ValueError naming where it came from."""

    @functools.wraps(create_fn)
    def create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        try:
            return create_fn(variant, pretrained, **kwargs)
        except (*_NOT_FOUND, SafetensorError) as e:
            if not pretrained:
                raise
            cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
            name = f'{variant}.{cfg.tag}' if cfg.tag else variant
            if isinstance(e, SafetensorError):
                raise ValueError(
                    f'{name}: the weights at {_weights_location(cfg)} are not a valid safetensors file ({e}). Remove '
                    f'the cached copy (`hf cache rm` or delete it under HF_HUB_CACHE) and publish the checkpoint again.'
                ) from e
            recipe = recipe_of(cfg)
            if recipe is None or not cfg.hf_hub_id:
                raise
            raise MissingWeightsError(
                f"{name}: no pretrained weights at Hugging Face Hub repo '{cfg.hf_hub_id}' "
                f"({_missing_reason(e, cfg.hf_hub_filename or WEIGHTS_NAME)}). Train them with\n    {recipe}\n"
                f'and publish them with\n    python -m timm_exits.hub push CHECKPOINT --model {name} '
                f'--repo {cfg.hf_hub_id}\n'
                f'Set {HUB_ORG_ENV} before importing timm_exits to load from another organisation, or use '
                f'pretrained=False for a random init.'
            ) from e

    return create


# --- checkpoint input ------------------------------------------------------------------------------------------------

def check_training_args(model: nn.Module, args: Optional[Dict[str, Any]]) -> None:
    """Refuse recorded training args (train.py's ``args``, a recipe's ``recipe`` or safetensors metadata) whose
    ``model_kwargs`` set a layout the weights cannot show (``HIDDEN_LAYOUT``) or another ``num_classes``."""
    check_checkpoint_args(model, args)


def load_evaluation(path: Union[str, Path]) -> Dict[str, Any]:
    """Evaluation JSON of ``python -m timm_exits.validate`` (optional fields may be missing), its rows checked."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f'evaluation {path} cannot be read as JSON ({e})') from e
    if not isinstance(data, dict):
        raise ValueError(f'evaluation {path} must hold a JSON object, got {type(data).__name__}')
    for key in ('exits', 'thresholds', 'budgets', 'keep_rates'):
        rows = data.get(key) or []
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f'evaluation {path}: "{key}" must be a list of objects')
        data[key] = rows
    data['_dir'] = str(path.parent)
    return data


# --- model card --------------------------------------------------------------------------------------------------

def _family(arch: str) -> str:
    return timm.models.model_entrypoint(arch).__module__.rsplit('.', 1)[-1]


def card_metadata(name: str, cards_dir: Union[str, Path] = CARDS_DIR) -> Dict[str, Any]:
    """Card data of ``name`` (``arch`` or ``arch.tag``): ``hub_cards/_{family}.json`` updated by ``{name}.json`` (or
    ``{arch}.json``); tags are joined."""
    cards_dir, arch = Path(cards_dir), name.split('.', 1)[0]
    data: Dict[str, Any] = {}
    for file in dict.fromkeys((f'_{_family(arch)}.json', f'{arch}.json', f'{name}.json')):
        path = cards_dir / file
        if path.is_file():
            extra = json.loads(path.read_text())
            tags = data.get('tags', []) + [t for t in extra.pop('tags', []) if t not in data.get('tags', [])]
            data.update(extra, tags=tags)
    if not data:
        raise FileNotFoundError(f'no model card data for {name} in {cards_dir}')
    return data


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _table(rows: Sequence[Dict[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> str:
    """Markdown table of ``rows``; ``columns`` are (header, key, format spec); a missing value shows as '-'."""
    lines = ['| ' + ' | '.join(c[0] for c in columns) + ' |', '|' + '---|' * len(columns)]
    return '\n'.join(lines + ['| ' + ' | '.join(_fmt(r.get(k), f) for _, k, f in columns) + ' |' for r in rows])


def _results(evaluation: Optional[Dict[str, Any]]) -> str:
    if evaluation is None:
        return 'No evaluation was supplied with this upload.'
    count = f' ({evaluation["num_images"]} images)' if evaluation.get('num_images') else ''
    parts = [f'Evaluated on {evaluation.get("dataset", "the validation set")}{count} with '
             f'`python -m timm_exits.validate` (`{evaluation.get("model", "?")}`).']
    acc, cost = ('Top-1 (%)', 'accuracy', '.2f'), ('Mean share of full FLOPs', 'mean_cost', '.3f')
    sections = (
        ('exits', 'Every image leaves at one exit (numbered by the block it follows); cost as a share of the full '
                  "model's FLOPs; an exit is practical when it is more accurate than every earlier exit.",
         [('Exit (block)', 'layer', 'g'), acc, ('Share of full FLOPs', 'cost', '.3f'), ('GFLOPs', 'gflops', '.2f'),
          ('Latency (ms)', 'latency_ms', '.2f'), ('Practical', 'practical', '')]),
        ('thresholds', 'Per-image early exit at a threshold (`model(x, threshold=t)`).',
         [('Threshold', 'threshold', 'g'), acc, cost]),
        ('budgets', 'Compute budgets (`model(x, budget=b)`).', [('Budget', 'budget', 'g'), acc, cost]),
        ('keep_rates', 'Patch slimming at a keep rate (`model(x, keep_rate=r)`).',
         [('Keep rate', 'keep_rate', 'g'), acc, ('FLOPs ratio', 'flops_ratio', '.3f'), ('GFLOPs', 'gflops', '.2f'),
          ('Latency (ms)', 'latency_ms', '.2f')]),
    )
    parts += [f'{text}\n\n{_table(evaluation[key], cols)}' for key, text, cols in sections if evaluation.get(key)]
    return '\n\n'.join(parts)


def _allowed_plot(evaluation: Dict[str, Any], allowed_dir: Optional[Union[str, Path]]) -> Optional[Path]:
    """The evaluation's plot file if it may be published: a regular PNG file whose real path (symlinks resolved) lies
    inside ``allowed_dir`` (the checkpoint's folder); None, with a warning, for anything else."""
    name = evaluation.get('plot')
    if not name:
        return None
    src = Path(evaluation.get('_dir', '.')) / str(name)
    real = src.resolve()
    root = Path(allowed_dir).resolve() if allowed_dir is not None else None
    if root is None or not real.is_relative_to(root):
        _logger.warning(f'evaluation plot {src} is not inside the checkpoint\'s folder {root}: not published; '
                        f'drawing the trade-off plot from the evaluation JSON instead')
        return None
    if not real.is_file():
        _logger.warning(f'evaluation plot {src} does not exist; drawing the trade-off plot here')
        return None
    with open(real, 'rb') as f:
        if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            _logger.warning(f'evaluation plot {src} is not a PNG file: not published; drawing the trade-off plot here')
            return None
    return real


def _plot(evaluation: Optional[Dict[str, Any]], out_dir: Path, allowed_dir: Optional[Union[str, Path]] = None) -> str:
    """Markdown for the trade-off plot: the evaluation's own plot copied when it is a PNG inside ``allowed_dir``
    (``_allowed_plot``), else drawn like Fig. 2 of 000_*.txt (accuracy against mean compute, exits marked, practical
    exits circled) with matplotlib, if installed."""
    if evaluation is None:
        return ''
    src = _allowed_plot(evaluation, allowed_dir)
    if src is not None:
        shutil.copyfile(src, out_dir / PLOT_NAME)
        return f'![Accuracy against compute]({PLOT_NAME})'
    exits, curves = evaluation['exits'], [(k, evaluation[k]) for k in ('thresholds', 'budgets') if evaluation[k]]
    rates = evaluation['keep_rates']
    if not (exits or curves or rates):
        return ''
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return '_No trade-off plot: matplotlib was not installed where this card was rendered._'
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for key, rows in curves:
        rows = sorted((r for r in rows if r.get('mean_cost') is not None), key=lambda r: r['mean_cost'])
        ax.plot([r['mean_cost'] for r in rows], [r['accuracy'] for r in rows], '-' if key == 'thresholds' else '--',
                marker='.', label=f'{key[:-1]} sweep')
    points = [r for r in exits if r.get('cost') is not None]
    if points:
        ax.scatter([r['cost'] for r in points], [r['accuracy'] for r in points], marker='s', color='k', label='exit')
        for r in points:
            ax.annotate(f'{r.get("layer")}', (r['cost'], r['accuracy']), textcoords='offset points', xytext=(4, -10))
        practical = [r for r in points if r.get('practical')]
        ax.scatter([r['cost'] for r in practical], [r['accuracy'] for r in practical], s=180, facecolors='none',
                   edgecolors='C3', label='practical exit')
    rates = [r for r in rates if r.get('flops_ratio') is not None]
    if rates:
        ax.plot([r['flops_ratio'] for r in rates], [r['accuracy'] for r in rates], '-o', label='keep rate')
        for r in rates:
            ax.annotate(f'{r.get("keep_rate")}', (r['flops_ratio'], r['accuracy']), textcoords='offset points',
                        xytext=(4, -10))
    ax.set_xlabel("mean compute (share of the full model's FLOPs)")
    ax.set_ylabel('top-1 accuracy (%)')
    ax.grid(alpha=.3)
    ax.legend()
    fig.savefig(out_dir / PLOT_NAME, dpi=150, bbox_inches='tight')
    return f'![Accuracy against compute]({PLOT_NAME})'


def _layout_text(model: nn.Module) -> str:
    args = layout_args(model)
    if 'exit_layers' in args:
        exits = ', '.join(str(v) for v in args['exit_layers'])
        return (f'exits after blocks {exits} and the final head (block {model.depth}), `{args["exit_head"]}` exit '
                f'heads, `{args["exit_criterion"]}` exit criterion')
    return (f'life regression after block {args["life_layer"]}, patches leave after blocks '
            f'{", ".join(str(v) for v in args["prune_layers"])}, default keep rate {args.get("keep_rate")}, '
            f'U = {args["U"]}')


def render_card(
        model: nn.Module,
        name: str,
        repo_id: str,
        evaluation: Optional[Dict[str, Any]] = None,
        plot: str = '',
        has_args: bool = False,
        cards_dir: Union[str, Path] = CARDS_DIR,
) -> str:
    """README.md of a published checkpoint: timm-style YAML front matter, details, usage, results and citation, from
    ``hub_cards/template.md`` and the card data of ``name``."""
    data, cfg = card_metadata(name, cards_dir), model.pretrained_cfg
    parent = str(cfg.get('hf_hub_id'))
    base_model = data.get('base_model') or (parent if parent.startswith('timm/') else None)
    meta = ModelCardData(
        library_name='timm', license=data.get('license') or cfg.get('license'), tags=data['tags'],
        datasets=data.get('datasets') or None, base_model=base_model, pipeline_tag='image-classification')
    recipe = recipe_of(cfg)
    named = recipe is not None and cfg.get('hf_hub_id') == repo_id
    paper = cfg.get('paper_name') or data.get('paper_title', '-')
    paper_ids = cfg.get('paper_ids')
    if paper_ids:
        paper += ''.join(f' ([{p}](https://arxiv.org/abs/{p[6:]}))' if p.startswith('arXiv:') else f' ({p})'
                         for p in ([paper_ids] if isinstance(paper_ids, str) else paper_ids))
    size = model.patch_embed.img_size
    fields = dict(
        front_matter=meta.to_yaml(),
        repo_id=repo_id,
        title=data.get('title', name),
        description=data.get('description', ''),
        architecture=f'`{name.split(".", 1)[0]}`: {_layout_text(model)}',
        params=f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f}',
        input=(f'{size[0]} x {size[1]}, mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])}, crop_pct '
               f'{cfg.get("crop_pct", 1.):.4g} ({cfg.get("crop_mode", "center")}, {cfg.get("interpolation")})'),
        classes=f'{model.num_classes}' + (f' ({data["labels_note"]})' if data.get('labels_note') else ''),
        dataset=data.get('dataset', '-'),
        base_model=f'[{base_model}](https://huggingface.co/{base_model})' if base_model else '-',
        paper=paper,
        recipe=f'`{recipe}`' if recipe else '-',
        training_args='[training_args.json](training_args.json)' if has_args else '-',
        create_name=name if named else f'hf-hub:{repo_id}',
        hub_name=f'hf-hub:{repo_id}',
        usage='\n'.join(data.get('usage', [])),
        results=_results(evaluation),
        plot=plot,
        citation=data.get('citation', ''),
    )
    return string.Template((Path(cards_dir) / 'template.md').read_text()).substitute(fields)


# --- export and push ---------------------------------------------------------------------------------------------

def _label_config(model: nn.Module, data: Dict[str, Any], label_names: Optional[Union[str, Path]]) -> Dict[str, Any]:
    """``label_names`` (and descriptions) for config.json: from a file (one name a line) or timm's ImageNet info."""
    if label_names:
        names = [line.strip() for line in Path(label_names).read_text().splitlines() if line.strip()]
        if len(names) != model.num_classes:
            raise ValueError(f'--label-names {label_names} has {len(names)} names for {model.num_classes} classes')
        return dict(label_names=names)
    if data.get('label_names') and model.num_classes > 0:
        from timm.data import ImageNetInfo
        info = ImageNetInfo(data['label_names'])
        if info.num_classes() == model.num_classes:
            return dict(label_names=info.label_names(), label_descriptions=info.label_descriptions(as_dict=True))
    return {}


def export(
        model: nn.Module,
        out_dir: Union[str, Path],
        name: str,
        repo_id: str,
        evaluation: Optional[Dict[str, Any]] = None,
        training_args: Optional[Dict[str, Any]] = None,
        label_names: Optional[Union[str, Path]] = None,
        cards_dir: Union[str, Path] = CARDS_DIR,
        source_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Write the Hub folder of ``model`` to ``out_dir`` (new or empty): config.json + model.safetensors (timm's
    ``save_for_hf``, ``model_args`` with the whole layout), training_args.json, tradeoff.png, README.md. Written
    into a temporary folder beside ``out_dir`` and renamed into place when complete; removed on any error.

    The evaluation's own plot is copied only from inside ``source_dir`` (the checkpoint's folder); with None, or a
    plot elsewhere, the plot is drawn from the evaluation JSON. No other file is read into the export."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f'export folder {out} exists and is not empty; name a new one')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', suffix='.partial', dir=out.parent))
    try:
        data = card_metadata(name, cards_dir)
        save_for_hf(
            model, tmp, model_config=_label_config(model, data, label_names), model_args=layout_args(model),
            safe_serialization=True)
        if training_args:
            (tmp / 'training_args.json').write_text(json.dumps(training_args, indent=2, default=str))
        plot = _plot(evaluation, tmp, source_dir)
        card = render_card(model, name, repo_id, evaluation, plot, bool(training_args), cards_dir)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def push(
        checkpoint: Union[str, Path],
        model_name: str,
        repo_id: Optional[str] = None,
        evaluation: Optional[Union[str, Path]] = None,
        local_dir: Optional[Union[str, Path]] = None,
        upload: bool = True,
        use_ema: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        label_names: Optional[Union[str, Path]] = None,
        private: bool = False,
        revision: Optional[str] = None,
        cards_dir: Union[str, Path] = CARDS_DIR,
) -> Tuple[Optional[Path], Optional[str]]:
    """Check ``checkpoint`` against ``model_name`` (strict load, training-args layout), export it and upload it.

    Returns:
        (the local export folder or None, the commit URL or None).
    """
    if not upload and local_dir is None:
        raise ValueError('--no-upload needs --local-dir: there would be nothing left to see')
    state_dict, args = read_checkpoint(checkpoint, use_ema)  # read before the model is built: fail fast
    evaluation = load_evaluation(evaluation) if evaluation else None
    model = timm.create_model(model_name, **(model_kwargs or {})).eval()
    layout_args(model)  # refuses models of other families
    if repo_id is None and recipe_of(model.pretrained_cfg):
        repo_id = model.pretrained_cfg.get('hf_hub_id')  # a named model goes to its own repo
    if not repo_id:
        raise ValueError(f'--repo is needed: {model_name} has no Hub repo of its own')
    check_checkpoint_args(model, args, f'checkpoint {checkpoint}')
    try:
        model.load_state_dict(state_dict, strict=True)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f'checkpoint {checkpoint} does not fit {model_name}: {e}') from e
    with tempfile.TemporaryDirectory() as scratch:
        folder = export(model, local_dir or Path(scratch) / 'export', model_name, repo_id, evaluation, args,
                        label_names, cards_dir, source_dir=Path(checkpoint).resolve().parent)
        url = None
        if upload:
            api = HfApi(library_name='timm-exits')
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision, commit_message=f'Add {model_name} weights')
            url = getattr(info, 'commit_url', str(info))
    return (folder if local_dir else None), url


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m timm_exits.hub push ...``: see the module docstring."""
    from timm.utils import ParseKwargs
    parser = argparse.ArgumentParser(prog='python -m timm_exits.hub', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('push', help='publish a checkpoint with its config and model card')
    p.add_argument('checkpoint', help='.safetensors state dict or timm train.py .pth / .pth.tar checkpoint')
    p.add_argument('--model', required=True, help='registered model name (e.g. vit_b16_mexit_cars)')
    p.add_argument('--repo', default=None, help='Hub repo ORG/NAME (default: the named model\'s own repo)')
    p.add_argument('--eval', default=None, help='evaluation JSON of python -m timm_exits.validate')
    p.add_argument('--local-dir', default=None, help='also keep the exported folder here (new or empty)')
    p.add_argument('--no-upload', action='store_true', help='export only (needs --local-dir)')
    p.add_argument('--ema', action='store_true', help='publish state_dict_ema instead of state_dict')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra create_model kwargs k=v')
    p.add_argument('--label-names', default=None, help='text file, one class name a line, for config.json')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', default=None, help='branch to commit to (default: main)')
    p.add_argument('--cards-dir', default=str(CARDS_DIR), help='model card templates and data')
    a = parser.parse_args(argv)
    try:
        folder, url = push(
            a.checkpoint, a.model, a.repo, a.eval, a.local_dir, not a.no_upload, a.ema, a.model_kwargs,
            a.label_names, a.private, a.revision, a.cards_dir)
    except (ValueError, RuntimeError, OSError) as e:  # bad input, unknown model, missing file, Hub errors
        parser.exit(2, f'error: {e}\n')
    print('\n'.join(f'{k}: {v}' for k, v in (('exported', folder), ('committed', url)) if v))
    return 0
