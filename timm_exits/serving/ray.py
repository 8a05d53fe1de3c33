""" Early-exit models on Ray Serve: an HTTP endpoint over ``ExitScheduler`` (``pip install "timm-exits[serve]"``).

``POST /`` with an image file's bytes as the body (any format Pillow reads) answers JSON::

    {"labels": [...], "indices": [...], "probabilities": [...], "exit_layer": 7, "cost": 0.58}

the top-k classes of the answer's softmax, the block after which the image exited and its share of the full model's
FLOPs. Query parameters: ``threshold``, ``budget`` (default: the deployment's, else the model's), ``top_k`` and
``resize=false`` (the image already comes at the model's input size: converted and normalised only). The image is
preprocessed as ``timm_exits.validate`` does (``timm_exits.data.resolve_data_cfg``: the deployment's
``data_config``, else what the checkpoint records, else the model's pretrained cfg). ``GET /`` describes the
deployment and its scheduler's counts.

A bad payload answers 4xx with a message (400: not an image, a bad parameter, an image of the wrong size; 413: a body
over ``max_body_bytes``), a full queue 503, a request over ``request_timeout_s`` 504; none stops the replica. A
client that goes away withdraws its request: it runs no further segment. Replicas, autoscaling and HTTP ingress are
Ray Serve's own (``num_replicas``, ``autoscaling_config`` in the config file)::

    serve run timm_exits.serving.ray:build_app model=deit_tiny_patch16_224_mexit threshold=0.8
    serve run docs/serve_config.yaml            # the same from a config file (replicas, autoscaling, ...)
"""
import asyncio
import io
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..data import build_transform, resolve_data_cfg
from ..models._base import check_fraction
from ..models._checkpoint import load_checkpoint_into, read_checkpoint
from . import Answer, ExitScheduler, SchedulerClosed, SchedulerFull

__all__ = ['BadRequest', 'ExitDeployment', 'Preprocessor', 'answer_json', 'build_app', 'load_model']


class BadRequest(ValueError):
    """A payload or parameter the endpoint refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def load_model(model: Union[str, torch.nn.Module], checkpoint: Optional[str] = None, pretrained: bool = False,
               model_kwargs: Optional[Mapping[str, Any]] = None) -> tuple:
    """``(model in eval mode, the checkpoint's recorded arguments or None)``: ``model`` a name for
    ``timm.create_model`` (or a model already built), weights from ``checkpoint`` (safetensors or .pth) if given."""
    import timm
    recorded = None
    if isinstance(model, str):
        model = timm.create_model(model, pretrained=pretrained, **dict(model_kwargs or {}))
    elif model_kwargs or pretrained:
        raise ValueError('model_kwargs and pretrained apply to a model name, not to a model already built')
    if checkpoint:
        state_dict, recorded = read_checkpoint(checkpoint, prefer_ema=True)
        load_checkpoint_into(model, state_dict, recorded, checkpoint)
    return model.eval(), recorded


class Preprocessor:
    """Image file bytes to the model's input tensor, as validation preprocesses (``resolve_data_cfg``)."""

    def __init__(self, model: torch.nn.Module, data_config: Optional[Mapping[str, Any]] = None,
                 recorded: Optional[Mapping[str, Any]] = None) -> None:
        from torchvision import transforms as T
        self.data_config = resolve_data_cfg(model, data_config, recorded, flags=False)
        if self.data_config.counting and self.data_config.counting.get('crop'):
            raise ValueError(f'the checkpoint counts crops ({self.data_config.counting}: an image\'s count is the sum '
                             'of its crops\'), and the endpoint answers one model input per image; serve whole images '
                             "with data_config={'count_crop': 0} only if the model was trained on them, or count with "
                             'python -m timm_exits.validate / timm_exits.infer')
        self.transform = build_transform(model, False, data_config=self.data_config)
        self.normalise = T.Compose([T.ToTensor(), T.Normalize(self.data_config['mean'], self.data_config['std'])])
        self.mode = 'RGB' if self.data_config['input_size'][0] == 3 else 'L'

    def __call__(self, body: bytes, resize: bool = True) -> torch.Tensor:
        """The (C, H, W) input of one image file; ``resize`` False: converted and normalised only.

        Raises:
            BadRequest: An empty body or one Pillow cannot read as an image.
        """
        from PIL import Image
        if not body:
            raise BadRequest('the request body is empty: send an image file\'s bytes (JPEG, PNG, ...)')
        try:
            with Image.open(io.BytesIO(body)) as img:
                img = img.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadRequest(f'the request body is not an image Pillow can read ({type(e).__name__}: {e}); send an '
                             f'image file\'s bytes (JPEG, PNG, ...)') from e
        return self.transform(img) if resize else self.normalise(img)


def answer_json(answer: Answer, labels: Sequence[str], top_k: int, regression: bool = False) -> Dict[str, Any]:
    """The JSON of an answer: the top-k classes of its softmax (labels, indices, probabilities), exit layer, cost; a
    regression model's (``task='regression'``) values instead of classes."""
    logits = torch.as_tensor(answer.logits).float().reshape(-1)
    if regression:
        return {'values': logits.tolist(), 'exit_layer': answer.exit_layer, 'cost': answer.cost}
    probs = logits.softmax(-1)
    values, indices = probs.topk(min(top_k, probs.numel()))
    return {'labels': [labels[i] for i in indices.tolist()], 'indices': indices.tolist(),
            'probabilities': values.tolist(), 'exit_layer': answer.exit_layer, 'cost': answer.cost}


def _labels(model: torch.nn.Module, labels: Optional[Sequence[str]]) -> List[str]:
    num_classes = model.num_classes
    if labels is not None:
        if len(labels) != num_classes:
            raise ValueError(f'labels has {len(labels)} names, the model has {num_classes} classes')
        return [str(label) for label in labels]
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset(model)
    if subset is not None:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def _query_fraction(params: Mapping[str, str], name: str, low_open: bool) -> Optional[float]:
    raw = params.get(name)
    if raw is None or raw == '':
        return None
    try:
        value = float(raw)
    except ValueError:
        value = raw
    try:
        return check_fraction(name, value, low_open=low_open)
    except ValueError as e:
        raise BadRequest(f'query parameter {e}') from None


class ExitDeployment:
    """A Ray Serve replica: one model, one ``ExitScheduler``; see the module docstring.

    Args:
        model: A ``timm.create_model`` name (``import timm_exits`` registers the families) or a model already built.
        checkpoint: Weights to load (safetensors or .pth); its recorded preprocessing applies.
        pretrained: ``timm.create_model``'s ``pretrained``.
        model_kwargs: More ``timm.create_model`` arguments.
        data_config: Preprocessing overrides (``resolve_data_cfg``'s keys: input_size, mean, std, crop_pct, ...).
        threshold: Default exit threshold of the requests (None: the model's).
        budget: Default budget of the requests (None: the model's).
        top_k: Default number of classes answered.
        labels: Class names (default: ImageNet's for an ImageNet head, else the indices).
        max_batch_size: ``ExitScheduler``'s.
        max_wait_ms: ``ExitScheduler``'s.
        max_queue: ``ExitScheduler``'s: beyond it, 503.
        request_timeout_s: A request not answered by then gets 504 (and is withdrawn).
        max_body_bytes: A larger body gets 413.
        torch_threads: ``torch.set_num_threads`` of the replica (None: torch's default).
    """

    def __init__(
            self,
            model: Union[str, torch.nn.Module],
            checkpoint: Optional[str] = None,
            pretrained: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            data_config: Optional[Dict[str, Any]] = None,
            threshold: Optional[float] = None,
            budget: Optional[float] = None,
            top_k: int = 5,
            labels: Optional[Sequence[str]] = None,
            max_batch_size: int = 32,
            max_wait_ms: float = 5.,
            max_queue: int = 1024,
            request_timeout_s: float = 60.,
            max_body_bytes: int = 20 * 2 ** 20,
            torch_threads: Optional[int] = None,
    ) -> None:
        import timm_exits  # noqa: F401  (registers the families with timm in the replica's process)
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.name = model if isinstance(model, str) else type(model).__name__
        self.model, recorded = load_model(model, checkpoint, pretrained, model_kwargs)
        self.preprocess = Preprocessor(self.model, data_config, recorded)
        self.threshold = None if threshold is None else check_fraction('threshold', threshold)
        self.budget = None if budget is None else check_fraction('budget', budget, low_open=True)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f'top_k must be an integer >= 1, got {top_k!r}')
        self.top_k, self.labels = top_k, _labels(self.model, labels)
        self.request_timeout_s, self.max_body_bytes = float(request_timeout_s), int(max_body_bytes)
        self.scheduler = ExitScheduler(self.model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                       max_queue=max_queue).start()

    def __del__(self) -> None:
        scheduler = getattr(self, 'scheduler', None)
        if scheduler is not None:
            scheduler.close(timeout=10)

    def describe(self) -> Dict[str, Any]:
        """The model, its preprocessing, exits and defaults, and the scheduler's counts."""
        return {'model': self.name, 'input_size': list(self.scheduler.input_shape),
                'data_config': self.preprocess.data_config.record(),
                'exit_layers': list(getattr(self.model, 'exit_layers', ())), 'threshold': self.threshold,
                'budget': self.budget, 'top_k': self.top_k, 'stats': self.scheduler.stats()}

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == 'GET':
            return JSONResponse(self.describe())
        if request.method != 'POST':
            return JSONResponse({'error': f'{request.method} is not served: POST an image, GET a description'},
                                status_code=405)
        try:
            answer, top_k = await self._answer(request)
        except BadRequest as e:
            return JSONResponse({'error': str(e)}, status_code=e.status)
        regression = getattr(self.model, 'task', 'classification') == 'regression'
        return JSONResponse(answer_json(answer, self.labels, top_k, regression))

    async def _answer(self, request: Request) -> tuple:
        params = request.query_params
        threshold = _query_fraction(params, 'threshold', low_open=False)
        budget = _query_fraction(params, 'budget', low_open=True)
        threshold = self.threshold if threshold is None else threshold
        budget = self.budget if budget is None else budget
        top_k = params.get('top_k', str(self.top_k))
        if not top_k.isdigit() or int(top_k) < 1:
            raise BadRequest(f'query parameter top_k must be an integer >= 1, got {top_k!r}')
        resize = params.get('resize', 'true').lower()
        if resize not in ('true', 'false', '1', '0'):
            raise BadRequest(f'query parameter resize must be true or false, got {resize!r}')
        body = await request.body()
        if len(body) > self.max_body_bytes:
            raise BadRequest(f'the body has {len(body)} bytes, more than max_body_bytes={self.max_body_bytes}', 413)
        image = self.preprocess(body, resize=resize in ('true', '1'))
        try:
            future = self.scheduler.submit(image, threshold=threshold, budget=budget)
        except (SchedulerFull, SchedulerClosed) as e:
            raise BadRequest(str(e), 503) from None
        waiting = asyncio.wrap_future(future)  # cancelled with this request (a client gone): the future too
        try:
            answer = await asyncio.wait_for(waiting, self.request_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(f'no answer within request_timeout_s={self.request_timeout_s:g} s; the request was '
                             f'withdrawn', 504) from None
        except (ValueError, TypeError) as e:
            if 'image must be one image of shape' in str(e):
                raise BadRequest(f'wrong image size after preprocessing: {e}') from None
            raise BadRequest(str(e)) from None
        return answer, int(top_k)


def build_app(args: Dict[str, Any], **options: Any) -> Any:
    """``serve run timm_exits.serving.ray:build_app key=value ...`` (or ``import_path`` of a config file): the
    application of one ``ExitDeployment`` with ``args`` (``ExitDeployment``'s arguments; strings from the command
    line are read as JSON where they parse: ``threshold=0.8``, ``model_kwargs='{"num_classes": 10}'``); ``options``:
    Ray Serve's deployment options from Python (``num_replicas``, ``ray_actor_options``, ...)."""
    kwargs = {}
    for key, value in dict(args).items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
            if key in ('model', 'checkpoint') and not isinstance(value, str):
                value = args[key]
        kwargs[key] = value
    # as many requests in a replica as its scheduler queues (Ray Serve's default of a few would starve the batches)
    ongoing = int(kwargs.get('max_queue', 1024))
    options = {'name': 'ExitDeployment', 'max_ongoing_requests': ongoing, **options}
    return serve.deployment(ExitDeployment, **options).bind(**kwargs)
