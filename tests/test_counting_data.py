"""Counting data: the digits_count benchmark (fixed by its seed, glyph pools apart, beaten by nothing trivial here),
the counting folder format (counts.csv; point files counted per crop as TransCrowd does) and its errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from timm_exits.data import CountingDataset, DigitsCountDataset, read_points, sum_by_image


def test_digits_count_is_fixed_by_its_seed():
    a, b = (DigitsCountDataset('val', seed=1, num_images=50) for _ in range(2))
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    c = DigitsCountDataset('val', seed=2, num_images=50)
    assert not torch.equal(a.targets, c.targets)
    assert a.images.shape == (50, 3, 32, 32) and (a.targets >= 0).all() and (a.targets <= 8).all()
    # the count is the number of glyphs of the counted class: never more than the glyphs on the canvas
    glyphs_ink = a.ink / a.ink.max()
    assert (glyphs_ink > 0).all()
    with pytest.raises(ValueError, match="split='dev' is not known"):
        DigitsCountDataset('dev')
    with pytest.raises(ValueError, match='the counted one not among the distractors'):
        DigitsCountDataset('val', count_class=1, distractors=(1, 2))


def _folder(root, points, size=(64, 32)):
    (root / 'train' / 'images').mkdir(parents=True)
    (root / 'train' / 'points').mkdir()
    for i, pts in enumerate(points):
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(root / 'train' / 'images' / f'{i}.png')
        (root / 'train' / 'points' / f'{i}.txt').write_text(''.join(f'{x} {y}\n' for x, y in pts))


def test_points_counted_per_crop_and_summed_per_image(tmp_path):
    _folder(tmp_path, [[(1, 1), (40, 5), (63, 31)], [(10, 10)]])
    whole = CountingDataset(str(tmp_path), 'train')
    assert [c for _, _, c in whole.samples] == [3., 1.]
    crops = CountingDataset(str(tmp_path), 'train', crop=32)  # two 32 px crops per 64 x 32 image
    assert [c for _, _, c in crops.samples] == [1., 2., 1., 0.] and crops.image_ids == [0, 0, 1, 1]
    image, count = crops[1]
    assert image.size == (32, 32) and count == 2.
    assert sum_by_image(crops.targets, crops.image_ids).tolist() == [3., 1.]
    resized = CountingDataset(str(tmp_path), 'train', crop=32, resize=(128, 64))  # points scale with the image
    assert sum(c for _, _, c in resized.samples[:8]) == 3.


def test_counting_errors_name_the_file(tmp_path):
    _folder(tmp_path / 'a', [[(70, 1)]])
    with pytest.raises(ValueError, match=r'0.txt line 1: point \(70, 1\) lies outside its image \(64 x 32 px\)'):
        CountingDataset(str(tmp_path / 'a'), 'train')
    with pytest.raises(ValueError, match='a point is two numbers'):
        (tmp_path / 'p.txt').write_text('1 2 3\n')
        read_points(str(tmp_path / 'p.txt'), 10, 10)
    root = tmp_path / 'b'
    (root / 'train' / 'images').mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / 'train' / 'images' / f'{i}.png')
    for text, message in (('image,count\n0.png,-1\n1.png,2\n', 'a count must be a finite number >= 0'),
                          ('0.png,nan\n1.png,2\n', 'a count must be a finite number >= 0'),
                          ('0.png,3\n', r'no count for 1 image\(s\)'),
                          ('0.png,x\n1.png,1\n', "the count 'x' is not a number")):
        (root / 'train' / 'counts.csv').write_text(text)
        with pytest.raises(ValueError, match=message):
            CountingDataset(str(root), 'train')
    (root / 'train' / 'counts.csv').write_text('image,count\n0.png,3\n1.png,0\n')
    assert CountingDataset(str(root), 'train').targets.tolist() == [3., 0.]
