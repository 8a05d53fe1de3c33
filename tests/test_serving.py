"""ExitScheduler: under concurrent load with random arrivals every request gets what ``forward_dynamic`` gives for its
image alone (none lost, none answered twice, none mixed up), for both exit families, eager, compiled and the staged
ONNX export; survivors of several batches share a segment; bad input fails one request only; cancelled requests
cost nothing; a closed or full scheduler refuses clearly."""
import random
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

import timm
from timm_exits.serving import POLICIES, Answer, ExitScheduler, SchedulerClosed, SchedulerFull

from .conftest import spread_exit_heads


def _model(name: str = 'test_vit_mexit', **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return spread_exit_heads(timm.create_model(name, **kwargs)).eval()


@pytest.fixture(scope='module')
def mexit():
    return _model()


def _reference(model, image, threshold, budget):
    with torch.no_grad():
        out = model.forward_dynamic(image[None], threshold=threshold, budget=budget)
    return out.logits[0], int(out.exit_layer[0]), float(out.cost[0])


def _check(answer, reference):
    assert isinstance(answer, Answer)
    logits, exit_layer, cost = reference
    assert answer.exit_layer == exit_layer
    assert abs(answer.cost - cost) < 1e-6
    torch.testing.assert_close(torch.as_tensor(answer.logits), torch.as_tensor(logits), atol=1e-4, rtol=1e-4)


def _load(scheduler, images, settings, seed, callers=4, gap_ms=3.):
    """Submit ``images`` from ``callers`` threads at random times; each image's future, by image index."""
    futures = [None] * len(images)
    barrier = threading.Barrier(callers)

    def caller(k):
        rng = random.Random(seed * 100 + k)
        barrier.wait()
        for i in range(k, len(images), callers):
            time.sleep(rng.expovariate(1e3 / gap_ms))  # Poisson arrivals of mean gap gap_ms per caller
            futures[i] = scheduler.submit(images[i], *settings[i])

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return futures


@pytest.mark.parametrize('family,seed', [('test_vit_mexit', 0), ('test_vit_mexit_liferegress', 1),
                                         ('test_vit_mexit', 2)])
def test_fuzz_concurrent_answers_equal_forward_dynamic(family, seed):
    """Random arrivals, thresholds, budgets (the model's default too), batch sizes and policies."""
    kwargs = dict(keep_rate=0.7) if 'liferegress' in family else {}
    model = _model(family, **kwargs)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    n = 48
    images = torch.randn(n, 3, 32, 32)
    settings = [(rng.choice([None, 0.3, 0.6, 0.9]), rng.choice([None, None, 0.85, 1.0])) for _ in range(n)]
    refs = [_reference(model, images[i], *settings[i]) for i in range(n)]
    assert len({r[1] for r in refs}) > 1  # the images really leave at different exits
    policy = POLICIES[seed % len(POLICIES)]
    with ExitScheduler(model, max_batch_size=rng.choice([3, 5, 8]), max_wait_ms=rng.choice([0, 1, 4]),
                       policy=policy) as scheduler:
        futures = _load(scheduler, images, settings, seed)
        answers = [f.result(timeout=60) for f in futures]
    for answer, ref in zip(answers, refs):
        _check(answer, ref)
    stats = scheduler.stats()
    assert stats['submitted'] == stats['answered'] == n and stats['failed'] == stats['cancelled'] == 0


@pytest.mark.parametrize('policy', POLICIES)
def test_policies_give_the_same_answers(mexit, policy):
    images = torch.randn(12, 3, 32, 32)
    with ExitScheduler(mexit, max_batch_size=4, max_wait_ms=1, policy=policy) as scheduler:
        answers = [f.result(timeout=60) for f in _load(scheduler, images, [(0.6, None)] * 12, 3, callers=3)]
    for i, answer in enumerate(answers):
        _check(answer, _reference(mexit, images[i], 0.6, None))


def _survivors_split(model, threshold, per_batch, batches):
    """Images of which exactly half of every batch of ``per_batch`` goes on after the first exit."""
    torch.manual_seed(5)
    pool = torch.randn(200, 3, 32, 32)
    with torch.no_grad():
        first = model.forward_dynamic(pool, threshold=threshold).exit_layer == model.exit_layers[0]
    leave, stay = pool[first], pool[~first]
    half = per_batch // 2
    assert len(leave) >= half * batches and len(stay) >= half * batches
    return torch.cat([torch.cat([leave[b * half:(b + 1) * half], stay[b * half:(b + 1) * half]])
                      for b in range(batches)])


@pytest.mark.parametrize('policy', ['continuous', 'early'])
def test_survivors_of_several_batches_share_a_segment(mexit, policy):
    """Two batches of 4 each leave 2 images after the first exit: refilled, one segment runs the 4 survivors; one batch
    at a time, each batch's 2 survivors run alone. Submitted before the worker starts, so no clock decides."""
    threshold = 0.6
    images = _survivors_split(mexit, threshold, 4, 2)
    scheduler = ExitScheduler(mexit, max_batch_size=4, max_wait_ms=60_000, policy=policy)
    futures = [scheduler.submit(image, threshold) for image in images]
    with scheduler:
        answers = [f.result(timeout=60) for f in futures]
    for i, answer in enumerate(answers):
        _check(answer, _reference(mexit, images[i], threshold, None))
    stats = scheduler.stats()
    exits = [a.exit_layer for a in answers]
    assert stats['batches'] == 2 and exits.count(mexit.exit_layers[0]) == 4
    last = [e == mexit.exit_layers[-1] for e in exits]
    assert stats['rows'] == 8 + 4 + sum(last)
    if policy == 'continuous':  # the 4 survivors run their second segment together
        assert stats['segments'] == 2 + 1 + any(last)
    else:  # each batch's 2 survivors run theirs apart
        assert stats['segments'] == 2 + 2 + any(last[:4]) + any(last[4:])


def test_compiled_model(mexit):
    compiled = torch.compile(mexit, backend='aot_eager')
    images = torch.randn(10, 3, 32, 32)
    with ExitScheduler(compiled, max_batch_size=4, max_wait_ms=1) as scheduler:
        answers = [f.result(timeout=120) for f in _load(scheduler, images, [(0.6, None)] * 10, 4, callers=2)]
    for i, answer in enumerate(answers):
        _check(answer, _reference(mexit, images[i], 0.6, None))


def test_model_default_threshold_and_budget():
    model = _model(threshold=0.6, budget=0.85)
    images = torch.randn(8, 3, 32, 32)
    with ExitScheduler(model, max_batch_size=3, max_wait_ms=1) as scheduler:
        answers = [f.result(timeout=60) for f in _load(scheduler, images, [(None, None)] * 8, 5, callers=2)]
    for i, answer in enumerate(answers):
        _check(answer, _reference(model, images[i], None, None))
        assert answer.cost <= 0.85


def test_model_without_exits_answers_whole():
    torch.manual_seed(0)
    parent = timm.create_model('test_vit', img_size=32).eval()
    images = torch.randn(6, 3, 32, 32)
    with ExitScheduler(parent, max_batch_size=4, max_wait_ms=1) as scheduler:
        futures = [scheduler.submit(image) for image in images]
        refused = scheduler.submit(images[0], threshold=0.5)
        answers = [f.result(timeout=60) for f in futures]
    with torch.no_grad():
        ref = parent(images)
    for i, answer in enumerate(answers):
        torch.testing.assert_close(answer.logits, ref[i], atol=1e-5, rtol=1e-5)
        assert answer.exit_layer == len(parent.blocks) and answer.cost == 1.
    with pytest.raises(ValueError, match='no exits: threshold and budget must be None'):
        refused.result(timeout=60)


def test_bad_requests_fail_alone(mexit):
    good = torch.randn(3, 32, 32)
    with ExitScheduler(mexit, max_batch_size=4, max_wait_ms=1) as scheduler:
        bad = {
            'shape': scheduler.submit(torch.randn(1, 3, 32, 32)),
            'size': scheduler.submit(torch.randn(3, 24, 24)),
            'dtype': scheduler.submit(torch.zeros(3, 32, 32, dtype=torch.uint8)),
            'type': scheduler.submit([[0.]]),
            'threshold': scheduler.submit(good, threshold=1.5),
            'nan': scheduler.submit(good, threshold=float('nan')),
            'budget': scheduler.submit(good, budget=0.),
            'below': scheduler.submit(good, budget=0.05),  # below the cheapest exit: the walker refuses it
        }
        after = scheduler.submit(good, threshold=0.6)
        _check(after.result(timeout=60), _reference(mexit, good, 0.6, None))
        messages = {}
        for name, future in bad.items():
            with pytest.raises((ValueError, TypeError)) as info:
                future.result(timeout=60)
            messages[name] = str(info.value)
    assert '(3, 32, 32)' in messages['shape'] and '(1, 3, 32, 32)' in messages['shape']
    assert '(3, 24, 24)' in messages['size'] and 'floating-point' in messages['dtype']
    assert 'list' in messages['type']
    assert messages['threshold'].startswith('threshold must be a number in [0, 1]') and 'nan' in messages['nan']
    assert messages['budget'].startswith('budget must be a number in (0, 1]') and 'budget' in messages['below']
    stats = scheduler.stats()
    assert stats['failed'] == len(bad) and stats['answered'] == 1


def test_other_dtypes_do_not_spoil_a_batch(mexit):
    """A float64 or half image joins a float32 batch in the model's dtype."""
    images = torch.randn(4, 3, 32, 32)
    scheduler = ExitScheduler(mexit, max_batch_size=4, max_wait_ms=60_000)
    futures = [scheduler.submit(images[0].double(), 0.6), scheduler.submit(images[1].half(), 0.6),
               scheduler.submit(images[2], 0.6), scheduler.submit(images[3].numpy(), 0.6)]
    with scheduler:
        answers = [f.result(timeout=60) for f in futures]
    assert scheduler.stats()['batches'] == 1
    for i, answer in enumerate(answers):
        image = images[i].half().float() if i == 1 else images[i]
        _check(answer, _reference(mexit, image, 0.6, None))


def test_closed_scheduler_refuses(mexit):
    scheduler = ExitScheduler(mexit)
    with scheduler:
        scheduler.submit(torch.randn(3, 32, 32)).result(timeout=60)
    with pytest.raises(SchedulerClosed, match='closed'):
        scheduler.submit(torch.randn(3, 32, 32))
    with pytest.raises(SchedulerClosed, match='closed'):
        scheduler.start()
    unstarted = ExitScheduler(mexit)
    waiting = unstarted.submit(torch.randn(3, 32, 32))
    unstarted.close()
    with pytest.raises(SchedulerClosed, match='before it started'):
        waiting.result(timeout=10)


def test_close_answers_what_it_took(mexit):
    images = torch.randn(6, 3, 32, 32)
    scheduler = ExitScheduler(mexit, max_batch_size=4, max_wait_ms=60_000)
    with scheduler:
        futures = [scheduler.submit(image, 0.6) for image in images]  # 2 of them wait for a batch that never fills
    assert all(f.done() for f in futures)
    for i, future in enumerate(futures):
        _check(future.result(), _reference(mexit, images[i], 0.6, None))


def test_full_queue_refuses(mexit):
    scheduler = ExitScheduler(mexit, max_queue=3)
    futures = [scheduler.submit(torch.randn(3, 32, 32)) for _ in range(3)]
    with pytest.raises(SchedulerFull, match='max_queue=3'):
        scheduler.submit(torch.randn(3, 32, 32))
    with scheduler:
        for future in futures:
            future.result(timeout=60)
        scheduler.submit(torch.randn(3, 32, 32)).result(timeout=60)  # room again
    assert scheduler.stats()['refused'] == 1


def test_cancelled_requests_cost_nothing(mexit):
    images = torch.randn(5, 3, 32, 32)
    scheduler = ExitScheduler(mexit, max_batch_size=4, max_wait_ms=60_000)
    gone = scheduler.submit(images[0], 0.6)
    assert gone.cancel()
    futures = [scheduler.submit(image, 0.6) for image in images[1:]]
    with scheduler:
        answers = [f.result(timeout=60) for f in futures]
    for i, answer in enumerate(answers):
        _check(answer, _reference(mexit, images[i + 1], 0.6, None))
    stats = scheduler.stats()
    assert stats['cancelled'] == 1 and stats['answered'] == 4 and stats['batches'] == 1
    assert stats['rows'] == 4 + sum(a.exit_layer > mexit.exit_layers[0] for a in answers) + sum(
        a.exit_layer > mexit.exit_layers[1] for a in answers)  # the cancelled image ran in no segment


def test_cancelled_between_segments_stops_running(mexit):
    """A request cancelled while it waits for its second segment is dropped there."""
    threshold = 0.6
    images = _survivors_split(mexit, threshold, 4, 1)  # 2 leave at the first exit, 2 go on
    scheduler = ExitScheduler(mexit, max_batch_size=4, max_wait_ms=60_000)
    futures = [scheduler.submit(image, threshold) for image in images]
    survivors = futures[2:]
    entered, blocker = threading.Event(), threading.Event()
    walker_step = None

    def hold(state):  # the first segment's answers wait until the test has cancelled a survivor
        out = walker_step(state)
        if state.done == 0:
            entered.set()
            blocker.wait(60)
        return out

    real_walker = mexit.exit_walker

    def walker(**kwargs):
        nonlocal walker_step
        w = real_walker(**kwargs)
        walker_step, w.step = w.step, hold
        return w

    mexit.exit_walker = walker
    try:
        with scheduler:
            assert entered.wait(60)
            assert survivors[0].cancel()
            blocker.set()
            answer = survivors[1].result(timeout=60)
            _check(answer, _reference(mexit, images[3], threshold, None))
            for future in futures[:2]:
                _check(future.result(timeout=60), _reference(mexit, images[futures.index(future)], threshold, None))
    finally:
        del mexit.exit_walker
    stats = scheduler.stats()
    assert stats['cancelled'] == 1 and stats['answered'] == 3
    assert stats['rows'] == 4 + mexit.exit_layers.index(answer.exit_layer)  # the cancelled image ran no further


def test_a_failing_step_fails_its_requests_and_serving_goes_on(mexit):
    scheduler = ExitScheduler(mexit, max_batch_size=2, max_wait_ms=1)
    real_walker = mexit.exit_walker
    calls = []

    def walker(**kwargs):
        w = real_walker(**kwargs)
        if not calls:
            def broken(state):
                raise RuntimeError('device lost')
            w.step = broken
        calls.append(kwargs)
        return w

    mexit.exit_walker = walker
    try:
        with scheduler:
            doomed = [scheduler.submit(torch.randn(3, 32, 32), 0.6) for _ in range(2)]
            for future in doomed:
                with pytest.raises(RuntimeError, match='device lost'):
                    future.result(timeout=60)
            image = torch.randn(3, 32, 32)
            _check(scheduler.submit(image, 0.6).result(timeout=60), _reference(mexit, image, 0.6, None))
    finally:
        del mexit.exit_walker


def test_bad_arguments(mexit):
    for kwargs, match in [(dict(max_batch_size=0), 'max_batch_size must be an integer >= 1'),
                          (dict(max_wait_ms=-1), 'max_wait_ms must be a finite number'),
                          (dict(max_queue=True), 'max_queue must be an integer >= 1'),
                          (dict(policy='eager'), "policy='eager' is not known; allowed")]:
        with pytest.raises(ValueError, match=match):
            ExitScheduler(mexit, **kwargs)
    with pytest.raises(ValueError, match=r'training mode.*model\.eval\(\)'):
        ExitScheduler(timm.create_model('test_vit_mexit'))
    with pytest.raises(TypeError, match='nn.Module'):
        ExitScheduler(object())


@pytest.mark.parametrize('family,kwargs', [('test_vit_mexit', {}), ('test_vit_mexit_liferegress', dict(keep_rate=0.7))])
def test_onnx_session(tmp_path, family, kwargs):
    pytest.importorskip('onnxruntime', reason='the deploy extra (onnx, onnxruntime, onnxscript) is not installed')
    pytest.importorskip('onnxscript', reason='the deploy extra (onnx, onnxruntime, onnxscript) is not installed')
    from timm_exits.export import export_onnx
    from timm_exits.runtime import ExitSession
    model = _model(family, **kwargs)
    session = ExitSession(export_onnx(model, tmp_path / 'onnx', family))
    images = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    settings = [(random.Random(i).choice([None, 0.4, 0.7]), None) for i in range(16)]
    with ExitScheduler(session, max_batch_size=4, max_wait_ms=1) as scheduler:
        answers = [f.result(timeout=60) for f in _load(scheduler, list(images), settings, 6, callers=2)]
        bad = scheduler.submit(images[0][:, :16])
        with pytest.raises(ValueError, match=r'exported input size'):
            bad.result(timeout=60)
    exits = set()
    for i, answer in enumerate(answers):
        ref = session(images[i:i + 1], *settings[i])
        assert isinstance(answer.logits, np.ndarray) and answer.exit_layer == int(ref.exit_layer[0])
        np.testing.assert_allclose(answer.logits, ref.logits[0], atol=1e-5, rtol=1e-5)
        assert abs(answer.cost - float(ref.cost[0])) < 1e-6
        exits.add(answer.exit_layer)
    assert len(exits) > 1


def test_future_is_a_concurrent_future(mexit):
    with ExitScheduler(mexit) as scheduler:
        future = scheduler.submit(torch.randn(3, 32, 32))
        assert isinstance(future, Future)
        assert future.result(timeout=60).exit_layer == mexit.exit_layers[-1]


def test_load_generator_runs_bounded(tmp_path):
    """The load generator's command: every configuration at saturation and at a load, every request answered, ratios
    to the parent of the same round (timings themselves are not asserted)."""
    import json
    from timm_exits.serving.load import CONFIGS, main
    out, png = tmp_path / 'load.json', tmp_path / 'load.png'
    assert main(['--model', 'test_vit', '--img-size', '32', '--num-classes', '10', '--requests', '6', '--rounds', '1',
                 '--loads', '0.5', '--report-load', '0.5', '--max-seconds', '10', '--max-batch-size', '4',
                 '--output', str(out), '--plot', str(png)]) == 0
    result = json.loads(out.read_text())
    assert sorted(r['config'] for r in result['runs']) == sorted([c for c, _ in CONFIGS] * 2)
    assert all(r['answered'] == r['submitted'] == 6 for r in result['runs'])
    for load in ('saturation', '0.5'):
        assert result['summary'][load]['parent']['throughput_ratio'] == 1.
        assert result['summary'][load]['refill']['mean_cost'] < 1.
    assert png.stat().st_size > 0
