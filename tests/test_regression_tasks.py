"""Regression training tasks: losses against hand-computed values, gradients that reach every trainable parameter and
no other, the seed's end-to-end weighting, classifier-wise on a frozen backbone, the errors."""
import math

import pytest
import timm
import torch

from timm_exits.losses import regression_loss, scale_nll
from timm_exits.tasks import TASKS, create_task, regression_target


def _model(name: str = 'test_vit_mexit', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, task='regression', num_classes=1, exit_layers=(2, 3), **kwargs)


def test_losses_by_hand():
    v, y, s = torch.tensor([[1.], [3.]]), torch.tensor([[2.], [0.]]), torch.tensor([[.5], [2.]])
    assert regression_loss(v, y, 'l1').item() == pytest.approx((1 + 3) / 2)
    assert regression_loss(v, y, 'mse').item() == pytest.approx((1 + 9) / 2)
    laplace = (math.log(1.) + 1 / .5 + math.log(4.) + 3 / 2.) / 2
    gauss = (math.log(.5) + 1 / (2 * .25) + math.log(2.) + 9 / 8 + math.log(2 * math.pi)) / 2
    assert scale_nll(v, s, y, 'laplace').item() == pytest.approx(laplace)
    assert scale_nll(v, s, y, 'gaussian').item() == pytest.approx(gauss)


@pytest.mark.parametrize('loss', ['l1', 'mse'])
def test_end_to_end_loss_is_the_seeds_weighting(loss):
    model = _model()
    task = create_task('regression_end_to_end', model, loss=loss, nll='gaussian')
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0., 2., 5., 1.])
    out = task(x, y)
    with torch.no_grad():
        values, scales = model.forward_exits_with_scale(x)
    err = [(v - y[:, None]) for v in values]
    per = [e.abs().mean() if loss == 'l1' else e.pow(2).mean() for e in err]
    nll = sum((s.log() + e.pow(2) / (2 * s.pow(2)) + .5 * math.log(2 * math.pi)).mean() for s, e in zip(scales, err))
    expected = per[-1] + .5 * per[0] + .5 * per[1] + nll  # the final term weighs twice each early exit
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(out['output'], values[-1])
    out['loss'].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_mevit_distillation_pulls_exits_to_the_detached_final():
    model = _model()
    task = create_task('regression_mevit', model, num_sampled=None, nll_weight=0.)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0., 2., 5., 1.])
    out = task(x, y)
    with torch.no_grad():
        values, _ = model.forward_exits_with_scale(x)
    final = values[-1]
    expected = sum((v - y[:, None]).abs().mean() + (v - final).abs().mean() for v in values[:-1])
    expected = expected + (final - y[:, None]).abs().mean()
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-5)
    # the teacher side is detached: the distillation term alone sends no gradient into the final head
    model.zero_grad()
    task.distill_weight, task.exit_weight, task.final_weight = 1., 0., 0.
    task(x, y)['loss'].backward()
    assert model.head.weight.grad is None or model.head.weight.grad.abs().sum() == 0
    assert model.exits['2'].head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('name', ['test_vit_mexit', 'test_vit_mexit_liferegress'])
def test_classifier_wise_leaves_the_backbone_unchanged(name):
    model = _model(name, exit_criterion='uncertainty')
    task = create_task('regression_classifier_wise', model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=.1)
    task.train()
    for _ in range(2):
        opt.zero_grad()
        task(torch.randn(4, 3, 32, 32), torch.rand(4) * 5)['loss'].backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(('exits.', 'uncertainty.')) for k in changed), changed
    assert any(k.startswith('uncertainty.') for k in changed)  # the scales train (NLL)


def test_liferegress_stage_and_backbone_task():
    model = _model('test_vit_mexit_liferegress')
    task = create_task('regression_mevit', model, stage='predictor')
    assert {n.split('.')[0] for n, p in model.named_parameters() if p.requires_grad} == {'life'}
    task(torch.randn(2, 3, 32, 32), torch.tensor([1., 2.]))['loss'].backward()
    assert model.life.parameters().__next__().grad is not None
    plain = _model()
    create_task('regression_backbone', plain)
    assert not any(p.requires_grad for n, p in plain.named_parameters() if n.startswith(('exits.', 'uncertainty.')))


def test_task_errors():
    with pytest.raises(ValueError, match=r"RegressionEndToEndTask trains task='regression' models; this model was "
                                         r"built with task='classification'"):
        create_task('regression_end_to_end', timm.create_model('test_vit_mexit'))
    with pytest.raises(ValueError, match=r"MEViTTask trains task='classification' models.*its tasks: \['regression_"):
        create_task('mevit', _model())
    with pytest.raises(ValueError, match=r"loss must be one of \['l1', 'mse'\], got 'huber'"):
        create_task('regression_end_to_end', _model(), loss='huber')
    with pytest.raises(ValueError, match=r"nll must be one of \['laplace', 'gaussian'\]"):
        create_task('regression_end_to_end', _model(), nll='cauchy')
    with pytest.raises(ValueError, match='takes loss='):
        create_task('regression_end_to_end', _model(), criterion=torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match='needs a \\*_mexit_liferegress model'):
        create_task('regression_end_to_end', _model(), stage='predictor')
    with pytest.raises(ValueError, match='must be finite; got 1 NaN'):
        regression_target(torch.tensor([1., float('nan')]), 1)
    with pytest.raises(ValueError, match=r'must be \(B,\) for one output or \(B, 2\), got \(3,\)'):
        regression_target(torch.tensor([1., 2., 3.]), 2)
    assert {'regression_end_to_end', 'regression_classifier_wise', 'regression_mevit', 'regression_backbone'} <= set(
        TASKS)


def test_trainer_runs_a_regression_recipe_and_validate_reads_it(tmp_path, monkeypatch):
    import json
    from timm_exits.data import DigitsCountDataset
    from timm_exits.train import Recipe, RunError, Stage, train
    from timm_exits.validate import main as validate_main
    monkeypatch.setattr(DigitsCountDataset, 'sizes', {'train': 128, 'val': 64, 'test': 64})
    recipe = Recipe(
        name='count', model='test_vit_mexit', dataset='digits_count', num_classes=1, batch_size=32, workers=0,
        model_kwargs=dict(task='regression', exit_layers=[2, 3], exit_criterion='uncertainty'), test_split='test',
        stages=[Stage('regression_end_to_end', 1, opt='adam', lr=1e-3, sched='plateau', task_kwargs=dict(loss='l1')),
                Stage('regression_classifier_wise', 1, opt='adam', lr=1e-3, sched='none')])
    result = train(recipe, str(tmp_path / 'run'))
    assert result['task'] == 'regression' and [e['layer'] for e in result['exits']] == [2, 3, 4]
    log = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    assert len(log) == 2 and all('val_mae' in row and row['metric'] < 0 for row in log)
    assert (tmp_path / 'run' / 'tradeoff.png').exists()
    out = validate_main(['--model', 'test_vit_mexit', '--checkpoint', str(tmp_path / 'run' / 'model.safetensors'),
                         '--dataset', 'digits_count', '--split', 'test', '--output', str(tmp_path / 'val'),
                         '--no-progress'])
    assert out['exits'][-1]['mae'] == pytest.approx(result['exits'][-1]['mae'], rel=1e-5)
    with pytest.raises(RunError, match='mixup, cutmix and smoothing'):
        train(Recipe(**{**recipe.__dict__, 'mixup': .2}), str(tmp_path / 'run2'))
