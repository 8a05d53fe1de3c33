""" Reading timm-exits checkpoints: weights, and the model arguments recorded beside them.

Three sources record how a checkpoint's model was built (``model``, ``model_kwargs``, ``num_classes``) and the
preprocessing it was trained with (``data_config``; train.py's ``mean``, ``std``, ``img_size``, ...):

- a recipe's ``model.safetensors`` (``timm_exits.train``): safetensors metadata key ``'timm_exits'``, a JSON object;
- a recipe's ``last.pth.tar``: key ``'recipe'``, a dict;
- timm's train.py checkpoints (``last.pth.tar``, ``model_best.pth.tar``): key ``'args'``, an ``argparse.Namespace``.

Some layout arguments change what the weights mean without changing their keys or shapes (``HIDDEN_LAYOUT``: the exit
criterion, where the life predictor sits and where patches leave, the temperature U, the default keep rate); a load
that can read them compares them with the model and refuses a mismatch, naming the keyword argument to pass.

``timm.create_model(name, checkpoint_path=...)`` loads after the entry function returns, so the entry function never
sees the path; ``install_checkpoint_loader`` wraps timm's factory-level ``load_checkpoint`` so that, for this package's
models only, the load goes through ``read_checkpoint`` (errors that name the file) and ``load_checkpoint_into`` (the
recorded layout checked). Every other model loads exactly as timm loads it.
"""
import argparse
import functools
import inspect
import json
import math
import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from timm.models import clean_state_dict

__all__ = [
    'CALIBRATION_KEY', 'HIDDEN_LAYOUT', 'METADATA_KEY', 'apply_calibration', 'check_checkpoint_args',
    'checkpoint_model_args', 'install_checkpoint_loader',
    'layout_args', 'load_checkpoint_into', 'read_checkpoint', 'read_checkpoint_args', 'same_value',
]

METADATA_KEY = 'timm_exits'
CALIBRATION_KEY = 'calibration'  # inside the METADATA_KEY object: the result of timm_exits.calibrate
HIDDEN_LAYOUT = ('exit_criterion', 'life_layer', 'prune_layers', 'U', 'keep_rate', 'task',
                 'exit_input_size')  # not visible in the weights (a CNN's exit heads and costs are sized at the last)


def layout_args(model: nn.Module) -> Dict[str, Any]:
    """Constructor arguments fixing the exit / life layout of a timm-exits model, JSON-ready (timm's ``model_args``):
    the family's own ``layout_args()``."""
    if not callable(getattr(model, 'layout_args', None)):
        raise ValueError(
            f'{type(model).__name__} is not a timm-exits model (a <parent>_mexit, _liferegress or _mexit_liferegress '
            f'model); publish it with timm.models.push_to_hf_hub')
    return {k: v for k, v in model.layout_args().items() if v is not None}


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    text = text[0].split('. ')[0] if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + '...'


def _torch_load(path: Path, map_location: Union[str, torch.device]) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                      if g != 'argparse.Namespace']
        except Exception:  # not a zip checkpoint at all
            unsafe = []
        if unsafe:
            raise ValueError(
                f'checkpoint {path} holds Python objects that torch.load(weights_only=True) refuses to unpickle '
                f'({", ".join(unsafe[:4])}); save its state dict as safetensors where it was made') from e
        raise _unreadable(path, e) from e
    except Exception as e:  # a cut or damaged file: torch raises RuntimeError, EOFError, KeyError, ... by where
        raise _unreadable(path, e) from e


def _unreadable(path: Path, error: BaseException) -> ValueError:
    return ValueError(
        f'checkpoint {path} is truncated, corrupt or not a torch checkpoint: torch.load cannot read it '
        f'({type(error).__name__}: {_first_line(error)}); write it again')


def read_checkpoint(
        path: Union[str, Path],
        use_ema: bool = False,
        prefer_ema: bool = False,
        map_location: Union[str, torch.device] = 'cpu',
) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """State dict and recorded training arguments of a checkpoint, read without unpickling code.

    Args:
        path: ``.safetensors`` file, or a ``.pth`` / ``.pth.tar`` checkpoint (``state_dict`` / ``model``, EMA in
            ``state_dict_ema`` / ``model_ema``).
        use_ema: Read the EMA weights; a checkpoint without them is an error.
        prefer_ema: Read the EMA weights when there are some (what ``timm.models.load_checkpoint`` does).
        map_location: Device of the tensors.

    Returns:
        The state dict (``module.`` / ``_orig_mod.`` prefixes stripped) and the recorded arguments as a dict (the
        safetensors metadata, the recipe, or timm train.py's ``args``), None when the file records none.

    Raises:
        FileNotFoundError: The file does not exist. ValueError: it cannot be read, naming the file and why.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist' + (' (it is a folder)' if path.is_dir() else ''))
    if path.suffix == '.safetensors':
        if use_ema:
            raise ValueError(
                f'EMA weights asked for (--ema), but checkpoint {path} is a safetensors state dict without them')
        try:
            state_dict = load_file(path, device=str(map_location))
            with safe_open(path, 'pt') as f:
                metadata = f.metadata() or {}
        except SafetensorError as e:
            raise ValueError(f'checkpoint {path} is not a valid safetensors file ({e})') from e
        return clean_state_dict(state_dict), _parse_metadata(path, metadata)
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a state dict or a checkpoint dict')
    ema_keys, plain_keys = ('state_dict_ema', 'model_ema'), ('state_dict', 'model')
    keys = ema_keys if use_ema else (ema_keys + plain_keys if prefer_ema else plain_keys)
    key = next((k for k in keys if isinstance(ckpt.get(k), dict)), None)
    if use_ema and key is None:
        raise ValueError(f'EMA weights asked for (--ema), but checkpoint {path} has no state_dict_ema / model_ema '
                         f'(keys: {sorted(ckpt)})')
    state_dict = clean_state_dict(ckpt[key] if key else ckpt)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f'checkpoint {path} holds no state dict: non-tensor entries {bad[:4]} (keys: {sorted(ckpt)})')
    args = (ckpt.get('args') or ckpt.get('recipe')) if key else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if isinstance(args, dict) and isinstance(ckpt.get('data_config'), dict):  # a recipe's whole preprocessing
        args = {**args, 'data_config': ckpt['data_config']}
    return state_dict, args if isinstance(args, dict) else None


def _parse_metadata(path: Path, metadata: Dict[str, str]) -> Optional[Dict[str, Any]]:
    if METADATA_KEY not in metadata:
        return None
    try:
        args = json.loads(metadata[METADATA_KEY])
    except ValueError as e:
        raise ValueError(f'checkpoint {path}: its {METADATA_KEY!r} metadata is not valid JSON ({e})') from e
    if not isinstance(args, dict):
        raise ValueError(f'checkpoint {path}: its {METADATA_KEY!r} metadata must be a JSON object')
    return args


def read_checkpoint_args(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The recorded arguments of a checkpoint (see ``read_checkpoint``) without keeping its weights; for a
    safetensors file only its header is read."""
    path = Path(path)
    if path.suffix == '.safetensors' and path.is_file():
        try:
            with safe_open(path, 'pt') as f:
                return _parse_metadata(path, f.metadata() or {})
        except SafetensorError as e:
            raise ValueError(f'checkpoint {path} is not a valid safetensors file ({e})') from e
    return read_checkpoint(path)[1]


def checkpoint_model_args(args: Optional[Dict[str, Any]]) -> Tuple[Optional[str], Dict[str, Any], Optional[int]]:
    """``(model, model_kwargs, num_classes)`` recorded in ``read_checkpoint``'s arguments (None, {}, None if absent)."""
    args = args or {}
    model = args.get('model') if isinstance(args.get('model'), str) else None
    kwargs = args.get('model_kwargs') if isinstance(args.get('model_kwargs'), dict) else {}
    num_classes = args.get('num_classes')
    num_classes = num_classes if isinstance(num_classes, int) and not isinstance(num_classes, bool) else None
    return model, dict(kwargs), num_classes


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, so that recorded (JSON or pickled) and live values compare equal."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def same_value(a: Any, b: Any) -> bool:
    """Whether a recorded argument equals a live one (tuples as lists, 2.0 as 2)."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_checkpoint_args(model: nn.Module, args: Optional[Dict[str, Any]], source: Any = 'the checkpoint') -> None:
    """Refuse a checkpoint whose recorded arguments give another layout than ``model``'s where the weights cannot
    show it (``HIDDEN_LAYOUT``), or another ``num_classes``. The error names each keyword argument to pass."""
    _, kwargs, num_classes = checkpoint_model_args(args)
    layout = layout_args(model) if getattr(model, 'new_prefixes', None) else {}
    bad = [(k, kwargs[k], layout.get(k)) for k in HIDDEN_LAYOUT
           if layout and k in kwargs and kwargs[k] is not None and not same_value(kwargs[k], layout.get(k))]
    if bad:
        trained = ', '.join(f'{k}={v!r}' for k, v, _ in bad)
        have = ', '.join(f'{k}={m!r}' for k, _, m in bad)
        flags = ' '.join(f'{k}={_cli_value(v)}' for k, v, _ in bad)
        raise ValueError(
            f'{source} was trained with {trained}, which the weights cannot show, but this model has {have}: create '
            f'the model with {trained} (command line: --model-kwargs {flags})')
    own = getattr(model, 'num_classes', None)
    if num_classes is not None and own is not None and num_classes != own:
        raise ValueError(
            f'{source} was trained with num_classes={num_classes}, this model has num_classes={own}: create the '
            f'model with num_classes={num_classes} (command line: --num-classes {num_classes})')


def _cli_value(value: Any) -> str:
    value = _plain(value)
    return "'" + repr(tuple(value)) + "'" if isinstance(value, list) else str(value)


def load_checkpoint_into(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        args: Optional[Dict[str, Any]],
        source: Any,
        strict: bool = True,
) -> Any:
    """Check the recorded arguments (``check_checkpoint_args``), then ``model.load_state_dict``, then the recorded
    calibration becomes the model's default (``apply_calibration``); every error names ``source`` (the checkpoint's
    path)."""
    check_checkpoint_args(model, args, f'checkpoint {source}')
    try:
        result = model.load_state_dict(state_dict, strict=strict)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f'checkpoint {source} does not fit this model: {e}') from e
    try:
        apply_calibration(model, (args or {}).get(CALIBRATION_KEY))
    except ValueError as e:
        raise ValueError(f'checkpoint {source}: {e}') from e
    return result


def apply_calibration(model: nn.Module, calibration: Optional[Dict[str, Any]]) -> None:
    """Make a calibration result (``timm_exits.calibrate``: ``threshold`` and / or ``keep_rate``) the model's default
    in eval mode and keep it as ``model.calibration``; None does nothing. A result for another kind of model (a
    threshold for a model without exits, a keep rate for one without slimming) is an error."""
    if not calibration:
        return
    if not isinstance(calibration, dict):
        raise ValueError(f'calibration must be a dict (timm_exits.calibrate\'s result), got '
                         f'{type(calibration).__name__}')
    threshold, keep_rate = calibration.get('threshold'), calibration.get('keep_rate')
    exits = hasattr(model, 'exit_layers')
    slims = getattr(model, 'life', None) is not None
    if threshold is not None and not exits:
        raise ValueError(f'the calibration chose threshold={threshold!r}, but {type(model).__name__} has no exits')
    if keep_rate is not None and not slims:
        raise ValueError(f'the calibration chose keep_rate={keep_rate!r}, but {type(model).__name__} has no slimming')
    regression = getattr(model, 'task', 'classification') == 'regression'  # thresholds in target units
    for name, value, low_open in (('threshold', threshold, False), ('keep_rate', keep_rate, True)):
        high = math.inf if regression and name == 'threshold' else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 < value <= high if low_open else 0 <= value <= high) or value == math.inf):
            raise ValueError(f'the calibration\'s {name}={value!r} is not allowed: '
                             + ('a finite number >= 0 (target units)' if high == math.inf else
                                f'a number in {"(0" if low_open else "[0"}, 1]'))
    if exits:
        model.threshold = None if threshold is None else float(threshold)
    if slims:
        model.keep_rate = 1. if keep_rate is None else float(keep_rate)
        if hasattr(model, '_reset_costs'):
            model._reset_costs()
    model.calibration = dict(calibration)


def install_checkpoint_loader() -> None:
    """Route ``timm.create_model(..., checkpoint_path=...)`` of this package's models (those with ``new_prefixes``)
    through ``read_checkpoint`` and ``load_checkpoint_into``; other models, npz files and the ``remap`` /
    ``filter_fn`` / ``weights_only=False`` options keep timm's own loader. Idempotent."""
    import timm.models._factory as factory
    original = getattr(factory, 'load_checkpoint', None)
    if original is None or getattr(original, '_timm_exits', False):
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint(model: nn.Module, checkpoint_path: str, *args: Any, **kwargs: Any) -> Any:
        call = signature.bind(model, checkpoint_path, *args, **kwargs)
        call.apply_defaults()
        opts = call.arguments
        ours = bool(getattr(model, 'new_prefixes', None))
        if not ours or opts.get('remap') or opts.get('filter_fn') is not None or not opts.get('weights_only', True) \
                or str(checkpoint_path).lower().endswith(('.npz', '.npy')):
            return original(model, checkpoint_path, *args, **kwargs)  # exactly timm's load
        state_dict, recorded = read_checkpoint(
            checkpoint_path, prefer_ema=bool(opts.get('use_ema', True)), map_location=opts.get('device', 'cpu'))
        return load_checkpoint_into(model, state_dict, recorded, checkpoint_path, strict=opts.get('strict', True))

    load_checkpoint._timm_exits = True
    factory.load_checkpoint = load_checkpoint
