""" What both model families share: argument checks, FLOP counting and the pretrained-weights filter.

The multi-exit and LifeRegress models subclass timm's ``VisionTransformer`` and add modules (exits, a life predictor)
that timm's checkpoints do not have. ``new_parts_filter`` loads those checkpoints strictly: the backbone goes through
timm's own ``checkpoint_filter_fn`` (pos-embed resampling, npz/CLIP conversions), the new parts either come from the
checkpoint, with their layout checked, or are kept as initialised, with a warning that they are untrained.
"""
import contextlib
import inspect
import logging
import math
import warnings
from numbers import Real
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

try:  # torch >= 2.6 warns that is_fx_tracing is also true under torch.export; only symbolic tracing matters here
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing
except ImportError:
    from torch.fx._symbolic_trace import is_fx_tracing

from huggingface_hub import constants as hf_constants, try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import get_session
from timm.models import resolve_pretrained_cfg
from timm.models._hub import hf_split
try:  # timm's own choice of weights source (file, state_dict, hf-hub, url), private: the check is skipped without it
    from timm.models._builder import _resolve_pretrained_source
except ImportError:
    _resolve_pretrained_source = None

from timm.models import get_pretrained_cfg, list_pretrained
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ._checkpoint import install_checkpoint_loader

_logger = logging.getLogger(__name__)
install_checkpoint_loader()  # create_model(checkpoint_path=...) of these models: files named, recorded layout checked

__all__ = [
    'NewPartsMixin', 'UntrainedWeightsWarning', 'add_block_group', 'pop_kwargs', 'check_fraction', 'check_layout',
    'check_num_classes', 'count_flops', 'is_fx_tracing', 'new_parts_filter', 'parent_cfgs',
]
__all__ += ['WeightsUnavailableError', 'check_weights_reachable', 'tracing_tool']


class UntrainedWeightsWarning(UserWarning):
    """Pretrained backbone loaded, but the parts this package adds (exits, life predictor) are untrained."""


def check_fraction(
        name: str,
        value: Any,
        low: float = 0.,
        high: float = 1.,
        low_open: bool = False,
        high_open: bool = False,
        allow_none: bool = True,
) -> float:
    """Return ``value`` as a float if it lies in [low, high] (an end excluded when ``low_open`` / ``high_open``), else
    raise a ValueError naming ``name``, the value and the allowed interval."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    allowed = f'a number in {interval}' + (' or None' if allow_none else '')
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f'{name} must be {allowed}, got {value!r}')
    value = float(value)
    if math.isnan(value) or value > high or value < low or (low_open and value == low) or (high_open and value == high):
        raise ValueError(f'{name} must be {allowed}, got {value!r}')
    return value


def count_flops(fn: Callable, *args: Any) -> Tuple[int, Any]:
    """FLOPs of ``fn(*args)`` by ``torch.utils.flop_counter`` (matmuls, convs, attention), and its output (detached).

    Runs with grad enabled (except in inference mode) and without autocast: the counter's module tracker needs every
    tensor that requires grad to have a grad_fn (a parameter expanded under ``no_grad``, as in timm's ``map`` pooling
    head, has none), and the count must not depend on the caller's autocast.
    """
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), 'cpu')
    # inside inference mode the weights may be inference tensors (a model built there), which autograd refuses
    grad_mode = torch.no_grad() if torch.is_inference_mode_enabled() else torch.enable_grad()
    with _jit_tracer_paused(), grad_mode, _no_autocast(device_type), FlopCounterMode(display=False) as counter:
        out = fn(*args)
        out = out.detach() if isinstance(out, torch.Tensor) else out
    return counter.get_total_flops(), out


@contextlib.contextmanager
def _jit_tracer_paused() -> Iterator[None]:
    """Counting inside ``torch.jit.trace`` (a budget's first use) stays out of the recorded graph."""
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _no_autocast(device_type: str) -> Any:
    """A context that turns autocast off on ``device_type`` (a no-op where autocast does not exist, e.g. meta)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def tracing_tool() -> Optional[str]:
    """The tool recording this forward as one fixed graph ('torch.jit.trace', 'torch.onnx.export', 'torch.export'),
    or None (eager, ``torch.compile``, ``torch.jit.script``). Such a graph replays one path for every input."""
    if torch.jit.is_scripting():
        return None
    if torch.onnx.is_in_onnx_export():
        return 'torch.onnx.export'
    if torch.jit.is_tracing():
        return 'torch.jit.trace'
    if torch.compiler.is_exporting():
        return 'torch.export'
    return None


def _tags(parent: str) -> List[str]:
    """timm's pretrained tags of ``parent`` (``list_pretrained(f'{parent}.*')``, one pass over the registry for all)."""
    if not _TAGS:
        for tagged in list_pretrained():
            _TAGS.setdefault(tagged.split('.', 1)[0], []).append(tagged)
    return _TAGS.get(parent, [])


_TAGS: Dict[str, List[str]] = {}


def parent_cfgs(
        parent: str,
        name: str,
        cfg_fn: Callable[..., Dict[str, Any]],
        **overrides: Any,
) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs of model ``name`` mirroring every tag of timm's ``parent``: same weights (its Hub repo), same
    preprocessing, timm's default tag first (so it stays the default). ``overrides`` (e.g. ``classifier``) win.

    Returns:
        ``{'name.tag': cfg_fn(**cfg)}`` for ``generate_default_cfgs``.
    """
    tag = get_pretrained_cfg(parent).tag
    default = f'{parent}.{tag}' if tag else parent  # an architecture without weights has one untagged cfg
    out = {}
    for tagged in [default] + [n for n in _tags(parent) if n != default]:
        cfg = get_pretrained_cfg(tagged).to_dict()
        drop = ('architecture', 'tag', 'custom_load')
        drop += ('url',) if cfg.get('hf_hub_id') or cfg.get('custom_load') else ()
        for key in drop:  # a url is kept where it is the only source (and a plain torch checkpoint)
            cfg.pop(key, None)
        out[f'{name}.{tagged.split(".", 1)[1]}' if '.' in tagged else name] = cfg_fn(**{**cfg, **overrides})
    return out


class WeightsUnavailableError(LocalEntryNotFoundError):
    """Pretrained weights are not in the local cache and cannot be downloaded (offline mode or an unreachable Hub)."""


def _cached(repo_id: str, filename: str, revision: Optional[str]) -> bool:
    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)


def check_weights_reachable(variant: str, **kwargs: Any) -> None:
    """Before a ``pretrained=True`` build: raise ``WeightsUnavailableError`` at once, naming the weights file and how to
    supply it offline, when timm would fetch it from the Hub but it is not cached and the Hub cannot be reached
    (``HF_HUB_OFFLINE`` set, or no answer from the endpoint within a few seconds). Without this check, timm retries
    for about a minute and ends in a bare ``LocalEntryNotFoundError``. Other sources (a file, a URL) are left to timm.
    """
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
    )
    if not cfg or _resolve_pretrained_source is None:
        return
    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    if load_from != 'hf-hub':
        return
    hub_id, filename = loc if isinstance(loc, (tuple, list)) else (loc, None)
    repo_id, revision = hf_split(hub_id)
    candidates = [filename] if filename else ['model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin']
    if any(_cached(repo_id, f, revision) for f in candidates):
        return
    if hf_constants.HF_HUB_OFFLINE:
        reason = 'HF_HUB_OFFLINE is set'
    else:
        try:  # any HTTP answer, even an error status, means the endpoint is reachable
            get_session().head(hf_constants.ENDPOINT, timeout=5)
            return
        except Exception as e:  # connection refused, DNS failure, timeout, proxy error
            reason = f'the Hub endpoint {hf_constants.ENDPOINT} is unreachable ({type(e).__name__})'
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    wanted = filename or candidates[0]
    raise WeightsUnavailableError(
        f"{name}: pretrained=True needs {wanted} of Hugging Face Hub repo '{repo_id}', which is not in the local "
        f'cache ({hf_constants.HF_HUB_CACHE}) and {reason}. To load it offline, either download it once where the '
        f'Hub is reachable (`hf download {repo_id} {wanted}`) into that cache and set HF_HUB_OFFLINE=1, or pass '
        f"the file: timm.create_model('{variant}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='/path/to/{wanted}')). pretrained=False gives a random init.")


class NewPartsMixin:
    """For a timm ViT subclass that adds modules under ``new_prefixes``: strict loads check their layout first."""
    new_prefixes: Tuple[str, ...] = ()
    new_parts_name: str = 'added modules'
    layout_arg: str = ''

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, raising a ValueError that names ``num_classes`` when the classifiers are
        sized for other classes, and ``layout_arg`` on another layout of the added parts."""
        check_num_classes(state_dict, self)
        found = {k: v for k, v in state_dict.items() if k.startswith(self.new_prefixes)}
        if found or strict:
            expected = {k: v for k, v in self.state_dict().items() if k.startswith(self.new_prefixes)}
            check_layout(found, expected, self.new_parts_name, self.layout_arg, allow_missing=not strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def check_num_classes(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise a ValueError naming ``num_classes`` when the checkpoint's final classifier (``head.weight``) is sized
    for another number of classes than ``model``'s."""
    found = state_dict.get('head.weight')
    if not isinstance(found, torch.Tensor) or found.ndim != 2:
        return
    own = model.state_dict().get('head.weight')
    if own is not None and own.shape[1:] == found.shape[1:] and own.shape[0] == found.shape[0]:
        return
    if own is not None and own.shape[1:] != found.shape[1:]:
        return  # another embedding width: the backbone's own shape errors say so
    raise ValueError(
        f'the checkpoint classifies {found.shape[0]} classes (head.weight {tuple(found.shape)}), this model '
        f'num_classes={getattr(model, "num_classes", None)}: create the model with num_classes={found.shape[0]}')


def new_parts_filter(
        state_dict: Dict[str, torch.Tensor],
        model: NewPartsMixin,
        parent_filter: Optional[Callable[..., Dict[str, torch.Tensor]]] = None,
) -> Dict[str, torch.Tensor]:
    """``pretrained_filter_fn``: the parent's filter (default timm's ViT one) for the backbone; the added parts
    from the checkpoint if it has them, else as initialised, with an ``UntrainedWeightsWarning``. The load itself
    stays strict."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    own = {k: v for k, v in state_dict.items() if k.startswith(model.new_prefixes)}
    parent_filter = parent_filter or vit_checkpoint_filter_fn
    out = parent_filter({k: v for k, v in state_dict.items() if k not in own}, model)
    absent = tuple(p for p in model.new_prefixes if not any(k.startswith(p) for k in own))
    if absent:  # none of the new parts, or some (a multi-exit checkpoint loaded into a model that also slims)
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        what = model.new_parts_name if not own else ', '.join(p.rstrip('.') for p in absent) + ' parameters'
        msg = (f'{name}: loaded the pretrained backbone; its {what} are not in the checkpoint and are '
               f'UNTRAINED (random init). Train them before use (see train_recipes/).')
        warnings.warn(msg, UntrainedWeightsWarning, stacklevel=2)  # once: no logger copy of the same line
        own.update({k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(absent)})
    out.update(own)
    return out


def check_layout(
        found: Dict[str, torch.Tensor],
        expected: Dict[str, torch.Tensor],
        what: str,
        layout_arg: str,
        allow_missing: bool = False,
) -> None:
    """Raise ValueError naming ``layout_arg`` unless ``found`` has the keys and shapes of ``expected``."""
    missing = [] if allow_missing else sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(found) & set(expected) if found[k].shape != expected[k].shape)
    if missing or extra or shapes:
        detail = '; '.join(f'{label}: {keys[:4]}{" ..." if len(keys) > 4 else ""}' for label, keys in (
            ('missing', missing), ('unexpected', extra), ('shape mismatch', shapes)) if keys)
        hint = ('' if found else ' A plain timm checkpoint of the parent model loads through pretrained=True '
                '(pretrained_cfg_overlay=dict(file=...)), which keeps the new parts as initialised.')
        raise ValueError(
            f'checkpoint {what} do not match this model: {detail}. Create the model with the {layout_arg} '
            f'the checkpoint was trained with.{hint}')


def pop_kwargs(cls: type, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Remove from ``kwargs`` and return the named arguments of every ``_init_mechanism`` along ``cls``'s MRO (a
    mechanism's, out of a constructor's; the rest are the parent's)."""
    names = {name for c in cls.__mro__ if '_init_mechanism' in vars(c)
             for name, p in inspect.signature(vars(c)['_init_mechanism']).parameters.items()
             if name != 'self' and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def add_block_group(matcher: Dict[str, Any], rule: Tuple[str, Any]) -> Dict[str, Any]:
    """The parent's ``group_matcher`` with ``rule`` (regex, group) added to its block rules, before the final norm's."""
    blocks = matcher.get('blocks')
    blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks or [])
    at = next((i for i, (regex, _) in enumerate(blocks) if regex.startswith('^norm')), len(blocks))
    return {**matcher, 'blocks': blocks[:at] + [rule] + blocks[at:]}
