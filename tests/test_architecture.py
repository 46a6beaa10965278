"""The package's module graph: no import cycles, no function-level imports of its own modules.

Lazy imports are allowed for optional heavy third-party packages (captum, kronfluence, peft,
bitsandbytes, matplotlib, ...) and, through ``importlib``, for the CLI's command dispatch and the
package's lazy exports; importing one of the package's own modules inside a function, which is how
cycles get dodged, is not.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "untrac_pl"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> tuple[set, list]:
    """(modules imported at module level, [(line, module) imported inside a function or class])."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    top, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        own = [t for t in targets if t in modules]
        if id(node) in top_level or _under_type_checking(tree, node):
            top.update(own)
        elif own:
            inner.append((node.lineno, own[0]))
    return top, inner


def _under_type_checking(tree, target) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(child is target for child in ast.walk(node)):
                return True
    return False


def test_no_function_level_imports_of_the_packages_own_modules():
    modules = _modules()
    found = [f"{name}:{line} imports {target}" for name, path in modules.items() for line, target in _imports(name, path, modules)[1]]
    assert not found, found


def test_the_module_graph_has_no_cycles():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _imports(name, path, modules)[0]
        # importing a.b.c runs a/__init__ and a/b/__init__ first; a module importing its own package's
        # facade (pkg/__init__ re-exporting pkg.sub) is the usual layout, not a cycle between modules
        for dep in list(deps):
            parts = dep.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules
                        and not name.startswith(".".join(parts[:i]) + "."))
        graph[name] = deps - {name}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, cycle[:3]


def test_the_method_layer_does_not_import_the_run_shell_or_front_ends():
    modules = _modules()
    upper = {"untrac_pl.engine", "untrac_pl.api", "untrac_pl.config", "untrac_pl.compat", "untrac_pl.estimator"}
    for name, path in modules.items():
        if name.startswith(("untrac_pl.methods", "untrac_pl.baselines", "untrac_pl.data", "untrac_pl.callbacks")):
            bad = {t for t in _imports(name, path, modules)[0] if t in upper or t.startswith(("untrac_pl.cli", "untrac_pl.experiments"))}
            assert not bad, (name, bad)
