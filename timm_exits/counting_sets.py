""" Real counting sets into the counting layout: ``python -m timm_exits.data convert-counting``.

``convert_counting(format, src, dst)`` reads a set as it is distributed and writes ``dst/<split>/images/`` with
``points/<stem>.txt`` (one ``x y`` per head) or ``density/<stem>.npy``, the layout ``--dataset counting`` reads
(``timm_exits.data.CountingDataset``):

- ``shanghaitech``: ShanghaiTech part A or B (``src``: ``part_A``, holding ``train_data/`` and ``test_data/``, each
  with ``images/IMG_<n>.jpg`` and ``ground-truth/GT_IMG_<n>.mat``, whose ``image_info[0,0][0,0][0]`` is the (N, 2)
  array of head points, x then y, in pixels) into ``train`` and ``test``.
- ``jhu``: JHU-Crowd++ (``src``: ``jhu_crowd_v2.0``, holding ``train/``, ``val/``, ``test/``, each with
  ``images/<id>.jpg`` and ``gt/<id>.txt``, one head a line: ``x y w h o b``, the point then its box, occlusion and
  blur; an empty file: no one) into ``train``, ``val`` and ``test``.
- ``disco``: DISCO as its Zenodo release ships it (assumed: ``src`` holds ``images/<id>.jpg`` and
  ``density_maps/<split>/<id>.mat``, each ``.mat`` with ``map``, the image's (H, W) density map whose sum is its
  count; the audio is not read) into one split per folder of ``density_maps`` (``train``, ``val``, ``test``), as
  density maps: their mass is counted per crop where a point would be.

``src`` may also be one split's folder itself (``images/`` beside ``ground-truth/``, ``gt/`` or the ``.mat`` maps),
named by ``split``. Points outside their image (some sets have a few on the border) are left out, as TransCrowd's
preprocessing leaves them, and counted in the summary. Every image needs its annotation file and every annotation
file its image, else one error names the file and what is wrong; ``dst`` is written whole or not at all.
"""
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ._files import atomic_dir, write_json

if TYPE_CHECKING:
    import numpy as np

__all__ = ['FORMATS', 'convert_counting', 'read_disco_density', 'read_jhu_points', 'read_shanghaitech_points']

_logger = logging.getLogger(__name__)
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp')


def _loadmat(path: str) -> Dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError('reading .mat files needs scipy: pip install "timm-exits[counting]"') from e
    try:
        return loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError ... by what is wrong with the file
        raise ValueError(f'{path} is not a readable MATLAB .mat file ({type(e).__name__}: {e})') from e


def read_shanghaitech_points(path: str) -> 'np.ndarray':
    """ShanghaiTech's ``GT_IMG_<n>.mat``: ``image_info[0,0][0,0][0]``, the (N, 2) head points (x, y)."""
    import numpy as np
    mat = _loadmat(path)
    try:
        points = np.asarray(mat['image_info'][0, 0][0, 0][0], dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError):
        keys = sorted(k for k in mat if not k.startswith('__'))
        raise ValueError(f'{path}: expected ShanghaiTech\'s image_info[0,0][0,0][0], an (N, 2) array of head points; '
                         f'the file holds {keys}') from None
    if points.size == 0:
        return points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f'{path}: image_info[0,0][0,0][0] must be an (N, 2) array of head points (x, y), got shape '
                         f'{points.shape}')
    return points


def read_disco_density(path: str) -> 'np.ndarray':
    """DISCO's ``<id>.mat``: ``map``, the image's (H, W) density map (finite, >= 0)."""
    import numpy as np
    mat = _loadmat(path)
    if 'map' not in mat:
        keys = sorted(k for k in mat if not k.startswith('__'))
        raise ValueError(f'{path}: expected DISCO\'s "map", the (H, W) density map of its image; the file holds {keys}')
    density = np.asarray(mat['map'], dtype=np.float64)
    if density.ndim != 2 or not np.isfinite(density).all() or (density < 0).any():
        raise ValueError(f'{path}: "map" must be a 2-D density map of finite values >= 0, got shape {density.shape}')
    return density


def read_jhu_points(path: str) -> 'np.ndarray':
    """JHU-Crowd++'s ``gt/<id>.txt``: one head a line, ``x y w h o b``; the (N, 2) points (x, y)."""
    import numpy as np
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            cells = line.split()
            if not cells:
                continue
            try:
                values = [float(c) for c in cells]
            except ValueError:
                values = []
            if len(values) != 6:
                raise ValueError(f'{path} line {number}: a head is six numbers "x y w h o b", got {line.strip()!r}')
            rows.append(values[:2])
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


# format: (annotation folder in a split, annotation file name of an image stem, reader, density)
_Format = Tuple[str, Callable[[str], str], Callable[[str], Any], bool]
FORMATS: Dict[str, _Format] = {
    'shanghaitech': ('ground-truth', lambda stem: f'GT_{stem}.mat', read_shanghaitech_points, False),
    'jhu': ('gt', lambda stem: f'{stem}.txt', read_jhu_points, False),
    'disco': ('', lambda stem: f'{stem}.mat', read_disco_density, True),
}


def _splits(fmt: str, src: str, split: Optional[str]) -> Dict[str, Tuple[str, str]]:
    """Split name -> (images folder, annotations folder) of ``src``."""
    folder = FORMATS[fmt][0]
    if fmt == 'disco':
        maps = os.path.join(src, 'density_maps')
        if not os.path.isdir(os.path.join(src, 'images')) or not os.path.isdir(maps):
            raise ValueError(f'--format disco: {src} must hold images/ and density_maps/<split>/ (DISCO\'s release)')
        if any(n.endswith('.mat') for n in os.listdir(maps)):
            if not split:
                raise ValueError(f'--format disco: {maps} holds the .mat maps of one split: name it with --split')
            return {split: (os.path.join(src, 'images'), maps)}
        found = {n: (os.path.join(src, 'images'), os.path.join(maps, n)) for n in sorted(os.listdir(maps))
                 if os.path.isdir(os.path.join(maps, n))}
    elif os.path.isdir(os.path.join(src, 'images')):
        if not split:
            raise ValueError(f'--format {fmt}: {src} holds one split (images/ and {folder}/): name it with --split')
        return {split: (os.path.join(src, 'images'), os.path.join(src, folder))}
    else:
        found = {}
        for name in sorted(os.listdir(src)):
            if os.path.isdir(os.path.join(src, name, 'images')):
                key = name[:-len('_data')] if name.endswith('_data') else name
                found[key] = (os.path.join(src, name, 'images'), os.path.join(src, name, folder))
    if not found:
        layout = {'shanghaitech': 'train_data/ and test_data/, each with images/ and ground-truth/',
                  'jhu': 'train/, val/ and test/, each with images/ and gt/',
                  'disco': 'images/ and density_maps/<split>/'}[fmt]
        raise ValueError(f'--format {fmt}: {src} holds no split ({layout})')
    if split:
        if split not in found:
            raise ValueError(f'--split {split!r} is not a split of {src}; allowed: {list(found)}')
        return {split: found[split]}
    return found


def _pairs(fmt: str, images: str, annotations: str, shared: bool) -> List[Tuple[str, str]]:
    """(image, annotation file) of every image; an image without its file, or a file without its image, is an error
    (``shared``: the images folder serves several splits, so only the files must find their images)."""
    _, name_of, _, _ = FORMATS[fmt]
    if not os.path.isdir(annotations):
        raise ValueError(f'{annotations} is not a folder: the annotations of the images in {images}')
    stems = {os.path.splitext(n)[0]: n for n in sorted(os.listdir(images)) if n.lower().endswith(IMAGE_EXTS)}
    files = {n for n in os.listdir(annotations) if not n.startswith('.')}
    expected = {name_of(stem): stem for stem in stems}
    orphans = sorted(files - set(expected))
    if orphans:
        raise ValueError(f'{os.path.join(annotations, orphans[0])}: no image of that name in {images} (expected '
                         f'{"a file named " + name_of("<image stem>") if fmt != "disco" else "<image stem>.mat"})'
                         + (f'; {len(orphans) - 1} more such file(s)' if len(orphans) > 1 else ''))
    pairs = [(os.path.join(images, stems[stem]), os.path.join(annotations, name)) for name, stem in
             sorted(expected.items(), key=lambda kv: kv[1]) if name in files]
    missing = [stems[stem] for name, stem in sorted(expected.items(), key=lambda kv: kv[1]) if name not in files]
    if missing and not shared:
        raise ValueError(f'{os.path.join(images, missing[0])}: no annotation file '
                         f'{os.path.join(annotations, name_of(os.path.splitext(missing[0])[0]))}'
                         + (f'; {len(missing) - 1} more image(s) without one' if len(missing) > 1 else ''))
    return pairs


def _write_image(fmt: str, image: str, annotation: str, out: str) -> Tuple[float, int]:
    """Copy one image into ``out/images`` and write its annotation; (its count, points left out)."""
    import numpy as np
    from PIL import Image
    _, _, read, density = FORMATS[fmt]
    try:
        with Image.open(image) as im:
            width, height = im.size
    except (OSError, ValueError) as e:
        raise ValueError(f'{image} is not a readable image ({type(e).__name__}: {e})') from e
    values = read(annotation)
    stem = os.path.splitext(os.path.basename(image))[0]
    shutil.copyfile(image, os.path.join(out, 'images', os.path.basename(image)))
    if density:
        if values.shape != (height, width):
            raise ValueError(f'{annotation}: the density map is {values.shape[1]} x {values.shape[0]}, its image '
                             f'{image} {width} x {height} px')
        np.save(os.path.join(out, 'density', stem + '.npy'), values.astype(np.float32))
        return float(values.sum()), 0
    ok = np.isfinite(values).all(1) & (values[:, 0] >= 0) & (values[:, 0] <= width) & (values[:, 1] >= 0) & (
        values[:, 1] <= height)
    with open(os.path.join(out, 'points', stem + '.txt'), 'w') as f:
        f.writelines(f'{x:.3f} {y:.3f}\n' for x, y in values[ok])
    return float(ok.sum()), int((~ok).sum())


def convert_counting(fmt: str, src: str, dst: str, split: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Write ``dst`` (new or empty) in the counting layout from the set ``src`` in format ``fmt`` (see the module
    docstring). Returns (and writes to ``dst/conversion.json``) per split: images, the total count and the points
    left out for lying outside their image."""
    if fmt not in FORMATS:
        raise ValueError(f'--format {fmt!r} is not known; allowed: {", ".join(FORMATS)}')
    if not os.path.isdir(src):
        raise ValueError(f'SRC {src!r} is not a folder')
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f'DST {dst!r} exists and is not an empty folder; name a new one')
    splits = _splits(fmt, src, split)
    shared = fmt == 'disco'
    plan = {name: _pairs(fmt, images, annotations, shared) for name, (images, annotations) in splits.items()}
    if shared and split is None:  # every image of the shared folder needs a map in some split
        images = next(iter(splits.values()))[0]
        used = {os.path.basename(image) for pairs in plan.values() for image, _ in pairs}
        unused = sorted(n for n in os.listdir(images) if n.lower().endswith(IMAGE_EXTS) and n not in used)
        if unused:
            raise ValueError(f'{os.path.join(images, unused[0])}: no density map in any split of '
                             f'{os.path.join(src, "density_maps")}' + (
                                 f'; {len(unused) - 1} more image(s) without one' if len(unused) > 1 else ''))
    summary: Dict[str, Dict[str, Any]] = {}
    with atomic_dir(dst) as tmp:
        for name, pairs in plan.items():
            if not pairs:
                raise ValueError(f'split {name!r} of {src} holds no annotated image')
            out = os.path.join(tmp, name)
            for sub in ('images', 'density' if FORMATS[fmt][3] else 'points'):
                os.makedirs(os.path.join(out, sub))
            counts = [_write_image(fmt, image, annotation, out) for image, annotation in pairs]
            summary[name] = {'images': len(pairs), 'count': sum(c for c, _ in counts),
                             'points_outside_left_out': sum(d for _, d in counts)}
            if summary[name]['points_outside_left_out']:
                _logger.warning(f'warning: {name}: {summary[name]["points_outside_left_out"]} point(s) lie outside '
                                f'their image and are left out (as TransCrowd leaves them)')
        write_json({'format': fmt, 'source': os.path.abspath(src), 'splits': summary},
                   os.path.join(tmp, 'conversion.json'))
    return summary
