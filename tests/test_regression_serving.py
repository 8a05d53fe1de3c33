"""Regression exits where the other tools meet them: the scheduler and the ONNX session's walk carry PABEE's patience
state across requests that join between segments, the HTTP answer gives values, and fit / calibrate (classification
risks) refuse a regression model with the reason."""
import random

import pytest
import torch

import timm
from timm_exits.serving import Answer, ExitScheduler

from .test_regression import _spread
from .test_serving import _check, _load, _reference


def _regression(criterion: str, patience: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return _spread(timm.create_model('test_vit_mexit', task='regression', num_classes=2, exit_layers=(1, 2, 3),
                                     exit_criterion=criterion, exit_patience=patience)).eval()


@pytest.mark.parametrize('criterion,patience,seed', [('patience', 1, 0), ('patience', 2, 1), ('uncertainty', 1, 2)])
def test_scheduler_answers_equal_forward_dynamic(criterion, patience, seed):
    """Random arrivals and thresholds in target units: every request gets its image's forward_dynamic alone, also
    when survivors of several batches (each with its previous prediction and counter) share a segment."""
    model = _regression(criterion, patience)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    n = 40
    images = torch.randn(n, 3, 32, 32)
    taus = (0.3, 1.0, 3.0) if criterion == 'patience' else (0.5, 2.0, 30.0)
    settings = [(rng.choice(taus), rng.choice([None, None, 0.9])) for _ in range(n)]
    refs = [_reference(model, images[i], *settings[i]) for i in range(n)]
    assert len({r[1] for r in refs}) > 1  # the images leave at different exits
    with ExitScheduler(model, max_batch_size=rng.choice([3, 5]), max_wait_ms=1) as scheduler:
        futures = _load(scheduler, images, settings, seed)
        answers = [f.result(timeout=120) for f in futures]
    for answer, ref in zip(answers, refs):
        _check(answer, ref)


def test_onnx_walker_carries_patience_across_joined_states(tmp_path):
    pytest.importorskip('onnxscript')
    from timm_exits.export import export_onnx
    from timm_exits.runtime import ExitSession, SessionState
    model = _regression('patience', 2)
    session = ExitSession(export_onnx(model, tmp_path / 'onnx', 'test_vit_mexit'))
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_dynamic(x, threshold=1.0)
    walker = session.exit_walker(threshold=1.0)
    exits = {}
    step = walker.step(walker.start(x[:6].numpy(), rows=range(6)))  # the first six one exit ahead
    for r in step.rows[step.leave]:
        exits[int(r)] = step.exit_layer
    late = walker.step(walker.start(x[6:].numpy(), rows=range(6, 12)))
    for r in late.rows[late.leave]:
        exits[int(r)] = late.exit_layer
    states = [s for s in (step.state, late.state) if s is not None]
    while states:
        done = min(s.done for s in states)
        group = [s for s in states if s.done == done]
        out = walker.step(SessionState.cat(group))
        for r in out.rows[out.leave]:
            exits[int(r)] = out.exit_layer
        states = [s for s in states if s.done != done] + ([out.state] if out.state is not None else [])
    assert [exits[i] for i in range(12)] == ref.exit_layer.tolist()


def test_http_answer_gives_values():
    pytest.importorskip('ray')
    from timm_exits.serving.ray import answer_json
    out = answer_json(Answer(torch.tensor([2.5, -1.0]), 2, 0.6), [], 5, regression=True)
    assert out == {'values': [2.5, -1.0], 'exit_layer': 2, 'cost': 0.6}


def test_fit_refuses_regression_and_calibrate_needs_a_tolerance():
    from timm_exits.calibrate import calibrate
    from timm_exits.fit import fit_parts
    model = _regression('patience')
    assert fit_parts(model) == ('exits', 'uncertainty')  # fit takes regression models (tests/test_fit_regression.py)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=4)
    with pytest.raises(ValueError, match="tolerance is required for a task='regression' model"):
        calibrate(model, loader, epsilon=0.1, delta=0.1)


def test_endpoint_refuses_a_counter_of_crops():
    """A checkpoint that counts crops (an image's count the sum of its crops') is refused by the HTTP endpoint's
    preprocessing, which answers one model input per image; asking for whole images explicitly is served."""
    pytest.importorskip('ray.serve', reason='the serve extra (ray[serve]) is not installed')
    from timm_exits.serving.ray import Preprocessor
    model = timm.create_model('test_vit_mexit', task='regression', num_classes=1).eval()
    recorded = {'data_config': {'counting': {'crop': 32, 'resize': [96, 64]}}}
    with pytest.raises(ValueError, match="counts crops .* the endpoint answers one model input per image"):
        Preprocessor(model, None, recorded)
    assert Preprocessor(model, {'count_crop': 0}, recorded).data_config.counting is None
