"""The package's shape: areas (impl/<area>/) reach each other only through their `__init__` faces, never through a
module or a private name of another area, and the module-level import graph has no cycle.

Both rules are read off the source with `ast`, so they hold for code paths no test happens to import. Each checker
is also run on a small planted example, so a checker that stopped seeing anything would fail here too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"common"}  # impl.common.* is the shared toolbox, imported by module on purpose


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, module_level_only: bool) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import; with module_level_only, those outside functions."""
    found = []
    nodes = _module_level(tree) if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], node.lineno) for a in node.names)
    return found


def _module_level(tree: ast.AST):
    """Nodes executed at import time: everything except the bodies of functions (and of TYPE_CHECKING blocks)."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def face_violations(sources: dict[str, str]) -> list[str]:
    """Imports in impl/<area>/ of another area's module (impl.<other>.<module>) or private name (_x)."""
    bad = []
    for path, text in sources.items():
        parts = Path(path).parts
        if len(parts) < 3 or parts[0] != "impl":
            continue  # impl/__main__.py, impl/bench.py: the package's own entry points, not an area
        area = parts[1]
        for module, names, line in imports(ast.parse(text), module_level_only=False):
            bits = module.split(".")
            if bits[0] != "impl" or len(bits) < 2 or bits[1] in SHARED | {area}:
                continue
            if len(bits) > 2:
                bad.append(f"{path}:{line} imports {module} (use the face impl.{bits[1]})")
            bad.extend(f"{path}:{line} imports private {module}.{n}" for n in names if n.startswith("_"))
    return bad


def import_cycle(sources: dict[str, str]) -> list[str] | None:
    """One cycle of the module-level import graph over the given modules (names as module paths), or None."""
    modules = {module_name(Path(p), Path(".")): text for p, text in sources.items()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, text in modules.items():
        for target, names, _ in imports(ast.parse(text), module_level_only=True):
            for t in [target, *(f"{target}.{n}" for n in names)]:
                if t in modules and t != m:
                    graph[m].add(t)
            # importing impl.a.b runs impl/__init__ and impl/a/__init__ first
            bits = target.split(".")
            graph[m].update(p for p in (".".join(bits[:i]) for i in range(1, len(bits))) if p in modules and p != m)
        if "." in m:  # a submodule's package __init__ runs before it
            parent = m.rsplit(".", 1)[0]
            if parent in modules:
                graph[m].add(parent)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1 and not _parent_of(n, m):
                return [*path[path.index(n) :], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def _parent_of(package: str, module: str) -> bool:
    """A package's __init__ importing its own submodules, which in turn need the package: Python's normal order."""
    return module.startswith(package + ".")


def impl_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "impl").rglob("*.py"))}


def test_areas_import_each_other_only_through_their_faces():
    assert face_violations(impl_sources()) == []


def test_module_level_import_graph_has_no_cycle():
    assert import_cycle(impl_sources()) is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from impl.gpt.model import GPT\n", "imports impl.gpt.model"),
        ("from impl.gpt import _LN_EPS\n", "imports private impl.gpt._LN_EPS"),
        ("def f():\n    import impl.clip.train\n", "imports impl.clip.train"),  # lazy imports count too
    ],
)
def test_face_checker_sees_a_planted_violation(source, expected):
    found = face_violations({"impl/rlhf/planted.py": source})
    assert len(found) == 1 and expected in found[0]
    own_area = expected.split("impl.")[1].split(".")[0]
    assert face_violations({f"impl/{own_area}/planted.py": source.replace("_LN_EPS", "GPT")}) == []  # own area


def test_cycle_checker_sees_a_planted_cycle():
    sources = {
        "impl/a/__init__.py": "from impl.a.x import f\n",
        "impl/a/x.py": "from impl.b import g\n",
        "impl/b/__init__.py": "from impl.b.y import g\n",
        "impl/b/y.py": "import impl.a\n",
    }
    assert import_cycle(sources) is not None
    sources["impl/b/y.py"] = "def g():\n    import impl.a\n"  # the same import inside a function: no cycle
    assert import_cycle(sources) is None
