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
                           (['--count-resize', '0', '5'],
                            r'--count-resize \(command line\) must be two integers >= 1')):
        with pytest.raises(ValueError, match=message):
            _validate_run(root, extra)
    # a counts.csv folder cannot be cut into crops: the error says where the crop came from and how to count wholes
    (tmp_path / 'test' / 'images').mkdir(parents=True)
    Image.fromarray(np.zeros((64, 96, 3), dtype=np.uint8)).save(tmp_path / 'test' / 'images' / '0.png')
    (tmp_path / 'test' / 'counts.csv').write_text('image,count\n0.png,3\n')
    with pytest.raises(ValueError, match=r'needs point annotations .* from checkpoint: recorded counting protocol; '
                                         r'--count-crop 0 counts whole images'):
        _validate_run(root, ['--data-dir', str(tmp_path)])


def test_per_image_figures_are_the_sums_of_their_crops():
    import timm
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_layers=[2, 3]).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # images of 3, 2 and 4 crops
    target = torch.randint(0, 5, (9, 1), generator=gen).float()
    values = target[None] + torch.randn(3, 9, 1, generator=gen) * torch.tensor([3., 2., 1.]).view(3, 1, 1)
    scales = torch.rand(3, 9, 1, generator=gen)
    outputs = {'values': values, 'scales': scales, 'target': target, 'image_ids': ids}
    result = evaluate_regression(model, outputs, 'm', 'd')
    assert result['num_images'] == 3 and result['num_crops'] == 9

    def by_hand(chosen):  # per image: |sum of its crops' counts - its total|, then mean and root mean square
        errs = [sum(float(chosen[k]) for k in range(9) if ids[k] == i) - sum(float(target[k]) for k in range(9)
                                                                            if ids[k] == i) for i in range(3)]
        return sum(abs(e) for e in errs) / 3, (sum(e * e for e in errs) / 3) ** .5

    for e, row in enumerate(result['exits']):
        assert (row['image_mae'], row['image_rmse']) == pytest.approx(by_hand(values[e, :, 0]))
        assert row['mae'] == pytest.approx(float((values[e] - target).abs().mean()))  # per crop, as before
    for row in result['budgets']:
        deepest = max(i for i, c in enumerate(model.exit_costs) if c <= row['budget'] + 1e-9)
        assert (row['image_mae'], row['image_rmse']) == pytest.approx(by_hand(values[deepest, :, 0]))
    for criterion in ('patience', 'uncertainty'):
        for row in result['thresholds'][criterion] + result['budgeted_batch'][criterion]:
            first = regression_exit_choice(values, scales, criterion, row['threshold'], model.exit_patience)
            assert (row['image_mae'], row['image_rmse']) == pytest.approx(by_hand(values[first, torch.arange(9), 0]))
    assert result['budgeted_batch']['patience']  # rows to check were there
    whole = evaluate_regression(model, {k: v for k, v in outputs.items() if k != 'image_ids'}, 'm', 'd')
    assert whole['num_images'] == 9 and 'image_mae' not in whole['exits'][0]


def test_collect_attaches_the_images_of_crops_read_in_order(tmp_path):
    import timm
    counting_folder(tmp_path, splits=('test',), num_images=3)
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=1).eval()
    cfg = resolve_data_cfg(model, {'count_crop': CROP, 'count_resize': list(RESIZE)})
    from timm_exits.data import create_dataset
    ds = create_dataset('counting', 'test', model, False, str(tmp_path), data_config=cfg)
    assert isinstance(ds, CountingDataset) and ds.crop == CROP and len(ds) == 18
    out = collect_regression_outputs(model, make_loader(ds, 5), torch.device('cpu'))
    assert out['image_ids'].tolist() == [i for i in range(3) for _ in range(6)]
    assert out['target'].sum() == sum(len(open(tmp_path / 'test' / 'points' / f'{i}.txt').readlines())
                                      for i in range(3))
    shuffled = collect_regression_outputs(model, torch.utils.data.DataLoader(ds, 5, shuffle=True), torch.device('cpu'))
    assert 'image_ids' not in shuffled  # crops out of order cannot be summed per image


def test_export_and_push_carry_the_protocol(counting_run, tmp_path):
    from timm_exits.export import main as export_main
    from timm_exits.hub import push
    root, trained = counting_run
    checkpoint = str(root / 'run' / 'model.safetensors')
    assert export_main(['--model', 'test_vit_mexit', '--checkpoint', checkpoint, '--model-kwargs', 'task=regression',
                        'exit_layers=[2,3]', '--num-classes', '1', '--output', str(tmp_path / 'onnx')]) == 0
    manifest = json.loads((tmp_path / 'onnx' / 'manifest.json').read_text())
    assert manifest['counting'] == {'crop': CROP, 'resize': list(RESIZE)}
    kwargs = dict(task='regression', exit_layers=[2, 3], num_classes=1)
    folder, _ = push(checkpoint, 'test_vit_mexit', 'org/count', None, tmp_path / 'hub', upload=False,
                     model_kwargs=kwargs)
    config = json.loads((folder / 'config.json').read_text())
    assert config['counting'] == {'crop': CROP, 'resize': list(RESIZE)}
    # an evaluation of whole images does not describe a model of crops (nor one of other crops), and the reverse
    from timm_exits.hub import _check_evaluation_preprocessing
    from timm_exits.models._checkpoint import read_checkpoint_args
    import timm
    model = timm.create_model('test_vit_mexit', **kwargs)
    pushed = resolve_data_cfg(model, None, read_checkpoint_args(checkpoint))
    _check_evaluation_preprocessing({'data_config': trained['data_config']}, pushed)
    whole = _validate(root, 'whole2', '--count-crop', '0')
    with pytest.raises(ValueError, match='measured with counting=None, but the push records counting='):
        _check_evaluation_preprocessing({'data_config': whole['data_config']}, pushed)
    with pytest.raises(ValueError, match="measured with counting={'crop': 32, 'resize': \\[96, 64\\]}, but the push "
                                         "records counting=None"):
        _check_evaluation_preprocessing({'data_config': trained['data_config']},
                                        resolve_data_cfg(model, {'count_crop': 0}, read_checkpoint_args(checkpoint)))


def test_fit_and_calibrate_read_the_recorded_protocol(counting_run):
    import timm
    from timm_exits.calibrate import command_dataset
    from timm_exits.fit import build_parser
    from timm_exits.models._checkpoint import read_checkpoint_args
    root, _ = counting_run
    recorded = read_checkpoint_args(root / 'run' / 'model.safetensors')
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_layers=[2, 3])
    argv = ['--model', 'test_vit_mexit', '--data-dir', str(root / 'data'), '--dataset', 'counting', '--split', 'val',
            '--output', str(root / 'fit')]
    ds, cfg = command_dataset(build_parser().parse_args(argv), model, recorded, False)
    assert (ds.crop, ds.resize, len(ds)) == (CROP, RESIZE, 24) and cfg.record()['counting']['crop'] == CROP
    ds, cfg = command_dataset(build_parser().parse_args([*argv, '--count-crop', '0']), model, recorded, False)
    assert ds.crop is None and len(ds) == 4 and 'counting' not in cfg.record()


def test_calibration_over_crops_counts_images(tmp_path):
    """Calibrating a counter of crops: the risk and the cost are per image (its count the sum of its crops', each
    crop leaving at its own exit), the number of calibration samples is the number of images, checked by hand."""
    import timm
    from timm_exits.calibrate import collect_calibration_outputs, point_table
    from timm_exits.data import create_dataset
    counting_folder(tmp_path, splits=('val',), num_images=5)
    torch.manual_seed(0)
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_layers=[2, 3]).eval()
    cfg = resolve_data_cfg(model, {'count_crop': CROP, 'count_resize': list(RESIZE)})
    ds = create_dataset('counting', 'val', model, False, str(tmp_path), data_config=cfg)
    outputs = collect_calibration_outputs(model, make_loader(ds, 7), torch.device('cpu'))
    ids = outputs['image_ids']
    assert ids.tolist() == [i for i in range(5) for _ in range(6)]
    values, scales = outputs['values'][0], outputs['scales'][0]
    threshold = float(scales[0].median())
    costs = lambda rate, t: model.threshold_costs  # noqa: E731
    losses, image_costs = point_table(outputs, [(None, threshold)], 'uncertainty', costs=costs, tolerance=(0.5, 0.))
    assert losses.shape == image_costs.shape == (1, 5)
    first = regression_exit_choice(values, scales, 'uncertainty', threshold)
    answer = values[first, torch.arange(len(ids))][:, 0].double()
    full = values[-1][:, 0].double()
    for i in range(5):
        mine = ids == i
        assert bool(losses[0, i]) == bool((answer[mine].sum() - full[mine].sum()).abs() > 0.5)
        cost = torch.as_tensor(model.threshold_costs, dtype=torch.float64)[first[mine]].mean()
        assert abs(float(image_costs[0, i]) - float(cost)) < 1e-12
