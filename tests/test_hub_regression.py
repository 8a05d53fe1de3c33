"""Publishing regression checkpoints: a label-free fitted counter pushed to the fake Hub (``tests/_hub_server.py``) and
loaded back by ``hf-hub:``, the regression card (outputs, MAE / RMSE, per-image figures, criteria, calibration with its
tolerance), a slimming counter's local-dir round trip."""
import json
import math

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

import timm
import timm_exits.hub as hub
from timm_exits import fit as fit_module

from ._hub_server import FakeHub
from .test_hub import _env, _run

REPO = 'fake-org/tiny-counter'
KWARGS = ['task=regression', 'num_classes=1', 'exit_layers=(2,3)', 'exit_criterion=uncertainty']

LOAD = r"""
import json, sys, torch, timm, timm_exits
x, threshold = torch.load(sys.argv[1]), float(sys.argv[2])
model = timm.create_model(sys.argv[3], pretrained=True).eval()
with torch.no_grad():
    dyn = model.forward_dynamic(x, threshold=threshold)
    values, scales = model.forward_exits_with_scale(x)
    out = dict(values=model(x).tolist(), dynamic=dyn.logits.tolist(), exits=dyn.exit_layer.tolist(),
               scales=[s.tolist() for s in scales], task=model.task, criterion=model.exit_criterion,
               layers=list(model.exit_layers))
from PIL import Image
usage = open(sys.argv[4] + '/README.md').read().split('```python\n')[1].split('```')[0]
exec(usage, {'img': Image.new('RGB', (48, 40))})  # the card's usage snippet, as written
out['usage'] = 'ran'
print(json.dumps(out))
"""

EVAL = {
    'model': 'test_vit_mexit', 'dataset': 'counting:/data/set/test', 'task': 'regression', 'num_images': 12,
    'target_mean': 2.5, 'exit_patience': 1,
    'exits': [{'layer': 2, 'mae': 0.8125, 'rmse': 1.25, 'image_mae': 3.5, 'image_rmse': 4.25, 'cost': 0.551,
               'gflops': 0.0011, 'practical': True},
              {'layer': 4, 'mae': 0.5, 'rmse': 0.75, 'cost': 1.0, 'gflops': 0.002, 'practical': True}],
    'budgets': [{'budget': 0.6, 'mae': 0.8125, 'rmse': 1.25, 'mean_cost': 0.551}],
    'thresholds': {'patience': [{'threshold': 0.25, 'mae': 0.625, 'rmse': 0.875, 'mean_cost': 0.8}],
                   'uncertainty': [{'threshold': 1.5, 'mae': 0.75, 'rmse': 1.0, 'image_mae': 2.0, 'mean_cost': 0.6}]},
    'budgeted_batch': {'patience': [{'mean_budget': 0.9, 'threshold': 0.25, 'mae': 0.625, 'rmse': 0.875,
                                     'mean_cost': 0.8}], 'uncertainty': []},
    'budgeted_batch_chosen_on': 'calibration split',
}


@pytest.fixture(scope='module')
def fitted(tmp_path_factory):
    """A counter fitted without labels by the command line on 16 digits images, and its validate eval.json."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from timm_exits import validate
    root = tmp_path_factory.mktemp('counter')
    d = load_digits()
    images = root / 'set' / 'test' / 'images'
    images.mkdir(parents=True)
    (root / 'flat').mkdir()
    rows = ['image,count']
    for i in range(24):
        img = Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).resize((32, 32)).convert('RGB')
        if i < 16:
            img.save(root / 'flat' / f'{i}.png')
        else:
            img.save(images / f'{i}.png')
            rows.append(f'{i}.png,{d.target[i]}')
    (root / 'set' / 'test' / 'counts.csv').write_text('\n'.join(rows) + '\n')
    fit_module.main(['--model', 'test_vit_mexit', '--model-kwargs', *KWARGS, '--data-dir', str(root / 'flat'),
                     '--output', str(root / 'run'), '--epochs', '1', '--workers', '0', '--no-progress',
                     '--batch-size', '8', '--lr', '0.01'])
    validate.main(['--checkpoint', str(root / 'run' / 'model.safetensors'), '--dataset', 'counting', '--data-dir',
                   str(root / 'set'), '--split', 'test', '--workers', '0', '--no-progress', '--output',
                   str(root / 'run')])
    return root


def test_hub_round_trip_of_a_fitted_counter(fitted, tmp_path):
    root = fitted
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=1, exit_layers=(2, 3),
                              exit_criterion='uncertainty',
                              checkpoint_path=str(root / 'run' / 'model.safetensors')).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        values, scales = model.forward_exits_with_scale(x)
        threshold = float(scales[0].median())  # some images leave at the first exit, some later
        dyn = model.forward_dynamic(x, threshold=threshold)
    assert 0 < int((dyn.exit_layer == 2).sum()) < 6
    torch.save(x, tmp_path / 'x.pt')
    with FakeHub() as server:
        env = _env(server.url, tmp_path / 'cache')
        push = _run(['-m', 'timm_exits.hub', 'push', str(root / 'run' / 'model.safetensors'), '--model',
                     'test_vit_mexit', '--model-kwargs', *KWARGS, '--repo', REPO, '--eval',
                     str(root / 'run' / 'eval.json'), '--local-dir', str(tmp_path / 'export')], env)
        assert 'committed: ' in push.stdout and {'config.json', 'model.safetensors', 'README.md'} <= set(
            server.repos[REPO])
        got = json.loads(_run(['-c', LOAD, str(tmp_path / 'x.pt'), str(threshold), f'hf-hub:{REPO}',
                               str(tmp_path / 'export')], env).stdout)
    assert (got['task'], got['criterion'], got['layers']) == ('regression', 'uncertainty', [2, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(got['values']), model(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got['dynamic']), dyn.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got['scales']), torch.stack(scales), rtol=0, atol=1e-6)
    assert got['exits'] == dyn.exit_layer.tolist() and got['usage'] == 'ran'
    card = ModelCard.load(tmp_path / 'export' / 'README.md')
    assert card.data.pipeline_tag is None and 'regression' in card.data.tags
    assert 'image-classification' not in card.data.tags
    text = card.text
    evaluation = json.loads((root / 'run' / 'eval.json').read_text())
    assert "**Outputs:** 1 real value per image (task='regression')" in text and 'Top-1' not in text
    mae = evaluation['exits'][0]['mae']
    assert f'| 2 | {mae:.4f} | {evaluation["exits"][0]["rmse"]:.4f} |' in text
    assert 'criterion `patience`' in text and 'criterion `uncertainty`' in text
    training = json.loads((tmp_path / 'export' / 'training_args.json').read_text())
    assert training['fit']['loss'] == 'l1' and training['model_kwargs']['task'] == 'regression'


def test_regression_card_tables_and_calibration(tmp_path):
    model = timm.create_model('test_vit_mexit_liferegress', task='regression', num_classes=1, exit_layers=(2, 3),
                              exit_criterion='patience', exit_patience=2).eval()
    model.calibration = {'task': 'regression', 'risk': 'disagreement', 'tolerance': 0.5, 'tolerance_rel': 0.1,
                         'criterion': 'patience', 'threshold': 0.25, 'epsilon': 0.05, 'delta': 0.1, 'n': 400,
                         'empirical_risk': 0.0125, 'mean_cost': 0.7}
    text = hub.render_card(model, 'test_vit_mexit_liferegress', 'me/counter', dict(EVAL, exit_patience=2))
    assert "**Outputs:** 1 real value per image (task='regression')" in text
    assert '`patience` exit criterion (patience 2); life regression after block' in text
    # per-image columns wherever any row has them, '-' where one does not
    assert '| Exit (block) | MAE | RMSE | Per-image MAE | Per-image RMSE | Share of full FLOPs |' in text
    assert '| 2 | 0.8125 | 1.2500 | 3.5000 | 4.2500 | 0.551 |' in text
    assert '| 4 | 0.5000 | 0.7500 | - | - | 1.000 |' in text
    assert 'criterion `uncertainty`' in text and '| 1.5 | 0.7500 | 1.0000 | 2.0000 | - | 0.600 |' in text
    assert 'leave when the last 3 exits agree within the threshold' in text
    assert '| 0.9 | 0.25 | 0.6250 | 0.8750 | - | - | 0.800 |' in text and 'chosen on calibration split' in text
    assert ('share of images whose early value differs from the full model\'s by more than 0.5 + 0.1 x |full value| '
            '(target units) is at most epsilon = 0.05') in text
    assert 'threshold 0.25 (patience)' in text and "values = model(x, keep_rate=1.0)" in text
    plain = dict(EVAL, exits=[{k: v for k, v in r.items() if not k.startswith('image_')} for r in EVAL['exits']],
                 thresholds={}, budgeted_batch={})
    assert 'Per-image' not in hub.render_card(model, 'test_vit_mexit_liferegress', 'me/counter', plain)
    model.calibration = dict(model.calibration, risk='error_growth', tolerance_rel=0.)
    assert 'whose absolute error grows by more than 0.5 (target units)' in hub.render_card(
        model, 'test_vit_mexit_liferegress', 'me/counter', None)


def test_regression_evaluation_is_read_and_drawn(tmp_path):
    path = tmp_path / 'eval.json'
    path.write_text(json.dumps(EVAL))
    evaluation = hub.load_evaluation(path)
    assert evaluation['thresholds']['uncertainty'][0]['mae'] == 0.75
    pytest.importorskip('matplotlib')
    assert hub._plot(evaluation, tmp_path) == '![MAE against compute](tradeoff.png)'
    assert (tmp_path / 'tradeoff.png').read_bytes()[:4] == b'\x89PNG'
    path.write_text(json.dumps(dict(EVAL, thresholds={'patience': 3})))
    with pytest.raises(ValueError, match='"thresholds" must be a list of objects or, for a regression model, an '
                                         'object of such lists'):
        hub.load_evaluation(path)


def test_local_dir_round_trip_of_a_slimming_counter(tmp_path):
    kwargs = dict(task='regression', num_classes=1, exit_layers=(2, 3), keep_rate=0.75)
    torch.manual_seed(0)
    model = timm.create_model('test_vit_mexit_liferegress', **kwargs).eval()
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / 'model.safetensors'), metadata={'timm_exits': json.dumps(
        {'model': 'test_vit_mexit_liferegress', 'model_kwargs': {**kwargs, 'exit_layers': [2, 3]}, 'num_classes': 1})})
    folder, _ = hub.push(tmp_path / 'model.safetensors', 'test_vit_mexit_liferegress', 'me/slim-counter',
                         local_dir=tmp_path / 'out', upload=False, model_kwargs=kwargs)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert (loaded.task, loaded.keep_rate, loaded.exit_layers) == ('regression', 0.75, (2, 3, 4))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x)) and math.isfinite(float(loaded(x, threshold=0.5).sum()))
    assert 'No evaluation was supplied' in (folder / 'README.md').read_text()
