"""Tracers and autocast: a graph records full depth, a fixed budget or a keep rate faithfully, refuses a threshold."""
import importlib.util
import warnings

import pytest
import torch
import torch.nn as nn

import timm

from .conftest import spread_exit_heads

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ('onnx', 'onnxruntime'))
HAS_ONNXSCRIPT = HAS_ONNX and importlib.util.find_spec('onnxscript') is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason='pip install timm-exits[deploy] (onnx, onnxruntime)')


class Call(nn.Module):
    """``model(x, **kwargs)`` as a module with a single tensor input, the form tracers take."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs
        self.train(model.training)  # torch.onnx.export restores the wrapper's mode on everything inside it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, **self.kwargs)


@pytest.fixture(scope='module')
def mexit():
    torch.manual_seed(0)
    return spread_exit_heads(timm.create_model('test_vit_mexit')).eval()


@pytest.fixture(scope='module')
def slim():
    torch.manual_seed(0)
    return timm.create_model('test_vit_liferegress').eval()


@pytest.fixture(scope='module')
def inputs(mexit):
    """Two different batches; on the first no image is confident at the first exit, on the second some are."""
    torch.manual_seed(1)
    xs = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        first = mexit.exit_scores(mexit.exit_layers[0], mexit.forward_exits(xs)[0])
    threshold = float(first.quantile(0.5))
    low, high = xs[first < threshold][:4], xs[first >= threshold][:4]
    return low, torch.cat([high[:2], low[2:]]), threshold


def _static_calls(mexit, slim):
    """The calls that export: full depth, a budget alone (two exits), LifeRegress at a keep rate and a budget."""
    return [
        ('mexit full', Call(mexit)),
        ('mexit budget', Call(mexit, budget=mexit.exit_costs[0])),
        ('mexit budget 2', Call(mexit, budget=(mexit.exit_costs[1] + mexit.exit_costs[2]) / 2)),
        ('liferegress keep_rate', Call(slim, keep_rate=0.5)),
        ('liferegress budget', Call(slim, budget=0.8)),
    ]


def _threshold_calls(mexit, threshold):
    return [
        Call(mexit, threshold=threshold),
        Call(mexit, threshold=threshold, budget=mexit.threshold_costs[1]),
        Call(timm.create_model('test_vit_mexit', threshold=threshold).eval()),  # a default threshold
    ]


def test_jit_trace_matches_eager_on_another_input(mexit, slim, inputs):
    x1, x2, _ = inputs
    for name, call in _static_calls(mexit, slim):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')  # torch.jit.trace's deprecation warning
            traced = torch.jit.trace(call, x1, check_trace=False)  # checked below, against eager on x2
            assert torch.allclose(traced(x2), call(x2), atol=1e-5), name


def test_torch_export_matches_eager_on_another_input(mexit, slim, inputs):
    x1, x2, _ = inputs
    for name, call in _static_calls(mexit, slim):
        exported = torch.export.export(call, (x1,)).module()
        with torch.no_grad():
            assert torch.allclose(exported(x2), call(x2), atol=1e-5), name


@needs_onnx
@pytest.mark.parametrize('dynamo', [False, pytest.param(True, marks=[pytest.mark.slow, pytest.mark.skipif(
    not HAS_ONNXSCRIPT, reason='pip install timm-exits[deploy] (onnxscript)')])])
def test_onnx_export_matches_eager_in_onnxruntime(mexit, slim, inputs, tmp_path, dynamo):
    import onnxruntime as ort
    x1, x2, _ = inputs
    calls = _static_calls(mexit, slim)
    for name, call in calls[1:2] + calls[3:4] if dynamo else calls:  # the dynamo exporter is slow: one per family
        path = tmp_path / f'{name.replace(" ", "_")}.onnx'
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(call, (x1,), str(path), dynamo=dynamo, input_names=['x'], output_names=['logits'])
        session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        (out,) = session.run(None, {'x': x2.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(out), call(x2), atol=1e-4), name


@pytest.mark.parametrize('tool', ['torch.jit.trace', 'torch.export', 'torch.onnx.export'])
def test_tracers_refuse_a_threshold(mexit, inputs, tool, tmp_path):
    x1, _, threshold = inputs
    for call in _threshold_calls(mexit, threshold):
        with pytest.raises(RuntimeError, match=f'{tool} of a call with threshold.*full depth.*fixed budget.*keep rate'):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                if tool == 'torch.jit.trace':
                    torch.jit.trace(call, x1)
                elif tool == 'torch.export':
                    torch.export.export(call, (x1,))
                else:
                    torch.onnx.export(call, (x1,), str(tmp_path / 'x.onnx'), dynamo=False)


@pytest.mark.skipif(not HAS_ONNXSCRIPT, reason='pip install timm-exits[deploy] (onnx, onnxruntime, onnxscript)')
def test_dynamo_onnx_export_refuses_a_threshold(mexit, inputs, tmp_path):
    x1, _, threshold = inputs
    with pytest.raises(Exception) as info, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(Call(mexit, threshold=threshold), (x1,), str(tmp_path / 'x.onnx'), dynamo=True)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any('of a call with threshold' in m and 'fixed budget' in m for m in chain)


def test_threshold_trace_would_be_wrong(mexit, inputs):
    """Why the refusal: the eager answers on the two batches take different exits, which one graph cannot replay."""
    x1, x2, threshold = inputs
    with torch.no_grad():
        e1 = mexit.forward_dynamic(x1, threshold=threshold).exit_layer
        e2 = mexit.forward_dynamic(x2, threshold=threshold).exit_layer
    assert (e1 > mexit.exit_layers[0]).all() and (e2[:2] == mexit.exit_layers[0]).all()


@pytest.mark.slow
def test_torch_compile_of_a_threshold_call_gives_the_eager_answer(mexit, inputs):
    _, x2, threshold = inputs
    compiled = torch.compile(Call(mexit, threshold=threshold))
    with torch.no_grad():
        assert torch.allclose(compiled(x2), mexit(x2, threshold=threshold), atol=1e-5)


AUTOCAST = [('cpu', torch.bfloat16), pytest.param('cuda', torch.float16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='no CUDA device'))]


@pytest.mark.parametrize('device,dtype', AUTOCAST)
@pytest.mark.parametrize('kind', ['threshold', 'budget', 'both'])
@pytest.mark.parametrize('name', ['test_vit_mexit', 'test_vit_mexit_ls'])
def test_autocast_agrees_with_float32(name, kind, device, dtype):
    model = spread_exit_heads(timm.create_model(name, exit_head=['cnn_add', 'linear'])).eval().to(device)
    x = torch.randn(32, 3, 32, 32, device=device)
    with torch.no_grad():
        scores = model.exit_scores(model.exit_layers[0], model.forward_exits(x)[0])
    threshold = float(scores.quantile(0.5))
    # keep only images whose first-exit score is well away from the threshold: bfloat16 may not flip them
    x = x[(scores - threshold).abs() > 0.05]
    kwargs = {
        'threshold': dict(threshold=threshold),
        'budget': dict(budget=model.exit_costs[1]),
        'both': dict(threshold=threshold, budget=min(1., model.threshold_costs[1])),
    }[kind]
    with torch.no_grad():
        ref = model.forward_dynamic(x, **kwargs)
        with torch.autocast(device, dtype=dtype):
            out = model.forward_dynamic(x, **kwargs)
            logits = model(x, **kwargs)
    assert len(x) >= 8 and torch.equal(out.exit_layer, ref.exit_layer) and torch.equal(out.cost, ref.cost)
    assert logits.dtype == out.logits.dtype == dtype
    assert torch.allclose(out.logits.float(), ref.logits, atol=0.15, rtol=0.05)
    assert torch.equal(logits, out.logits)


@pytest.mark.parametrize('device,dtype', AUTOCAST)
@pytest.mark.parametrize('kwargs', [dict(keep_rate=0.5), dict(budget=0.8)])
def test_autocast_liferegress(kwargs, device, dtype):
    torch.manual_seed(0)
    slim = timm.create_model('test_vit_liferegress').eval().to(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    with torch.no_grad():
        ref = slim(x, **kwargs)
        with torch.autocast(device, dtype=dtype):
            out = slim(x, **kwargs)
    assert out.dtype == dtype and torch.allclose(out.float(), ref, atol=0.15, rtol=0.05)
