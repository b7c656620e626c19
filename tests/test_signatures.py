"""No function takes more than MAX_PARAMETERS parameters, except Triton kernels (whose long
lists are grouped under comments, as the Triton tutorials do) and the loralib-compatible
layer constructors, whose keyword arguments are loralib's.

Read with ``ast``, so nothing is imported and every file is checked, Triton or not.
"""
import ast
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMETERS = 8
# Checked packages: the library, the model and the trainer.
PACKAGES = ("lorakernels", "model", "training")
# loralib's constructors: their keyword arguments are loralib's, so its users' calls work as is.
LORALIB_CONSTRUCTORS = {
    "lorakernels/layers.py": {"Linear.__init__", "MergedLinear.__init__", "ConvLoRA.__init__"},
}
# A long kernel parameter list names its groups, at least these where it has such parameters.
POINTER_GROUP, META_GROUP = "# Pointers", "# Meta-parameters"


def _functions(tree: ast.AST) -> Iterator[Tuple[str, ast.FunctionDef]]:
    """(qualified name, node) of every function and method, nested ones included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)
    yield from walk(tree, "")


def parameter_names(node: ast.FunctionDef) -> List[str]:
    """Its parameters, without the receiver (self, cls, or an autograd.Function's ctx)."""
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return names[1:] if names and names[0] in ("self", "cls", "ctx") else names


def is_triton_jit(node: ast.FunctionDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target) in ("triton.jit", "jit"):
            return True
    return False


def ungrouped_kernel(node: ast.FunctionDef, lines: Sequence[str]) -> List[str]:
    """The group comments a long Triton kernel's parameter list lacks."""
    signature = "\n".join(lines[node.lineno - 1:node.body[0].lineno - 1])
    names = parameter_names(node)
    constexprs = [a.arg for a in node.args.args if a.annotation is not None
                  and ast.unparse(a.annotation).endswith("constexpr")]
    wanted = [(POINTER_GROUP, any(n.endswith("_ptr") for n in names)), (META_GROUP, constexprs)]
    return [group for group, present in wanted if present and group not in signature]


def signature_problems(packages: Sequence[str], root: Path = ROOT) -> List[str]:
    """One line per function of ``packages`` (folders under ``root``) over the limit, and per
    long Triton kernel whose parameters are not grouped under comments."""
    problems = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            source = path.read_text()
            lines = source.splitlines()
            for name, node in _functions(ast.parse(source, relative)):
                count = len(parameter_names(node))
                if count <= MAX_PARAMETERS or name in LORALIB_CONSTRUCTORS.get(relative, ()):
                    continue
                if not is_triton_jit(node):
                    problems.append(f"{relative}:{node.lineno} {name} takes {count} parameters")
                elif ungrouped_kernel(node, lines):
                    missing = ", ".join(ungrouped_kernel(node, lines))
                    problems.append(f"{relative}:{node.lineno} kernel {name}: no {missing}")
    return problems


@pytest.mark.parametrize("package", PACKAGES)
def test_functions_take_at_most_eight_parameters(package):
    assert signature_problems([package]) == []


def test_the_check_finds_long_signatures_and_ungrouped_kernels(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "import triton\n"
        "import triton.language as tl\n"
        "def fine(a, b, c, d, e, f, g, h): pass\n"
        "class K:\n"
        "    def method(self, a, b, c, d, e, f, g, h): pass\n"
        "    def long(self, a, b, c, d, e, f, g, h, *rest): pass\n"
        "@triton.jit\n"
        "def kernel(x_ptr, y_ptr, a, b, c, d, e, f, BLOCK: tl.constexpr):\n"
        "    pass\n"
        "@triton.jit(do_not_specialize=['a'])\n"
        "def grouped(\n"
        "    # Pointers\n"
        "    x_ptr, y_ptr,\n"
        "    # Shapes\n"
        "    a, b, c, d, e, f,\n"
        "    # Meta-parameters\n"
        "    BLOCK: tl.constexpr,\n"
        "):\n"
        "    pass\n")
    assert signature_problems(["pkg"], tmp_path) == [
        "pkg/mod.py:6 K.long takes 9 parameters",
        "pkg/mod.py:8 kernel kernel: no # Pointers, # Meta-parameters",
    ]
