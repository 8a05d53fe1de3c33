""" Files written atomically: a reader (or a resumed run) sees the old file or the new one, never half of one.

A file is written to ``<path>.tmp<pid>`` and renamed over ``path`` (``os.replace``); a folder is built in a hidden
temporary folder beside it and renamed into place when complete. A kill leaves at most the temporary file or folder,
which ``timm_exits.train`` removes when the next run starts (its files) and which no reader mistakes for a result.
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union

__all__ = ['atomic_dir', 'atomic_write', 'write_json']


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` then ``os.replace(tmp, path)``: readers (and a resumed run) never see half a file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON, atomically. A NaN or infinity (not JSON; readers turn it into null) is refused
    with a ValueError naming the file, before anything is written."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f'{path}: refusing to write a NaN or infinite value ({e})') from e

    def _write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, _write)


@contextlib.contextmanager
def atomic_dir(out: Union[str, Path]) -> Iterator[Path]:
    """Build the folder ``out`` (absent or empty) atomically: the block writes into the temporary folder yielded
    (``.{name}.*.partial`` beside ``out``), which is renamed to ``out`` when the block ends and removed on any error."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', suffix='.partial', dir=out.parent))
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
