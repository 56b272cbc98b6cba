"""The layout the code keeps: ``vllm_sink/`` needs no vLLM, the bindings are grouped by side,
and no module imports another in a cycle (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_sink
from vllm_sink import patches

PACKAGE = Path(vllm_sink.__file__).resolve().parent
PATCHES = Path(patches.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for root, prefix in ((PACKAGE, "vllm_sink"), (PATCHES, "vllm_sink.patches")):
        for path in root.rglob("*.py"):
            if root == PACKAGE and PATCHES in path.parents:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([prefix, *parts])] = path
    return mods


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The plugin's modules that ``name`` imports, anywhere in it."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            # ``from package import module`` imports the module, not the package's own code.
            targets = [t for t in subs if t in known] or [base]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    # A package's __init__ that only re-exports is not an edge back into its modules.
    return {name: _imports(path, name, known) - {"vllm_sink", "vllm_sink.patches"} for name, path in mods.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_sides_do_not_import_each_other():
    graph = _graph()
    sides = ("frontend", "scheduler", "worker")
    crossing = [(a, b) for a, deps in graph.items() for b in deps
                for s in sides for t in sides
                if s != t and a.startswith(f"vllm_sink.patches.{s}") and b.startswith(f"vllm_sink.patches.{t}")]
    assert not crossing, crossing


def test_the_policy_imports_no_vllm_and_no_binding():
    for name, path in _modules().items():
        if name.startswith("vllm_sink.patches"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [m for m in mods if m.split(".")[0] == "vllm" or m.startswith("vllm_sink.patches")]
            # ``vllm_sink.register``/``LLM`` load them lazily; the demo runs the engine.
            assert not bad or name in ("vllm_sink", "vllm_sink.demo"), (name, bad)
