"""``python -m timm_exits.data convert-counting``: ShanghaiTech, JHU-Crowd++ and DISCO as their files ship (written
here with scipy.io.savemat), into the counting layout; and what a bad file gives."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

scipy_io = pytest.importorskip('scipy.io')

from timm_exits.data import CountingDataset, main  # noqa: E402


def _image(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(path)


def _shanghaitech_mat(path, points):
    info = np.zeros((1, 1), dtype=[('location', 'O'), ('number', 'O')])
    info[0, 0]['location'] = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    info[0, 0]['number'] = np.array([[float(len(points))]])
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = info
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy_io.savemat(str(path), {'image_info': cell})


SHT = {'train_data': {'IMG_1': [(3.5, 4.5), (40., 30.), (63.9, 47.9)], 'IMG_2': []},
       'test_data': {'IMG_1': [(10., 10.), (70., 5.)]}}  # (70, 5) lies outside its 64 x 48 image


def _shanghaitech(root):
    for split, images in SHT.items():
        for stem, points in images.items():
            _image(root / split / 'images' / f'{stem}.jpg')
            _shanghaitech_mat(root / split / 'ground-truth' / f'GT_{stem}.mat', points)


def test_shanghaitech_points_into_the_counting_layout(tmp_path):
    _shanghaitech(tmp_path / 'part_A')
    assert main(['convert-counting', '--format', 'shanghaitech', str(tmp_path / 'part_A'), str(tmp_path / 'out')]) == 0
    lines = (tmp_path / 'out' / 'train' / 'points' / 'IMG_1.txt').read_text().splitlines()
    assert [tuple(map(float, line.split())) for line in lines] == SHT['train_data']['IMG_1']
    assert (tmp_path / 'out' / 'train' / 'points' / 'IMG_2.txt').read_text() == ''
    summary = json.loads((tmp_path / 'out' / 'conversion.json').read_text())['splits']
    assert summary == {'train': {'images': 2, 'count': 3., 'points_outside_left_out': 0},
                       'test': {'images': 1, 'count': 1., 'points_outside_left_out': 1}}
    ds = CountingDataset(str(tmp_path / 'out'), 'train')
    assert ds.targets.tolist() == [3., 0.]
    crops = CountingDataset(str(tmp_path / 'out'), 'train', crop=16, resize=(64, 48))  # 4 x 3 crops an image
    assert len(crops) == 24 and crops.targets[:12].sum() == 3. and crops.targets[0] == 1.  # (3.5, 4.5): top left


def test_jhu_points_into_the_counting_layout(tmp_path):
    src = tmp_path / 'jhu_crowd_v2.0'
    heads = {'train': {'0001': [(5, 6), (20.5, 30)]}, 'val': {'0002': [(1, 1)]}, 'test': {'0003': []}}
    for split, images in heads.items():
        for stem, points in images.items():
            _image(src / split / 'images' / f'{stem}.jpg')
            (src / split / 'gt').mkdir(parents=True, exist_ok=True)
            (src / split / 'gt' / f'{stem}.txt').write_text(''.join(f'{x} {y} 4 4 1 0\n' for x, y in points))
    assert main(['convert-counting', '--format', 'jhu', str(src), str(tmp_path / 'out')]) == 0
    for split, images in heads.items():
        for stem, points in images.items():
            assert CountingDataset(str(tmp_path / 'out'), split).targets.tolist() == [float(len(points))]
    text = (tmp_path / 'out' / 'train' / 'points' / '0001.txt').read_text()
    assert [tuple(map(float, line.split())) for line in text.splitlines()] == [(5., 6.), (20.5, 30.)]
    # one split's folder, named with --split
    assert main(['convert-counting', '--format', 'jhu', '--split', 'val', str(src / 'val'), str(tmp_path / 'v')]) == 0
    assert CountingDataset(str(tmp_path / 'v'), 'val').targets.tolist() == [1.]


def test_disco_density_maps_counted_whole_and_per_crop(tmp_path):
    src = tmp_path / 'disco'
    rng = np.random.default_rng(0)
    maps = {'train': {'1': rng.random((48, 64)) * .01}, 'test': {'2': np.zeros((48, 64))}}
    maps['test']['2'][5, 40] = 2.  # two heads at pixel (x 40, y 5): the crop [32, 48) x [0, 16)
    for split, images in maps.items():
        for stem, density in images.items():
            _image(src / 'images' / f'{stem}.jpg')
            (src / 'density_maps' / split).mkdir(parents=True, exist_ok=True)
            scipy_io.savemat(str(src / 'density_maps' / split / f'{stem}.mat'), {'map': density})
    assert main(['convert-counting', '--format', 'disco', str(src), str(tmp_path / 'out')]) == 0
    train = CountingDataset(str(tmp_path / 'out'), 'train')
    assert train.targets.tolist() == pytest.approx([float(maps['train']['1'].astype(np.float32).sum())], rel=1e-5)
    crops = CountingDataset(str(tmp_path / 'out'), 'train', crop=16)
    assert float(crops.targets.sum()) == pytest.approx(float(train.targets.sum()), rel=1e-5)
    by_hand = maps['train']['1'].reshape(3, 16, 4, 16).sum((1, 3)).ravel()  # each 16 px square's mass
    assert crops.targets.tolist() == pytest.approx(by_hand.tolist(), rel=1e-4)
    test = CountingDataset(str(tmp_path / 'out'), 'test', crop=16, resize=(128, 96))  # pixel (40, 5) -> (81, 11)
    assert test.targets.tolist() == [0.] * 5 + [2.] + [0.] * 42  # 8 x 6 crops


def _error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(['convert-counting', *argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_files_are_named(tmp_path, capsys):
    _shanghaitech(tmp_path / 'a')
    scipy_io.savemat(str(tmp_path / 'a' / 'train_data' / 'ground-truth' / 'GT_IMG_2.mat'), {'points': np.ones((2, 2))})
    err = _error(capsys, '--format', 'shanghaitech', str(tmp_path / 'a'), str(tmp_path / 'o1'))
    assert 'GT_IMG_2.mat: expected ShanghaiTech\'s image_info[0,0][0,0][0], an (N, 2) array of head points; the file ' \
           "holds ['points']" in err
    assert not (tmp_path / 'o1').exists()  # nothing half written
    _shanghaitech(tmp_path / 'b')
    _shanghaitech_mat(tmp_path / 'b' / 'train_data' / 'ground-truth' / 'GT_IMG_9.mat', [(1, 1)])
    err = _error(capsys, '--format', 'shanghaitech', str(tmp_path / 'b'), str(tmp_path / 'o2'))
    assert 'GT_IMG_9.mat: no image of that name in' in err
    _shanghaitech(tmp_path / 'c')
    _image(tmp_path / 'c' / 'test_data' / 'images' / 'IMG_7.jpg')
    err = _error(capsys, '--format', 'shanghaitech', str(tmp_path / 'c'), str(tmp_path / 'o3'))
    assert 'IMG_7.jpg: no annotation file' in err and 'GT_IMG_7.mat' in err
    (tmp_path / 'd' / 'train' / 'gt').mkdir(parents=True)
    _image(tmp_path / 'd' / 'train' / 'images' / '1.jpg')
    (tmp_path / 'd' / 'train' / 'gt' / '1.txt').write_text('1 2 3 4 5 6\n1 2\n')
    err = _error(capsys, '--format', 'jhu', str(tmp_path / 'd'), str(tmp_path / 'o4'))
    assert '1.txt line 2: a head is six numbers "x y w h o b", got \'1 2\'' in err
    (tmp_path / 'e' / 'density_maps' / 'train').mkdir(parents=True)
    _image(tmp_path / 'e' / 'images' / '1.jpg')
    _image(tmp_path / 'e' / 'images' / '2.jpg')
    scipy_io.savemat(str(tmp_path / 'e' / 'density_maps' / 'train' / '1.mat'), {'density': np.ones((48, 64))})
    err = _error(capsys, '--format', 'disco', str(tmp_path / 'e'), str(tmp_path / 'o5'))
    assert '2.jpg: no density map in any split' in err
    scipy_io.savemat(str(tmp_path / 'e' / 'density_maps' / 'train' / '2.mat'), {'map': np.ones((48, 64))})
    err = _error(capsys, '--format', 'disco', str(tmp_path / 'e'), str(tmp_path / 'o5'))
    assert '1.mat: expected DISCO\'s "map", the (H, W) density map of its image; the file holds [\'density\']' in err
    scipy_io.savemat(str(tmp_path / 'e' / 'density_maps' / 'train' / '1.mat'), {'map': np.ones((10, 10))})
    err = _error(capsys, '--format', 'disco', str(tmp_path / 'e'), str(tmp_path / 'o5'))
    assert '1.mat: the density map is 10 x 10, its image' in err
    (tmp_path / 'e' / 'density_maps' / 'train' / '1.mat').write_text('not a mat file')
    err = _error(capsys, '--format', 'disco', str(tmp_path / 'e'), str(tmp_path / 'o5'))
    assert '1.mat is not a readable MATLAB .mat file' in err
    err = _error(capsys, '--format', 'jhu', str(tmp_path / 'd' / 'train'), str(tmp_path / 'o6'))
    assert 'holds one split (images/ and gt/): name it with --split' in err
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('')
    err = _error(capsys, '--format', 'jhu', str(tmp_path / 'd'), str(tmp_path / 'full'))
    assert 'exists and is not an empty folder' in err


def test_module_runs_from_the_command_line(tmp_path):
    _shanghaitech(tmp_path / 'part_B')
    done = subprocess.run([sys.executable, '-m', 'timm_exits.data', 'convert-counting', '--format', 'shanghaitech',
                           '--split', 'test', str(tmp_path / 'part_B'), str(tmp_path / 'out')],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '1 point(s) lie outside their image and are left out' in done.stderr
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['conversion.json', 'test']
    assert CountingDataset(str(tmp_path / 'out'), 'test').targets.tolist() == [1.]
