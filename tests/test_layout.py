"""The layout rules, read from the source with ``ast`` (nothing is imported): no import circle
between the package's modules (imports inside functions count too) nor between the scripts of
``experiments/`` and ``benchmarks/`` (which import each other by file name), no Python file of
the package, ``experiments/`` or ``benchmarks/`` over 600 lines, and the model and layer files
reach no code of :mod:`timm_edl.hub`."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'timm_edl'
SCRIPT_DIRS = ('experiments', 'benchmarks')  # scripts run with their folder on sys.path
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(name: str, path: Path, known: set) -> set:
    """The timm_edl modules that ``name`` imports, anywhere in its code (``from pkg import sub``
    counts as importing ``pkg.sub`` when that is a module)."""
    is_package = path.name == '__init__.py'
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split('.') if is_package else name.split('.')[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = '.'.join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ''
            targets = [f'{module}.{a.name}' if f'{module}.{a.name}' in known else module for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_is_read():
    graph = _graph()
    assert 'timm_edl.hub.export' in graph['timm_edl.cli.export'] | graph['timm_edl.hub']
    assert 'timm_edl.weights' in graph['timm_edl.models.edlnet']
    assert 'timm_edl.layers.rista' in graph['timm_edl.layers.edl']


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def test_cycle_finder_finds_a_planted_circle():
    graph = dict(_graph())
    graph['timm_edl.weights'] = graph['timm_edl.weights'] | {'timm_edl.hub.load'}
    assert _cycle(graph) is not None


@pytest.mark.parametrize('name', ['timm_edl.models.edlnet', 'timm_edl.layers.edl', 'timm_edl.convert'])
def test_model_code_reaches_no_hub_code(name):
    graph, seen, todo = _graph(), set(), [name]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph[node]
    assert not [m for m in seen if m.startswith(('timm_edl.hub', 'timm_edl.cli'))]


def _scripts() -> dict:
    return {p.stem: p for d in SCRIPT_DIRS for p in sorted((ROOT / d).glob('*.py'))}


def _script_graph() -> dict:
    """The scripts each script of ``experiments/`` and ``benchmarks/`` imports (by file name)."""
    scripts = _scripts()
    graph = {}
    for name, path in scripts.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Import):
                targets |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets.add(node.module.split('.')[0])
        graph[name] = {t for t in targets if t in scripts and t != name}
    return graph


def test_the_script_graph_is_read():
    graph = _script_graph()
    assert 'claims_document' in graph['paper_claims'] and 'claims_effect' in graph['claims_document']
    assert 'elastic_decision' in graph['zoo'] and '_timing' in graph['bench_attack']


def test_no_import_circle_between_scripts():
    cycle = _cycle(_script_graph())
    assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def test_no_file_is_too_long_to_read_at_once():
    files = sorted(PACKAGE.rglob('*.py')) + list(_scripts().values())
    assert len(files) > len(_modules())
    long = {path.relative_to(ROOT).as_posix(): n for path in files
            if (n := len(path.read_text(encoding='utf-8').splitlines())) > MAX_LINES}
    assert not long, f'files over {MAX_LINES} lines: {long}'
