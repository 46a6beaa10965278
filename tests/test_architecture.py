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


def _exports() -> dict[str, str]:
    """``untrac_pl``'s lazy exports (``from untrac_pl import attribute`` imports ``untrac_pl.api``)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "_EXPORTS":
            return ast.literal_eval(node.value)
    return {}


# where importing a module by name at run time is the design: the lazy package exports, the CLI's command dispatch
DYNAMIC_IMPORTS_ALLOWED = {"untrac_pl", "untrac_pl.cli"}


def _imports(name: str, path: Path, modules: dict) -> tuple[set, list]:
    """(modules imported at module level, [(line, module) imported inside a function or class, or by name])."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    exports = _exports()
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
            if base == "untrac_pl":  # the package's lazy exports
                targets += [exports[a.name] for a in node.names if a.name in exports]
        elif isinstance(node, ast.Call) and name not in DYNAMIC_IMPORTS_ALLOWED:
            func = ast.unparse(node.func)
            if func in ("importlib.import_module", "import_module", "__import__") and node.args:
                arg = node.args[0]
                text = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ast.unparse(arg)
                if "untrac_pl" in text:
                    inner.append((node.lineno, f"{text} (by name)"))
            continue
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


FRONT_ENDS = ("untrac_pl.cli", "untrac_pl.api", "untrac_pl.compat", "untrac_pl.estimator", "untrac_pl.experiments")
SHELL = ("untrac_pl.engine", "untrac_pl.config")
METHODS = ("untrac_pl.methods", "untrac_pl.evaluation")


def _layer(name: str) -> int:
    """3 front ends, 2 the run shell, 1 methods (and the evaluation, which names them), 0 building blocks."""
    for level, prefixes in ((3, FRONT_ENDS), (2, SHELL), (1, METHODS)):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return level
    return 0


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if name == "untrac_pl":
            continue  # the package facade (lazy exports only)
        for target in _imports(name, path, modules)[0]:
            if target != "untrac_pl" and _layer(target) > _layer(name):
                bad.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not bad, bad
