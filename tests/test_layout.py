"""The package's layout: no import cycle, imports at module level, docstring examples that run."""

import ast
import doctest
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "tlkeras")
MODULES = sorted(f"tlkeras.{m.name}" for m in pkgutil.iter_modules([PACKAGE]))
# Imports that may stay inside functions: optional dependencies, and the CLI's lazy commands.
OPTIONAL = {"keras_hub", "yaml", "tensorflow_datasets", "tensorflow_text", "grpc", "matplotlib",
            "sklearn", "PIL", "tensorboard", "keras_tuner", "tflite_runtime", "tensorflow"}
LAZY_OK = {"tlkeras.cli", "tlkeras.demo"}


def _tree(module):
    with open(os.path.join(PACKAGE, module.split(".")[1] + ".py")) as f:
        return ast.parse(f.read())


def _tlkeras_imports(node):
    """The tlkeras modules an import statement names."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlkeras"):
        if node.module == "tlkeras":
            return {f"tlkeras.{a.name}" for a in node.names if f"tlkeras.{a.name}" in MODULES}
        return {node.module}
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("tlkeras.")}
    return set()


def test_module_level_imports_form_no_cycle_and_no_tlkeras_import_hides_in_a_function():
    graph, local = {}, []
    for module in MODULES:
        tree = _tree(module)
        graph[module] = set()
        for node in tree.body:
            graph[module] |= _tlkeras_imports(node) - {"tlkeras"}
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    names = _tlkeras_imports(node) | ({"tlkeras"} if isinstance(
                        node, ast.Import) and any(a.name == "tlkeras" for a in node.names)
                        else set())
                    if names and module not in LAZY_OK:
                        local.append(f"{module}:{node.lineno} imports {sorted(names)}")
    assert not local, local
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "active", f"import cycle: {' -> '.join(path + [module])}"
        state[module] = "active"
        for other in sorted(graph.get(module, ())):
            visit(other, path + [module])
        state[module] = "done"

    for module in MODULES:
        visit(module, [])


def test_every_module_imports_in_a_fresh_process():
    # `import tlkeras.x` runs the package's __init__ first, whatever x is, so one fresh process
    # importing each module in turn covers what a process per module would; the order between
    # modules is checked statically above.
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as error:\n"
            "        sys.exit(f'{name}: {type(error).__name__}: {error}')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    imported = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(imported, module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}"
