"""The package layering, checked on the source (every import, module level or inside a function):

* pure core (``src/rollout_matching``, ``src/losses``) never imports transformers, nor the data-loading,
  model, rollout or trainer packages;
* only the trainers themselves and the launcher (``src/sft.py``) import ``src.trainers``: the rollout
  engines, the data and model code and the tools (infer, eval, visualize, replay, export, bench,
  converters) do not;
* the import graph between ``src`` modules has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAUNCHER = {"src.sft"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def walk_runtime(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotation-only imports never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports() -> dict[str, set[str]]:
    """Module -> every module name it imports (absolute names; ``from x import y`` gives ``x`` and ``x.y``)."""
    out: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        names: set[str] = set()
        for node in walk_runtime(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
        out[module_name(path)] = names
    return out


def test_pure_core_imports_no_framework_and_no_upper_layer():
    bad = {}
    for mod, names in imports().items():
        if mod.startswith(("src.rollout_matching", "src.losses")):
            hits = sorted(n for n in names if n.split(".")[0] == "transformers"
                          or n.startswith(("src.models", "src.trainers", "src.rollout.", "src.data.images", "src.data.convert")))
            if hits:
                bad[mod] = hits
    assert not bad, f"pure-core modules importing upper layers or transformers: {bad}"


def test_only_the_trainers_and_the_launcher_import_the_trainers():
    bad = {mod: sorted(n for n in names if n == "src.trainers" or n.startswith("src.trainers."))
           for mod, names in imports().items() if not mod.startswith("src.trainers") and mod not in LAUNCHER}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"modules outside src/trainers importing it: {bad}"


def test_no_import_cycle_between_src_modules():
    graph = imports()
    mods = set(graph)
    edges = {m: {n for n in graph[m] if n in mods and n != m} for m in mods}
    # Tarjan's strongly connected components; any component with more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    # a package importing its own submodules (``src.x`` -> ``src.x.y``) and back is not a layering cycle
    real = [c for c in cycles if len({name.rsplit(".", 1)[0] if name.count(".") > 1 else name for name in c}) > 1 or len(c) > 2]
    assert not real, f"import cycles: {real}"
