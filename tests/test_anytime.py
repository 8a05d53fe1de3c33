"""Anytime inference: ``forward_anytime`` yields each exit's answer for the images still running, and
``forward_dynamic(deadline_ms=...)`` answers at the first exit reached after the deadline."""
import itertools

import pytest
import torch

import timm
import timm_exits.models.multi_exit_vit as mev

from .conftest import spread_exit_heads


@pytest.fixture
def deep():
    model = timm.create_model('test_vit_mexit', depth=6, exit_layers=(2, 3, 4, 5))
    return spread_exit_heads(model).eval()


@pytest.mark.parametrize('threshold', [None, 0.6])
def test_stopping_after_exit_k_gives_exit_k(deep, threshold):
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        every = dict(zip(deep.exit_layers, deep.forward_exits(x)))
        steps = list(deep.forward_anytime(x, threshold=threshold))
        for k in range(1, len(steps) + 1):  # a caller that stops after k exits keeps each image's last answer
            best = torch.full((12, 10), float('nan'))
            for step in itertools.islice(deep.forward_anytime(x, threshold=threshold), k):
                best[step.rows] = step.logits
            last = steps[k - 1]
            torch.testing.assert_close(best[last.rows], every[last.exit_layer][last.rows], atol=1e-5, rtol=1e-5)
        dynamic = deep.forward_dynamic(x, threshold=threshold)
    assert [s.exit_layer for s in steps] == list(deep.exit_layers)[:len(steps)]
    answers, layers = torch.empty(12, 10), torch.zeros(12, dtype=torch.long)
    for step in steps:  # every image exits exactly once, where forward_dynamic says, with its logits
        answers[step.rows[step.exited]] = step.logits[step.exited]
        layers[step.rows[step.exited]] = step.exit_layer
    assert layers.tolist() == dynamic.exit_layer.tolist()
    torch.testing.assert_close(answers, dynamic.logits, atol=1e-5, rtol=1e-5)
    if threshold is None:
        assert all(len(s.rows) == 12 for s in steps) and steps[-1].exited.all()
    else:
        assert len(steps[-1].rows) < 12  # images that left were not computed further
    assert [s.cost for s in steps] == pytest.approx(list(deep.threshold_costs)[:len(steps)])


def _fake_clock(monkeypatch, step_s: float):
    """time.perf_counter of the model module advancing ``step_s`` per call (the first call is the start)."""
    ticks = itertools.count()
    monkeypatch.setattr(mev.time, 'perf_counter', lambda: next(ticks) * step_s)


@pytest.mark.parametrize('threshold', [None, 0.99])
def test_deadline_answers_at_first_exit_after_it(deep, monkeypatch, threshold):
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        every = dict(zip(deep.exit_layers, deep.forward_exits(x)))
        ref = deep.forward_dynamic(x, threshold=threshold)
        _fake_clock(monkeypatch, 1e-3)  # 1 ms per clock read: the start, then one read per exit reached
        out = deep.forward_dynamic(x, threshold=threshold, deadline_ms=2.5)  # passes at the third exit: block 4
        monkeypatch.undo()
        zero = deep.forward_dynamic(x, threshold=threshold, deadline_ms=0)
        late = deep.forward_dynamic(x, threshold=threshold, deadline_ms=1e9)
    assert set(out.exit_layer.tolist()) <= {2, 3, 4} and 4 in out.exit_layer.tolist()
    at4 = out.exit_layer == 4
    torch.testing.assert_close(out.logits[at4], every[4][at4], atol=1e-5, rtol=1e-5)
    costs = dict(zip(deep.exit_layers, deep.threshold_costs if threshold is not None else deep.exit_costs))
    assert out.cost[at4].tolist() == pytest.approx([costs[4]] * int(at4.sum()))
    assert zero.exit_layer.tolist() == [2] * 8  # already passed: the first exit answers
    torch.testing.assert_close(zero.logits, every[2], atol=1e-5, rtol=1e-5)
    assert late.exit_layer.tolist() == ref.exit_layer.tolist()
    torch.testing.assert_close(late.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_deadline_keeps_the_budget_ceiling(deep):
    with torch.no_grad():
        out = deep.forward_dynamic(torch.randn(4, 3, 32, 32), budget=0.7, deadline_ms=1e9)
    assert (out.cost <= 0.7).all() and set(out.exit_layer.tolist()) == {max(
        layer for layer, cost in zip(deep.exit_layers, deep.exit_costs) if cost <= 0.7)}


@pytest.mark.parametrize('bad', [-1, float('nan'), float('inf'), 'soon', True])
def test_bad_deadline(deep, bad):
    with pytest.raises(ValueError, match='deadline_ms must be a finite number of milliseconds >= 0'):
        deep.forward_dynamic(torch.randn(1, 3, 32, 32), deadline_ms=bad)


def test_tracing_a_deadline_refuses(deep):
    with pytest.raises(RuntimeError, match='torch.jit.trace of a call with deadline_ms=5'):
        torch.jit.trace(lambda x: deep.forward_dynamic(x, deadline_ms=5).logits, torch.randn(2, 3, 32, 32))
