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

builds ``NAME``, loads the checkpoint strictly (another exit / life layout is refused), records the preprocessing it was
trained with in the pretrained cfg (timm validate.py's flags, else what the checkpoint records, else the model's own
cfg; so ``timm.data.resolve_data_config(model=...)`` of the loaded model gives its transform), exports timm's
``config.json``
and ``model.safetensors`` (``save_for_hf``), ``training_args.json`` and a ``README.md`` rendered from ``hub_cards/``
(results table and trade-off plot from the evaluation JSON of ``python -m timm_exits.validate``) into a temporary
folder that is renamed into place only when complete, then uploads it with ``HfApi.upload_folder``. The export holds
only files push wrote, plus the evaluation's plot if it is a PNG inside the checkpoint's folder (symlinks resolved);
a plot anywhere else is ignored with a warning and drawn again from the JSON.

The named models' cfgs and ``MissingWeightsError`` live beside the models (``timm_exits.models._pretrained``: the
models need them when they register), the model cards in ``timm_exits.hub.cards``; this module re-exports both.
"""
import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn
from huggingface_hub import HfApi

import timm
from timm.models import save_for_hf

from .._files import atomic_dir
from ..data import (
    DATA_CONFIG_KEYS, DataConfig, add_data_config_args, counting_record, data_config_flags, resolve_data_cfg,
)
from ..models._checkpoint import (
    CALIBRATION_KEY, apply_calibration, check_checkpoint_args, layout_args, read_checkpoint, same_value,
)
from ..models._pretrained import (  # noqa: F401  (the named models' cfgs live beside the models; re-exported here)
    _NOT_FOUND, DEFAULT_HUB_ORG, HUB_ORG_ENV, RECIPE_NOTE, WEIGHTS_NAME, MissingWeightsError, _missing_reason,
    _weights_location, explain_missing_weights, hub_org, published_cfg, published_models, recipe_of,
)
from .cards import (  # noqa: F401  (model cards; re-exported here)
    CARDS_DIR, PLOT_NAME, PNG_SIGNATURE, _allowed_plot, _family, _fmt, _layout_text, _plot, _results, _table,
    card_metadata, render_card,
)

__all__ = [
    'CARDS_DIR', 'DEFAULT_HUB_ORG', 'HUB_ORG_ENV', 'MissingWeightsError', 'card_metadata',
    'explain_missing_weights', 'export', 'hub_org', 'layout_args', 'main', 'published_cfg', 'published_models', 'push',
    'read_checkpoint', 'recipe_of', 'record_data_config', 'render_card',
]

_logger = logging.getLogger(__name__)


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
    regression = data.get('task') == 'regression'  # its sweeps hold one list per criterion
    for key in ('exits', 'thresholds', 'budgets', 'keep_rates') + (('budgeted_batch',) if regression else ()):
        rows = data.get(key) or []
        per_criterion = regression and key in ('thresholds', 'budgeted_batch')
        groups = list(rows.values()) if per_criterion and isinstance(rows, dict) else [rows]
        if not all(isinstance(g, list) and all(isinstance(r, dict) for r in g) for g in groups):
            raise ValueError(f'evaluation {path}: "{key}" must be a list of objects' + (
                ' or, for a regression model, an object of such lists (one per criterion)' if per_criterion else ''))
        data[key] = rows
    data['_dir'] = str(path.parent)
    return data


# --- export and push ---------------------------------------------------------------------------------------------

def _check_evaluation_preprocessing(evaluation: Optional[Dict[str, Any]], data_config: DataConfig) -> None:
    """Refuse an evaluation (its card table and plot) measured with other preprocessing than the one pushed."""
    seen = (evaluation or {}).get('data_config') or {}
    pushed = data_config.record()
    diff = [k for k in DATA_CONFIG_KEYS if k in seen and not same_value(seen[k], pushed.get(k))]
    if seen and (seen.get('counting') or pushed.get('counting')) and not same_value(
            seen.get('counting'), pushed.get('counting')):  # whole images or other crops than the push records
        seen, pushed = {**seen, 'counting': seen.get('counting')}, {**pushed, 'counting': pushed.get('counting')}
        diff.append('counting')
    if diff:
        raise ValueError(
            f'--eval {evaluation.get("_dir", "")}/eval.json was measured with ' + ', '.join(
                f'{k}={seen[k]}' for k in diff) + ', but the push records ' + ', '.join(
                f'{k}={pushed[k]}' for k in diff) + ': evaluate with the preprocessing the model was trained with, '
            'or pass the same flags here')


def record_data_config(model: nn.Module, data_config: DataConfig) -> None:
    """Put the resolved preprocessing into ``model.pretrained_cfg`` (what ``save_for_hf`` writes to config.json and
    the card shows); the test size and crop go, since the resolution already chose between train and test."""
    cfg = {k: v for k, v in (model.pretrained_cfg or {}).items() if k not in ('test_input_size', 'test_crop_pct')}
    cfg.update({k: v for k, v in data_config.items() if k != 'crop_border_pixels'})
    model.pretrained_cfg = cfg
    # the counting protocol (crop, resize) has no place in timm's pretrained cfg: config.json keeps it beside
    model.counting_protocol = counting_record(data_config.counting) if getattr(data_config, 'counting', None) \
        else None


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
        model_args: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the Hub folder of ``model`` to ``out_dir`` (new or empty): config.json + model.safetensors (timm's
    ``save_for_hf``, ``model_args`` with the whole layout), training_args.json, tradeoff.png, README.md. Written
    into a temporary folder beside ``out_dir`` and renamed into place when complete; removed on any error.

    The evaluation's own plot is copied only from inside ``source_dir`` (the checkpoint's folder); with None, or a
    plot elsewhere, the plot is drawn from the evaluation JSON. No other file is read into the export.

    ``model_args``: the ``create_model`` arguments the model was built with beyond its architecture's own (e.g. a
    parent's ``depth`` or ``img_size``); recorded with the layout so ``hf-hub:`` / ``local-dir:`` rebuild it."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f'export folder {out} exists and is not empty; name a new one')
    with atomic_dir(out) as tmp:
        data = card_metadata(name, cards_dir)
        counting = getattr(model, 'counting_protocol', None)
        save_for_hf(
            model, tmp, model_config={**_label_config(model, data, label_names),
                                      **({'counting': counting} if counting else {})},
            model_args={**(model_args or {}), **layout_args(model)},
            safe_serialization=True)
        if training_args:
            (tmp / 'training_args.json').write_text(json.dumps(training_args, indent=2, default=str))
        plot = _plot(evaluation, tmp, source_dir)
        card = render_card(model, name, repo_id, evaluation, plot, bool(training_args), cards_dir)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
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
        data_config: Optional[Dict[str, Any]] = None,
        use_train_size: bool = False,
) -> Tuple[Optional[Path], Optional[str]]:
    """Check ``checkpoint`` against ``model_name`` (strict load, training-args layout), export it and upload it.
    ``data_config``: preprocessing overrides (``timm_exits.data.resolve_data_cfg``), else what the checkpoint records,
    else the model's pretrained cfg; recorded in the pushed pretrained cfg.

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
    apply_calibration(model, (args or {}).get(CALIBRATION_KEY))  # the calibrated default goes to config and card
    resolved = resolve_data_cfg(model, data_config, args, use_train_size=use_train_size)
    _logger.info(f'preprocessing: {resolved.describe()}')
    _check_evaluation_preprocessing(evaluation, resolved)
    record_data_config(model, resolved)
    with tempfile.TemporaryDirectory() as scratch:
        folder = export(model, local_dir or Path(scratch) / 'export', model_name, repo_id, evaluation, args,
                        label_names, cards_dir, source_dir=Path(checkpoint).resolve().parent,
                        model_args={k: v for k, v in (model_kwargs or {}).items() if k != 'num_classes'})
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
    add_data_config_args(p)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        folder, url = push(
            a.checkpoint, a.model, a.repo, a.eval, a.local_dir, not a.no_upload, a.ema, a.model_kwargs,
            a.label_names, a.private, a.revision, a.cards_dir, data_config_flags(a), a.use_train_size)
    except (ValueError, RuntimeError, OSError) as e:  # bad input, unknown model, missing file, Hub errors
        parser.exit(2, f'error: {e}\n')
    print('\n'.join(f'{k}: {v}' for k, v in (('exported', folder), ('committed', url)) if v))
    return 0
