"""The structure the code keeps (issue 25): small modules, classes and functions; no probing of
model kinds with hasattr; the command line on public names only. Outside shapkern/kernels/, whose
Triton kernels and launchers are long by nature.

Sizes count the lines from ``def``/``class`` to the end, less docstrings (the node's and those of
the functions and classes inside it): documentation is not size.
"""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shapkern"
MAX_MODULE_LINES = 350
MAX_CLASS_LINES = 150
MAX_FUNCTION_LINES = 60


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "kernels" not in p.relative_to(PACKAGE).parts)


def name(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def docstring_lines(node: ast.AST) -> int:
    """Lines of the docstrings of ``node`` and of every function and class inside it."""
    count = 0
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(sub):
            doc = sub.body[0]
            count += doc.end_lineno - doc.lineno + 1
    return count


def definitions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and class, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qualified = f"{prefix}{node.name}"
            yield qualified, node
            yield from definitions(node, qualified + ".")
        else:
            yield from definitions(node, prefix)


def test_modules_are_small():
    found = []
    for path in sources():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{name(path)} ({lines} lines)")
    assert not found, f"modules over {MAX_MODULE_LINES} lines: {found}"


def test_classes_and_functions_are_small():
    found = []
    for path in sources():
        for qualified, node in definitions(ast.parse(path.read_text())):
            is_class = isinstance(node, ast.ClassDef)
            lines = node.end_lineno - node.lineno + 1 - docstring_lines(node)
            if lines > (MAX_CLASS_LINES if is_class else MAX_FUNCTION_LINES):
                found.append(f"{name(path)}::{qualified} ({lines} lines)")
    assert not found, (
        f"classes over {MAX_CLASS_LINES} or functions over {MAX_FUNCTION_LINES} lines (docstrings "
        f"excluded): {found}"
    )


def test_no_hasattr():
    """Model kinds are told apart by protocols, isinstance or explicit attributes, not by probing.
    The model-family adapters (engine/adapters/) are where a family's variants are read off its
    modules, so they may probe them; nothing else may."""
    found = []
    adapters = PACKAGE / "engine" / "adapters"
    for path in sources():
        if adapters in path.parents:
            continue
        tree = ast.parse(path.read_text())
        calls = [
            n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "hasattr"
        ]
        found += [f"{name(path)}:hasattr line {call.lineno}" for call in calls]
    assert not found, f"hasattr( outside shapkern/kernels/ and engine/adapters/: {found}"


def cli_imports():
    """(module file, imported module, name) of every ``from shapkern... import name`` in shapkern/cli/."""
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shapkern"):
                for alias in node.names:
                    yield path.name, node.module, alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("shapkern."):
                        yield path.name, alias.name, None


def test_cli_imports_only_public_names_of_packages():
    """The command line imports from shapkern itself or one of its first-level packages and modules
    (never a submodule of a package), names in their ``__all__``; its own modules are exempt."""
    found = []
    for file, module, imported in cli_imports():
        if module == "shapkern.cli" or module.startswith("shapkern.cli."):
            continue
        if module.count(".") > 1 or imported is None:
            found.append(f"cli/{file}: {module} ({imported}): import from the package, not a submodule")
            continue
        public = getattr(importlib.import_module(module), "__all__", ())
        if imported not in public:
            found.append(f"cli/{file}: {imported} is not in {module}.__all__")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "package", sorted({"shapkern"} | {f"shapkern.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")})
)
def test_every_public_name_exists(package):
    module = importlib.import_module(package)
    missing = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ lists names it does not define: {missing}"
