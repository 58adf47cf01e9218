"""The package's layering, checked on every import statement (module level and inside functions, so a
lazy import cannot hide an upward dependency or a cycle), and a cheap ``import surgery_plugin``."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "surgery_plugin"

# lowest first: a module may import its own layer and the layers below it, never one above
LAYERS = (
    ("base", ("errors", "config", "io.files", "io.cache")),
    ("core", ("core", "core.*")),
    ("data, files, behaviors, models", ("data", "data.*", "io", "io.*", "behaviors", "models")),
    ("evaluation", ("evaluation", "evaluation.*", "integrations.lm_eval", "integrations.lm_eval.*")),
    ("pipeline", ("pipeline",)),
    ("commands and integrations", ("commands", "commands.*", "integrations", "integrations.*", "__main__")),
)


def _modules() -> dict[str, Path]:
    """``dotted name -> file`` of every module, ``__init__`` named by its package ("" for the top)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement loads (submodules named in ``from pkg import sub`` included)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name == "surgery_plugin" or a.name.startswith("surgery_plugin.")]
        return [n.removeprefix("surgery_plugin").lstrip(".") for n in names]
    if node.level == 0:
        if not (node.module or "").startswith("surgery_plugin"):
            return []
        base = node.module.removeprefix("surgery_plugin").lstrip(".")
    else:
        here = module.split(".") if module else []
        if not is_package:
            here = here[:-1]
        here = here[: len(here) - (node.level - 1)] if node.level > 1 else here
        base = ".".join(here + ([node.module] if node.module else []))
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        targets.append(sub if sub in MODULES else base)
    return targets


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(t for t in _resolve(module, is_package, node) if t != module)
        graph[module] = edges
    return graph


def _layer(module: str) -> int:
    if module == "":  # the top-level __init__: lazy re-exports of the public API
        return len(LAYERS) - 1
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"module {module!r} is in no layer of LAYERS; add it")


GRAPH = _graph()


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module):
    mine = _layer(module)
    above = sorted(t for t in GRAPH[module] if _layer(t) > mine)
    assert not above, f"{module} ({LAYERS[mine][0]}) imports {above} from a layer above it"


def test_the_core_imports_only_itself_and_the_base_directly_or_not():
    core = [m for m in MODULES if m == "core" or m.startswith("core.")]
    allowed = {m for m in MODULES if _layer(m) <= 1}
    for module in core:
        seen, todo = set(), [module]
        while todo:  # every module it reaches, through any chain of imports
            for target in GRAPH[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert seen <= allowed, f"{module} reaches {sorted(seen - allowed)}"


def test_no_import_cycles_lazy_or_not():
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for target in sorted(GRAPH.get(node, ())):
            if state.get(target) == 1:
                cycle.extend(stack[stack.index(target) :] + [target] if target in stack else [node, target])
                return True
            if state.get(target) is None and visit(target, [*stack, target]):
                return True
        state[node] = 2
        return False

    for module in sorted(MODULES):
        if state.get(module) is None and visit(module, [module]):
            break
    assert not cycle, "import cycle: " + " -> ".join(m or "surgery_plugin" for m in cycle)


def test_importing_the_package_imports_nothing_heavy():
    code = (
        "import sys, surgery_plugin; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'numpy', 'easyeditor') if m in sys.modules); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
