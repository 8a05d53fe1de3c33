""" Datasets and transforms of the training recipes and ``python -m timm_exits.validate``.

``digits`` (scikit-learn's bundled 8x8 digits, nothing downloaded), ``folder`` (an ImageFolder at ``data_dir/split``),
``images`` (the image files of a folder, labelled when they sit in class folders, else label -1) or ``torch/<name>``
(torchvision: cifar10, cifar100, flowers102, stanford_cars, fgvc_aircraft, imagenet; downloads only when asked),
transformed with one resolution of the data config (``resolve_data_cfg``: input size, mean, std,
crop_pct, crop_mode, interpolation): a command-line flag, else what the checkpoint records, else the model's pretrained
cfg. validate, the recipes, export, hub push, fit and calibrate all read it, so a checkpoint is evaluated, exported and
published with the preprocessing it was trained with.

The counting protocol travels the same way: the crop size and resize a counting recipe cut its point-annotated
images with (``DataConfig.counting``; TransCrowd's crops, whose test counts are also summed per image) is recorded
beside the data config, and ``--count-crop`` / ``--count-resize`` override it (``resolve_data_cfg``).
``python -m timm_exits.data convert-counting`` writes the counting layout from ShanghaiTech, DISCO or JHU-Crowd++
files (``timm_exits.counting_sets``).
"""
import argparse
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from timm.data import create_transform

from .models.adapters import any_input_size, input_shape

if TYPE_CHECKING:
    import numpy as np

_logger = logging.getLogger(__name__)

__all__ = [
    'COUNTING_KEYS', 'CROP_MODES', 'DATA_CONFIG_KEYS', 'NO_LABEL', 'TORCHVISION_DATASETS', 'CountingDataset',
    'DataConfig', 'DigitsCountDataset', 'DigitsDataset', 'ImageFiles', 'add_data_config_args', 'available_cpus',
    'build_transform', 'check_counting', 'check_data_config', 'counting_record', 'counting_transform', 'create_dataset',
    'data_config_flags', 'digits_augment', 'main', 'make_loader', 'read_density', 'read_points',
    'recorded_data_config', 'resolve_data_cfg', 'sum_by_image', 'write_digits_folder',
]

COUNTING_KEYS = ('crop', 'resize')  # the counting protocol: crop size (px) and the resize (W, H) before cutting
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
NO_LABEL = -1  # the label of an image that has none (``ImageFiles`` of a flat folder)
CROP_MODES = ('center', 'squash', 'border')
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'box', 'hamming', 'lanczos', 'random')
# timm train.py's preprocessing arguments (its ``args``), as its ``resolve_data_config(vars(args), model=model)`` reads
TRAIN_PY_KEYS = ('img_size', 'input_size', 'mean', 'std', 'crop_pct', 'interpolation')
SOURCE_FLAG, SOURCE_MODEL, SOURCE_CFG = 'command line', 'model', 'pretrained cfg'


class DataConfig(dict):
    """The resolved data config (timm's ``resolve_data_config`` keys, ``DATA_CONFIG_KEYS``; plus
    ``crop_border_pixels`` when asked for) with ``sources``: where each value came from; and ``counting``, the
    counting protocol (``{'crop': px, 'resize': (W, H) or None}``; None: whole images), kept out of the dict so
    that the dict stays timm's transform arguments."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str],
                 counting: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(values)
        self.sources = dict(sources)
        self.counting = dict(counting) if counting else None

    def describe(self) -> str:
        """One line: each value and its source, e.g. ``mean (0.5, 0.5, 0.5) [checkpoint: train.py args]``, then the
        counting protocol's crop and resize with theirs."""
        text = ', '.join(f'{k} {self[k]} [{self.sources.get(k, "?")}]' for k in self)
        if not self.counting and 'count_crop' in self.sources:  # whole images asked for
            text += f', count crop 0 (whole images) [{self.sources["count_crop"]}]'
        elif self.counting:
            text += ''.join(f', count {k} {self.counting[k]} [{self.sources.get("count_" + k, "?")}]'
                            for k in COUNTING_KEYS if self.counting.get(k) is not None)
        return text

    def record(self) -> Dict[str, Any]:
        """JSON-ready values (what a checkpoint's metadata records and eval.json reports); ``counting``:
        ``{'crop': px, 'resize': [W, H] or None}`` when images are cut into crops."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self.items()}
        if self.counting:
            out['counting'] = counting_record(self.counting)
        return out


def add_data_config_args(parser: argparse.ArgumentParser) -> None:
    """timm validate.py's preprocessing flags, with the same names and meanings; unset ones resolve from the
    checkpoint's record, else the model's pretrained cfg (``resolve_data_cfg``)."""
    group = parser.add_argument_group(
        'preprocessing', 'timm validate.py\'s flags; unset: what the checkpoint records (timm train.py args or '
        'timm_exits metadata), else the model\'s pretrained cfg')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='input image size (square)')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N',
                       help='input dimensions (d h w, e.g. --input-size 3 224 224)')
    group.add_argument('--use-train-size', action='store_true',
                       help="ignore the pretrained cfg's test_input_size / test_crop_pct")
    group.add_argument('--crop-pct', type=float, default=None, metavar='N', help='centre crop share of the resize')
    group.add_argument('--crop-mode', default=None, metavar='N', help=f'crop mode: {", ".join(CROP_MODES)}')
    group.add_argument('--crop-border-pixels', type=int, default=None, metavar='N',
                       help='trim this many pixels around the image before the resize')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalisation mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalisation std')
    group.add_argument('--interpolation', default='', metavar='NAME',
                       help=f'resize interpolation: {", ".join(INTERPOLATIONS)}')
    group.add_argument('--count-crop', type=int, default=None, metavar='PX',
                       help='counting protocol (--dataset counting with point files): cut each image into PX px square '
                       'crops, each one sample, test counts also summed per image (0: whole images); unset: what the '
                       'checkpoint records')
    group.add_argument('--count-resize', type=int, nargs=2, default=None, metavar=('W', 'H'),
                       help='counting protocol: resize each image to W x H before cutting it into crops; unset: what '
                       'the checkpoint records')


def data_config_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The preprocessing flags ``add_data_config_args`` added that were given, as ``resolve_data_cfg`` overrides."""
    out = {k: getattr(args, k, None) for k in ('img_size', 'input_size', 'mean', 'std', 'crop_pct', 'crop_mode',
                                                  'crop_border_pixels', 'count_crop', 'count_resize')}
    out['interpolation'] = getattr(args, 'interpolation', '') or None
    return {k: v for k, v in out.items() if v is not None}


def _name(key: str, flags: bool) -> str:
    return '--' + key.replace('_', '-') if flags else f'data_config[{key!r}]'


def check_data_config(values: Mapping[str, Any], in_chans: int, flags: bool = True) -> Dict[str, Any]:
    """Check and normalise data config overrides (flag names, or ``data_config[...]`` keys with ``flags=False``):
    ``img_size`` becomes ``input_size``, a one-value mean / std is repeated per channel. Errors name the argument."""
    known = (*DATA_CONFIG_KEYS, 'img_size', 'crop_border_pixels')
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ValueError(f'data_config keys {unknown} are not known; allowed: {list(known)}')
    out: Dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        name = _name(key, flags)
        if key == 'img_size':
            if not _is_int(value) or value < 1:
                raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
            out.setdefault('input_size', (in_chans, int(value), int(value)))
        elif key == 'input_size':
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_int(v) and v >= 1 for v in value):
                raise ValueError(f'{name} must be three integers >= 1 (channels, height, width), got {value!r}')
            if int(value[0]) != in_chans:
                raise ValueError(f'{name} {tuple(value)}: the model takes {in_chans} input channels')
            out['input_size'] = tuple(int(v) for v in value)
        elif key in ('mean', 'std'):
            seq = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(seq) == 1:
                seq = seq * in_chans
            ok = len(seq) == in_chans and all(_is_number(v) for v in seq) and (key == 'mean' or min(seq) > 0)
            if not ok:
                allowed = 'numbers' if key == 'mean' else 'numbers > 0'
                raise ValueError(f'{name} must be 1 or {in_chans} (one per input channel) {allowed}, got {value!r}')
            out[key] = tuple(float(v) for v in seq)
        elif key == 'crop_pct':
            if not _is_number(value) or value <= 0:
                raise ValueError(f'{name} must be a number > 0 (1: no crop), got {value!r}')
            out[key] = float(value)
        elif key == 'crop_mode':
            if value not in CROP_MODES:
                raise ValueError(f'{name} {value!r} is not known; allowed: {", ".join(CROP_MODES)}')
            out[key] = value
        elif key == 'interpolation':
            if value not in INTERPOLATIONS:
                raise ValueError(f'{name} {value!r} is not known; allowed: {", ".join(INTERPOLATIONS)}')
            out[key] = value
        else:  # crop_border_pixels
            if not _is_int(value) or value < 0:
                raise ValueError(f'{name} must be an integer >= 0, got {value!r}')
            out[key] = int(value)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def recorded_data_config(recorded: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, Any], str]:
    """The data config a checkpoint records and the name of its source: ``data_config`` (timm_exits' recipes, fit
    and calibrate write the whole resolution), or timm train.py's ``args`` (``TRAIN_PY_KEYS``, read as its
    ``resolve_data_config(vars(args), model=model)`` does; its evaluation loader passes no crop mode, so the centre
    crop). ``({}, '')`` when it records none."""
    if not recorded:
        return {}, ''
    if isinstance(recorded.get('data_config'), dict):
        cfg = recorded['data_config']
        return {k: cfg[k] for k in (*DATA_CONFIG_KEYS, 'crop_border_pixels') if cfg.get(k) is not None}, \
            'checkpoint: recorded data config'
    if not any(k in recorded for k in TRAIN_PY_KEYS):
        return {}, ''
    out: Dict[str, Any] = {}
    if recorded.get('input_size') is not None:
        out['input_size'] = recorded['input_size']
    elif recorded.get('img_size') is not None:
        out['img_size'] = recorded['img_size']
    for key in ('mean', 'std'):
        if recorded.get(key) is not None:
            out[key] = recorded[key]
    for key in ('crop_pct', 'interpolation'):  # falsy values fall back, as in timm's resolve_data_config
        if recorded.get(key):
            out[key] = recorded[key]
    out['crop_mode'] = recorded.get('crop_mode') or 'center'
    return out, 'checkpoint: train.py args'


def counting_record(counting: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON form of a counting protocol: ``{'crop': px, 'resize': [W, H] or None}``."""
    resize = counting.get('resize')
    return {'crop': counting.get('crop'), 'resize': None if resize is None else [int(v) for v in resize]}


def check_counting(crop: Any, resize: Any, names: Tuple[str, str] = ('--count-crop', '--count-resize')
                   ) -> Optional[Dict[str, Any]]:
    """The counting protocol ``{'crop', 'resize'}`` from a crop size (an integer >= 1; 0 or None: whole images) and a
    resize (W, H) (None: the image's own size; each side at least the crop), or None for whole images. Errors name
    the argument (``names``: crop's and resize's)."""
    if crop is not None and (not _is_int(crop) or crop < 0):
        raise ValueError(f'{names[0]} must be an integer >= 1 (the crop size in pixels; 0: whole images), got '
                         f'{crop!r}')
    if resize is not None:
        if not isinstance(resize, (list, tuple)) or len(resize) != 2 or not all(_is_int(v) and v >= 1 for v in resize):
            raise ValueError(f'{names[1]} must be two integers >= 1 (width, height), got {resize!r}')
        if not crop:
            raise ValueError(f'{names[1]} {tuple(resize)} resizes images before they are cut into crops: it needs a '
                             f'crop size ({names[0]})')
        if min(resize) < crop:
            raise ValueError(f'{names[1]} {tuple(resize)} is smaller than the {crop} px crop: no crop would fit')
    if not crop:
        return None
    return {'crop': int(crop), 'resize': None if resize is None else tuple(int(v) for v in resize)}


def _resolve_counting(given: Mapping[str, Any], recorded: Optional[Mapping[str, Any]], flags: bool,
                      sources: Dict[str, str]) -> Optional[Dict[str, Any]]:
    """The counting protocol: each of crop and resize from ``given`` (``count_crop``, ``count_resize``), else from
    the checkpoint's ``data_config['counting']``; ``sources`` gets where each came from."""
    cfg = (recorded or {}).get('data_config')
    record = cfg.get('counting') if isinstance(cfg, dict) else None
    if record is not None:
        if not isinstance(record, dict) or set(record) - set(COUNTING_KEYS):
            raise ValueError(f'the checkpoint records a bad counting protocol {record!r}: a dict with keys '
                             f'{list(COUNTING_KEYS)}')
        try:
            check_counting(record.get('crop'), record.get('resize'), ("data_config['counting']['crop']",
                                                                       "data_config['counting']['resize']"))
        except ValueError as e:
            raise ValueError(f'the checkpoint records a bad counting protocol: {e}') from e
    record = record or {}
    values: Dict[str, Any] = {}
    for key in COUNTING_KEYS:
        if given.get('count_' + key) is not None:
            values[key], sources['count_' + key] = given['count_' + key], SOURCE_FLAG if flags else 'recipe'
        elif record.get(key) is not None and not ('count_crop' in given and given['count_crop'] == 0):
            values[key], sources['count_' + key] = record[key], 'checkpoint: recorded counting protocol'
    names = ('--count-crop', '--count-resize') if flags else ("data_config['count_crop']",
                                                              "data_config['count_resize']")
    if 'resize' in values and 'crop' in values and sources['count_resize'] != sources['count_crop']:
        names = (f'{names[0]} ({sources["count_crop"]})', f'{names[1]} ({sources["count_resize"]})')
    counting = check_counting(values.get('crop'), values.get('resize'), names)
    if counting is None:
        sources.pop('count_resize', None)
        if 'crop' not in values:
            sources.pop('count_crop', None)
    return counting


def _model_input_size(model: nn.Module) -> Tuple[int, int, int]:
    return input_shape(model)


def resolve_data_cfg(
        model: nn.Module,
        overrides: Optional[Mapping[str, Any]] = None,
        recorded: Optional[Mapping[str, Any]] = None,
        use_train_size: bool = False,
        flags: bool = True,
) -> DataConfig:
    """The one data config of every command: each value from ``overrides`` (command-line flags, or a recipe's
    ``data_config``), else from what the checkpoint records (``recorded``: ``read_checkpoint``'s arguments, see
    ``recorded_data_config``), else from the model's pretrained cfg (its test size / crop unless
    ``use_train_size``), as timm's ``resolve_data_config`` does. The input size falls back to the model's own when
    its pretrained cfg's size does not fit a model built at another ``img_size``. The counting protocol
    (``DataConfig.counting``) resolves alike: ``count_crop`` / ``count_resize`` in ``overrides`` (0 crop: whole
    images), else the checkpoint's ``data_config['counting']``, else whole images.

    Raises:
        ValueError: a bad override or record, naming the flag (``flags``) or ``data_config`` key.
    """
    in_chans = _model_input_size(model)[0]
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    overrides = dict(overrides or {})
    count_given = {k: overrides.pop(k) for k in ('count_crop', 'count_resize') if k in overrides}
    counting = _resolve_counting(count_given, recorded, flags, sources)
    given = check_data_config(overrides, in_chans, flags)
    values.update(given)
    sources.update({k: SOURCE_FLAG if flags else 'recipe' for k in given})
    record, where = recorded_data_config(recorded)
    try:
        record = check_data_config(record, in_chans, flags=False)
    except ValueError as e:
        raise ValueError(f'the checkpoint records a bad data config ({where}): {e}') from e
    for key, value in record.items():
        if key not in values:
            values[key], sources[key] = value, where
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    own = _model_input_size(model)
    dynamic = any_input_size(model)
    if 'input_size' in values and tuple(values['input_size']) != own and not dynamic:
        where = 'the command line (--img-size / --input-size)' if sources['input_size'] == SOURCE_FLAG else \
            sources['input_size']
        raise ValueError(
            f'input size {tuple(values["input_size"])} from {where} does not fit the model, built for {own} without '
            f'dynamic_img_size: create it with img_size={values["input_size"][-1]} (or dynamic_img_size=True)')
    if 'input_size' not in values:
        size = cfg.get('test_input_size') if not use_train_size and cfg.get('test_input_size') else cfg.get(
            'input_size')
        if size is not None and (tuple(size) == own or (dynamic and size[0] == in_chans)):
            values['input_size'], sources['input_size'] = tuple(size), SOURCE_CFG
        else:
            values['input_size'], sources['input_size'] = own, f'{SOURCE_MODEL} (img_size)'
    defaults = dict(interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875,
                    crop_mode='center')  # timm's defaults when a pretrained cfg has none
    for key, default in defaults.items():
        if key in values:
            continue
        value = cfg.get('test_crop_pct') if key == 'crop_pct' and not use_train_size else None
        value = value or cfg.get(key)
        if value:
            values[key], sources[key] = (tuple(value) if isinstance(value, (list, tuple)) else value), SOURCE_CFG
        else:
            values[key], sources[key] = default, 'timm default'
    order = [*DATA_CONFIG_KEYS, *(['crop_border_pixels'] if 'crop_border_pixels' in values else [])]
    return DataConfig({k: values[k] for k in order}, sources, counting)

# torchvision class name and the constructor arguments of each split
TORCHVISION_DATASETS: Dict[str, Tuple[str, Dict[str, Dict[str, Any]]]] = {
    'cifar10': ('CIFAR10', {'train': dict(train=True), 'test': dict(train=False)}),
    'cifar100': ('CIFAR100', {'train': dict(train=True), 'test': dict(train=False)}),
    'flowers102': ('Flowers102', {s: dict(split=s) for s in ('train', 'val', 'test')}),
    'stanford_cars': ('StanfordCars', {s: dict(split=s) for s in ('train', 'test')}),
    'fgvc_aircraft': ('FGVCAircraft', {s: dict(split=s) for s in ('train', 'val', 'trainval', 'test')}),
    'imagenet': ('ImageNet', {s: dict(split=s) for s in ('train', 'val')}),
}


class ImageFiles(Dataset):
    """The image files under ``root``, nested or flat, labelled when they can be.

    ImageFolder's layout (every image inside a first-level class folder, at any depth below it) gives labels, the
    sorted folder names as classes; images directly in ``root`` make the whole folder unlabelled: every image found
    (recursively) gets label ``NO_LABEL`` (-1). Every file's header is opened when the dataset is built, so an
    unreadable image is an error naming it before any work starts.

    Raises:
        ValueError: ``root`` is not a readable folder, holds no image, or holds a file that is not a readable image.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None) -> None:
        from PIL import Image
        from torchvision.datasets.folder import IMG_EXTENSIONS
        if not os.path.isdir(root):
            raise ValueError(f'{root!r} is not a folder')
        try:
            top = sorted(os.listdir(root))
        except OSError as e:
            raise ValueError(f'{root!r} cannot be read ({e.strerror or e})') from e
        found = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            raise ValueError(f'{root!r} holds no image ({", ".join(IMG_EXTENSIONS)}), nested or flat')
        flat = any(os.path.isfile(os.path.join(root, f)) and f.lower().endswith(IMG_EXTENSIONS) for f in top)
        self.classes = [] if flat else sorted({os.path.relpath(f, root).split(os.sep)[0] for f in found})
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(f, NO_LABEL if flat else index[os.path.relpath(f, root).split(os.sep)[0]]) for f in found]
        for path, _ in self.samples:
            try:
                with Image.open(path) as im:
                    im.size  # the header: format and size
            except (OSError, ValueError) as e:
                raise ValueError(f'{path} is not a readable image ({type(e).__name__}: {e})') from e
        self.labelled = not flat
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        from PIL import Image
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert('RGB')
        except (OSError, ValueError) as e:
            raise ValueError(f'{path} is not a readable image ({type(e).__name__}: {e})') from e
        return (image if self.transform is None else self.transform(image)), label


def _raise(error: OSError) -> None:
    raise ValueError(f'{error.filename!r} cannot be read ({error.strerror or error})') from error


class _GreyImages(Dataset):
    """Grey images as input tensors (``_resized``, ``_normalised``) with one target each (``targets``, returned as
    Python numbers), optionally transformed (tensor to tensor)."""
    images: torch.Tensor
    targets: torch.Tensor
    transform: Optional[Callable]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, Any]:
        image = self.images[i]
        return (image if self.transform is None else self.transform(image)), self.targets[i].item()


def _resized(images: torch.Tensor, img_size: Any) -> torch.Tensor:
    """(N, 1, h, w) grey images at ``img_size`` (an int or (H, W)), bilinear."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode='bilinear', align_corners=False)


def _normalised(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, 1, H, W) grey levels in [0, 1] repeated over ``len(mean)`` channels and normalised per channel."""
    mean_, std_ = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    return ((images.expand(-1, len(mean), -1, -1) - mean_) / std_).contiguous()


class DigitsDataset(_GreyImages):
    """scikit-learn's bundled digits (1797 real 8x8 grey images, 10 classes; nothing downloaded), upsampled.

    A fixed stratified split: 'train' 60 %, 'val' 20 %, 'test' 20 %. Images are (3, H, W) (``img_size``: an int or
    (H, W)), grey levels in [0, 1] normalised with ``mean`` and ``std`` (default 0.5: [-1, 1], the test models'
    cfgs). ``transform`` (tensor to tensor) augments them.
    """
    splits = ('train', 'val', 'test')

    def __init__(self, split: str = 'train', img_size: Any = 32, transform: Optional[Callable] = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        if split not in self.splits:
            raise ValueError(f'digits split={split!r} is not known; allowed: {list(self.splits)}')
        digits = load_digits()
        index = list(range(len(digits.target)))
        train, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=0)
        val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
        index = {'train': train, 'val': val, 'test': test}[split]
        images = torch.tensor(digits.images[index], dtype=torch.float32)[:, None] / 16.
        self.images = _normalised(_resized(images, img_size), mean, std)
        self.targets = torch.tensor(digits.target[index], dtype=torch.long)
        self.transform = transform


class DigitsCountDataset(_GreyImages):
    """An offline counting benchmark (nothing downloaded): canvases of scikit-learn's digits glyphs, each labelled with
    the number of glyphs of one class (``count_class``) among glyphs of every class.

    Each canvas (``canvas`` px square, black) holds 1..``max_glyphs`` glyphs (8 x 8 px, never overlapping), each of
    class ``count_class`` with probability ``p_count`` and of one of ``distractors`` otherwise; the target is how many
    of ``count_class`` it holds (a float). Glyphs come from a pool split by index (index mod 5: 0-2 train, 3 val, 4
    test), so test canvases show glyphs no training canvas showed. Every split is fixed by ``seed``. Images are
    (3, H, W) at ``img_size``, grey levels in [0, 1] normalised with ``mean`` and ``std``.
    """
    splits = ('train', 'val', 'test')
    sizes = {'train': 3000, 'val': 1000, 'test': 1000}

    def __init__(self, split: str = 'train', img_size: Any = 32, transform: Optional[Callable] = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5), seed: int = 0,
                 num_images: Optional[int] = None, count_class: int = 0, distractors: Sequence[int] = (1, 4, 7),
                 max_glyphs: int = 8, p_count: float = .4, canvas: int = 32) -> None:
        from sklearn.datasets import load_digits
        if split not in self.splits:
            raise ValueError(f'digits_count split={split!r} is not known; allowed: {list(self.splits)}')
        if count_class not in range(10) or not distractors or any(
                d not in range(10) or d == count_class for d in distractors):
            raise ValueError(f'count_class and distractors must be digit classes in 0..9, the counted one not among '
                             f'the distractors; got count_class={count_class!r}, distractors={distractors!r}')
        digits = load_digits()
        part = {'train': (0, 1, 2), 'val': (3,), 'test': (4,)}[split]
        pool = [i for i in range(len(digits.target)) if i % 5 in part]
        glyphs = torch.tensor(digits.images[pool], dtype=torch.float32) / 16.
        labels = torch.tensor(digits.target[pool])
        ours = torch.nonzero(labels == count_class)[:, 0]
        others = torch.nonzero(torch.isin(labels, torch.tensor(list(distractors))))[:, 0]
        gen = torch.Generator().manual_seed(seed * 1000 + self.splits.index(split))
        n = self.sizes[split] if num_images is None else num_images
        images, counts = torch.zeros(n, 1, canvas, canvas), torch.zeros(n)
        for k in range(n):
            boxes: List[Tuple[int, int]] = []
            for _ in range(int(torch.randint(1, max_glyphs + 1, (1,), generator=gen))):
                for _ in range(50):  # a free place, else this glyph is left out (its class not counted)
                    y, x = (int(v) for v in torch.randint(0, canvas - 7, (2,), generator=gen))
                    if all(abs(y - by) >= 8 or abs(x - bx) >= 8 for by, bx in boxes):
                        break
                else:
                    continue
                mine = bool(torch.rand(1, generator=gen) < p_count)
                group = ours if mine else others
                glyph = glyphs[group[int(torch.randint(len(group), (1,), generator=gen))]]
                images[k, 0, y:y + 8, x:x + 8] = glyph
                boxes.append((y, x))
                counts[k] += float(mine)
        images = _resized(images, img_size)
        self.ink = images.flatten(1).sum(1)  # total ink per canvas: the trivial predictor's feature
        self.images = _normalised(images, mean, std)
        self.targets = counts
        self.transform = transform


def _check_count(value: Any, where: str) -> float:
    """A count read from ``where``: a finite number >= 0, else a ValueError naming the place."""
    try:
        count = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{where}: the count {value!r} is not a number') from None
    if not math.isfinite(count) or count < 0:
        raise ValueError(f'{where}: a count must be a finite number >= 0, got {value!r}')
    return count


def read_points(path: str, width: int, height: int) -> List[Tuple[float, float]]:
    """Point annotations of one image (ShanghaiTech / DISCO style: one head per point), a text file of ``x y`` per
    line (pixels; ',' or spaces; '#' comments), or a ``.npy`` (N, 2) array; every point must lie on the image
    (``width`` x ``height``), else a ValueError naming the file, the line and the image size."""
    if path.endswith('.npy'):
        import numpy as np
        rows = [(float(a), float(b)) for a, b in np.load(path).reshape(-1, 2)]
        lines = [f'row {i}' for i in range(len(rows))]
    else:
        rows, lines = [], []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                text = line.split('#', 1)[0].replace(',', ' ').split()
                if not text:
                    continue
                if len(text) != 2:
                    raise ValueError(f'{path} line {number}: a point is two numbers "x y", got {line.strip()!r}')
                try:
                    rows.append((float(text[0]), float(text[1])))
                except ValueError:
                    raise ValueError(f'{path} line {number}: a point is two numbers "x y", got {line.strip()!r}') \
                        from None
                lines.append(f'line {number}')
    for (x, y), where in zip(rows, lines):
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= width and 0 <= y <= height):
            raise ValueError(f'{path} {where}: point ({x:g}, {y:g}) lies outside its image ({width} x {height} px): '
                             f'the point file does not match the image')
    return rows


def _read_counts_csv(path: str) -> Dict[str, float]:
    """``image,count`` per line (a header allowed) of a counting set's counts.csv."""
    counts: Dict[str, float] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            cells = [c.strip() for c in line.strip().split(',')]
            if not cells[0] or (number == 1 and cells[-1].lower() == 'count'):
                continue
            if len(cells) != 2:
                raise ValueError(f'{path} line {number}: expected "image,count", got {line.strip()!r}')
            counts[cells[0]] = _check_count(cells[1], f'{path} line {number} ({cells[0]})')
    return counts


def read_density(path: str, width: int, height: int) -> 'np.ndarray':
    """A density map (``.npy``, (H, W) of the image's size, finite, >= 0; its sum is the image's count), else a
    ValueError naming the file."""
    import numpy as np
    try:
        density = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} is not a readable .npy array ({e})') from e
    if density.ndim != 2 or density.shape != (height, width):
        raise ValueError(f'{path}: a density map must be (H, W) = ({height}, {width}), the size of its image; got '
                         f'shape {density.shape}')
    if not np.isfinite(density).all() or (density < 0).any():
        raise ValueError(f'{path}: a density map must hold finite values >= 0')
    return density.astype(np.float64)


def _image_counts(image: str, annotations: str, density: bool, crop: Optional[int],
                  resize: Optional[Tuple[int, int]]) -> List[Tuple[Optional[Tuple[int, int, int, int]], float]]:
    """(crop box or None, count) of each sample of one image: its points (``annotations``/<stem>.txt or .npy) or
    density map (``annotations``/<stem>.npy) counted whole, or per ``crop`` px square after ``resize``."""
    import numpy as np
    from PIL import Image
    stem = os.path.splitext(os.path.basename(image))[0]
    exts = ('.npy',) if density else ('.txt', '.npy')
    path = next((os.path.join(annotations, stem + e) for e in exts
                 if os.path.isfile(os.path.join(annotations, stem + e))), None)
    if path is None:
        raise ValueError(f'counting set: no {"density" if density else "point"} file for {os.path.basename(image)} '
                         f'({annotations}/{stem}{"" if density else ".txt or "}.npy)')
    with Image.open(image) as im:
        width, height = im.size
    if density:
        mass = read_density(path, width, height)
        ys, xs = np.mgrid[0:height, 0:width]
        xs, ys, mass = (xs.ravel() + .5), (ys.ravel() + .5), mass.ravel()  # each pixel's mass at its centre
    else:
        points = read_points(path, width, height)
        xs, ys = np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)
        mass = np.ones(len(points))
    if crop is None:
        return [(None, float(mass.sum()))]
    w, h = resize or (width, height)
    if min(w, h) < crop:
        after = ' after the resize' if resize else ''
        raise ValueError(f'counting set: {os.path.basename(image)} is {w} x {h} px{after}, smaller than the {crop} px '
                         f'crop: it would give no sample')
    cols, rows = w // crop, h // crop  # the crops that fit, left to right, top to bottom
    c, r = np.floor(xs * w / width / crop).astype(int), np.floor(ys * h / height / crop).astype(int)
    inside = (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
    grid = np.bincount(r[inside] * cols + c[inside], weights=mass[inside], minlength=rows * cols)
    return [((left * crop, top * crop, (left + 1) * crop, (top + 1) * crop), float(grid[top * cols + left]))
            for top in range(rows) for left in range(cols)]


class CountingDataset(Dataset):
    """A counting set in one format real sets map to: ``root/<split>/images/`` and either ``root/<split>/counts.csv``
    (``image,count`` per line, a header allowed), ``root/<split>/points/<image stem>.txt`` / ``.npy`` (one point
    per object, as ShanghaiTech and JHU-Crowd++ ship their heads) or ``root/<split>/density/<image stem>.npy`` (an
    (H, W) density map of the image's size whose sum is its count, as DISCO ships its heads);
    ``python -m timm_exits.data convert-counting`` writes this layout from the sets' own files.

    With points or densities and ``crop`` (TransCrowd's setting, 001_*.txt: images resized to ``resize`` (W, H) and
    cut into ``crop`` px squares), every crop is one sample whose target is the number of points inside it (the
    density mass of the pixels whose centres fall inside it); ``image_ids`` says which image each sample came from,
    so a test split is scored per image on the sum over its crops (``sum_by_image``). Without ``crop`` every image
    is one sample, its count the number of points (the sum of its density).
    """

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, crop: Optional[int] = None,
                 resize: Optional[Tuple[int, int]] = None) -> None:
        folder = os.path.join(root, split)
        images = os.path.join(folder, 'images')
        if not os.path.isdir(images):
            raise ValueError(f'counting set: {images} is not a folder (expected {root}/<split>/images/)')
        names = sorted(n for n in os.listdir(images) if n.lower().endswith(('.jpg', '.jpeg', '.png', '.bmp')))
        if not names:
            raise ValueError(f'counting set: no images in {images}')
        csv_path = os.path.join(folder, 'counts.csv')
        points_dir, density_dir = os.path.join(folder, 'points'), os.path.join(folder, 'density')
        protocol = check_counting(crop, resize, ('crop', 'resize'))
        crop, resize = (protocol['crop'], protocol['resize']) if protocol else (None, None)
        self.transform, self.crop, self.resize = transform, crop, resize
        self.samples: List[Tuple[str, Optional[Tuple[int, int, int, int]], float]] = []
        self.image_ids: List[int] = []
        if os.path.isfile(csv_path):
            if crop is not None:
                raise ValueError(f'crop={crop} needs point annotations ({points_dir}); {csv_path} gives one count per '
                                 f'image')
            counts = _read_counts_csv(csv_path)
            missing = [n for n in names if n not in counts]
            if missing:
                raise ValueError(f'{csv_path}: no count for {len(missing)} image(s), e.g. {missing[:3]}')
            for i, n in enumerate(names):
                self.samples.append((os.path.join(images, n), None, counts[n]))
                self.image_ids.append(i)
            return
        kind = next((d for d in (points_dir, density_dir) if os.path.isdir(d)), None)
        if kind is None:
            raise ValueError(f'counting set: neither {csv_path} nor {points_dir}/ nor {density_dir}/ exists')
        for i, n in enumerate(names):
            for box, count in _image_counts(os.path.join(images, n), kind, kind == density_dir, crop, resize):
                self.samples.append((os.path.join(images, n), box, count))
                self.image_ids.append(i)

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([c for _, _, c in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Any, float]:
        from PIL import Image
        path, box, count = self.samples[i]
        with Image.open(path) as im:
            image = im.convert('RGB')
        if box is not None:
            if self.resize is not None:
                image = image.resize(tuple(self.resize), Image.BILINEAR)
            image = image.crop(box)
        return (image if self.transform is None else self.transform(image)), count


def sum_by_image(values: torch.Tensor, image_ids: Sequence[int]) -> torch.Tensor:
    """Per image, the sum of its crops' ``values`` (N, ...) (TransCrowd's test count), images in id order."""
    ids = torch.as_tensor(list(image_ids))
    out = values.new_zeros(int(ids.max()) + 1, *values.shape[1:])
    return out.index_add_(0, ids.to(values.device), values)


def counting_transform(data_config: Mapping[str, Any], is_training: bool) -> Callable:
    """A counting set's transform: resize to the input size (a crop already is), a horizontal flip in training, the
    config's normalisation; no scale or crop augmentation, which would change the count."""
    from torchvision import transforms as T
    flip = [T.RandomHorizontalFlip()] if is_training else []
    return T.Compose([T.Resize(tuple(data_config['input_size'][1:])), *flip, T.ToTensor(),
                      T.Normalize(data_config['mean'], data_config['std'])])


def build_transform(
        model: nn.Module,
        is_training: bool,
        resize_crop: int = 0,
        data_config: Optional[Mapping[str, Any]] = None,
        **aug: Any,
) -> Callable:
    """Image transform of ``data_config`` (default: ``resolve_data_cfg(model)``): timm's ``create_transform``
    (``aug`` are its arguments), or with ``resize_crop`` > 0 TransFG's: resize to ``resize_crop`` square, random
    (eval: centre) crop and flip, the augmentation MEViT follows (3.1, 000_*.txt)."""
    from torchvision import transforms as T
    cfg = dict(resolve_data_cfg(model) if data_config is None else data_config)
    input_size = cfg['input_size']
    if resize_crop <= 0:
        return create_transform(**cfg, is_training=is_training, **aug)
    crop = T.RandomCrop(input_size[1:]) if is_training else T.CenterCrop(input_size[1:])
    flip = [T.RandomHorizontalFlip()] if is_training else []
    return T.Compose([
        T.Resize((resize_crop, resize_crop), interpolation=T.InterpolationMode.BILINEAR), crop, *flip,
        T.ToTensor(), T.Normalize(cfg['mean'], cfg['std'])])


def digits_augment(fill: Any = -1.) -> Callable:
    """Light augmentation for the digits tensors: shifts of up to 10 % and small rotations; ``fill`` is black after
    the normalisation (per channel: -mean / std)."""
    from torchvision import transforms as T
    return T.RandomAffine(degrees=10, translate=(0.1, 0.1), fill=fill)


def create_dataset(
        name: str,
        split: str,
        model: nn.Module,
        is_training: bool,
        data_dir: str = '',
        download: bool = False,
        data_config: Optional[Mapping[str, Any]] = None,
        **transform_kwargs: Any,
) -> Dataset:
    """Dataset ``name`` ('digits', 'folder', 'images', 'torch/<name>'), split ``split``, transformed for ``model``
    with ``data_config`` (default: ``resolve_data_cfg(model)``; digits: its input size, mean and std). ``images``
    reads ``data_dir/split`` (``data_dir`` itself when ``split`` is '') as ``ImageFiles``.

    Nothing downloads unless ``download`` is set (torchvision datasets that support it).
    """
    cfg = resolve_data_cfg(model) if data_config is None else data_config
    if getattr(cfg, 'counting', None) and name != 'counting':
        _logger.warning(f'warning: the counting protocol ({cfg.counting["crop"]} px crops) applies to --dataset '
                        f'counting only; {name} is read as it is')
    if name.startswith('digits_count'):  # 'digits_count' or 'digits_count/<seed>'
        seed = name.split('/', 1)[1] if '/' in name else '0'
        if not seed.isdigit():
            raise ValueError(f'dataset={name!r}: digits_count/<seed> takes an integer seed, got {seed!r}')
        return DigitsCountDataset(split, tuple(cfg['input_size'][1:]), mean=cfg['mean'], std=cfg['std'],
                                  seed=int(seed))
    if name == 'counting':
        return _counting_dataset(data_dir, split, cfg, is_training, transform_kwargs)
    if name == 'digits':
        mean, std = cfg['mean'], cfg['std']
        fill = [-m / s for m, s in zip(mean, std)]
        return DigitsDataset(split, tuple(cfg['input_size'][1:]), digits_augment(fill) if is_training else None,
                             mean=mean, std=std)
    transform = build_transform(model, is_training, data_config=cfg, **transform_kwargs)
    if name == 'images':
        return ImageFiles(os.path.join(data_dir, split) if split else data_dir, transform=transform)
    if name == 'folder':
        from torchvision.datasets import ImageFolder
        return ImageFolder(os.path.join(data_dir, split), transform=transform)
    key = name.split('/', 1)[1] if name.startswith('torch/') else ''
    if key not in TORCHVISION_DATASETS:
        raise ValueError(
            f'dataset={name!r} is not known; allowed: digits, folder, images, '
            f'{", ".join("torch/" + k for k in TORCHVISION_DATASETS)}, digits_count[/<seed>], counting')
    cls_name, splits = TORCHVISION_DATASETS[key]
    if split not in splits:
        raise ValueError(f'{name} has no split {split!r}; allowed: {list(splits)}')
    import torchvision.datasets
    kwargs = dict(splits[split], transform=transform)
    if key != 'imagenet':
        kwargs['download'] = download
    return getattr(torchvision.datasets, cls_name)(data_dir, **kwargs)


def _counting_dataset(data_dir: str, split: str, cfg: Mapping[str, Any], is_training: bool,
                      kwargs: Dict[str, Any]) -> 'CountingDataset':
    """``--dataset counting`` cut by the counting protocol: ``crop`` / ``resize`` in ``kwargs`` when given, else
    ``cfg.counting`` (the resolved protocol: a flag or the checkpoint's record), else whole images."""
    kwargs.pop('resize_crop', None)
    protocol = getattr(cfg, 'counting', None) or {}
    given = {k: kwargs.pop(k) for k in COUNTING_KEYS if k in kwargs}
    if kwargs:
        raise ValueError(f'dataset counting takes the augmentation arguments crop and resize only (a scale or crop '
                         f'augmentation would change the counts), got {sorted(kwargs)}')
    crop, resize = (given.get('crop'), given.get('resize')) if given else (protocol.get('crop'), protocol.get('resize'))
    try:
        return CountingDataset(data_dir, split, counting_transform(cfg, is_training), crop=crop, resize=resize)
    except ValueError as e:
        if given or not crop:
            raise
        where = getattr(cfg, 'sources', {}).get('count_crop', 'the data config')
        raise ValueError(f'{e} (the counting protocol: {crop} px crops from {where}; --count-crop 0 counts whole '
                         f'images)') from e


def write_digits_folder(root: str, num_val: int = 397, img_size: int = 32, seed: int = 0) -> None:
    """scikit-learn's digits as an ImageFolder (``train`` / ``validation``, one folder per class, grey PNGs of
    ``img_size`` px, a stratified split of ``num_val`` validation images); written once, atomically (a folder that
    exists is kept)."""
    import shutil
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    if os.path.isdir(root):
        return
    digits = load_digits()
    train, val = train_test_split(np.arange(len(digits.target)), test_size=num_val, stratify=digits.target,
                                  random_state=seed)
    tmp = f'{root}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    for split, rows in (('train', train), ('validation', val)):
        for i in rows:
            folder = os.path.join(tmp, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            img = Image.fromarray((digits.images[i] * 255. / 16.).astype('uint8'), mode='L')
            img.resize((img_size, img_size), Image.BILINEAR).save(os.path.join(folder, f'{i:04d}.png'))
    os.replace(tmp, root)


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Ordered evaluation loader."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m timm_exits.data convert-counting --format shanghaitech|disco|jhu SRC DST``: a real counting set
    into the counting layout (``timm_exits.counting_sets``); bad input prints one ``error: ...`` line (status 2)."""
    from .counting_sets import FORMATS, convert_counting
    parser = argparse.ArgumentParser(prog='python -m timm_exits.data', description='Dataset tools.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('convert-counting', help='write the counting layout (--dataset counting) from a real set')
    p.add_argument('--format', required=True, choices=list(FORMATS), help='the set SRC is distributed as')
    p.add_argument('--split', default=None, help='convert this split only, or name the one split SRC holds')
    p.add_argument('src', metavar='SRC', help='the set as distributed (e.g. ShanghaiTech/part_A, jhu_crowd_v2.0)')
    p.add_argument('dst', metavar='DST', help='new (or empty) folder: DST/<split>/images/, points/ or density/')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        summary = convert_counting(args.format, args.src, args.dst, args.split)
    except (ValueError, OSError, ImportError) as e:
        parser.exit(2, f'error: {" ".join(str(e).split())}\n')
    for name, info in summary.items():
        _logger.info(f'{args.dst}/{name}: {info["images"]} images, {info["count"]:g} heads'
                     + (f', {info["points_outside_left_out"]} outside their image left out'
                        if info['points_outside_left_out'] else ''))
    return 0


if __name__ == '__main__':
    import sys
    sys.exit(main())
