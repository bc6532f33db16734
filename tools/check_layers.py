"""Check sdml_ext's import graph: no cycles, and no module imports one of a higher layer.

    python tools/check_layers.py        # prints the layers and the graph's size; exit 1 on a violation

The layers, bottom-up (a module may import its own layer and the ones below):

  0 foundation   errors, devices, waitpolicy, wording, _testing, _extension, store.files, store.locking, data, ops
  1 model        model, loss, preprocess, projection, store.bundle (a bundle loads networks)
  2 eval         eval (metrics, evaluation, plots), metrics (the public alias of eval.metrics)
  3 engine       engine (training, strategies, distributed, checkpoints, run directories, flows)
  4 search       search
  5 cli          cli, the entry modules train, evaluate, launch and info, search.__main__
  6 api          the package itself (sdml_ext/__init__.py re-exports the public names)

Every import counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (annotations only) and ``from sdml_ext import __version__``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "sdml_ext"
LAYERS = [  # (layer name, module prefixes), bottom-up; the longest matching prefix decides
    ("foundation", ["errors", "devices", "waitpolicy", "wording", "_testing", "_extension", "_build_config", "store",
                    "store.files", "store.locking", "data", "ops"]),
    ("model", ["model", "loss", "preprocess", "projection", "store.bundle"]),
    ("eval", ["eval", "metrics"]),
    ("engine", ["engine"]),
    ("search", ["search"]),
    ("cli", ["cli", "train", "evaluate", "launch", "info", "search.__main__"]),
    ("api", [""]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    rel = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (rel == prefix or rel.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports (TYPE_CHECKING blocks left out)."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            names = [a.name for a in node.names]
            if target == PACKAGE and names == ["__version__"]:
                continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if submodules:
                found.update(submodules)
            if len(submodules) < len(names):
                found.add(target)
    return {m for m in found if m in modules and m != name}


def main() -> int:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports(p, modules) for p in files}
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                problems.append(f"upward import: {module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                                f"({LAYERS[layer_of(target)][0]})")
    # cycles: Tarjan's strongly connected components
    index, low, stack, on_stack, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    problems += [f"import cycle: {' <-> '.join(c)}" for c in sccs]
    for number, (layer, _) in enumerate(LAYERS):
        members = sorted(m for m in graph if layer_of(m) == number)
        print(f"{number} {layer:<10} {len(members):2d} modules: {', '.join(m[len(PACKAGE) + 1:] or PACKAGE for m in members)}")
    edges = sum(len(t) for t in graph.values())
    print(f"{len(graph)} modules, {edges} internal imports, {len(sccs)} cycles, "
          f"{sum(p.startswith('upward') for p in problems)} upward imports")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
