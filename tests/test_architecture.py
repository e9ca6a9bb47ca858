"""The package's layering (docs/architecture.md), checked on the source with ``ast``.

* Each subpackage imports only itself and the layers below it (lazy imports inside functions count too).
* Nothing in ``adasr`` imports the tooling outside it (``benchmarks``, ``scripts``, ``tests``).
* Generic code (tiling, memory planning, the generic model class, the CLIs, data, the benchmark harness) never
  imports a network module (``adasr.archs.*_arch``) or class, never tests ``isinstance`` against a network class or
  compares a class name with one, and never probes a network's attributes with ``getattr``/``hasattr``: it asks the
  declared interface (``adasr.archs.interface``) and builds networks by their registered names.
"""
import ast
import os
import os.path as osp
from typing import Iterator, List, Tuple

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: Bottom to top. A module may import its own subpackage and any subpackage of a lower rank.
LAYERS = {
    'adasr.compat': 0,
    'adasr.utils': 0,
    'adasr.ops': 1,
    'adasr.archs': 2,
    'adasr.data': 3,
    'adasr.losses': 3,
    'adasr.inference': 3,
    'adasr.models': 4,
    'adasr.cli': 5,
    'adasr': 6,  # adasr/__init__.py, adasr/train.py, adasr/test.py: the entry files
}

GENERIC = ['adasr/inference', 'adasr/models/adasr_model.py', 'adasr/cli', 'adasr/data', 'benchmarks/harness.py']

#: What an arch declares through the interface; generic code must not look for these by name.
ARCH_ATTRIBUTES = {'pads_input', 'window_size', 'last_halting', 'eps_h', 'flops', 'preferred_half', 'embed_dim',
                   'upscale', 'halting_record', 'arch_traits', 'module'}


def _python_files(*roots: str) -> Iterator[str]:
    for root in roots:
        path = osp.join(REPO, root)
        if osp.isfile(path):
            yield path
            continue
        for folder, _, files in os.walk(path):
            yield from (osp.join(folder, f) for f in sorted(files) if f.endswith('.py'))


def _module_name(path: str) -> str:
    rel = osp.relpath(path, REPO)[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _layer_of(module: str) -> Tuple[str, int]:
    """The layer (subpackage name and rank) a module belongs to."""
    parts = module.split('.')
    if len(parts) >= 2 and '.'.join(parts[:2]) in LAYERS:
        return '.'.join(parts[:2]), LAYERS['.'.join(parts[:2])]
    if parts[0] == 'adasr':
        return 'adasr', LAYERS['adasr']
    raise KeyError(module)


def _imports(path: str) -> Iterator[Tuple[int, str]]:
    tree = ast.parse(open(path, encoding='utf-8').read(), filename=path)
    package = _module_name(path).rsplit('.', 1)[0] if not path.endswith('__init__.py') else _module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                name = '.'.join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ''
            yield node.lineno, name
            for alias in node.names:  # ``from adasr.archs import pft_arch`` imports a module
                yield node.lineno, f'{name}.{alias.name}'


def _violations() -> List[str]:
    out = []
    for path in _python_files('adasr'):
        own, rank = _layer_of(_module_name(path))
        reported = set()  # (line, module): ``from m import x`` is reported once, not again as m.x
        for line, name in _imports(path):
            if (line, name.rsplit('.', 1)[0]) in reported:
                continue
            if name.split('.')[0] in ('benchmarks', 'scripts', 'tests'):
                out.append(f'{osp.relpath(path, REPO)}:{line} imports {name} (tooling outside the package)')
                reported.add((line, name))
            if not name.startswith('adasr.'):
                continue
            try:
                other, other_rank = _layer_of(name)
            except KeyError:
                continue
            if other != own and other_rank >= rank and other != 'adasr':
                out.append(f'{osp.relpath(path, REPO)}:{line} imports {name} ({own} may import only lower layers)')
                reported.add((line, name))
    return out


def test_layers_import_only_lower_layers():
    assert _violations() == []


def test_every_subpackage_has_a_layer():
    subpackages = {f'adasr.{d}' for d in os.listdir(osp.join(REPO, 'adasr'))
                   if osp.isfile(osp.join(REPO, 'adasr', d, '__init__.py'))}
    assert subpackages <= set(LAYERS), f'place {sorted(subpackages - set(LAYERS))} in LAYERS and docs/architecture.md'


def test_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself works: an upward import (utils -> models) and a lazy one inside a function are reported."""
    pkg = tmp_path / 'adasr' / 'utils'
    pkg.mkdir(parents=True)
    (tmp_path / 'adasr' / '__init__.py').write_text('')
    (pkg / '__init__.py').write_text('')
    (pkg / 'bad.py').write_text('def f():\n    from adasr.models.adasr_model import AdaSRModel\n    return 1\n')
    monkeypatch.setattr(__import__(__name__, fromlist=['REPO']), 'REPO', str(tmp_path))
    found = _violations()
    assert len(found) == 1 and 'adasr/utils/bad.py:2 imports adasr.models.adasr_model' in found[0]


def _arch_class_names() -> set:
    """The names of every network class in BasicSR's registry once adasr registered its own (AdaFormer, PFT, Spandrel,
    Bicubic, HAT, ATD, SwinIR, ...)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    import adasr  # noqa: F401 - registers

    return set(ARCH_REGISTRY.keys())


def _names_in(node: ast.AST) -> Iterator[str]:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            yield sub.id
        elif isinstance(sub, ast.Attribute):
            yield sub.attr


def _generic_code_problems(path: str, arch_names: set) -> List[str]:
    tree = ast.parse(open(path, encoding='utf-8').read())
    problems = []
    for line, name in _imports(path):
        parts = name.split('.')
        if name.startswith('adasr.archs.') and parts[2].endswith('_arch'):
            problems.append(f'line {line}: imports network module {name}')
        elif name.startswith('adasr.archs.') and parts[-1] in arch_names:
            problems.append(f'line {line}: imports network class {parts[-1]} (build it by its registered name)')
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ('getattr', 'hasattr'):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in ARCH_ATTRIBUTES:
                problems.append(f'line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})')
        called = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
        if called in ('isinstance', 'issubclass'):
            classes = set(_names_in(node.args[1])) & arch_names if len(node.args) == 2 else set()
            if classes:
                problems.append(f'line {node.lineno}: {called}(..., {sorted(classes)})')
        if isinstance(node, ast.Compare) and any(isinstance(sub, ast.Attribute) and sub.attr == '__name__'
                                                 for side in [node.left, *node.comparators] for sub in ast.walk(side)):
            named = {c.value for side in [node.left, *node.comparators] for c in ast.walk(side)
                     if isinstance(c, ast.Constant) and isinstance(c.value, str)} & arch_names
            if named:
                problems.append(f'line {node.lineno}: compares a class name with {sorted(named)}')
    return problems


@pytest.mark.parametrize('path', [osp.relpath(p, REPO) for p in _python_files(*GENERIC)])
def test_generic_code_asks_the_interface(path):
    """No network module or class imported, no isinstance test or class-name comparison against a network class, no
    arch attribute probed by name, in code that serves every arch."""
    problems = _generic_code_problems(osp.join(REPO, path), _arch_class_names())
    assert problems == [], f'{path}: {problems}'


def test_generic_code_checker_sees_a_class_named(tmp_path):
    """The check itself works: each way of naming a network class in generic code is reported."""
    bad = tmp_path / 'bad.py'
    bad.write_text('from adasr.archs.spandrel_support import Spandrel\n'
                   'from adasr.archs import pft_arch\n'
                   'def f(net):\n'
                   '    if isinstance(net, (pft_arch.PFT, int)):\n'
                   '        return 1\n'
                   "    if type(net).__name__ == 'AdaFormer':\n"
                   '        return 2\n'
                   "    return getattr(net, 'window_size', 8)\n")
    found = _generic_code_problems(str(bad), _arch_class_names())
    assert [p.split(':')[0] for p in found] == ['line 1', 'line 2', 'line 4', 'line 6', 'line 8'], found
