"""The counting protocol travels with the checkpoint (crop size and resize recorded beside the data config, used by
validate, export and hub push, a flag overriding), and counts are scored per image on the sum of their crops
(TransCrowd's MAE / RMSE) beside the per-crop figures."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from timm_exits.data import CountingDataset, make_loader, resolve_data_cfg
from timm_exits.evaluation import collect_regression_outputs, evaluate_regression, regression_exit_choice

CROP, RESIZE = 32, (96, 64)  # six 32 px crops per image, as TransCrowd cuts 1152 x 768 into 384 px crops


def counting_folder(root, splits=('train', 'val', 'test'), num_images=4, size=(80, 56), seed=0):
    """Point-annotated images (a white dot on every head) of every split; returns {split: [points per image]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in splits:
        (root / split / 'images').mkdir(parents=True)
        (root / split / 'points').mkdir()
        out[split] = []
        for i in range(num_images):
            pts = rng.uniform(0, 1, (int(rng.integers(0, 12)), 2)) * (np.array(size) - 1)
            pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            for x, y in pts:
                pixels[int(y), int(x)] = 255
            Image.fromarray(pixels).save(root / split / 'images' / f'{i}.png')
            (root / split / 'points' / f'{i}.txt').write_text(''.join(f'{x} {y}\n' for x, y in pts))
            out[split].append(pts)
    return out


@pytest.fixture(scope='module')
def counting_run(tmp_path_factory):
    """A counting recipe trained (one epoch) on TransCrowd's crops: its folder and its own evaluation."""
    from timm_exits.train import Recipe, Stage, train
    root = tmp_path_factory.mktemp('counting')
    counting_folder(root / 'data')
    recipe = Recipe(
        name='crops', model='test_vit_mexit', dataset='counting', num_classes=1, batch_size=8, workers=0,
        model_kwargs=dict(task='regression', exit_layers=[2, 3]), train_split='train', val_split='val',
        test_split='test', aug=dict(crop=CROP, resize=RESIZE),
        stages=[Stage('regression_end_to_end', 1, opt='adam', lr=1e-3, sched='none', task_kwargs=dict(loss='l1'))])
    result = train(recipe, str(root / 'run'), str(root / 'data'), 'cpu')
    return root, result


def _validate(root, out, *extra):
    from timm_exits.validate import main
    return main(['--checkpoint', str(root / 'run' / 'model.safetensors'), '--dataset', 'counting', '--data-dir',
                 str(root / 'data'), '--split', 'test', '--output', str(root / out), '--workers', '0',
                 '--no-progress', *extra])


def test_validate_on_the_checkpoint_gives_the_recipes_own_figures(counting_run, caplog):
    root, trained = counting_run
    assert trained['num_images'] == 4 and trained['num_crops'] == 24
    assert trained['data_config']['counting'] == {'crop': CROP, 'resize': list(RESIZE)}
    with caplog.at_level(logging.INFO):
        result = _validate(root, 'eval')
    assert 'count crop 32 [checkpoint: recorded counting protocol]' in caplog.text
    assert 'count resize (96, 64) [checkpoint: recorded counting protocol]' in caplog.text
    assert result['num_crops'] == 24 and result['num_images'] == 4
    for mine, theirs in zip(result['exits'], trained['exits']):
        for key in ('mae', 'rmse', 'image_mae', 'image_rmse'):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6)
    assert result['data_config']['counting'] == {'crop': CROP, 'resize': list(RESIZE)}
    assert result['data_config']['sources']['count_crop'] == 'checkpoint: recorded counting protocol'
    # what validate used to do without a word: the whole images resized to the model's input; now only when asked
    caplog.clear()
    with caplog.at_level(logging.INFO):
        whole = _validate(root, 'whole', '--count-crop', '0')
    assert whole['num_images'] == 4 and 'num_crops' not in whole and 'counting' not in whole['data_config']
    assert 'image_mae' not in whole['exits'][0] and whole['exits'][-1]['mae'] != pytest.approx(
        result['exits'][-1]['mae'])
    assert 'count crop 0 (whole images) [command line]' in caplog.text
    # a flag overrides the record key by key
    other = _validate(root, 'other', '--count-crop', '16')
    assert other['num_crops'] == 4 * 6 * 4 and other['data_config']['counting'] == {'crop': 16, 'resize': [96, 64]}
    assert other['data_config']['sources']['count_resize'] == 'checkpoint: recorded counting protocol'
    assert other['data_config']['sources']['count_crop'] == 'command line'


def _validate_run(root, extra):
    from timm_exits.validate import build_parser, run
    return run(build_parser().parse_args([
        '--checkpoint', str(root / 'run' / 'model.safetensors'), '--dataset', 'counting', '--data-dir',
        str(root / 'data'), '--split', 'test', '--output', str(root / 'err'), '--workers', '0', '--no-progress',
        *extra]))


def test_counting_protocol_errors_name_the_flag_or_source(counting_run, tmp_path):
    root, _ = counting_run
    for extra, message in ((['--count-crop', '0', '--count-resize', '96', '64'], 'it needs a crop size'),
                           (['--count-crop', '-1'], r'--count-crop \(command line\) must be an integer >= 1'),
                           (['--count-crop', '70'], r'--count-resize \(checkpoint: recorded counting protocol\) '
                                                    r'\(96, 64\) is smaller than the 70 px crop'),
                           (['--count-resize', '0', '5'], r'--count-resize \(command line\) must be two integers >= 1')):
        with pytest.raises(ValueError, match=message):
            _validate_run(root, extra)
    # a counts.csv folder cannot be cut into crops: the error says where the crop came from and how to count wholes
    (tmp_path / 'test' / 'images').mkdir(parents=True)
    Image.fromarray(np.zeros((64, 96, 3), dtype=np.uint8)).save(tmp_path / 'test' / 'images' / '0.png')
    (tmp_path / 'test' / 'counts.csv').write_text('image,count\n0.png,3\n')
    with pytest.raises(ValueError, match=r'needs point annotations .* from checkpoint: recorded counting protocol; '
                                         r'--count-crop 0 counts whole images'):
        _validate_run(root, ['--data-dir', str(tmp_path)])
