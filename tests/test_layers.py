"""The package's imports flow one way, layer by layer (docs/layout.md): no module imports
one of a higher layer, no two modules import each other through any path, and the library
never imports a tool. Read from the source files, so nothing is imported to check it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "distnn"

# Lowest first. A module may import modules of its own layer or of any lower one.
LAYERS = [
    {"distnn._launched", "distnn._version", "distnn.errors", "distnn.config", "distnn.logs"},
    {"distnn.data", "distnn.job", "distnn.distributed", "distnn.models"},
    {"distnn.resilience"},
    {"distnn.step"},
    {"distnn.settings", "distnn.run"},
    {"distnn.trainer"},
    {"distnn.fit", "distnn.train", "distnn"},
    {"distnn.tools", "distnn.plot", "distnn.scale"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == unit or module.startswith(unit + ".") for unit in layer - {"distnn"}):
            return index
    assert module == "distnn", f"{module} is in no layer: add it to LAYERS and docs/layout.md"
    return next(index for index, layer in enumerate(LAYERS) if "distnn" in layer)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (at its top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}


def test_no_module_imports_a_higher_layer_and_the_library_no_tool():
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
              for name, targets in graph().items() for target in targets
              if layer_of(target) > layer_of(name)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    edges = graph()
    # a package's __init__ importing its own modules is not a circle of the design
    edges = {name: {t for t in targets if not t.startswith(name + ".")}
             for name, targets in edges.items()}
    circles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges.get(name, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


def test_the_check_sees_the_package_s_imports():
    edges = graph()
    assert "distnn.run.checkpointer" in edges["distnn.trainer"]
    assert "distnn.distributed.sharding" in edges["distnn.step.update"]
    assert "distnn.distributed.gradsync" in edges["distnn.step.builder"]
