""" Datasets and transforms of the training recipes and ``python -m timm_exits.validate``.

``digits`` (scikit-learn's bundled 8x8 digits, nothing downloaded), ``folder`` (an ImageFolder at ``data_dir/split``)
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
    'TORCHVISION_DATASETS', 'DigitsDataset', 'available_cpus', 'build_transform', 'create_dataset', 'digits_augment',
    'make_loader',
]

# torchvision class name and the constructor arguments of each split
TORCHVISION_DATASETS: Dict[str, Tuple[str, Dict[str, Dict[str, Any]]]] = {
    'cifar10': ('CIFAR10', {'train': dict(train=True), 'test': dict(train=False)}),
    'cifar100': ('CIFAR100', {'train': dict(train=True), 'test': dict(train=False)}),
    'flowers102': ('Flowers102', {s: dict(split=s) for s in ('train', 'val', 'test')}),
    'stanford_cars': ('StanfordCars', {s: dict(split=s) for s in ('train', 'test')}),
    'fgvc_aircraft': ('FGVCAircraft', {s: dict(split=s) for s in ('train', 'val', 'trainval', 'test')}),
    'imagenet': ('ImageNet', {s: dict(split=s) for s in ('train', 'val')}),
}


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
        **aug: Any,
) -> Callable:
    """Image transform at the model's input size and normalisation: timm's ``create_transform`` (``aug`` are its
    arguments), or with ``resize_crop`` > 0 TransFG's: resize to ``resize_crop`` square, random (eval: centre) crop
    and flip, the augmentation MEViT follows (3.1, 000_*.txt)."""
    from torchvision import transforms as T
    input_size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    cfg = resolve_data_config({'input_size': input_size}, model=model)
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
    """Dataset ``name`` ('digits', 'folder', 'torch/<name>'), split ``split``, transformed for ``model``.

    Nothing downloads unless ``download`` is set (torchvision datasets that support it).
    """
    if name == 'digits':
        return DigitsDataset(split, model.patch_embed.img_size[0], digits_augment() if is_training else None)
    transform = build_transform(model, is_training, **transform_kwargs)
    if name == 'folder':
        from torchvision.datasets import ImageFolder
        return ImageFolder(os.path.join(data_dir, split), transform=transform)
    key = name.split('/', 1)[1] if name.startswith('torch/') else ''
    if key not in TORCHVISION_DATASETS:
        raise ValueError(
            f'dataset={name!r} is not known; allowed: digits, folder, '
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
