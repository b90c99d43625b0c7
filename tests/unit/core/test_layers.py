"""The import graph of every library module (imports inside functions included) points down the
layers of linearsr.core.layers and has no cycle: what docs/architecture.md draws."""

import ast
import os
import tomllib

from linearsr.core.layers import LAYERS, layer_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def modules() -> dict[str, str]:
    """{dotted module name: source path} of every module pyproject maps into the package."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    out = {}
    for pkg, folder in sorted(dirs.items(), key=lambda kv: -len(kv[1])):
        for top, subdirs, files in os.walk(os.path.join(ROOT, folder)):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(top, name), os.path.join(ROOT, folder))[:-3].split(os.sep)
                dotted = ".".join([pkg, *rel]).removesuffix(".__init__")
                path = os.path.join(top, name)
                if path not in out.values():  # a nested mapping (cli/commands) wins over its parent's (cli)
                    out[dotted] = path
    return out


def imports(path: str, known: set[str]) -> set[str]:
    """The linearsr modules a file imports anywhere in it (`from a.b import c` is a.b.c if c is a module)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "linearsr"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "linearsr":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {t for t in imports(p, known) if t != m} for m, p in mods.items()}


def test_every_import_points_down_the_layers():
    upward = []
    for mod, targets in graph().items():
        for t in targets:
            a, b = layer_of(mod), layer_of(t)
            same_package = mod.split(".")[1:2] == t.split(".")[1:2]
            if b > a or (b == a and not same_package and len(LAYERS[a]) > 1):
                upward.append(f"{mod} -> {t}")
    assert not upward, "imports that point up (or across a layer) in linearsr.core.layers' order:\n" + "\n".join(sorted(upward))


def test_the_module_graph_has_no_cycle():
    g, state, cycles = graph(), {}, []

    def visit(m, path):
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from linearsr.cluster import jobs\n    import linearsr.core.storage\n")
    assert imports(str(src), {"linearsr.cluster.jobs"}) == {"linearsr.cluster.jobs", "linearsr.core.storage"}
