""" Serving early-exit models under live load: ``ExitScheduler(model, max_batch_size=, max_wait_ms=)``.

Single-image requests from many concurrent callers, batched segment by segment (segment-level continuous batching)::

    with ExitScheduler(model, max_batch_size=32, max_wait_ms=5) as scheduler:
        future = scheduler.submit(image, threshold=0.8)          # image (C, H, W); a concurrent.futures.Future
        answer = future.result()                                 # Answer(logits, exit_layer, cost)

A worker thread drives the model's per-image exit walker (``model.exit_walker``, ``timm_exits.models.walker``; for the
staged ONNX export ``ExitSession.exit_walker``) one step at a time: a step runs the images standing at one point of
the walk through the next segment, the images that exit there are answered at once, and the others wait at the next
point, where the survivors of several batches join into one. New requests start between any two steps, so every
segment runs on a batch of up to ``max_batch_size`` of the images waiting for it. New requests wait at most
``max_wait_ms`` for company (ordinary dynamic batching); images past an exit wait for the survivors of later batches
only while more are coming (a full batch of new requests is waiting, or images stand at an earlier exit), at most
``refill_wait_ms``, and never while the worker would otherwise idle. Of the points ready to run, the one holding the
oldest request runs first. What an image gets never depends on the images it runs with:
every answer is the one ``forward_dynamic`` gives for that image alone.

Requests of different settings (threshold, budget; image size for a ``dynamic_img_size`` model) walk apart, one
walker per setting. ``policy`` chooses how much of this a scheduler does, to measure what each part is worth:
``'continuous'`` (the above), ``'early'`` (a batch is formed, walks to its end answering each image at its exit, and
only then does the next batch start) and ``'batch'`` (ordinary dynamic batching: the batch's answers are given when
its last image is done). A model without exits (a timm parent) runs whole, answering at its depth at cost 1.
"""
import collections
import itertools
import math
import threading
import time
from concurrent.futures import Future, InvalidStateError
from contextlib import nullcontext
from numbers import Integral, Real
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..data import _model_input_size
from ..models._base import check_fraction
from ..models.walker import WalkState, WalkStep
from ..models.adapters import FeatureMapAdapter, adapter_for, any_input_size
from ..runtime import ExitSession, SessionWalker

__all__ = ['POLICIES', 'Answer', 'ExitScheduler', 'SchedulerClosed', 'SchedulerFull']

POLICIES = ('continuous', 'early', 'batch')
WALKERS = 32  # walkers of this many settings are kept for reuse


class Answer(NamedTuple):
    """One request's answer: the model's output for its image (``logits``: a row of ``forward_dynamic``'s, a tensor,
    or a NumPy array with an ``ExitSession``), the 1-based block after which it exited and its share of the full
    model's FLOPs (``cost``)."""
    logits: Any
    exit_layer: int
    cost: float


class SchedulerClosed(RuntimeError):
    """The scheduler is closed: it takes no new requests."""


class SchedulerFull(RuntimeError):
    """``max_queue`` requests are waiting or running: try again later."""


class _Request:
    __slots__ = ('id', 'image', 'key', 'future', 'arrived')

    def __init__(self, rid: int, image: Any, key: tuple, future: Future, arrived: float) -> None:
        self.id, self.image, self.key, self.future, self.arrived = rid, image, key, future, arrived


class _WholeModel:
    """The walk of a model without exits: one step through the whole model, every image leaving at its depth."""

    def __init__(self, model: Callable, depth: int) -> None:
        self.model, self.depth = model, depth

    def start(self, x: torch.Tensor, rows: torch.Tensor) -> WalkState:
        return WalkState(0, rows, x)

    def step(self, state: WalkState) -> WalkStep:
        logits = self.model(state.tokens)
        return WalkStep(self.depth, state.rows, logits, torch.ones_like(state.rows, dtype=torch.bool), 1., None)


def _depth(model: nn.Module) -> int:
    """Blocks of a model without exits (the depth its answers are reported at): its adapter's blocks, a ViT's
    ``blocks``, a CNN's units (``FeatureMapAdapter._units``); 0 for a model no adapter serves."""
    if hasattr(model, '_exit_blocks'):
        return len(model._exit_blocks())
    try:
        adapter = adapter_for(type(model))
    except ValueError:
        return len(getattr(model, 'blocks', ()))
    if issubclass(adapter, FeatureMapAdapter):
        return len(adapter._units(model))
    return len(getattr(model, 'blocks', ()))


class _TorchBackend:
    """An eager or ``torch.compile``d model: its walker (compiled segments for a compiled model), images as tensors."""

    def __init__(self, model: nn.Module) -> None:
        module = getattr(model, '_orig_mod', None)
        self.compiled = module is not None and hasattr(model, 'dynamo_ctx')
        self.module: nn.Module = module if self.compiled else model
        if not isinstance(self.module, nn.Module):
            raise TypeError(f'model must be a torch nn.Module (eager or torch.compile\'d) or a '
                            f'timm_exits.runtime.ExitSession, got {type(model).__name__}')
        if self.module.training:
            raise ValueError('model is in training mode: serve it in eval mode (model.eval()), as forward_dynamic '
                             'answers are defined there')
        self.model = model
        self.exits = hasattr(self.module, 'exit_walker')
        self.shape = tuple(_model_input_size(self.module))
        self.dynamic = any_input_size(self.module)
        first = next(self.module.parameters())
        self.device, self.dtype = first.device, first.dtype

    def context(self) -> Any:
        return torch.no_grad()

    def image(self, image: Any) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(image)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f'image must be a torch tensor or NumPy array of shape {self.shape}, got '
                            f'{type(image).__name__}')
        if not image.is_floating_point():
            raise ValueError(f'image must hold floating-point values (preprocessed), got dtype {image.dtype}')
        shape = tuple(image.shape)
        fits = image.ndim == 3 and (shape == self.shape or (self.dynamic and shape[0] == self.shape[0]))
        if not fits:
            size = f'({self.shape[0]}, H, W)' if self.dynamic else str(self.shape)
            raise ValueError(f'image must be one image of shape {size} (no batch axis), got {tuple(image.shape)}')
        return image.detach().to(self.device, self.dtype)  # one batch, one device and dtype: no request spoils it

    def threshold(self, threshold: Any) -> float:
        """The model's own check: in [0, 1], or in target units for a regression model."""
        check = getattr(self.module, '_check_threshold', None)
        return check(threshold) if check is not None else check_fraction('threshold', threshold)

    def walker(self, threshold: Optional[float], budget: Optional[float], size: Tuple[int, ...]) -> Any:
        if not self.exits:
            if threshold is not None or budget is not None:
                raise ValueError(f'{type(self.module).__name__} has no exits: threshold and budget must be None')
            return _WholeModel(self.model, _depth(self.module))
        walker = self.module.exit_walker(threshold=threshold, budget=budget,
                                         img_size=size[1:] if self.dynamic else None)
        if self.compiled:  # the segments compiled with the model's own torch.compile settings
            walker.step = self.model.dynamo_ctx(walker.step)
        return walker

    def batch(self, images: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack(images).to(self.device)

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def index(self, rows: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
        return torch.tensor(index, dtype=torch.long, device=rows.device)

    def row(self, logits: torch.Tensor, i: int) -> torch.Tensor:
        return logits[i].clone()


class _OnnxBackend:
    """A staged ONNX export on ONNX Runtime (``ExitSession``): its walker, images as float32 NumPy arrays."""

    def __init__(self, session: ExitSession) -> None:
        if session.static:
            raise ValueError('a --static export has no exits to schedule: export without --static for per-image early '
                             'exit')
        self.session, self.shape, self.dynamic = session, tuple(session.input_size), False

    def context(self) -> Any:
        return nullcontext()

    def image(self, image: Any) -> np.ndarray:
        if hasattr(image, 'detach') and hasattr(image, 'cpu'):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(f'image must be a NumPy array or torch tensor of shape {self.shape}, got '
                            f'{type(image).__name__}')
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f'image must hold floating-point values (preprocessed), got dtype {image.dtype}')
        if tuple(image.shape) != self.shape:
            raise ValueError(f'image must be one image of shape {self.shape} (the exported input size, no batch axis), '
                             f'got {tuple(image.shape)}')
        return image

    def threshold(self, threshold: Any) -> float:
        """The export's own check: in [0, 1], or in target units for a regression export."""
        return SessionWalker.check_threshold(self.session.manifest, threshold)

    def walker(self, threshold: Optional[float], budget: Optional[float], size: Tuple[int, ...]) -> Any:
        return self.session.exit_walker(threshold, budget)

    def batch(self, images: List[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(np.stack(images), dtype=np.float32)

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64)

    def index(self, rows: np.ndarray, index: Sequence[int]) -> np.ndarray:
        return np.asarray(index, dtype=np.int64)

    def row(self, logits: np.ndarray, i: int) -> np.ndarray:
        return logits[i].copy()


class _Waiting(NamedTuple):
    """Images of one setting standing at one point of the walk: their state, since when they wait there, and the
    arrival of the oldest of them."""
    state: Any
    since: float
    oldest: float


class _Group:
    """The requests of one setting: its walker, the requests not started yet and the states waiting at each point."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.walker: Any = None
        self.new: Deque[_Request] = collections.deque()
        self.points: Dict[int, List[_Waiting]] = {}


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
    return int(value)


class ExitScheduler:
    """Serve single-image requests with per-image early exit, segment by segment (see the module docstring).

    Args:
        model: A model that exits (either exit family, eager or ``torch.compile``d, in eval mode), a
            ``timm_exits.runtime.ExitSession`` of a staged export, or a model without exits (answered whole).
        max_batch_size: The most images one segment runs on.
        max_wait_ms: How long new requests wait for more before the first segment runs on fewer than
            ``max_batch_size``.
        refill_wait_ms: How long images past an exit wait at most for survivors of later batches to join them while
            the worker is busy (default: ``max(50, 10 * max_wait_ms)``; ``policy='continuous'`` only).
        max_queue: The most requests waiting or running; beyond it ``submit`` raises ``SchedulerFull``.
        policy: 'continuous' (new requests join between segments), 'early' (answers at each exit, one batch at a
            time) or 'batch' (ordinary dynamic batching: answers when the batch is done).

    Raises:
        ValueError: An argument out of range (named, with the allowed values), a model in training mode or a
            ``--static`` export.
        TypeError: A model of another kind.
    """

    def __init__(
            self,
            model: Any,
            max_batch_size: int = 32,
            max_wait_ms: float = 5.,
            refill_wait_ms: Optional[float] = None,
            max_queue: int = 4096,
            policy: str = 'continuous',
    ) -> None:
        self.max_batch_size = _check_int('max_batch_size', max_batch_size, 1)
        self.max_queue = _check_int('max_queue', max_queue, 1)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, Real) or not 0 <= max_wait_ms < math.inf:
            raise ValueError(f'max_wait_ms must be a finite number of milliseconds >= 0, got {max_wait_ms!r}')
        self.max_wait = float(max_wait_ms) / 1e3
        if refill_wait_ms is None:
            refill_wait_ms = max(50., 10 * max_wait_ms)
        if isinstance(refill_wait_ms, bool) or not isinstance(refill_wait_ms, Real) or not (
                0 <= refill_wait_ms < math.inf):
            raise ValueError(f'refill_wait_ms must be a finite number of milliseconds >= 0 or None, got '
                             f'{refill_wait_ms!r}')
        self.refill_wait = float(refill_wait_ms) / 1e3
        if policy not in POLICIES:
            raise ValueError(f'policy={policy!r} is not known; allowed: {list(POLICIES)}')
        self.policy = policy
        self._backend = _OnnxBackend(model) if isinstance(model, ExitSession) else _TorchBackend(model)
        self._cond = threading.Condition()
        self._queue: Deque[_Request] = collections.deque()
        self._live: Dict[int, _Request] = {}
        self._ids = itertools.count()
        self._groups: Dict[tuple, _Group] = {}
        self._held: List[Tuple[_Request, Answer]] = []  # 'batch': answers given when their batch is done
        self._walkers: 'collections.OrderedDict[tuple, Any]' = collections.OrderedDict()
        self._started = self._closing = self._withdrawn = False
        self._thread: Optional[threading.Thread] = None
        self._stats: Dict[str, int] = collections.Counter()

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The shape (C, H, W) of one image (H, W free for a ``dynamic_img_size`` model)."""
        return self._backend.shape

    # --- the callers' side ----------------------------------------------------------------------------------------

    def start(self) -> 'ExitScheduler':
        """Start the worker (``with`` does it)."""
        with self._cond:
            if self._closing:
                raise SchedulerClosed('this ExitScheduler is closed; create a new one')
            if self._started:
                return self
            self._started = True
        self._thread = threading.Thread(target=self._work, name='ExitScheduler', daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no new requests, answer those already taken, and stop the worker (``with`` does it on exit)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            never = [] if self._started else list(self._live.values())
        for request in never:
            self._finish(request, SchedulerClosed('the ExitScheduler was closed before it started'))
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> 'ExitScheduler':
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, image: Any, threshold: Optional[float] = None, budget: Optional[float] = None) -> Future:
        """One image's request: a ``concurrent.futures.Future`` of its ``Answer``.

        Args:
            image: (C, H, W) float image, preprocessed (a tensor; a NumPy array too; for an ``ExitSession`` either).
            threshold: Exit threshold in [0, 1] of the model's criterion (default: the model's).
            budget: Share (0, 1] of the full model's FLOPs no answer exceeds (default: the model's).

        A bad image or setting fails the returned future (ValueError / TypeError naming the argument) and leaves the
        scheduler serving. ``future.cancel()`` withdraws a request until it is answered: it runs no further segment.

        Requests submitted before ``start`` wait for it.

        Raises:
            SchedulerClosed: The scheduler is closed.
            SchedulerFull: ``max_queue`` requests are waiting or running.
        """
        future: Future = Future()
        try:
            image = self._backend.image(image)
            key = (None if threshold is None else self._backend.threshold(threshold),
                   None if budget is None else check_fraction('budget', budget, low_open=True), tuple(image.shape))
        except (TypeError, ValueError) as e:
            with self._cond:
                self._refuse_if_closed()
                self._stats['submitted'] += 1
                self._stats['failed'] += 1
            future.set_exception(e)
            return future
        with self._cond:
            self._refuse_if_closed()
            if len(self._live) >= self.max_queue:
                self._stats['refused'] += 1
                raise SchedulerFull(f'{len(self._live)} requests are waiting or running (max_queue={self.max_queue}); '
                                    f'try again later')
            request = _Request(next(self._ids), image, key, future, time.perf_counter())
            self._live[request.id] = request
            self._queue.append(request)
            self._stats['submitted'] += 1
            self._cond.notify_all()
        future.add_done_callback(self._on_done)
        return future

    def _on_done(self, future: Future) -> None:
        """A request cancelled while it waits: the worker drops it now (its place in ``max_queue`` with it)."""
        if future.cancelled():
            with self._cond:
                self._withdrawn = True
                self._cond.notify_all()

    def _refuse_if_closed(self) -> None:
        if self._closing:
            raise SchedulerClosed('this ExitScheduler is closed: it takes no new requests')

    def stats(self) -> Dict[str, int]:
        """Counts so far: requests ``submitted``, ``answered``, ``failed``, ``cancelled``, ``refused`` (queue full),
        ``batches`` started, ``segments`` run and ``rows`` (images summed over the segments run)."""
        with self._cond:
            out = dict(self._stats)
        for name in ('submitted', 'answered', 'failed', 'cancelled', 'refused', 'batches', 'segments', 'rows'):
            out.setdefault(name, 0)
        return out

    # --- the worker -----------------------------------------------------------------------------------------------

    def _work(self) -> None:
        with self._backend.context():
            while True:
                with self._cond:
                    while self._queue:
                        request = self._queue.popleft()
                        group = self._groups.get(request.key)
                        if group is None:
                            group = self._groups[request.key] = _Group(request.key)
                        group.new.append(request)
                    choice, wait = self._choose(time.perf_counter())
                    if choice is None:
                        if self._closing and self._live:  # nothing left to run, yet requests taken: none hangs
                            self._fail_orphans(SchedulerClosed('the ExitScheduler closed without running it'))
                        if self._closing and not self._live:
                            return
                        self._cond.wait(wait)
                        continue
                group, point = choice
                try:
                    self._run(group, point)
                except Exception as e:  # noqa: B902  (a fault of the model: its requests fail, serving goes on)
                    error = RuntimeError(f'the scheduler\'s step failed: {e!r}')
                    self._fail_group(group, error)
                    self._fail_orphans(error)

    def _choose(self, now: float) -> Tuple[Optional[Tuple[_Group, int]], Optional[float]]:
        """The point to run next (group, blocks done; 0: requests not started) and, when none is ready, how long to
        wait for one (None: until a request comes)."""
        running = self.policy != 'continuous' and any(g.points for g in self._groups.values())
        best, best_age, wake = None, math.inf, math.inf
        idle, idle_age = None, math.inf  # never idle while images wait past the first segment
        withdrawn, self._withdrawn = self._withdrawn, False
        for group in list(self._groups.values()):
            if withdrawn:  # requests cancelled before they started leave at once
                for request in [r for r in group.new if r.future.cancelled()]:
                    self._finish(request, None)
                group.new = collections.deque(r for r in group.new if not r.future.cancelled())
            candidates = []
            if group.new and not running:
                candidates.append((0, len(group.new), group.new[0].arrived, group.new[0].arrived))
            for done, waiting in group.points.items():
                count = sum(len(w.state.rows) for w in waiting)
                candidates.append((done, count, min(w.since for w in waiting), min(w.oldest for w in waiting)))
            for done, count, since, oldest in candidates:
                # survivors wait for company only where it is coming: a full batch of new requests (a backlog) or
                # images at an earlier exit
                upstream = done > 0 and (len(group.new) >= self.max_batch_size or any(d < done for d in group.points))
                patience = self.refill_wait if done > 0 else self.max_wait
                ready = (count >= self.max_batch_size or now - since >= patience or self._closing or running
                         or (done > 0 and not upstream))
                if ready and oldest < best_age:
                    best, best_age = (group, done), oldest
                elif not ready:
                    wake = min(wake, since + patience - now)
                    if done > 0 and oldest < idle_age:
                        idle, idle_age = (group, done), oldest
            if not group.new and not group.points:
                del self._groups[group.key]
        if best is not None or idle is not None:
            return best or idle, None
        return None, (None if wake == math.inf else max(wake, 0.))

    def _run(self, group: _Group, point: int) -> None:
        backend = self._backend
        if group.walker is None:
            group.walker = self._walkers.pop(group.key, None)
            if group.walker is None:
                threshold, budget, size = group.key
                try:
                    group.walker = backend.walker(threshold, budget, size)
                except (TypeError, ValueError) as e:  # a setting the model refuses (a budget below every exit, e.g.)
                    self._fail_group(group, e)
                    return
            self._walkers[group.key] = group.walker  # the most recent last; the oldest go beyond WALKERS settings
            while len(self._walkers) > WALKERS:
                self._walkers.popitem(last=False)
        if point == 0:
            taken = []
            while group.new and len(taken) < self.max_batch_size:
                request = group.new.popleft()
                if request.future.cancelled():
                    self._finish(request, None)
                else:
                    taken.append(request)
            if not taken:
                return
            try:
                state = group.walker.start(backend.batch([r.image for r in taken]), rows=backend.rows(
                    [r.id for r in taken]))
            except Exception as e:  # noqa: B902
                for request in taken:
                    self._finish(request, e)
                return
            oldest = taken[0].arrived
            with self._cond:
                self._stats['batches'] += 1
        else:
            waiting = group.points.pop(point)
            state = type(waiting[0].state).cat([w.state for w in waiting])
            oldest = min(w.oldest for w in waiting)
            ids = state.rows.tolist()
            keep = [i for i, rid in enumerate(ids) if not self._live[rid].future.cancelled()]
            if len(keep) < len(ids):
                for rid in ids:
                    if self._live[rid].future.cancelled():
                        self._finish(self._live[rid], None)
                if not keep:
                    return
                state = state.select(backend.index(state.rows, keep))
            if len(keep) > self.max_batch_size:  # the rest waits for the next run of this point
                rest = state.select(backend.index(state.rows, range(self.max_batch_size, len(keep))))
                group.points[point] = [_Waiting(rest, min(w.since for w in waiting), oldest)]
                state = state.select(backend.index(state.rows, range(self.max_batch_size)))
        try:
            step = group.walker.step(state)
        except Exception as e:  # noqa: B902  (its images fail; the setting's next batch gets a new walker)
            for rid in state.rows.tolist():
                self._finish(self._live[rid], e)
            if not group.points:  # a walker's state (rotary rows, e.g.) stays with the images it started
                group.walker = None
                self._walkers.pop(group.key, None)
            return
        rows = step.rows.tolist()
        with self._cond:
            self._stats['segments'] += 1
            self._stats['rows'] += len(rows)
        leave = step.leave.tolist()
        for i, (rid, gone) in enumerate(zip(rows, leave)):
            if gone:
                answer = Answer(backend.row(step.logits, i), int(step.exit_layer), float(step.cost))
                if self.policy == 'batch':
                    self._held.append((self._live[rid], answer))
                else:
                    self._finish(self._live[rid], answer)
        if step.state is not None:
            group.points.setdefault(step.state.done, []).append(_Waiting(step.state, time.perf_counter(), oldest))
        elif self.policy == 'batch':
            held, self._held = self._held, []
            for request, answer in held:
                self._finish(request, answer)

    def _fail_group(self, group: _Group, error: BaseException) -> None:
        """Fail every request of ``group`` (not started, or waiting at any point) with ``error``."""
        for request in list(group.new):
            self._finish(request, error)
        group.new.clear()
        for waiting in group.points.values():
            for w in waiting:
                for rid in w.state.rows.tolist():
                    self._finish(self._live[rid], error)
        group.points.clear()
        held, self._held = self._held, []
        for request, _ in held:
            self._finish(request, error)
        group.walker = None
        self._walkers.pop(group.key, None)

    def _fail_orphans(self, error: BaseException) -> None:
        """Fail every request taken that no group holds any more (a step that failed half-way): none hangs."""
        with self._cond:
            held = {r.id for r in self._queue} | {r.id for r, _ in self._held}
        for group in self._groups.values():
            held |= {r.id for r in group.new}
            held |= {rid for waiting in group.points.values() for w in waiting for rid in w.state.rows.tolist()}
        with self._cond:
            orphans = [r for rid, r in self._live.items() if rid not in held]
        for request in orphans:
            self._finish(request, error)

    def _finish(self, request: _Request, result: Any) -> None:
        """Answer ``request`` (an ``Answer``), fail it (an exception) or drop it (None: it was cancelled)."""
        with self._cond:
            if self._live.pop(request.id, None) is None:
                return
            kind = 'cancelled' if result is None else 'answered' if isinstance(result, Answer) else 'failed'
            self._stats[kind] += 1
            if not self._live:
                self._cond.notify_all()
        if result is None:
            return
        try:
            if isinstance(result, Answer):
                request.future.set_result(result)
            else:
                request.future.set_exception(result)
        except InvalidStateError:  # cancelled meanwhile: nobody waits for it
            with self._cond:
                self._stats[kind] -= 1
                self._stats['cancelled'] += 1
