"""The house rules that keep the code easy to change, checked on the source itself.

Layers, bottom to top: data_process -> eval -> tasks -> steering -> collect -> train ->
stages -> serve -> scripts.  A module imports only from its own layer or below (lazy imports inside
functions included), nothing imports from scripts, and there are no import circles.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

LAYERS = ["data_process", "eval", "tasks", "steering", "collect", "train", "stages", "serve", "scripts"]


def _modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] in LAYERS}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
              if LAYERS.index(target.split(".")[0]) > LAYERS.index(module.split(".")[0])]
    assert upward == []


def test_there_are_no_import_circles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package importing its own submodules (collect/__init__ -> collect.pairs) is how
    # Python packages work, not a circle between ideas.
    cycles = [c for c in cycles
              if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:], strict=False))]
    assert cycles == []


def test_no_task_branches_outside_the_task_definitions():
    pattern = re.compile(r"task\s*[!=]=|task\.name\s*[!=]=")
    hits = [f"{path.relative_to(ROOT)}:{i}" for name, path in _modules().items() if not name.startswith("tasks")
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_every_stage_script_only_parses_and_calls_its_stage():
    scripts = sorted((ROOT / "scripts").glob("[0-9]*.py"))
    scripts += [ROOT / "scripts" / n for n in ("sweep.py", "train_sasrec.py")]
    for path in scripts:
        body = ast.parse(path.read_text(encoding="utf-8")).body
        assert ast.get_docstring(ast.Module(body=body, type_ignores=[])), path  # a usage docstring first
        cli, stage, guard = (ast.unparse(node) for node in body[1:])
        assert cli == "from data_process.cli import main", path
        config = re.fullmatch(r"from stages\.\w+ import (\w+Config), run", stage).group(1)
        assert guard == f"if __name__ == '__main__':\n    main({config}, run)", path
