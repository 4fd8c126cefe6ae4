"""The package's imports run one way: down the layers (app -> blocks -> openeo -> formats -> codec ->
core), and no module of corsa imports, at its top or inside a function, one that imports it back
(directly or through others)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "client" / "corsa"
LAYERS = ("core", "codec", "formats", "openeo", "blocks", "app")     # bottom to top


def imports_of(path: Path) -> set[str]:
    """The corsa modules ``path`` imports, wherever in the file."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            if module[:1] != ["corsa"]:
                continue
            for alias in node.names:        # "from . import cli" names a module; "from .x import f" a name in x
                sub = ".".join(module + [alias.name])
                out.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() else ".".join(module))
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "corsa"}
    return out


def graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                circles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_graph_is_read():
    g = graph()
    assert "corsa.codec.models" in g["corsa.app.cli"] and "corsa.app.cli" in g["corsa.app.demo"] and len(g) > 20


def test_imports_run_down_the_layers():
    g = graph()
    assert {m.split(".")[1] for m in g if m.count(".") == 2} == set(LAYERS)
    upward = [f"{m} -> {n}" for m, deps in g.items() if m.count(".") == 2 for n in deps
              if LAYERS.index(n.split(".")[1]) > LAYERS.index(m.split(".")[1])]
    assert not upward, "imports from a layer above: " + "; ".join(sorted(upward))
