""" One per-image exit walker for every family: exit criteria, the walk's state and its step.

A walk runs images from the embedding, segment by segment (the blocks between two exits), through the exits of a
multi-exit model (with or without LifeRegress slimming): at each exit whose head runs, the images whose criterion
passes leave with their answer and only the others go on, their state with them (tokens, the predicted lives and
kept positions of their patches, whose rotary rows follow, and a criterion's own state). ``forward_dynamic``,
``forward_anytime`` and deadlines are loops over ``ExitWalker.step``; a server drives the step itself::

    walker = model.exit_walker(threshold=0.9)             # one setting: threshold, budget, keep rate, input size
    waiting = [walker.start(images, rows=request_ids)]   # images embedded, at the start of the walk
    step = walker.step(WalkState.cat(waiting))          # the next segment for every image at this point
    answers = step.rows[step.leave], step.logits[step.leave]
    state = step.state                                  # who goes on (None: nobody); concatenate it with others

Images that entered at different times concatenate as soon as they stand at the same point (``WalkState.done``);
``WalkState.select`` splits a state. Early exit is per image (002_*.txt): what an image gets never depends on the
images it walks with.

Criteria are small objects: ``ExitCriterion`` subclasses, one class each (``register_criterion``), with an optional
per-image state carried by the walk (a criterion that compares an exit with the previous one, e.g.). A criterion
serves one ``task``: classification criteria read logits (``CRITERIA``), regression criteria read predicted values in
target units and, when ``learned``, the exit's predicted scale (``REGRESSION_CRITERIA``: PABEE's ``patience``, the
scale's ``uncertainty``).
"""
import math
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

__all__ = [
    'CRITERIA', 'REGRESSION_CRITERIA', 'TASKS', 'AnytimeStep', 'ConfidenceCriterion', 'EntropyCriterion',
    'ExitCriterion', 'ExitOutput', 'ExitWalker', 'PatienceCriterion', 'ScaleCriterion', 'UncertaintyCriterion',
    'WalkState', 'WalkStep', 'criteria_for', 'criterion', 'register_criterion',
]

TASKS = ('classification', 'regression')


class ExitOutput(NamedTuple):
    """Result of ``forward_dynamic``: per image, logits, 1-based block after which it exited, share of full FLOPs."""
    logits: torch.Tensor
    exit_layer: torch.Tensor
    cost: torch.Tensor


class AnytimeStep(NamedTuple):
    """One exit of ``forward_anytime``: the block it follows, the images still running there (``rows``, indices into
    the batch) with that exit's ``logits``, which of them leave here (``exited``: their criterion passed, or the final
    exit), and the share of full FLOPs an image has spent on reaching this answer (every head on the way)."""
    exit_layer: int
    rows: torch.Tensor
    logits: torch.Tensor
    exited: torch.Tensor
    cost: float


# --- criteria -----------------------------------------------------------------------------------------------------

class ExitCriterion:
    """When an image leaves an exit. ``scores`` is the value compared with the threshold (``higher_leaves``: leave
    when it is >= the threshold, else <=); ``learned`` criteria read the exit's uncertainty unit (eq. 3, 000_*.txt),
    whose FLOPs are counted with the exit. A criterion with a per-image state (``initial_state`` not None) gets it
    back in ``decide``, and the walk carries it with the images that go on. ``task``: the models it serves; a
    regression criterion gets the exit's predicted values as ``logits`` and, as ``unit``, its predicted scale (B, K)
    when ``learned`` (None otherwise); its threshold is in target units (any finite number >= 0)."""
    name: str = ''
    task: str = 'classification'
    higher_leaves: bool = False
    learned: bool = False

    def scores(self, logits: torch.Tensor, unit: nn.Module) -> torch.Tensor:
        """Per image, the value compared with the threshold."""
        raise NotImplementedError(f'{type(self).__name__} defines scores')

    def leaves(self, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return scores >= threshold if self.higher_leaves else scores <= threshold

    def initial_state(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """Per-image state at the start of the walk (None: the criterion keeps none)."""
        return None

    def decide(
            self,
            logits: torch.Tensor,
            unit: nn.Module,
            threshold: float,
            state: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Which images leave at this exit, and the state of every image after it."""
        return self.leaves(self.scores(logits, unit), threshold), state


class ConfidenceCriterion(ExitCriterion):
    """Max softmax probability >= threshold."""
    name, higher_leaves = 'confidence', True

    def scores(self, logits: torch.Tensor, unit: nn.Module) -> torch.Tensor:
        return logits.float().softmax(-1).amax(-1)


class EntropyCriterion(ExitCriterion):
    """Entropy of the softmax over log(num_classes) <= threshold."""
    name = 'entropy'

    def scores(self, logits: torch.Tensor, unit: nn.Module) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return entropy / math.log(max(probs.shape[-1], 2))


class UncertaintyCriterion(ExitCriterion):
    """MEViT's predicted uncertainty u_i = sigmoid(w^T f_i + b) (eq. 3, 000_*.txt) <= threshold."""
    name, learned = 'uncertainty', True

    def scores(self, logits: torch.Tensor, unit: nn.Module) -> torch.Tensor:
        return torch.sigmoid(unit(logits).squeeze(-1))


class PatienceCriterion(ExitCriterion):
    """PABEE's regression rule: a per-image counter of consecutive exits whose prediction differs from the previous
    exit's by at most ``threshold`` (target units, the largest difference over the outputs), reset when it differs
    more; an image leaves when the counter reaches ``patience``, i.e. when its last ``patience + 1`` exits agree,
    each with the one before it. The state (b, K + 1) carries the previous exit's prediction and the counter."""
    name, task = 'patience', 'regression'

    def __init__(self, patience: int = 1) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f'exit_patience must be an integer >= 1 (consecutive agreeing exits), got {patience!r}')
        self.patience = patience

    def scores(self, logits: torch.Tensor, unit: Optional[torch.Tensor]) -> torch.Tensor:
        raise ValueError('the patience criterion compares an exit with the previous one: its scores need the walk\'s '
                         'state (decide), not one exit\'s output')

    def initial_state(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        return torch.zeros(batch, 0, device=device)  # widened to (b, K + 1) at the first exit (K unknown here)

    def decide(
            self,
            logits: torch.Tensor,
            unit: Optional[torch.Tensor],
            threshold: float,
            state: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        values = logits.float()
        if state is None or state.shape[-1] == 0:  # the first exit: nothing to agree with
            count = torch.zeros(values.shape[0], 1, device=values.device)
        else:
            agree = (values - state[:, :-1]).abs().amax(-1, keepdim=True) <= threshold
            count = torch.where(agree, state[:, -1:] + 1, torch.zeros_like(state[:, -1:]))
        return count.squeeze(-1) >= self.patience, torch.cat([values, count], -1)


class ScaleCriterion(ExitCriterion):
    """Regression counterpart of MEViT's u_i (eq. 3, 000_*.txt): each exit predicts a scale s_i (Laplace b or
    Gaussian sigma, target units) beside its value, trained by a negative log-likelihood; an image leaves when its
    largest scale over the outputs is <= threshold."""
    name, task, learned = 'uncertainty', 'regression', True

    def scores(self, logits: torch.Tensor, unit: Optional[torch.Tensor]) -> torch.Tensor:
        if unit is None:
            raise ValueError('the regression uncertainty criterion needs the exit\'s predicted scale')
        return unit.float().amax(-1)


CRITERIA: Dict[str, Type[ExitCriterion]] = {}
REGRESSION_CRITERIA: Dict[str, Type[ExitCriterion]] = {}
_INSTANCES: Dict[Tuple[str, str, int], ExitCriterion] = {}  # criteria keep no per-model state: one object serves all


def register_criterion(cls: Type[ExitCriterion]) -> Type[ExitCriterion]:
    """Class decorator: ``exit_criterion=cls.name`` builds models of ``cls.task`` with this criterion."""
    if not cls.name:
        raise ValueError(f'{cls.__name__} needs a name to be registered')
    if cls.task not in TASKS:
        raise ValueError(f'{cls.__name__}.task must be one of {list(TASKS)}, got {cls.task!r}')
    criteria_for(cls.task)[cls.name] = cls
    return cls


def criteria_for(task: str) -> Dict[str, Type[ExitCriterion]]:
    """The registered criteria of ``task`` ('classification' or 'regression'), by name."""
    if task not in TASKS:
        raise ValueError(f'task must be one of {list(TASKS)}, got {task!r}')
    return CRITERIA if task == 'classification' else REGRESSION_CRITERIA


def criterion(name: str, task: str = 'classification', patience: int = 1) -> ExitCriterion:
    """The registered criterion ``name`` of ``task`` (``patience``: the count of PABEE's rule, 'patience' only)."""
    cls = criteria_for(task)[name]
    if cls is PatienceCriterion and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f'exit_patience must be an integer >= 1 (consecutive agreeing exits), got {patience!r}')
    key = (task, name, patience if cls is PatienceCriterion else 0)
    if key not in _INSTANCES:
        _INSTANCES[key] = cls(patience) if cls is PatienceCriterion else cls()
    return _INSTANCES[key]


for _cls in (ConfidenceCriterion, EntropyCriterion, UncertaintyCriterion, PatienceCriterion, ScaleCriterion):
    register_criterion(_cls)


# --- the walk -----------------------------------------------------------------------------------------------------

class WalkState(NamedTuple):
    """Images at one point of a walk: ``done`` blocks run, their ids ``rows`` (the caller's), ``tokens`` (b, L, D),
    with slimming the predicted ``lives`` (b, n) of the patches still running and their positions ``kept`` (b, n)
    in the full grid (None before the life layer / the first prune), and the criterion's state (None without one)."""
    done: int
    rows: torch.Tensor
    tokens: torch.Tensor
    lives: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None
    criterion: Optional[torch.Tensor] = None

    def select(self, index: torch.Tensor) -> 'WalkState':
        """The images ``index`` (a bool mask or indices over ``rows``)."""
        return WalkState(self.done, *(None if t is None else t[index] for t in self[1:]))

    @staticmethod
    def cat(states: Sequence['WalkState']) -> 'WalkState':
        """One state of the images of ``states``, which must stand at the same point of walks of one setting."""
        states = list(states)
        if not states:
            raise ValueError('WalkState.cat needs at least one state')
        first = states[0]
        for s in states[1:]:
            if s.done != first.done or s.tokens.shape[1:] != first.tokens.shape[1:] or any(
                    (a is None) != (b is None) for a, b in zip(s[3:], first[3:])):
                raise ValueError(
                    f'states concatenate only at the same point of a walk of one setting: done={s.done} with '
                    f'{tuple(s.tokens.shape[1:])} tokens vs done={first.done} with {tuple(first.tokens.shape[1:])}')
        if len(states) == 1:
            return first
        columns = zip(*(s[1:] for s in states))
        return WalkState(first.done, *(None if ts[0] is None else torch.cat(ts) for ts in columns))


class WalkStep(NamedTuple):
    """What one step did: the images that reached ``exit_layer`` (``rows``), their ``logits`` there (None where no
    head ran: no image leaves), which of them ``leave`` (bool), the share of the parent's FLOPs an image leaving here
    spent (``cost``), and the ``state`` of the images that go on (None when none does)."""
    exit_layer: int
    rows: torch.Tensor
    logits: Optional[torch.Tensor]
    leave: torch.Tensor
    cost: float
    state: Optional[WalkState]


@torch.compiler.disable  # the host sync of an exit: under torch.compile, no graph break inside a segment
def _going_on(state: WalkState, leave: torch.Tensor) -> Optional[WalkState]:
    """The state of the images that do not leave (None when every image leaves)."""
    if not bool(leave.any()):
        return state
    stay = ~leave
    return state.select(stay) if bool(stay.any()) else None


class ExitWalker:
    """Per-image early exit of a multi-exit model at one setting (``model.exit_walker(...)`` builds it from the call's
    arguments): exits ``exit_layers`` up to ``stop``, ``threshold`` of the model's criterion (None: no image leaves
    before ``stop``), ``costs`` per exit (what an image leaving there spent), the token schedule ``counts`` with the
    target mean and std of the lives (slimming; None: every patch), a ``deadline`` in ``time.perf_counter()``
    seconds after which every image still running answers at the next exit, and ``every_head`` (anytime: each exit's
    answer for every image), at input size ``img_size``. Under torch.compile each segment is one graph and the exit
    decision the only host sync.
    """

    def __init__(
            self,
            model: nn.Module,
            threshold: Optional[float],
            stop: int,
            costs: Dict[int, float],
            counts: Optional[Sequence[int]] = None,
            mu: float = 0.,
            sigma: float = 1.,
            deadline: Optional[float] = None,
            every_head: bool = False,
            grid: Optional[Tuple[int, int]] = None,
            img_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        self.model, self.threshold, self.stop, self.costs = model, threshold, stop, costs
        self.counts = None if counts is None or counts[-1] == counts[0] else list(counts)  # nothing dropped: no life
        self.mu, self.sigma, self.deadline, self.every_head, self.grid = mu, sigma, deadline, every_head, grid
        self.img_size = model._input_size() if img_size is None else img_size
        self.exit_layers = tuple(layer for layer in model.exit_layers if layer <= stop)
        # each exit's head (None: the final norm and head) and uncertainty unit, the modules in exit order
        self.heads = dict(zip(model.exit_layers, zip([*model.exits.values(), None], model.uncertainty.values())))
        self.ropes: Optional[List[Optional[torch.Tensor]]] = None

    @property
    def single_path(self) -> bool:
        """Every image takes the same path (no threshold, deadline or anytime answers): one segment to ``stop``."""
        return self.threshold is None and self.deadline is None and not self.every_head

    def start(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> WalkState:
        """Embed images x (B, C, H, W): their state at the start of the walk; ``rows`` their ids (default 0..B-1)."""
        tokens, rope = self.model._embed(x)
        if self.ropes is None:  # the rotary rows of the full grid, alike for every image of this size
            self.ropes = [self.model._block_rope(rope, i) for i in range(self.model.depth)]
        rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
        return WalkState(0, rows, tokens, criterion=self.model.criterion.initial_state(x.shape[0], x.device))

    def _segment_args(self, state: WalkState, layer: int, with_head: bool, threshold: Optional[float]) -> Tuple:
        """Arguments of ``model._segment`` from the point of ``state`` to the exit after block ``layer``."""
        model, start = self.model, state.done
        if self.ropes is None:  # a state started by another walker of this setting: the rows of an empty image
            with torch.no_grad():
                self.start(state.tokens.new_zeros(1, model._in_chans(), *self.img_size))
        counts, life_at = None, -1
        if self.counts is not None:
            counts = self.counts[start:layer]
            life_at = model.life_layer - start if state.lives is None and start <= model.life_layer < layer else -1
        head, unit = self.heads[layer]
        blocks = list(model._exit_blocks())[start:layer]
        return (state.tokens, state.lives, state.kept, blocks, self.ropes[start:layer], counts, life_at, self.mu,
                self.sigma, head, unit, self.grid, threshold, state.criterion, with_head)

    @torch._dynamo.disable(recursive=False)  # the host-side set-up stays eager; torch.compile compiles the segment
    def _segment_to(self, state: WalkState, layer: int, with_head: bool, threshold: Optional[float]) -> Tuple:
        return self.model._segment(*self._segment_args(state, layer, with_head, threshold))

    @torch._dynamo.disable(recursive=False)  # the host-side step stays eager; torch.compile compiles each segment
    def step(self, state: WalkState) -> WalkStep:
        """Run the images of ``state`` to the next exit whose head runs (or whose deadline is checked), and return
        who leaves there with their answers and the state of who goes on."""
        layer = next((e for e in self.exit_layers if e > state.done and (
            e == self.stop or not self.single_path)), None)
        if layer is None:
            raise ValueError(f'the walk is over: the state has run {state.done} blocks, the last exit is {self.stop}')
        torch._dynamo.decorators.mark_unbacked(state.tokens, 0)  # one graph for any number of images running
        with_head = layer == self.stop or self.threshold is not None or self.every_head
        threshold = None if layer == self.stop else self.threshold
        x, lives, kept, logits, leave, crit = self._segment_to(state, layer, with_head, threshold)
        late = self.deadline is not None and time.perf_counter() >= self.deadline
        moved = WalkState(layer, state.rows, x, lives, kept, crit)
        if logits is None and late:  # the deadline passed: every image answers here
            logits = self._segment_to(moved, layer, True, None)[3]
        rows, cost = state.rows, self.costs[layer]
        if layer == self.stop or late:
            return WalkStep(layer, rows, logits, torch.ones_like(rows, dtype=torch.bool), cost, None)
        if leave is None:
            return WalkStep(layer, rows, logits, torch.zeros_like(rows, dtype=torch.bool), cost, moved)
        return WalkStep(layer, rows, logits, leave, cost, _going_on(moved, leave))

    def run(self, x: torch.Tensor) -> ExitOutput:
        """``forward_dynamic``: every image's answer, the exit it took and its cost."""
        if self.single_path:  # one path for every image: tracers (jit.trace, ONNX, torch.export) record it faithfully
            state = self.start(x)
            logits = self.model._segment(*self._segment_args(state, self.stop, True, None))[3]
            batch = x.shape[0]
            return ExitOutput(
                logits,
                torch.full((batch,), self.stop, dtype=torch.long, device=x.device),
                torch.full((batch,), self.costs[self.stop], dtype=torch.float32, device=x.device),
            )
        return self._loop(x)

    @torch._dynamo.disable(recursive=False)  # the host-side loop stays eager
    def _loop(self, x: torch.Tensor) -> ExitOutput:
        batch = x.shape[0]
        state: Optional[WalkState] = self.start(x)
        out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        while state is not None:
            step = self.step(state)
            state = step.state
            if step.logits is None:
                continue
            if out is None:  # allocated at the first answer, in the logits' dtype (autocast)
                out = (step.logits.new_empty(batch, step.logits.shape[-1]),
                       torch.full((batch,), step.exit_layer, dtype=torch.long, device=x.device),
                       torch.empty(batch, dtype=torch.float32, device=x.device))
            _write(out, step)
        if out is None:
            raise RuntimeError('no exit evaluated')
        return ExitOutput(*out)

    def anytime(self, x: torch.Tensor) -> Iterator[AnytimeStep]:
        """``forward_anytime``: each exit's answer for the images still running there."""
        state: Optional[WalkState] = self.start(x)
        while state is not None:
            step = self.step(state)
            state = step.state
            yield AnytimeStep(step.exit_layer, step.rows, step.logits, step.leave, step.cost)


@torch.compiler.disable
def _write(out: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], step: WalkStep) -> None:
    """Write the answers of the images that leave at ``step`` into ``out`` (logits, exit layer, cost)."""
    logits_out, exit_out, cost_out = out
    logits = step.logits.to(logits_out.dtype)
    if step.state is None:  # every image running leaves here
        logits_out[step.rows], exit_out[step.rows], cost_out[step.rows] = logits, step.exit_layer, step.cost
    elif bool(step.leave.any()):
        gone = step.rows[step.leave]
        logits_out[gone], exit_out[gone], cost_out[gone] = logits[step.leave], step.exit_layer, step.cost
