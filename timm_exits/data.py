""" Datasets and transforms of the training recipes and ``python -m timm_exits.validate``.

``digits`` (scikit-learn's bundled 8x8 digits, nothing downloaded), ``folder`` (an ImageFolder at ``data_dir/split``),
``images`` (the image files of ``data_dir`` itself, labelled when they sit in class folders, else unlabelled: label -1)
or ``torch/<name>`` (torchvision: cifar10, cifar100, flowers102, stanford_cars, fgvc_aircraft, imagenet; downloads only
when asked), transformed at the model's input size and normalisation.
"""
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from timm.data import create_transform, resolve_data_config

__all__ = [
    'DATA_CONFIG_KEYS', 'NO_LABEL', 'TORCHVISION_DATASETS', 'DigitsDataset', 'ImageFiles', 'available_cpus',
    'build_transform', 'create_dataset', 'digits_augment', 'make_loader',
]

NO_LABEL = -1  # the label of an image that has none (``ImageFiles`` of a flat folder)
# data config entries a command line may set (timm validate.py's flags), passed to ``build_transform(data_config=)``
DATA_CONFIG_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')

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


class DigitsDataset(Dataset):
    """scikit-learn's bundled digits (1797 real 8x8 grey images, 10 classes; nothing downloaded), upsampled.

    A fixed stratified split: 'train' 60 %, 'val' 20 %, 'test' 20 %. Images are (3, img_size, img_size) in [-1, 1]
    (mean = std = 0.5 of the test models' cfgs). ``transform`` (tensor to tensor) augments them.
    """
    splits = ('train', 'val', 'test')

    def __init__(self, split: str = 'train', img_size: int = 32, transform: Optional[Callable] = None) -> None:
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
        images = F.interpolate(images, size=(img_size, img_size), mode='bilinear', align_corners=False)
        self.images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        self.targets = torch.tensor(digits.target[index], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        image = self.images[i]
        return (image if self.transform is None else self.transform(image)), int(self.targets[i])


def build_transform(
        model: nn.Module,
        is_training: bool,
        resize_crop: int = 0,
        data_config: Optional[Dict[str, Any]] = None,
        **aug: Any,
) -> Callable:
    """Image transform at the model's input size and normalisation: timm's ``create_transform`` (``aug`` are its
    arguments), or with ``resize_crop`` > 0 TransFG's: resize to ``resize_crop`` square, random (eval: centre) crop
    and flip, the augmentation MEViT follows (3.1, 000_*.txt). ``data_config``: entries of ``DATA_CONFIG_KEYS``
    that replace the model's (None values are ignored)."""
    from torchvision import transforms as T
    input_size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    given = {k: v for k, v in (data_config or {}).items() if v is not None}
    unknown = sorted(set(given) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f'data_config keys {unknown} are not known; allowed: {list(DATA_CONFIG_KEYS)}')
    cfg = resolve_data_config({'input_size': input_size, **given}, model=model)
    input_size = cfg['input_size']
    if resize_crop <= 0:
        return create_transform(**cfg, is_training=is_training, **aug)
    crop = T.RandomCrop(input_size[1:]) if is_training else T.CenterCrop(input_size[1:])
    flip = [T.RandomHorizontalFlip()] if is_training else []
    return T.Compose([
        T.Resize((resize_crop, resize_crop), interpolation=T.InterpolationMode.BILINEAR), crop, *flip,
        T.ToTensor(), T.Normalize(cfg['mean'], cfg['std'])])


def digits_augment() -> Callable:
    """Light augmentation for the digits tensors: shifts of up to 10 % and small rotations."""
    from torchvision import transforms as T
    return T.RandomAffine(degrees=10, translate=(0.1, 0.1), fill=-1.)


def create_dataset(
        name: str,
        split: str,
        model: nn.Module,
        is_training: bool,
        data_dir: str = '',
        download: bool = False,
        **transform_kwargs: Any,
) -> Dataset:
    """Dataset ``name`` ('digits', 'folder', 'images', 'torch/<name>'), split ``split``, transformed for ``model``.

    ``images`` reads ``data_dir/split`` (``data_dir`` itself when ``split`` is '') as ``ImageFiles``. Nothing
    downloads unless ``download`` is set (torchvision datasets that support it).
    """
    if name == 'digits':
        return DigitsDataset(split, model.patch_embed.img_size[0], digits_augment() if is_training else None)
    transform = build_transform(model, is_training, **transform_kwargs)
    if name == 'images':
        return ImageFiles(os.path.join(data_dir, split) if split else data_dir, transform=transform)
    if name == 'folder':
        from torchvision.datasets import ImageFolder
        return ImageFolder(os.path.join(data_dir, split), transform=transform)
    key = name.split('/', 1)[1] if name.startswith('torch/') else ''
    if key not in TORCHVISION_DATASETS:
        raise ValueError(
            f'dataset={name!r} is not known; allowed: digits, folder, images, '
            f'{", ".join("torch/" + k for k in TORCHVISION_DATASETS)}')
    cls_name, splits = TORCHVISION_DATASETS[key]
    if split not in splits:
        raise ValueError(f'{name} has no split {split!r}; allowed: {list(splits)}')
    import torchvision.datasets
    kwargs = dict(splits[split], transform=transform)
    if key != 'imagenet':
        kwargs['download'] = download
    return getattr(torchvision.datasets, cls_name)(data_dir, **kwargs)


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Ordered evaluation loader."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1
