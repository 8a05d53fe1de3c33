""" Per-image early exit on ONNX Runtime: ``ExitSession(DIR)(x, threshold=t, budget=b)``.

Runs a folder written by ``python -m timm_exits.export`` (``timm_exits.export``). For a staged export, the loop of
eager ``forward_dynamic``: segment by segment, each exit's head on the images still running, the images whose score
passes the threshold leave, and only the others go on to the next segment (002_*.txt: a batch-wide decision gives no
speed-up). A budget stops every image at the deepest exit whose cost fits it. A static export runs its one graph.

``session.exit_walker(threshold=, budget=)`` is the same walk to drive step by step (``start(x, rows)`` and
``step(state)``, as ``timm_exits.models.walker.ExitWalker``), for a server that lets new images join between segments.

Needs numpy and onnxruntime only (``pip install "timm-exits[deploy]"``); torch tensors are accepted and returned as
tensors when torch is importable.
"""
import json
import math
from numbers import Real
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ['ExitSession', 'RuntimeOutput', 'SessionState', 'SessionStep', 'SessionWalker', 'default_session_options']

FORMAT = 1
MANIFEST = 'manifest.json'
EXPORT_ID_KEY = 'timm_exits_export_id'
# ONNX Runtime's thread pools spin after each run by default; with one session per segment the pool of the segment
# that just ran keeps the cores busy while the next segment's pool needs them (on 2 cores, ~3x slower at batch 1)
NO_SPINNING = {'session.intra_op.allow_spinning': '0', 'session.inter_op.allow_spinning': '0'}


def default_session_options() -> Any:
    """The ``onnxruntime.SessionOptions`` every graph of an ``ExitSession`` gets unless the caller passes its own:
    onnxruntime's defaults with thread-pool spinning off (``NO_SPINNING``), so that consecutive segments do not steal
    each other's cores."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    return options


class RuntimeOutput(NamedTuple):
    """Per image: logits (B, num_classes), the 1-based block after which it exited (B,), its share of full FLOPs (B,).
    NumPy arrays for NumPy input, torch tensors for a tensor."""
    logits: Any
    exit_layer: Any
    cost: Any


class SessionState(NamedTuple):
    """Images at one point of a walk through a staged export: ``done`` blocks run (0: not embedded yet), their ids
    ``rows`` (the caller's) and ``feed``, what the next segment takes: the images at the start, then what a segment
    passes on (tokens; with slimming the lives and kept positions too)."""
    done: int
    rows: np.ndarray
    feed: Tuple[np.ndarray, ...]
    criterion: Tuple[np.ndarray, ...] = ()  # PABEE's patience: each image's previous prediction and counter

    def select(self, index: Any) -> 'SessionState':
        """The images ``index`` (a bool mask or indices over ``rows``)."""
        return SessionState(self.done, self.rows[index], tuple(f[index] for f in self.feed),
                            tuple(c[index] for c in self.criterion))

    @staticmethod
    def cat(states: Sequence['SessionState']) -> 'SessionState':
        """One state of the images of ``states``, which must stand at the same point of walks of one setting."""
        points = sorted({(s.done, tuple(f.shape[1:] for f in s.feed + s.criterion)) for s in states})
        if len(points) != 1:
            raise ValueError(f'states concatenate only at one point of a walk (blocks done, shapes), got {points}')
        return SessionState(points[0][0], np.concatenate([s.rows for s in states]),
                            *(tuple(np.concatenate(fs) for fs in zip(*(getattr(s, part) for s in states)))
                              for part in ('feed', 'criterion')))


class SessionStep(NamedTuple):
    """What one step did, as ``timm_exits.models.walker.WalkStep``: the images that reached ``exit_layer`` (``rows``),
    their ``logits`` there, which of them ``leave``, the share of full FLOPs an image leaving here spent (``cost``) and
    the ``state`` of the images that go on (None when none does)."""
    exit_layer: int
    rows: np.ndarray
    logits: np.ndarray
    leave: np.ndarray
    cost: float
    state: Optional[SessionState]


def _fraction(name: str, value: Any, low_open: bool) -> float:
    interval = '(0, 1]' if low_open else '[0, 1]'
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value) or value > 1 or value < 0 or (
            low_open and value == 0):
        raise ValueError(f'{name} must be a number in {interval} or None, got {value!r}')
    return float(value)


class ExitSession:
    """ONNX Runtime session of a ``timm_exits.export`` folder.

    Args:
        folder: The export folder (``manifest.json`` and the graphs it lists).
        providers: onnxruntime execution providers (default: CPU; e.g. ``['CUDAExecutionProvider',
            'CPUExecutionProvider']``).
        session_options: ``onnxruntime.SessionOptions`` for every graph, used as given (default:
            ``default_session_options()``, onnxruntime's defaults without thread-pool spinning; set
            ``session.intra_op.allow_spinning`` to '0' on your own options to keep consecutive segments fast).

    Raises:
        FileNotFoundError: No manifest (not an export folder, or an export that did not finish) or a missing graph.
        ValueError: A manifest of another format, a graph of another export (its export id differs) or of another
            size than the manifest records.
    """

    def __init__(self, folder: Union[str, Path], providers: Optional[Sequence[str]] = None,
                 session_options: Any = None) -> None:
        import onnxruntime as ort
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f'{self.folder} has no {MANIFEST}: not a timm_exits export folder, or an export that did not finish '
                f'(python -m timm_exits.export writes it last)')
        try:
            manifest = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f'{path} is not valid JSON ({e}); export the model again') from e
        if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
            raise ValueError(
                f'{path}: export format {manifest.get("format") if isinstance(manifest, dict) else None!r} is not '
                f'supported by this timm_exits (format {FORMAT}); export the model again with this version')
        self.manifest = manifest
        files = manifest.get('files', {})
        for name, info in files.items():
            file = self.folder / name
            if not file.is_file():
                raise FileNotFoundError(f'{self.folder}: graph {name} listed in {MANIFEST} is missing; export again')
            if file.stat().st_size != info['bytes']:
                raise ValueError(f'{self.folder}: {name} has {file.stat().st_size} bytes, the manifest records '
                                 f'{info["bytes"]}: it is not the file of this export; export again')
        providers = list(providers or ['CPUExecutionProvider'])
        self.session_options = default_session_options() if session_options is None else session_options

        def session(name: str) -> Any:
            if name not in files:
                raise FileNotFoundError(f'{self.folder}: {MANIFEST} lists no file {name}; export again')
            sess = ort.InferenceSession(str(self.folder / name), sess_options=self.session_options,
                                        providers=providers)
            found = sess.get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY)
            if found != manifest['export_id']:
                raise ValueError(f'{self.folder}: {name} belongs to another export (export id {found}, manifest '
                                 f'{manifest["export_id"]}); do not mix folders, export again')
            return sess

        self.static = manifest['mode'] == 'static'
        if self.static:
            self.graph = session(manifest['graph'])
        else:
            self.segments = [session(s['file']) for s in manifest['segments']]
            self.heads = [session(h['file']) for h in manifest['heads']]
            self.exit_layers: List[int] = list(manifest['exit_layers'])
        self.input_size = tuple(manifest['input_size'])
        self.threshold = manifest.get('default_threshold')
        self.budget = manifest.get('default_budget')

    def _stop(self, costs: Sequence[float], budget: Optional[float]) -> int:
        """Index of the deepest exit whose cost fits ``budget`` (the last without one)."""
        if budget is None:
            return len(costs) - 1
        fits = [k for k, c in enumerate(costs) if c <= budget + 1e-9]
        if not fits:
            cost, k = min((c, k) for k, c in enumerate(costs))
            raise ValueError(f'budget={budget:g} is below the cheapest exit (block {self.exit_layers[k]}, cost '
                             f'{cost:.4f} of the full model); allowed: {cost:.4f} <= budget <= 1')
        return fits[-1]

    def _input(self, x: Any) -> np.ndarray:
        if hasattr(x, 'detach') and hasattr(x, 'cpu'):
            x = x.detach().cpu().float().numpy()
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f'x must hold floating-point images, got dtype {x.dtype}')
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_size:
            raise ValueError(f'x must be images of shape (B, {", ".join(map(str, self.input_size))}) (the exported '
                             f'input size), got {tuple(x.shape)}')
        return np.ascontiguousarray(x, dtype=np.float32)

    def exit_walker(self, threshold: Optional[float] = None, budget: Optional[float] = None) -> 'SessionWalker':
        """The walk of ``session(x, threshold, budget)`` to drive step by step (``SessionWalker``); the export's
        defaults apply.

        Raises:
            ValueError: A ``--static`` export (no exits), a threshold or budget out of range, a budget below the
                cheapest exit.
        """
        if self.static:
            raise ValueError('a --static export has no exits to walk: export without --static for per-image early '
                             'exit')
        return SessionWalker(self, threshold, budget)

    def __call__(self, x: Any, threshold: Optional[float] = None, budget: Optional[float] = None) -> RuntimeOutput:
        """Per-image early exit, as ``forward_dynamic`` of the exported model.

        Args:
            x: (B, C, H, W) float images, NumPy array or torch tensor, at the exported input size.
            threshold: Exit threshold in [0, 1] of the exported criterion (default: the model's); for a regression
                export a finite number >= 0 in target units (PABEE's patience or the predicted scale).
            budget: Share (0, 1] of the full model's FLOPs that no image exceeds, heads on the way included.
        """
        tensor = hasattr(x, 'detach')
        x = self._input(x)
        if self.static:
            if threshold is not None or budget is not None:
                raise ValueError(
                    'a --static export has no exits to choose: its setting (keep rate, budget) was fixed at export; '
                    'threshold and budget must be None (export without --static for per-image early exit)')
            logits = self.graph.run(None, {'input': x})[0]
            m = self.manifest
            exit_layer = np.full(len(x), m['exit_layer'] if m.get('exit_layer') is not None else -1, dtype=np.int64)
            out = RuntimeOutput(logits, exit_layer, np.full(len(x), m['cost'], dtype=np.float32))
        else:
            out = self._staged(x, threshold, budget)
        if tensor:
            import torch
            out = RuntimeOutput(*(torch.from_numpy(v) for v in out))
        return out

    def _staged(self, x: np.ndarray, threshold: Optional[float], budget: Optional[float]) -> RuntimeOutput:
        walker = self.exit_walker(threshold, budget)
        batch = len(x)
        logits_out = np.empty((batch, self.manifest['num_classes']), dtype=np.float32)
        exit_out = np.full(batch, self.exit_layers[walker.stop], dtype=np.int64)
        cost_out = np.empty(batch, dtype=np.float32)
        state = walker.start(x) if batch else None
        while state is not None:
            step = walker.step(state)
            gone = step.rows[step.leave]
            logits_out[gone], exit_out[gone], cost_out[gone] = step.logits[step.leave], step.exit_layer, step.cost
            state = step.state
        return RuntimeOutput(logits_out, exit_out, cost_out)


class SessionWalker:
    """Per-image early exit through a staged export at one setting (``ExitSession.exit_walker``): ``start(x, rows)``
    takes images, ``step(state)`` runs them to the next exit whose head runs and says who leaves there; the images
    of several states at the same point go on together (``SessionState.cat``). ``stop`` is the index of the last exit
    the walk reaches, ``threshold`` the criterion's (None: every image runs to ``stop``)."""

    def __init__(self, session: ExitSession, threshold: Optional[float], budget: Optional[float]) -> None:
        threshold = session.threshold if threshold is None else threshold
        budget = session.budget if budget is None else budget
        self.session = session
        m = session.manifest
        self.threshold = None if threshold is None else self.check_threshold(m, threshold)
        regression = m.get('task', 'classification') == 'regression'
        self.patience = m['exit_patience'] if regression and m['criterion'] == 'patience' else None
        budget = None if budget is None else _fraction('budget', budget, low_open=True)
        if self.threshold is not None and budget is not None and min(m['threshold_costs']) > budget + 1e-9:
            self.threshold = None  # no threshold path fits: the budget alone decides, as in eager forward_dynamic
        self.costs: List[float] = m['exit_costs'] if self.threshold is None else m['threshold_costs']
        self.stop = session._stop(self.costs, budget)

    @staticmethod
    def check_threshold(manifest: Dict[str, Any], threshold: Any) -> float:
        """A threshold of the export's task: in [0, 1], or a finite number >= 0 in target units for regression."""
        if manifest.get('task', 'classification') != 'regression':
            return _fraction('threshold', threshold, low_open=False)
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 <= threshold < math.inf:
            raise ValueError(f"threshold must be a finite number >= 0 in target units (task='regression', "
                             f"criterion={manifest['criterion']!r}) or None, got {threshold!r}")
        return float(threshold)

    def start(self, x: Any, rows: Any = None) -> SessionState:
        """Images x (B, C, H, W) at the start of the walk; ``rows`` their ids (default 0..B-1)."""
        x = self.session._input(x)
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        patience = () if self.patience is None else (  # no previous prediction yet (NaN never agrees), counter 0
            np.full((len(x), self.session.manifest['num_classes']), np.nan, dtype=np.float32), np.zeros(len(x)))
        return SessionState(0, rows, (x,), patience)

    def step(self, state: SessionState) -> SessionStep:
        """Run the images of ``state`` to the next exit whose head runs; who leaves there and who goes on."""
        session, layers = self.session, self.session.exit_layers
        k = 0 if state.done == 0 else layers.index(state.done) + 1
        if k > self.stop:
            raise ValueError(f'the walk is over: the state has run {state.done} blocks, the last exit is '
                             f'{layers[self.stop]}')
        feed = state.feed
        while True:
            inputs = session.manifest['segments'][k].get('inputs', ['input'])
            feed = tuple(session.segments[k].run(None, dict(zip(inputs, feed))))
            if k == self.stop or self.threshold is not None:
                break
            k += 1
        logits, score = session.heads[k].run(None, {'input': feed[0]})
        criterion = state.criterion
        if self.patience is not None and self.threshold is not None:  # PABEE: the last exits agree within tau
            prev, count = criterion
            agree = np.abs(logits - prev).max(-1) <= np.float32(self.threshold)  # NaN (first exit): False
            count = np.where(agree, count + 1, 0)
            criterion, leave = (logits, count), count >= self.patience
        elif self.threshold is not None:
            leave = score >= self.threshold if session.manifest['confident_high'] else score <= self.threshold
        if k == self.stop:
            leave = np.ones(len(state.rows), dtype=bool)
        stay = ~leave
        going = SessionState(layers[k], state.rows[stay], tuple(f[stay] for f in feed),
                             tuple(c[stay] for c in criterion)) if stay.any() else None
        return SessionStep(layers[k], state.rows, logits, leave, self.costs[k], going)
