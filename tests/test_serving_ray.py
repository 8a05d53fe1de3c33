"""The Ray Serve endpoint against a local Ray instance on 127.0.0.1: answers equal the library's for the same image
file, bad payloads get a 4xx with a message and the server keeps serving, a client that goes away is withdrawn, and
the documented config file builds the application."""
import http.client
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
import timm_exits

from .conftest import spread_exit_heads

ray = pytest.importorskip('ray', reason='the serve extra (ray[serve]) is not installed')
serve = pytest.importorskip('ray.serve', reason='the serve extra (ray[serve]) is not installed')
from timm_exits.serving.ray import Preprocessor, answer_json, build_app, load_model  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(timm_exits.__file__).parent.parent
THRESHOLD = 0.6
TIMEOUT = 120


def _png(seed: int, size=(40, 48), mode='RGB') -> bytes:
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == 'RGB' else size
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format='PNG')
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = spread_exit_heads(timm.create_model('test_vit_mexit')).eval()
    checkpoint = tmp_path_factory.mktemp('serve') / 'model.safetensors'
    save_file(model.state_dict(), str(checkpoint))
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace='timm_exits_tests',
             runtime_env={'env_vars': {'PYTHONPATH': str(ROOT)}})
    try:
        serve.start(http_options={'host': '127.0.0.1', 'port': port})
        # a lone request waits long for company: the disconnect test relies on it; the others come 4 at a time
        args = {'model': 'test_vit_mexit', 'checkpoint': str(checkpoint), 'max_batch_size': '4',
                'max_wait_ms': '3000', 'torch_threads': '1', 'top_k': '3'}
        serve.run(build_app(args), name='exits', route_prefix='/')
        yield port, str(checkpoint)
    finally:
        serve.shutdown()
        ray.shutdown()


def _request(port, method='POST', body=b'', query='', route='/'):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=TIMEOUT)
    try:
        conn.request(method, route + (f'?{query}' if query else ''), body=body,
                     headers={'Content-Type': 'application/octet-stream'})
        response = conn.getresponse()
        body = response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:  # Ray Serve's own error pages are text
            return response.status, {'text': body.decode(errors='replace')}
    finally:
        conn.close()


def _library(checkpoint, bodies, threshold, name='test_vit_mexit', model_kwargs=None):
    model, recorded = load_model(name, checkpoint, model_kwargs=model_kwargs)
    preprocess = Preprocessor(model, None, recorded)
    out = []
    for body in bodies:
        with torch.no_grad():
            ref = model.forward_dynamic(preprocess(body)[None], threshold=threshold)
        from timm_exits.serving import Answer
        out.append(answer_json(Answer(ref.logits[0], int(ref.exit_layer[0]), float(ref.cost[0])),
                               [str(i) for i in range(10)], 3))
    return out


def _threshold(checkpoint, bodies, **model):
    """A threshold at which these images leave at different exits."""
    for threshold in (0.5, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9):
        if len({a['exit_layer'] for a in _library(checkpoint, bodies, threshold, **model)}) > 1:
            return threshold
    pytest.fail('no threshold splits the images between exits')


def _post_many(port, bodies, query, route='/'):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: _request(port, body=b, query=query, route=route), bodies))


def _same(got, want):
    assert got['labels'] == want['labels'] and got['indices'] == want['indices']
    assert got['exit_layer'] == want['exit_layer'] and abs(got['cost'] - want['cost']) < 1e-6
    np.testing.assert_allclose(got['probabilities'], want['probabilities'], atol=1e-5)


def test_answers_equal_the_library(server):
    port, checkpoint = server
    bodies = [_png(seed) for seed in range(8)]
    threshold = _threshold(checkpoint, bodies)
    answers = []
    for start in (0, 4):
        answers += _post_many(port, bodies[start:start + 4], f'threshold={threshold}')
    want = _library(checkpoint, bodies, threshold)
    for (status, got), ref in zip(answers, want):
        assert status == 200, got
        _same(got, ref)
    assert len({a['exit_layer'] for _, a in answers}) > 1
    status, info = _request(port, 'GET')
    assert status == 200 and info['model'] == 'test_vit_mexit' and info['input_size'] == [3, 32, 32]


def test_a_cnn_twin_answers_as_the_library(server, tmp_path):
    """A feature-map parent (ResNet-10t) served as a second application: per-image exits through HTTP equal the
    library's for the same files; the application is deleted afterwards."""
    from safetensors.torch import save_file
    port, _ = server
    model = dict(name='resnet10t_mexit', model_kwargs={'num_classes': 10})
    torch.manual_seed(0)
    net = spread_exit_heads(timm.create_model(model['name'], **model['model_kwargs'])).eval()
    checkpoint = str(tmp_path / 'cnn.safetensors')
    save_file(net.state_dict(), checkpoint)
    bodies = [_png(seed) for seed in range(60, 64)]
    threshold = _threshold(checkpoint, bodies, **model)
    args = {'model': model['name'], 'checkpoint': checkpoint, 'model_kwargs': json.dumps(model['model_kwargs']),
            'max_batch_size': '4', 'max_wait_ms': '3000', 'torch_threads': '1', 'top_k': '3'}
    serve.run(build_app(args), name='cnn', route_prefix='/cnn')
    try:
        answers = _post_many(port, bodies, f'threshold={threshold}', route='/cnn')
        want = _library(checkpoint, bodies, threshold, **model)
        for (status, got), ref in zip(answers, want):
            assert status == 200, got
            _same(got, ref)
        assert len({a['exit_layer'] for _, a in answers}) > 1
        status, info = _request(port, 'GET', route='/cnn')
        assert status == 200 and info['model'] == model['name'] and info['input_size'] == list(net.input_shape)
    finally:
        serve.delete('cnn')


def test_bad_payloads_get_4xx_and_the_server_keeps_serving(server):
    port, checkpoint = server
    cases = [
        (b'not an image', '', 400, 'not an image'),
        (b'', '', 400, 'body is empty'),
        (_png(1), 'threshold=2', 400, 'threshold must be a number in [0, 1]'),
        (_png(1), 'threshold=high', 400, 'threshold must be a number in [0, 1]'),
        (_png(1), 'budget=0.01', 400, 'budget'),
        (_png(1), 'top_k=0', 400, 'top_k must be an integer >= 1'),
        (_png(1, size=(40, 40)), 'resize=false', 400, 'wrong image size after preprocessing'),
    ]
    for body, query, status, message in cases:
        got_status, got = _request(port, body=body, query=query)
        assert got_status == status and message in got['error'], (query, got)
    bodies = [_png(seed) for seed in range(10, 14)]
    want = _library(checkpoint, bodies, THRESHOLD)
    for (status, got), ref in zip(_post_many(port, bodies, f'threshold={THRESHOLD}'), want):
        assert status == 200
        _same(got, ref)
    status, got = _request(port, body=_png(2, size=(32, 32), mode='L'), query='resize=false')
    assert status == 200  # a grey image is converted to the model's 3 channels, as timm's datasets do


def test_a_client_that_goes_away_is_withdrawn(server):
    port, _ = server
    before = _request(port, 'GET')[1]['stats']
    body = _png(20)
    with socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT) as s:
        s.sendall(b'POST /?threshold=0.6 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n'
                  + f'Content-Length: {len(body)}\r\n\r\n'.encode() + body)
        time.sleep(0.5)  # the request is in the scheduler, waiting for company (max_wait_ms 3000)
        s.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + TIMEOUT
    while True:
        stats = _request(port, 'GET')[1]['stats']
        if stats['submitted'] > before['submitted'] and stats['submitted'] == (
                stats['answered'] + stats['failed'] + stats['cancelled']) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats['cancelled'] == before['cancelled'] + 1, stats
    assert stats['rows'] == before['rows']  # it ran in no segment
    bodies = [_png(seed) for seed in range(30, 34)]
    assert all(status == 200 for status, _ in _post_many(port, bodies, f'threshold={THRESHOLD}'))


def test_config_file_builds_the_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema
    config = yaml.safe_load((ROOT / 'docs' / 'serve_config.yaml').read_text())
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, 'model_validate') else \
        ServeDeploySchema.parse_obj(config)
    (app,) = config['applications']
    assert app['import_path'] == 'timm_exits.serving.ray:build_app'
    module, _, name = app['import_path'].partition(':')
    assert callable(getattr(__import__(module, fromlist=[name]), name))


def test_a_replica_that_dies_fails_its_requests_and_serve_replaces_it(server):
    """Last in this module: the replica is killed while a request waits in its scheduler; the client gets an error
    status instead of hanging, and Ray Serve's controller starts a new replica that answers."""
    port, _ = server
    from ray.util import list_named_actors
    names = [a for a in list_named_actors(all_namespaces=True) if 'ExitDeployment' in a['name']]
    assert len(names) == 1, names
    replica = ray.get_actor(names[0]['name'], namespace=names[0]['namespace'])
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_request, port, 'POST', _png(40), f'threshold={THRESHOLD}')
        time.sleep(1.)  # in the scheduler, waiting for company (max_wait_ms 3000)
        ray.kill(replica, no_restart=True)
        status, got = waiting.result(timeout=TIMEOUT)
    assert status >= 500, got
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            statuses = [status for status, _ in _post_many(port, [_png(s) for s in range(50, 54)], '')]
        except OSError:
            statuses = []
        if statuses == [200] * 4 or time.monotonic() > deadline:
            break
        time.sleep(1.)
    assert statuses == [200] * 4


def _starlette_request(body: bytes, query: str = ''):
    from starlette.requests import Request
    scope = {'type': 'http', 'method': 'POST', 'path': '/', 'query_string': query.encode(), 'headers': []}
    sent = []

    async def receive():
        if not sent:
            sent.append(True)
            return {'type': 'http.request', 'body': body, 'more_body': False}
        return {'type': 'http.disconnect'}

    return Request(scope, receive)


def test_timeout_and_full_queue_answer_504_and_503():
    """The deployment class itself (no Ray instance): a request not answered in time gets 504 and is withdrawn, one
    beyond max_queue gets 503, and the queue has room again afterwards."""
    import asyncio
    from timm_exits.serving.ray import ExitDeployment
    deployment = ExitDeployment('test_vit_mexit', max_batch_size=4, max_wait_ms=60_000, max_queue=1,
                                request_timeout_s=1.)
    try:
        async def scenario():
            first = asyncio.ensure_future(deployment(_starlette_request(_png(1))))
            await asyncio.sleep(0.3)  # it waits in the scheduler for company
            second = await deployment(_starlette_request(_png(2)))
            return await first, second

        timed_out, full = asyncio.run(scenario())
        assert full.status_code == 503 and 'max_queue=1' in json.loads(full.body)['error']
        assert timed_out.status_code == 504 and 'request_timeout_s=1' in json.loads(timed_out.body)['error']
        deadline = time.monotonic() + TIMEOUT
        while deployment.scheduler.stats()['cancelled'] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = deployment.scheduler.stats()
        assert stats['cancelled'] == 1 and stats['refused'] == 1 and stats['rows'] == 0
        assert deployment.scheduler.submit(torch.randn(3, 32, 32)).cancel()  # room again
    finally:
        deployment.scheduler.close()
