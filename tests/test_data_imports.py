"""The modules of gan_dist/data import each other without a cycle (function-local imports count:
a cycle hidden in a function still breaks whichever module is imported first)."""
from __future__ import annotations

import ast
import subprocess

from tests._mp import PYTHON, REPO, base_env

DATA = REPO / "gan_dist" / "data"


def data_imports() -> dict[str, set[str]]:
    """{module: the gan_dist.data modules it imports anywhere in its body}."""
    graph: dict[str, set[str]] = {}
    names = {p.stem for p in DATA.glob("*.py")}
    for path in DATA.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[:2] == ["gan_dist", "data"] and len(parts) > 2:
                    deps.add(parts[2])
                elif parts == ["gan_dist", "data"]:
                    deps.update(a.name for a in node.names if a.name in names)
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_import_cycle_in_data():
    graph = data_imports()
    assert {"manifest", "index", "writer", "demo"} <= set(graph)
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d != "__init__":
                visit(d, trail + [m])
        state[m] = 2

    for module in sorted(graph):
        if module != "__init__":
            visit(module, [])


def test_every_data_module_imports_first_in_a_fresh_interpreter():
    names = ["gan_dist.data" + ("" if p.stem == "__init__" else f".{p.stem}") for p in sorted(DATA.glob("*.py"))]
    # one interpreter per module, started together (each mostly waits on importing torch)
    procs = {name: subprocess.Popen([PYTHON, "-c", f"import {name}"], env=base_env(threads=1), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name in names}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"import {name} first fails:\n{err[-2000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
