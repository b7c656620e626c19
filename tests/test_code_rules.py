"""Rules of the code base that a reader relies on: a choice is passed as settings, never by
writing the environment; ARCHITECTURE.md names every module it describes."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["lorakernels", "model", "training", "benchmarks", "scripts",
           "train.py", "generate.py", "merge.py"]
WRITES = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def python_files(names):
    for name in names:
        path = ROOT / name
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def environment_writes(tree: ast.AST):
    """Lines that write os.environ (item assignment or deletion, a mutating method, putenv)."""
    def is_environ(node):
        return (isinstance(node, ast.Attribute) and node.attr == "environ"
                and isinstance(node.value, ast.Name) and node.value.id == "os")

    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else []
        if isinstance(node, ast.AugAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
            yield node.lineno
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in WRITES and is_environ(node.func.value):
                yield node.lineno
            if node.func.attr in ("putenv", "unsetenv") and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "os":
                yield node.lineno


def test_environment_writes_are_found():
    code = ("import os\nos.environ['A'] = '1'\nos.environ.setdefault('B', '2')\n"
            "del os.environ['A']\nos.putenv('C', '3')\nx = os.environ.get('D')\n"
            "env = {**os.environ, 'E': '4'}\n")
    assert sorted(environment_writes(ast.parse(code))) == [2, 3, 4, 5]


def test_no_code_outside_tests_writes_the_environment():
    found = [f"{path.relative_to(ROOT)}:{line}" for path in python_files(SOURCES)
             for line in environment_writes(ast.parse(path.read_text()))]
    assert found == []


def test_architecture_names_every_module():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    modules = [path.relative_to(ROOT / package) for package in ("lorakernels", "model", "training")
               for path in (ROOT / package).rglob("*.py") if path.name != "__init__.py"]
    missing = [str(m) for m in modules if f"`{m.as_posix()}`" not in text
               and f"`{m.name}`" not in text]
    assert missing == []
