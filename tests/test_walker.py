"""The exit walker's public step: images that arrive between segments join the running ones and get exactly the
answer ``forward_dynamic`` gives each of them alone; states split and concatenate; a criterion is one class, with a
per-image state the walk carries; with a threshold, a budget no threshold path fits is met by the budget alone."""
import random
from typing import Dict, List, Optional, Tuple

import pytest
import torch

import timm
from timm_exits.models.walker import CRITERIA, ExitCriterion, WalkState, register_criterion

from .conftest import spread_exit_heads

FAMILIES = [
    ('test_vit_mexit', {}),
    ('test_vit_mexit', dict(depth=5, exit_layers=(1, 2, 3, 4), exit_head=['cnn_add', 'vit', 'mlp', 'mixer'])),
    ('test_vit_mexit_ls', dict(exit_criterion='entropy')),
    ('test_vit_mexit_liferegress', {}),
    ('eva02_tiny_patch14_224_mexit_liferegress', dict(img_size=28, patch_size=7, depth=5, embed_dim=32, num_heads=2,
                                                     num_classes=10, exit_layers=(2, 3, 4))),
    ('eva02_tiny_patch14_224_mexit', dict(img_size=28, patch_size=7, depth=4, embed_dim=32, num_heads=2,
                                          num_classes=10, exit_criterion='uncertainty')),
]


def _model(name: str, kwargs: Dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return spread_exit_heads(timm.create_model(name, **kwargs)).eval()


def _serve(walker, arrivals: List[torch.Tensor]) -> Dict[int, Tuple[torch.Tensor, int, float]]:
    """A server's loop: a new request (a few images) arrives before every step; running images that stand at the same
    point of the walk go through the next segment together. Returns, per image id, (logits, exit, cost)."""
    answers, waiting, next_id = {}, {}, 0
    queue = list(arrivals)
    while queue or waiting:
        if queue:
            x = queue.pop(0)
            ids = torch.arange(next_id, next_id + len(x))
            next_id += len(x)
            state = walker.start(x, rows=ids)
            waiting.setdefault(state.done, []).append(state)
        done = min(waiting)  # the least advanced images go first
        step = walker.step(WalkState.cat(waiting.pop(done)))
        if step.logits is not None:
            for row, logits in zip(step.rows[step.leave].tolist(), step.logits[step.leave]):
                answers[row] = (logits, step.exit_layer, step.cost)
        if step.state is not None:
            waiting.setdefault(step.state.done, []).append(step.state)
    return answers


@pytest.mark.parametrize('name,kwargs', FAMILIES, ids=[f'{f[0]}-{i}' for i, f in enumerate(FAMILIES)])
def test_interleaved_arrivals_get_their_own_answers(name, kwargs):
    """Seeded fuzz over thresholds, budgets and keep rates: each image's answer through interleaved steps equals
    forward_dynamic on that image alone (logits, exit and cost)."""
    model = _model(name, kwargs)
    rng = random.Random(0)
    size = tuple(model.patch_embed.img_size)
    slim = hasattr(model, 'life')
    for trial in range(4):
        threshold = rng.choice([None, rng.uniform(0.2, 0.95)])
        budget = rng.choice([None, rng.uniform(0.75, 1.)])
        call = dict(threshold=threshold, budget=budget)
        if slim:
            call['keep_rate'] = rng.choice([None, rng.uniform(0.4, 1.)])
        arrivals = [torch.randn(rng.randint(1, 4), 3, *size) for _ in range(rng.randint(2, 5))]
        with torch.no_grad():
            answers = _serve(model.exit_walker(**call), arrivals)
            alone = [model.forward_dynamic(x[i:i + 1], **call) for x in arrivals for i in range(len(x))]
        assert sorted(answers) == list(range(len(alone))), call
        for row, out in enumerate(alone):
            logits, layer, cost = answers[row]
            assert layer == int(out.exit_layer) and cost == pytest.approx(float(out.cost)), (call, row)
            torch.testing.assert_close(logits, out.logits[0], atol=1e-5, rtol=1e-5)


def test_step_returns_who_leaves_and_who_goes_on(tiny):
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        first = tiny.exit_scores(2, tiny.forward_exits(x)[0])
        threshold = float(first.median())
        walker = tiny.exit_walker(threshold=threshold)
        state = walker.start(x, rows=torch.arange(10, 18))
        assert state.done == 0 and state.rows.tolist() == list(range(10, 18)) and state.lives is None
        step = walker.step(state)
    assert step.exit_layer == 2 and step.rows.tolist() == list(range(10, 18))
    assert step.leave.tolist() == (first >= threshold).tolist() and 0 < int(step.leave.sum()) < 8
    assert step.state.done == 2 and step.state.rows.tolist() == step.rows[~step.leave].tolist()
    assert step.cost == tiny.threshold_costs[0]


def test_state_split_and_cat():
    model = timm.create_model('test_vit_mexit_liferegress').eval()  # untrained exits: no image is confident
    walker = model.exit_walker(keep_rate=0.5, threshold=0.99)
    with torch.no_grad():
        state = walker.start(torch.randn(5, 3, 32, 32))
        other = walker.start(torch.randn(2, 3, 32, 32), rows=torch.tensor([7, 9]))
        both = WalkState.cat([state.select(torch.tensor([0, 3])), other])
    assert both.rows.tolist() == [0, 3, 7, 9] and both.tokens.shape[0] == 4
    with torch.no_grad():
        moved = model.exit_walker(keep_rate=0.5, threshold=0.99).step(state)  # a walker of the same setting
    assert not moved.leave.any() and moved.state.done == 2 and moved.state.lives is not None  # lives after block 1
    assert moved.state.kept is None  # patches leave after block 2, before block 3
    with torch.no_grad():
        on = walker.step(moved.state).state
    assert on.done == 3 and on.kept.shape == on.lives.shape == (5, model.token_schedule(0.5)[2])
    with pytest.raises(ValueError, match='same point of a walk'):
        WalkState.cat([moved.state, other])
    with pytest.raises(ValueError, match='at least one state'):
        WalkState.cat([])


def test_walker_refuses_what_it_cannot_do(tiny):
    with pytest.raises(ValueError, match='keep_rate=0.5 applies to a model with patch slimming'):
        tiny.exit_walker(keep_rate=0.5).start(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match='threshold must be a number in'):
        tiny.exit_walker(threshold=2.)
    walker = tiny.exit_walker(budget=tiny.exit_costs[0])
    step = walker.step(walker.start(torch.randn(2, 3, 32, 32)))
    assert step.state is None and step.leave.all()
    with pytest.raises(ValueError, match='the walk is over'):
        walker.step(WalkState(4, step.rows, torch.zeros(2, 17, 32)))


class _Agree(ExitCriterion):
    """Leave when this exit's prediction agrees with the previous exit's and its confidence passes (a criterion
    with a per-image state: the previous prediction, -1 at the start)."""
    name, higher_leaves = 'test_agree', True

    def scores(self, logits: torch.Tensor, unit: torch.nn.Module) -> torch.Tensor:
        return logits.float().softmax(-1).amax(-1)

    def initial_state(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        return torch.full((batch,), -1, dtype=torch.long, device=device)

    def decide(self, logits, unit, threshold, state):
        pred = logits.argmax(-1)
        return self.leaves(self.scores(logits, unit), threshold) & (pred == state), pred


@pytest.fixture
def agree():
    register_criterion(_Agree)
    yield
    del CRITERIA['test_agree']


@pytest.mark.parametrize('name', ['test_vit_mexit', 'test_vit_mexit_liferegress'])
def test_a_criterion_with_state_is_one_class(agree, name):
    model = _model(name, dict(exit_criterion='test_agree', depth=6, exit_layers=(2, 3, 4, 5)))
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        every = model.forward_exits(x)
        out = model.forward_dynamic(x, threshold=0.3)
        served = _serve(model.exit_walker(threshold=0.3), [x[:5], x[5:9], x[9:]])
    preds = torch.stack([z.argmax(-1) for z in every])
    conf = torch.stack([z.softmax(-1).amax(-1) for z in every])
    expected = []
    for i in range(16):  # by hand: the first exit after the first one whose prediction repeats, confident enough
        k = next((k for k in range(1, len(every) - 1) if preds[k, i] == preds[k - 1, i] and conf[k, i] >= 0.3),
                 len(every) - 1)
        expected.append(model.exit_layers[k])
    assert out.exit_layer.tolist() == expected and len(set(expected)) > 1
    assert [served[i][1] for i in range(16)] == expected
    assert 'test_agree' in str(model.criterion.name)


def test_no_threshold_path_fits_the_budget_alone_decides():
    """cnn_project heads cost more than they save on the tiny model: no threshold path fits budget=1, so every image
    runs to the deepest exit whose own cost fits (the final one), without evaluating an earlier head."""
    model = _model('test_vit_mexit', dict(exit_head='cnn_project'))
    assert min(model.threshold_costs) > 1 and model.exit_costs[-1] == 1.
    calls = []
    for head in model.exits.values():
        head.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_dynamic(x, threshold=0.5, budget=1)
        full = model(x)
    assert not calls and out.exit_layer.tolist() == [4] * 6 and out.cost.tolist() == [1.] * 6
    torch.testing.assert_close(out.logits, full)
    with pytest.raises(ValueError, match=r'allowed: 1.0000 <= budget <= 1'):
        model.forward_dynamic(x, threshold=0.5, budget=0.99)
    model.threshold, model.budget = 0.5, 1.
    with torch.no_grad():
        torch.testing.assert_close(model(x), full)


def test_threshold_paths_that_fit_are_kept(tiny):
    """Where a threshold path fits the budget, the threshold decides up to the deepest exit whose path fits."""
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        out = tiny.forward_dynamic(x, threshold=0.5, budget=tiny.threshold_costs[1])
    assert out.exit_layer.max() <= 3 and float(out.cost.max()) <= tiny.threshold_costs[1]


@pytest.mark.parametrize('name,kwargs', [
    ('test_vit_mexit_liferegress', {}),
    ('eva02_tiny_patch14_224_mexit_liferegress', dict(img_size=28, patch_size=7, depth=5, embed_dim=32, num_heads=2,
                                                      num_classes=10, rope_type='mixed')),
])
def test_forward_intermediates_of_the_combined_family_is_slimmed(name, kwargs):
    model = _model(name, kwargs)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, keep_rate=0.5)
        full, full_inter = model.forward_intermediates(x)  # the model's keep rate, 1: the parent's path
        parent = timm.models.VisionTransformer.forward_features if 'eva' not in name else \
            timm.models.Eva.forward_features
        torch.testing.assert_close(final, model.forward_features(x, keep_rate=0.5))
        torch.testing.assert_close(model.forward_head(final), model(x, keep_rate=0.5), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, parent(model, x))
    schedule = model.token_schedule(0.5)
    assert final.shape[1] == model.num_prefix_tokens + schedule[-1] < full.shape[1]
    assert len(inter) == len(full_inter) == len(model.blocks) and inter[-1].shape == full_inter[-1].shape
    torch.testing.assert_close(inter[0], full_inter[0])  # before the first prune the same as the parent
