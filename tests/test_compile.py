"""torch.compile with early exit: the eager answers, at most one graph break per exit, no recompilation for new batch
sizes after a warm-up, and LifeRegress at a keep rate in one graph."""
import pytest
import torch
import torch._dynamo as dynamo

import timm

from .conftest import spread_exit_heads

BACKEND = 'aot_eager'  # the graphs torch.compile captures, without inductor's C++ build time (same capture)


@pytest.fixture
def deep():
    """8 blocks, an exit after each of blocks 2..7: every segment kind (first, one block, final) several times."""
    model = timm.create_model('test_vit_mexit', depth=8, exit_layers=(2, 3, 4, 5, 6, 7))
    return spread_exit_heads(model).eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


@pytest.mark.parametrize('kwargs', [dict(threshold=0.6), dict(budget=0.7), dict(threshold=0.5, budget=0.8),
                                    dict(threshold=0.99)])
def test_compiled_matches_eager(deep, kwargs):
    compiled = torch.compile(deep, backend=BACKEND)
    with torch.no_grad():
        for batch in (8, 1, 5):
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(compiled(x, **kwargs), deep(x, **kwargs), atol=1e-5, rtol=1e-5)
        out = deep.forward_dynamic(x, **kwargs)
    if 'threshold' in kwargs and kwargs['threshold'] < 0.9:
        assert len(set(out.exit_layer.tolist())) > 1  # the batch really split between exits


@pytest.mark.parametrize('kwargs', [dict(threshold=0.6), dict(threshold=0.5, budget=0.8), dict(budget=0.7)])
def test_at_most_one_graph_break_per_exit(deep, kwargs):
    with torch.no_grad():
        deep(torch.randn(2, 3, 32, 32), **kwargs)  # FLOPs counted (eagerly, once) before the explanation
        explanation = dynamo.explain(deep)(torch.randn(8, 3, 32, 32), **kwargs)
    assert explanation.graph_break_count <= len(deep.exit_layers)
    if 'threshold' not in kwargs:
        assert explanation.graph_break_count == 0  # a budget alone: one path, one graph


def test_no_recompilation_for_new_batch_sizes(deep):
    compiled = torch.compile(deep, backend=BACKEND)
    with torch.no_grad():
        for batch in (8, 1, 2):  # warm-up: one image and two other batch sizes (the input's own dynamic dimension)
            compiled(torch.randn(batch, 3, 32, 32), threshold=0.6)
        graphs = dynamo.utils.counters['stats']['unique_graphs']
        assert graphs > 0
        for batch in (13, 3, 2, 21):
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(compiled(x, threshold=0.6), deep(x, threshold=0.6), atol=1e-5, rtol=1e-5)
    assert dynamo.utils.counters['stats']['unique_graphs'] == graphs


def test_costs_counted_outside_compiled_code(deep):
    assert not deep._flops
    compiled = torch.compile(deep, backend=BACKEND)
    with torch.no_grad():
        out = compiled(torch.randn(4, 3, 32, 32), budget=0.7)
    assert out.shape == (4, 10) and deep._flops  # counted by torch's flop counter, eagerly, and cached


def test_liferegress_keep_rate_one_graph():
    model = timm.create_model('test_vit_liferegress').eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        explanation = dynamo.explain(model)(x, keep_rate=0.7)
        compiled = torch.compile(model, backend=BACKEND)
        torch.testing.assert_close(compiled(x, keep_rate=0.7), model(x, keep_rate=0.7), atol=1e-5, rtol=1e-5)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.fixture
def deep_slim():
    """Exits and slimming: 6 blocks, an exit after each of blocks 2..5, lives after block 1, patches leave after 2
    and 4."""
    model = timm.create_model('test_vit_mexit_liferegress', depth=6, exit_layers=(2, 3, 4, 5), life_layer=1,
                              prune_layers=(2, 4))
    return spread_exit_heads(model).eval()


@pytest.mark.parametrize('kwargs,breaks', [
    (dict(keep_rate=0.7), 0), (dict(keep_rate=0.6, budget=0.7), 0), (dict(budget=0.7), 0),
    (dict(threshold=0.6, keep_rate=0.7), 2), (dict(threshold=0.5, budget=0.8), 2)])
def test_exits_and_slimming_compile_with_bounded_breaks(deep_slim, kwargs, breaks):
    """Without a threshold one graph; with one, two breaks whatever the number of exits (into the host-side loop and
    its step; each segment, with its top-k selection of patches, one graph), and the eager answers."""
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        deep_slim(x, **kwargs)  # FLOPs counted (eagerly, once) before the explanation
        explanation = dynamo.explain(deep_slim)(x, **kwargs)
        dynamo.reset()
        compiled = torch.compile(deep_slim, backend=BACKEND)
        for batch in (8, 1, 5):
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(compiled(x, **kwargs), deep_slim(x, **kwargs), atol=1e-5, rtol=1e-5)
    assert explanation.graph_break_count == breaks
    if not breaks:
        assert explanation.graph_count == 1


def test_liferegress_budget_one_graph():
    model = timm.create_model('test_vit_liferegress').eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x, budget=0.8)
        explanation = dynamo.explain(model)(x, budget=0.8)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
