""" Bulk inference: every image of a folder, a list or a table answered at its exit, written to one Parquet file.

    python -m timm_exits.infer --checkpoint CK --data-dir DIR --output OUT.parquet [--ray [--ray-address ADDR]]

One row per image: ``path``, its top-k classes (``indices``, ``labels``, ``probabilities``; a regression model's
``values`` instead), ``exit_layer`` (the block after which it left; the model's depth without exits), ``cost`` (its
share of the full model's FLOPs) and ``error`` (null, or why the image could not be read: the run goes on). The
model answers at the checkpoint's calibrated point (``timm_exits.calibrate``) unless ``--threshold`` / ``--budget``
/ ``--keep-rate`` say otherwise; images are preprocessed with the one resolution of the data config
(``timm_exits.data.resolve_data_cfg``: what the checkpoint records, else the model's pretrained cfg), as validate does.

Resumable: rows are written in parts (``OUT.parquet.parts/part-00000.parquet``, ``--part-size`` images each, every
part written atomically beside the run's ``settings.json``) and combined into ``OUT.parquet`` at the end. A killed run
started again with the same settings computes only the parts that are missing: no row is lost or written twice. An
existing output, or parts of a run with other settings, is refused unless ``--overwrite``.

``--ray`` runs the model on Ray Data (``map_batches`` over an actor pool of ``--ray-actors`` replicas of the model) on
a local Ray, or on the cluster at ``--ray-address``; the rows are the same as in-process (``pip install
"timm-exits[ray]"``).
"""
import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ._files import atomic_write
from .data import available_cpus, build_transform, resolve_data_cfg
from .models import LifeRegressMixin, MultiExitLifeRegressMixin, MultiExitMixin
from .validate import _create_model, _int_at_least, _load_weights, _model_arguments, _number, callable_module, \
    run_command

__all__ = ['SETTINGS', 'Runner', 'infer', 'main', 'read_inputs']

_logger = logging.getLogger(__name__)

FORMAT = 1
SETTINGS = 'settings.json'
PART = 'part-{:05d}.parquet'
TABLE_SUFFIXES = ('.parquet', '.csv')


def _image_extensions() -> Tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return IMG_EXTENSIONS


def read_inputs(source: Union[str, Path], path_column: str = 'path') -> Tuple[List[str], List[str]]:
    """``(paths as written in the rows, paths to open)`` of ``source``: a folder (its image files, recursively, sorted;
    written relative to it), a list file (one path a line; blank lines and ``#`` comments skipped) or a ``.parquet`` /
    ``.csv`` table with the column ``path_column``. Relative paths of a list or table are opened from its folder.

    Raises:
        ValueError: ``source`` does not exist, holds no image / no path, or a table lacks ``path_column``.
    """
    source = str(source)
    if os.path.isdir(source):
        extensions = _image_extensions()
        found = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(extensions)]
        if not found:
            raise ValueError(f'--data-dir {source!r} holds no image ({", ".join(extensions)}), nested or flat')
        return [os.path.relpath(f, source) for f in found], [os.path.abspath(f) for f in found]
    if not os.path.isfile(source):
        raise ValueError(f'--data-dir {source!r} is neither a folder of images nor a list or table file')
    if source.lower().endswith(TABLE_SUFFIXES):
        paths = _table_paths(source, path_column)
    else:
        with open(source, encoding='utf-8') as f:
            paths = [line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')]
    if not paths:
        raise ValueError(f'--data-dir {source!r} lists no image path')
    base = os.path.dirname(os.path.abspath(source))
    return paths, [p if os.path.isabs(p) else os.path.join(base, p) for p in paths]


def _table_paths(source: str, path_column: str) -> List[str]:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(source) if source.lower().endswith('.parquet') else pcsv.read_csv(source)
    except Exception as e:  # pyarrow's own errors (ArrowInvalid, ...) and OSError
        raise ValueError(f'--data-dir {source!r} is not a readable table ({type(e).__name__}: {e})') from e
    if path_column not in table.column_names:
        raise ValueError(f'--path-column {path_column!r} is not a column of {source!r}; its columns: '
                         f'{table.column_names}')
    paths = table.column(path_column).to_pylist()
    bad = [i for i, p in enumerate(paths) if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f'--path-column {path_column!r} of {source!r}: row {bad[0]} holds no path ({paths[bad[0]]!r})')
    return paths


def _label_names(model: torch.nn.Module) -> List[str]:
    """Class names: ImageNet's descriptions for a model with ImageNet's classes, else the class indices."""
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset(model)
    if subset is not None and ImageNetInfo(subset).num_classes() == model.num_classes:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(model.num_classes)]
    return [str(i) for i in range(model.num_classes)]


class Runner:
    """The model of ``spec`` (checkpoint, model, threshold, budget, keep rate, top-k, device) and its preprocessing;
    ``runner(batch)`` answers a batch of ``{'index', 'path', 'open'}`` columns with a ``pyarrow.Table`` of rows (the
    callable Ray Data's ``map_batches`` runs in each actor)."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        from .models._checkpoint import read_checkpoint
        self.spec = spec
        args = argparse.Namespace(model=spec.get('model'), model_kwargs=dict(spec.get('model_kwargs') or {}),
                                  num_classes=None, checkpoint=spec['checkpoint'], in_chans=None)
        try:
            state_dict, recorded = read_checkpoint(spec['checkpoint'], prefer_ema=True)
        except FileNotFoundError as e:
            raise ValueError(f'--checkpoint: {e}') from e
        name, kwargs = _model_arguments(args, recorded)
        model = _create_model(name, False, kwargs)
        _load_weights(model, spec['checkpoint'], state_dict, recorded)
        if spec.get('in_actor') and spec.get('torch_threads'):  # a Ray actor: as many threads as its CPUs
            torch.set_num_threads(spec['torch_threads'])
        self.name, self.device = name, torch.device(spec.get('device', 'cpu'))
        self.model = model.to(self.device).eval()
        self.data_config = resolve_data_cfg(model, None, recorded, flags=False)
        if self.data_config.counting and self.data_config.counting.get('crop'):
            raise ValueError(f'--checkpoint: it counts crops ({self.data_config.counting}: an image\'s count is the sum '
                             'of its crops\'), and infer answers one model input per image; count such images with '
                             'python -m timm_exits.validate --dataset counting')
        self.transform = build_transform(model, False, data_config=self.data_config)
        self.mode = 'RGB' if self.data_config['input_size'][0] == 3 else 'L'
        self.regression = getattr(model, 'task', 'classification') == 'regression'
        self.labels = None if self.regression else _label_names(model)
        self.top_k = min(int(spec.get('top_k', 5)), model.num_classes or 1)
        self.depth = len(model.blocks) if hasattr(model, 'blocks') else -1
        self._check_setting()

    def _check_setting(self) -> None:
        """Refuse a setting the model does not have, then run it once on a blank image (its own checks, e.g. a
        budget below the cheapest exit), before any row is written."""
        model, spec = self.model, self.spec
        exits = isinstance(model, MultiExitMixin)
        slims = isinstance(model, (LifeRegressMixin, MultiExitLifeRegressMixin))
        if spec.get('threshold') is not None and not exits:
            raise ValueError(f'--threshold applies to a multi-exit model; {self.name} has no exits')
        if spec.get('budget') is not None and not (exits or slims):
            raise ValueError(f'--budget applies to a multi-exit or LifeRegress model; {self.name} has neither')
        if spec.get('keep_rate') is not None and not slims:
            raise ValueError(f'--keep-rate applies to a model with patch slimming; {self.name} has none')
        self.forward(torch.zeros(1, *self.data_config['input_size'], device=self.device))

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(outputs, exit layer, cost) per image at the run's setting (the model's calibrated defaults where None)."""
        model, spec = self.model, self.spec
        threshold, budget, keep_rate = spec.get('threshold'), spec.get('budget'), spec.get('keep_rate')
        if isinstance(model, MultiExitLifeRegressMixin):
            out = model.forward_dynamic(x, threshold=threshold, budget=budget, keep_rate=keep_rate)
        elif isinstance(model, MultiExitMixin):
            out = model.forward_dynamic(x, threshold=threshold, budget=budget)
        else:
            if isinstance(model, LifeRegressMixin):
                logits = model(x, keep_rate=keep_rate, budget=budget)
                cost = model.flops_ratio(model.resolve_keep_rate(keep_rate, budget))
            else:
                logits, cost = model(x), 1.
            n = len(x)
            return logits, torch.full((n,), self.depth, dtype=torch.long), torch.full((n,), cost)
        return out.logits, out.exit_layer, out.cost

    def load(self, path: str) -> torch.Tensor:
        """The model's input of one image file. Raises ValueError saying why it cannot be read."""
        from PIL import Image
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f'not a readable image ({type(e).__name__}: {e})') from e
        return self.transform(img)

    def answer(self, index: Sequence[int], path: Sequence[str], x: Optional[torch.Tensor],
               errors: Sequence[Optional[str]]) -> Any:
        """Rows of a batch: ``x`` holds the images whose ``errors`` entry is None, in order."""
        import pyarrow as pa
        n, ok = len(index), [i for i, e in enumerate(errors) if e is None]
        cols: Dict[str, List[Any]] = {k: [None] * n for k in self.columns()}
        cols.update(index=[int(i) for i in index], path=[str(p) for p in path], error=list(errors))
        if ok:
            outputs, exit_layer, cost = self.forward(x.to(self.device))
            outputs, exit_layer, cost = outputs.float().cpu(), exit_layer.cpu().tolist(), cost.float().cpu().tolist()
            if not self.regression:
                probs, idx = outputs.softmax(-1).topk(self.top_k, dim=-1)
            for j, i in enumerate(ok):
                cols['exit_layer'][i], cols['cost'][i] = int(exit_layer[j]), float(cost[j])
                if self.regression:
                    cols['values'][i] = outputs[j].tolist()
                else:
                    cols['indices'][i] = idx[j].tolist()
                    cols['labels'][i] = [self.labels[k] for k in cols['indices'][i]]
                    cols['probabilities'][i] = probs[j].tolist()
        return pa.table(cols, schema=self.schema())

    def columns(self) -> List[str]:
        outputs = ['values'] if self.regression else ['indices', 'labels', 'probabilities']
        return ['index', 'path', *outputs, 'exit_layer', 'cost', 'error']

    def schema(self) -> Any:
        import pyarrow as pa
        types = {'index': pa.int64(), 'path': pa.string(), 'values': pa.list_(pa.float32()),
                 'indices': pa.list_(pa.int64()), 'labels': pa.list_(pa.string()),
                 'probabilities': pa.list_(pa.float32()), 'exit_layer': pa.int64(), 'cost': pa.float32(),
                 'error': pa.string()}
        return pa.schema([(k, types[k]) for k in self.columns()])

    def __call__(self, batch: Dict[str, Any]) -> Any:
        """Ray Data's batch (columns ``index``, ``path``, ``open``) to rows: each image read here."""
        images, errors = [], []
        for file in batch['open']:
            try:
                images.append(self.load(str(file)))
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        x = torch.stack(images) if images else None
        return self.answer(list(batch['index']), list(batch['path']), x, errors)


class _Images(torch.utils.data.Dataset):
    """(index, path, image or None, error or None) of the images to run, read in DataLoader workers."""

    def __init__(self, runner: Runner, items: Sequence[Tuple[int, str, str]]) -> None:
        self.load, self.items = runner.load, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[int, str, Optional[torch.Tensor], Optional[str]]:
        index, path, file = self.items[i]
        try:
            return index, path, self.load(file), None
        except ValueError as e:
            return index, path, None, str(e)


def _collate(batch: List[Tuple[int, str, Optional[torch.Tensor], Optional[str]]]) -> Tuple[Any, ...]:
    images = [b[2] for b in batch if b[2] is not None]
    return [b[0] for b in batch], [b[1] for b in batch], torch.stack(images) if images else None, [b[3] for b in batch]


def _local_tables(runner: Runner, items: Sequence[Tuple[int, str, str]], batch_size: int,
                  workers: int) -> Iterator[Any]:
    loader = torch.utils.data.DataLoader(_Images(runner, items), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate)
    for index, path, x, errors in loader:
        yield runner.answer(index, path, x, errors)


def _connect_ray(address: Optional[str]) -> bool:
    """Connect to the Ray at ``address`` (None: start a local one) unless this process already is; True when this
    call connected (and the run disconnects at its end). An address nothing listens at is a ValueError at once
    (``ray.init`` would wait minutes)."""
    import ray
    if address and address != 'auto':
        host, _, port = address.split('://', 1)[-1].rpartition(':')
        try:
            socket.create_connection((host or '127.0.0.1', int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise ValueError(f'--ray-address {address!r} does not answer ({type(e).__name__}: {e}); give the '
                             f'address of a running Ray head (host:port, ray://host:port or auto), or leave it out '
                             f'for a local Ray') from e
    if ray.is_initialized():
        return False
    runtime_env = None if address else {'env_vars': {'PYTHONPATH': str(Path(__file__).resolve().parent.parent)}}
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    return True


def _ray_tables(spec: Dict[str, Any], items: Sequence[Tuple[int, str, str]], batch_size: int,
                actors: int) -> Iterator[Any]:
    """The rows of ``items`` from Ray Data: ``map_batches`` with ``Runner`` on a pool of ``actors`` actors."""
    import ray
    ds = ray.data.from_items([{'index': i, 'path': p, 'open': f} for i, p, f in items],
                             override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    ds = ds.map_batches(Runner, fn_constructor_kwargs={'spec': {**spec, 'in_actor': True}}, batch_size=batch_size,
                        concurrency=actors, num_cpus=spec.get('torch_threads') or 1)
    yield from ds.iter_batches(batch_size=None, batch_format='pyarrow')


def _settings(spec: Dict[str, Any], runner: Runner, files: Sequence[str], part_size: int) -> Dict[str, Any]:
    """What the rows depend on: a partial run resumes only under the same settings."""
    checkpoint = Path(spec['checkpoint']).resolve()
    stat = checkpoint.stat()
    settings = {
        'format': FORMAT, 'checkpoint': str(checkpoint), 'checkpoint_bytes': stat.st_size,
        'checkpoint_mtime_ns': stat.st_mtime_ns, 'model': runner.name, 'model_kwargs': spec.get('model_kwargs') or {},
        'threshold': spec.get('threshold'), 'budget': spec.get('budget'), 'keep_rate': spec.get('keep_rate'),
        'calibration': getattr(runner.model, 'calibration', None), 'top_k': runner.top_k,
        'data_config': runner.data_config.record(), 'images': len(files), 'part_size': part_size,
        'files_sha256': hashlib.sha256('\n'.join(files).encode()).hexdigest(),
    }
    return json.loads(json.dumps(settings, default=str))


def _prepare(output: Path, settings: Dict[str, Any], overwrite: bool) -> Path:
    """The parts folder of ``output``: this run's own partial output (same settings: resumed), or a new one; an
    existing output or another run's parts are refused unless ``overwrite``."""
    from ._files import atomic_dir
    parts = output.with_name(output.name + '.parts')
    if output.is_dir():
        raise ValueError(f'--output {str(output)!r} is a folder; give the path of the Parquet file to write')
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
    elif parts.is_dir():
        try:
            old = json.loads((parts / SETTINGS).read_text())
        except (OSError, ValueError):
            old = {}
        differ = sorted(k for k in {*settings, *old} if old.get(k) != settings.get(k))
        if differ:
            raise ValueError(f'--output {str(output)!r}: {parts} holds the partial output of a run with other '
                             f'settings (differing: {", ".join(differ)}); run with the same settings to resume it, '
                             f'or pass --overwrite to start again')
        return parts
    elif output.exists():
        raise ValueError(f'--output {str(output)!r} exists; pass --overwrite to replace it')
    try:
        with atomic_dir(parts) as tmp:
            (tmp / SETTINGS).write_text(json.dumps(settings, indent=2))
    except OSError as e:
        raise ValueError(f'--output {str(output)!r} cannot be written beside ({e.strerror or e})') from e
    return parts


def _part_sizes(n: int, part_size: int) -> List[int]:
    return [min(part_size, n - k * part_size) for k in range(math.ceil(n / part_size))]


def _done_parts(parts: Path, sizes: Sequence[int]) -> List[int]:
    import pyarrow.parquet as pq
    done = []
    for k, size in enumerate(sizes):
        file = parts / PART.format(k)
        if file.is_file() and pq.read_metadata(file).num_rows == size:
            done.append(k)
    return done


def _write_parts(tables: Iterator[Any], parts: Path, sizes: Sequence[int], part_size: int,
                 on_part: Optional[Callable[[int], Any]], bar: Any) -> None:
    """Gather the rows of ``tables`` (in any order) part by part; each complete part is written atomically."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    held: Dict[int, List[Any]] = {}
    count: Counter = Counter()
    for table in tables:
        part_of = table.column('index').to_numpy() // part_size
        for k in np.unique(part_of).tolist():
            rows = table.filter(pa.array(part_of == k)) if len(np.unique(part_of)) > 1 else table
            held.setdefault(k, []).append(rows)
            count[k] += len(rows)
            if count[k] == sizes[k]:
                whole = pa.concat_tables(held.pop(k))
                whole = whole.take(pc.sort_indices(whole, [('index', 'ascending')]))
                atomic_write(str(parts / PART.format(k)), lambda tmp: pq.write_table(whole, tmp))
                if on_part is not None:
                    on_part(k)
        bar.update(len(table))
    if held:
        raise RuntimeError(f'parts {sorted(held)} did not receive all their rows; run again to resume them')


def _summary(table: Any) -> Dict[str, Any]:
    """Images per exit (answered ones), how many could not be read, and the mean cost."""
    ok = [e is None for e in table.column('error').to_pylist()]
    exits = [e for e, good in zip(table.column('exit_layer').to_pylist(), ok) if good]
    costs = [c for c, good in zip(table.column('cost').to_pylist(), ok) if good]
    return {'images': table.num_rows, 'answered': len(exits), 'unreadable': table.num_rows - len(exits),
            'per_exit': {str(k): v for k, v in sorted(Counter(exits).items())},
            'mean_cost': sum(costs) / len(costs) if costs else None}


def _combine(parts: Path, output: Path, n_parts: int, settings: Dict[str, Any]) -> Dict[str, Any]:
    """Every part, in order, into ``output`` (atomically, with the settings and the summary in its metadata); the
    parts folder goes once the output is in place."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.concat_tables([pq.read_table(parts / PART.format(k)) for k in range(n_parts)])
    summary = _summary(table)
    table = table.replace_schema_metadata({'timm_exits': json.dumps({'settings': settings, 'summary': summary})})
    atomic_write(str(output), lambda tmp: pq.write_table(table, tmp))
    shutil.rmtree(parts)
    return summary


def _check_counts(**values: int) -> None:
    lows = {'batch_size': 1, 'part_size': 1, 'top_k': 1, 'workers': 0, 'ray_actors': 1, 'torch_threads': 0}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < lows[name]:
            raise ValueError(f'{name} must be an integer >= {lows[name]}, got {value!r}')


def infer(
        checkpoint: Union[str, Path],
        data: Union[str, Path],
        output: Union[str, Path],
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        threshold: Optional[float] = None,
        budget: Optional[float] = None,
        keep_rate: Optional[float] = None,
        top_k: int = 5,
        path_column: str = 'path',
        batch_size: int = 64,
        part_size: int = 1024,
        workers: int = 0,
        device: str = 'cpu',
        overwrite: bool = False,
        progress: bool = True,
        ray: bool = False,
        ray_address: Optional[str] = None,
        ray_actors: int = 1,
        torch_threads: int = 0,
        on_part: Optional[Callable[[int], Any]] = None,
) -> Dict[str, Any]:
    """Answer every image of ``data`` (a folder, a list file, a Parquet / CSV table of paths, see ``read_inputs``)
    with the model of ``checkpoint`` and write the rows to the Parquet file ``output`` (see the module docstring);
    ``ray`` or ``ray_address`` run the model on Ray Data. ``on_part(k)`` is called after part k is written.

    Returns:
        The summary: ``images``, ``answered``, ``unreadable``, ``per_exit`` (images per exit layer), ``mean_cost``,
        plus ``output``, ``resumed_parts`` (parts a previous run had written), ``computed`` (images run now) and
        ``images_per_s`` (their rate from the first image read to the last part written; model loading excluded).

    Raises:
        ValueError: bad input, naming the argument (no image, an unreadable checkpoint, a setting the model does not
            have, an existing output, a Ray address that does not answer).
    """
    _check_counts(batch_size=batch_size, part_size=part_size, top_k=top_k, workers=workers, ray_actors=ray_actors,
                  torch_threads=torch_threads)
    if importlib.util.find_spec('pyarrow') is None:
        raise ImportError('bulk inference writes Parquet with pyarrow: pip install "timm-exits[infer]" (or '
                          '"timm-exits[ray]" for Ray Data too)')
    paths, files = read_inputs(data, path_column)
    spec = {'checkpoint': os.path.abspath(checkpoint), 'model': model, 'model_kwargs': dict(model_kwargs or {}),
            'threshold': threshold, 'budget': budget, 'keep_rate': keep_rate, 'top_k': top_k, 'device': device,
            'torch_threads': torch_threads}
    runner = Runner(spec)
    output = Path(output)
    settings = _settings(spec, runner, files, part_size)
    use_ray = ray or ray_address is not None
    ours = use_ray and _connect_ray(ray_address)  # an address that does not answer: refused before any file
    threads = torch.get_num_threads()
    try:
        parts = _prepare(output, settings, overwrite)
        sizes = _part_sizes(len(files), part_size)
        done = _done_parts(parts, sizes)
        items = [(i, paths[i], files[i]) for k in range(len(sizes)) if k not in done
                 for i in range(k * part_size, k * part_size + sizes[k])]
        _logger.info(f'{len(files)} images, {len(sizes)} parts ({len(done)} done before); model {runner.name}; '
                     f'preprocessing: {runner.data_config.describe()}')
        tables = _ray_tables(spec, items, batch_size, ray_actors) if use_ray else \
            _local_tables(runner, items, batch_size, workers)
        if torch_threads and not use_ray:
            torch.set_num_threads(torch_threads)
        from tqdm import tqdm
        start = time.perf_counter()
        with tqdm(total=len(files), initial=len(files) - len(items), unit='img', disable=not progress) as bar:
            if items:
                _write_parts(tables, parts, sizes, part_size, on_part, bar)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        if ours:
            import ray as ray_module
            ray_module.shutdown()
    summary = _combine(parts, output, len(sizes), settings)
    _logger.info(f'wrote {output}: {json.dumps(summary)}')
    return {**summary, 'output': str(output), 'resumed_parts': len(done), 'computed': len(items),
            'images_per_s': len(items) / seconds if items else None}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m timm_exits.infer``."""
    from timm.utils import ParseKwargs
    parser = argparse.ArgumentParser(prog='python -m timm_exits.infer', description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help='weights: .safetensors or a training checkpoint (the model '
                        'and its calibration are read from it)')
    parser.add_argument('--model', default=None, help='timm model name; default: the one the checkpoint names')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='create_model kwargs k=v')
    parser.add_argument('--data-dir', required=True,
                        help='a folder of images (recursive), a list file (one path a line) or a .parquet / .csv table')
    parser.add_argument('--path-column', default='path', help='the column of paths of a table')
    parser.add_argument('--output', required=True, help='the Parquet file to write')
    parser.add_argument('--threshold', type=_number(0.), default=None,
                        help='exit threshold (default: the checkpoint\'s calibrated one, else the model\'s)')
    parser.add_argument('--budget', type=_number(0., 1., low_open=True), default=None,
                        help='largest share of the full FLOPs any image spends, in (0, 1]')
    parser.add_argument('--keep-rate', type=_number(0., 1., low_open=True), default=None,
                        help='patch keep rate of a slimming model, in (0, 1]')
    parser.add_argument('--top-k', type=_int_at_least(1), default=5)
    parser.add_argument('--batch-size', type=_int_at_least(1), default=64)
    parser.add_argument('--part-size', type=_int_at_least(1), default=1024, help='images per part file')
    parser.add_argument('--workers', type=_int_at_least(0), default=min(2, available_cpus()),
                        help='image reading processes (in-process run)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output or another run\'s parts')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--ray', action='store_true', help='run on Ray Data (a local Ray unless --ray-address)')
    parser.add_argument('--ray-address', default=None, help='a running Ray cluster (host:port, ray://..., auto)')
    parser.add_argument('--ray-actors', type=_int_at_least(1), default=1, help='model replicas in the actor pool')
    parser.add_argument('--torch-threads', type=_int_at_least(0), default=0,
                        help='torch threads of the run (0: torch\'s default); on Ray, per actor and its CPUs (0: one)')
    return parser


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """``infer`` with the command line's arguments; the summary goes to the log."""
    summary = infer(args.checkpoint, args.data_dir, args.output, model=args.model, model_kwargs=args.model_kwargs,
                    threshold=args.threshold, budget=args.budget, keep_rate=args.keep_rate, top_k=args.top_k,
                    path_column=args.path_column, batch_size=args.batch_size, part_size=args.part_size,
                    workers=args.workers, device=args.device, overwrite=args.overwrite,
                    progress=not args.no_progress, ray=args.ray, ray_address=args.ray_address,
                    ray_actors=args.ray_actors, torch_threads=args.torch_threads)
    for layer, count in summary['per_exit'].items():
        _logger.info(f'exit {layer}: {count} images')
    cost = summary['mean_cost']
    _logger.info(f'{summary["answered"]} answered, {summary["unreadable"]} unreadable; mean cost '
                 f'{"-" if cost is None else format(cost, ".4f")} of the full model')
    return summary


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``python -m timm_exits.infer``: bad input prints one ``error: ...`` line and exits with status 2."""
    return run_command(build_parser(), run, argv)


callable_module(__name__, infer)

if __name__ == '__main__':
    main()
