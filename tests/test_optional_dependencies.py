"""No test needs a package beyond the README's install (``pip install -e ".[dev]"``) without a skip naming it.

Every module a test imports (``import``, ``from ... import``, ``importlib.import_module("...")``) must
be the standard library's, the project's, the tests' own, or one that installing mait with its
``dev`` extra always brings (its requirements and theirs, those without a platform or Python
condition: triton and the CUDA libraries come with some builds of torch only).  Any other (onnx,
onnxruntime, onnxscript, triton, ...) must be guarded by a skip that names it: an earlier
``pytest.importorskip("<it>")`` in the same function (or at module level), or a ``skipif`` mark on
the test or module whose reason names it.  Imports that tests reach only through the library are
not seen here; the clean environment of ``.ci/run`` catches those.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement

TESTS = Path(__file__).resolve().parent
PROJECT_MODULES = {"mait", "mait_cli"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_with(project: str = "mait", extras: tuple[str, ...] = ("dev",)) -> set[str]:
    """Distributions that installing ``project[extras]`` always brings: requirements without a marker
    other than these extras, followed through the installed metadata."""
    seen: set[str] = set()
    todo = [(project, extras)]
    while todo:
        name, wanted = todo.pop()
        if _canonical(name) in seen:
            continue
        seen.add(_canonical(name))
        try:
            lines = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in lines:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": extra}) for extra in wanted):
                continue                                   # another extra's, or false here
            if marker is not None and re.search(r"\b(?!extra\b)[a-z_]+\s*(==|!=|<|>|~=| in | not in )", str(marker)):
                continue                                   # a platform or Python condition
            todo.append((requirement.name, tuple(requirement.extras)))
    return seen


def allowed_modules(local: set[str]) -> set[str]:
    """Top-level modules a test may import without a skip."""
    distributions = installed_with()
    modules = {module for module, owners in importlib.metadata.packages_distributions().items()
               if any(_canonical(owner) in distributions for owner in owners)}
    return modules | set(sys.stdlib_module_names) | PROJECT_MODULES | local | {"__future__"}


def _skip_names(node: ast.AST) -> set[str]:
    """Modules named by ``pytest.importorskip("...")`` calls and skip reasons within ``node``."""
    names = set()
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        function = ast.unparse(call.func)
        if function.endswith("importorskip") and call.args and isinstance(call.args[0], ast.Constant):
            names.add(str(call.args[0].value).split(".")[0])
        if function.endswith("skipif") or function.endswith("skip"):
            for keyword in call.keywords:
                if keyword.arg == "reason" and isinstance(keyword.value, ast.Constant):
                    names.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(keyword.value.value)))
    return names


def _imported(node: ast.AST) -> list[str]:
    """Top-level modules that ``node`` imports (an absolute ``import``/``from`` or ``import_module("...")``)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value.split(".")[0]]
    return []


DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _guarded(module: str, node: ast.AST, tree: ast.Module, enclosing: list[ast.AST]) -> bool:
    """Whether a skip naming ``module`` guards the import ``node`` (inside the definitions ``enclosing``)."""
    top = [s for s in tree.body if not isinstance(s, DEFINITIONS)]
    if not enclosing:                                  # runs at collection: only an earlier importorskip guards it
        return any(module in _skip_names(s) for s in top if s.lineno < node.lineno)
    names = set().union(*(_skip_names(s) for s in top), *(_skip_names(d) for scope in enclosing
                                                             for d in scope.decorator_list))
    earlier = [s for s in ast.walk(enclosing[-1]) if isinstance(s, ast.stmt) and s.lineno < node.lineno
               and s is not enclosing[-1]]
    return module in names or any(module in _skip_names(s) for s in earlier)


def unguarded_imports(source: str, allowed: set[str], filename: str = "<test>") -> list[str]:
    """``file:line module`` for each import of a module outside ``allowed`` that no skip naming it guards."""
    tree = ast.parse(source, filename)
    found = []

    def visit(node: ast.AST, enclosing: list[ast.AST]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, DEFINITIONS):
                visit(child, [*enclosing, child])
                continue
            for module in _imported(child):
                if module not in allowed and not _guarded(module, child, tree, enclosing):
                    found.append(f"{filename}:{child.lineno} {module}")
            visit(child, enclosing)

    visit(tree, [])
    return found


def _test_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def _local_modules() -> set[str]:
    return {path.stem for path in _test_files()} | {path.name for path in TESTS.iterdir() if path.is_dir()}


def test_every_optional_import_of_the_tests_is_guarded_by_a_skip_naming_it() -> None:
    allowed = allowed_modules(_local_modules())
    found = [hit for path in _test_files()
             for hit in unguarded_imports(path.read_text(), allowed, str(path.relative_to(TESTS.parent)))]
    assert not found, f"imports of packages beyond pip install -e '.[dev]' without a skip naming them: {found}"


def test_the_declared_dependencies_are_allowed_and_the_optional_ones_are_not() -> None:
    allowed = allowed_modules(set())
    assert {"torch", "torchvision", "timm", "numpy", "safetensors", "yaml", "tqdm", "matplotlib", "sklearn",
            "tensorboard", "pytest", "build", "PIL", "os", "mait", "mait_cli"} <= allowed
    assert not {"onnx", "onnxruntime", "onnxscript", "triton", "nvidia", "requests"} & allowed


def test_a_planted_unguarded_import_is_found() -> None:
    """The check on made-up test files: each unguarded import of an optional package is named, guarded ones are not."""
    allowed = allowed_modules(set())
    planted = textwrap.dedent('''
        import os
        import onnx                                   # line 3: at collection, no skip
        import pytest
        import torch

        scripted = pytest.importorskip("onnxscript", reason="needs onnxscript")
        from onnxscript import optimizer              # guarded by the module-level importorskip above


        def test_runtime():
            import onnxruntime                        # line 12: no skip in this test
            pytest.importorskip("onnxruntime")


        def test_guarded():
            pytest.importorskip("onnxruntime", reason="the [export] extra")
            import onnxruntime


        def test_wrong_name():
            pytest.importorskip("onnx")
            import triton.language                    # line 23: a skip, but not naming triton


        @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs triton and a GPU")
        def test_marked():
            import triton


        class TestNested:
            def test_dynamic(self):
                import importlib
                importlib.import_module("onnxruntime.quantization")  # line 34
    ''')
    assert unguarded_imports(planted, allowed) == [
        "<test>:3 onnx", "<test>:12 onnxruntime", "<test>:23 triton", "<test>:34 onnxruntime"]
