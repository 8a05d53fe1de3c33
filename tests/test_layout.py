"""The package's import graph runs one way: models at the bottom, data / evaluation / plots / file helpers above them,
training above those, publishing and the command lines on top. Read from the source with ``ast`` (nothing imported),
function-level imports included: a lazy import is still a dependency."""
import ast
import fnmatch
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

import timm_exits

PACKAGE = 'timm_exits'
ROOT = Path(timm_exits.__file__).parent

# What each module may import from the package (names relative to timm_exits; 'timm_exits' is the package root).
# The first key that matches a module (exact name, then the patterns in this order) applies. A module no key matches
# fails the test: place a new module in the layout here.
MODELS = {'models', 'models.*', 'losses'}
ALLOWED: Dict[str, Set[str]] = {
    'losses': set(),
    'models._pretrained': {'models.*'},
    'models': MODELS,
    'models.*': MODELS,
    '_files': set(),
    'data': {'models.adapters', 'counting_sets'},  # the input size a model is built for; the counting-set command
    'counting_sets': {'_files'},
    'evaluation': MODELS | {'benchmark', 'data'},  # per-image sums of crops
    'plots': {'_files'},
    'tasks': MODELS,
    'benchmark': MODELS,
    'benchmark_slim': MODELS | {'benchmark'},
    'demo': MODELS,
    'runtime': set(),
    'train': MODELS | {'_files', 'data', 'evaluation', 'plots', 'tasks', 'benchmark'},
    'validate': MODELS | {'_files', 'data', 'evaluation', 'plots'},
    'calibrate': MODELS | {'_files', 'data', 'evaluation', 'validate', 'train'},
    'fit': MODELS | {'_files', 'data', 'tasks', 'train', 'validate', 'calibrate'},
    'export': MODELS | {'_files', 'data', 'timm_exits'},  # the root for __version__
    'benchmark_onnx': MODELS | {'_files', 'benchmark', 'export', 'runtime'},
    'serving': MODELS | {'data', 'runtime'},
    'serving.ray': MODELS | {'data', 'serving', 'timm_exits'},  # the root registers the families in a replica
    'serving.load': MODELS | {'_files', 'benchmark', 'data', 'serving', 'runtime'},
    'serving.http_load': MODELS | {'_files', 'benchmark', 'data', 'serving', 'serving.load', 'serving.ray', 'runtime'},
    'hub': {'*'},
    'hub.*': {'*'},
    'infer': MODELS | {'_files', 'data', 'validate'},
    'timm_exits': MODELS | {'hub', 'fit', 'calibrate', 'infer'},  # fit, calibrate, infer on first use (__getattr__)
}
# Only these outside the standard library, for the modules every model build imports.
EXTERNAL: Dict[str, Set[str]] = {
    'losses': {'torch', 'timm'},
    'models._pretrained': {'torch', 'timm', 'huggingface_hub', 'safetensors'},
}
# Function-level imports that point back up inside models/ (none: the checkpoint loader asks a model for its own
# layout). Listed so that no new one comes in unseen.
LAZY_BACK_EDGES = set()
HEAVY = ('matplotlib', 'onnx', 'onnxruntime', 'sklearn', 'pandas', 'scipy', 'ray')


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob('*.py')):
        parts = path.relative_to(ROOT).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts) or PACKAGE] = path
    return out


MODULES = _modules()


def _package_of(name: str) -> List[str]:
    """The package a module's relative imports start from (as parts; [] is the root)."""
    parts = [] if name == PACKAGE else name.split('.')
    return parts if MODULES[name].name == '__init__.py' else parts[:-1]


def _resolve(parts: List[str]) -> str:
    name = '.'.join(parts) or PACKAGE
    while name not in MODULES:  # an attribute of a module ('from .x import y' where y is no module)
        parts = parts[:-1]
        name = '.'.join(parts) or PACKAGE
    return name


def _imports(name: str) -> Iterator[Tuple[str, bool, int]]:
    """(what ``name`` imports: a module of the package as its table name, or 'ext:<top-level name>', whether at
    module level, line)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    top = {id(n) for n in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for n in ast.walk(node)}
    for node in ast.walk(tree):
        at_top = id(node) in top
        if isinstance(node, ast.Import):
            for alias in node.names:
                first, *rest = alias.name.split('.')
                yield (_resolve(rest) if first == PACKAGE else f'ext:{first}'), at_top, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                first, *rest = (node.module or '').split('.')
                if first != PACKAGE:
                    yield f'ext:{first}', at_top, node.lineno
                    continue
                base = rest
            else:
                package = _package_of(name)
                base = package[:len(package) - node.level + 1] + (node.module.split('.') if node.module else [])
            for alias in node.names:  # 'from . import x' imports the module x when there is one
                yield _resolve(base + [alias.name]), at_top, node.lineno


def _rule(name: str, table: Dict[str, Set[str]]) -> Set[str]:
    if name in table:
        return table[name]
    return next((v for k, v in table.items() if fnmatch.fnmatchcase(name, k)), None)


def _graph(module_level_only: bool) -> Dict[str, Set[str]]:
    return {name: {dep for dep, at_top, _ in _imports(name)
                   if not dep.startswith('ext:') and dep != name and (at_top or not module_level_only)}
            for name in MODULES}


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as a path (first == last), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_table_parses_imports():
    """The reader sees relative, absolute and 'from . import module' imports, at module level and in functions."""
    deps = {(dep, at_top) for dep, at_top, _ in _imports('hub')}
    assert {('models._pretrained', True), ('hub.cards', True), ('_files', True), ('ext:huggingface_hub', True)} <= deps
    assert {('ext:timm', True), ('ext:timm', False)} <= deps and 'hub' not in {d for d, _ in deps}
    assert {('benchmark', False), ('models.multi_exit_vit', True)} <= {(d, t) for d, t, _ in _imports('evaluation')}
    assert {dep for dep, _, _ in _imports('hub.__main__')} == {'hub', 'ext:sys'}
    assert ('timm_exits', False) in {(d, t) for d, t, _ in _imports('export')}


def test_every_module_has_a_place():
    assert len(MODULES) > 15 and 'models._pretrained' in MODULES
    missing = [name for name in MODULES if _rule(name, ALLOWED) is None]
    assert not missing, f'modules not in the layout table of {__file__}: {missing}'


def test_imports_run_one_way():
    wrong = []
    for name in MODULES:
        allowed = _rule(name, ALLOWED) or set()
        ext_allowed = _rule(name, EXTERNAL)
        for dep, _, line in _imports(name):
            if dep.startswith('ext:'):
                dep = dep[4:]
                if ext_allowed is not None and dep not in ext_allowed and dep not in sys.stdlib_module_names:
                    wrong.append(f'{MODULES[name].relative_to(ROOT.parent)}:{line} imports {dep}')
            elif dep != name and not any(fnmatch.fnmatchcase(dep, a) for a in allowed):
                wrong.append(f'{MODULES[name].relative_to(ROOT.parent)}:{line} imports {PACKAGE}.{dep}'.replace(
                    f'{PACKAGE}.{PACKAGE}', PACKAGE))
    assert not wrong, 'imports against the layout (the table in tests/test_layout.py):\n' + '\n'.join(wrong)


def test_no_import_cycle():
    graph = _graph(module_level_only=True)
    assert not _cycle(graph), f'import cycle at import time: {" -> ".join(_cycle(graph))}'
    graph = _graph(module_level_only=False)
    stale = {edge for edge in LAZY_BACK_EDGES if edge[1] not in graph[edge[0]]}
    assert not stale, f'LAZY_BACK_EDGES lists imports that are gone, remove them: {stale}'
    for src, dst in LAZY_BACK_EDGES:
        graph[src].discard(dst)
    assert not _cycle(graph), f'import cycle (function-level imports included): {" -> ".join(_cycle(graph))}'


def test_cycle_finder_finds_one():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) == []


@pytest.mark.parametrize('module', ['timm_exits', 'timm_exits.models'])
def test_import_loads_no_heavy_module(module):
    """Plotting, ONNX and scikit-learn load where they are used, not when the models are registered."""
    code = f'import sys, {module}; print(" ".join(m for m in {HEAVY!r} if m in sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == '', f'import {module} loads {out.stdout.strip()}'
