"""The package's structure, read from the source with `ast`: imports run one way (no
cycles, nothing imports a layer above it) and functions stay short.

    python tests/test_structure.py      # prints the layers and each module's imports

The layering (lowest first; a module imports only from its own package or lower layers):

    storage                                  clear errors for failed writes, atomic files
    data, compress, sharding, distributed,
    preemption                               (independent of each other)
    models                                   the Conformer; calls `compress` layers
    checkpoints                              async, fall-back restores; uses `storage`
    config                                   the schema: every block's keys, validation
    run                                      what every command needs from a workdir
    evaluate                                 decoders, scoring, decoding a workdir's split
    train, export                            the loop; the packed export and serving
    transcribe, onnx_export                  audio files -> text; the ONNX model of an export
    study_report, sensitivity                rows, tables, plot, README block of a study;
                                             per-group PTQ sensitivity, mixed policies
    study, compile                           the compression study; ahead-of-time compile
    cli                                      argument parsing
    __main__                                 `python -m usmqs`
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "usmqs"

LAYERS = (
    ("storage",),
    ("data", "compress", "sharding", "distributed", "preemption"),
    ("models", "checkpoints"),
    ("config",),
    ("run",),
    ("evaluate",),
    ("train", "export"),
    ("transcribe", "onnx_export"),
    ("study_report", "sensitivity"),
    ("study", "compile"),
    ("cli",),
    ("__main__",),
)
RANK = {group: i for i, groups in enumerate(LAYERS) for group in groups}

# Imports that may sit inside a function, and why: the CLI imports a command's modules
# only when it runs (`usmqs synth` needs no JAX; `compile --fake-devices` sets XLA_FLAGS
# first); the corpus synthesizer is an optional (GPL) extra, imported only when used.
LAZY_IMPORTERS = {"usmqs.cli"}
LAZY_TARGETS = {"usmqs.data.synth"}

MAX_FUNCTION_LINES = 80
# The CLI's argument declarations are one long list by nature.
LONG_FUNCTIONS_ALLOWED = {("usmqs.cli", "main")}


def modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def group(module: str) -> str:
    """The layer group of a module: its first component below ``usmqs``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: pathlib.Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported usmqs module, line, inside a function?) for every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from usmqs.x import y`: y may be a module itself.
                names = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in known else child.module
                         for a in child.names]
            for name in names:
                if name.split(".")[0] == "usmqs":
                    found.append((name, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {n for n, _, _ in imports(p, set(mods)) if n != m and n in mods} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := dfs(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return None


def layering_problems() -> list[str]:
    mods = modules()
    problems = []
    for m, path in mods.items():
        g = group(m)
        if g == "__init__":
            continue
        for target, line, in_function in imports(path, set(mods)):
            tg = group(target)
            where = f"{path.relative_to(PACKAGE.parent)}:{line}: {m} imports {target}"
            if tg not in RANK:
                problems.append(f"{where}: {tg!r} is in no layer (add it to LAYERS)")
            elif tg != g and RANK[tg] >= RANK[g]:
                problems.append(f"{where}: {tg} is not below {g}")
            if in_function and m not in LAZY_IMPORTERS and target not in LAZY_TARGETS:
                problems.append(f"{where} inside a function (import it at the top)")
    return problems


def long_functions() -> list[str]:
    out = []
    for m, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and (m, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.name} has {length} lines")
    return out


def test_every_module_is_in_a_layer_and_imports_point_down():
    assert layering_problems() == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_no_function_over_the_line_limit():
    assert long_functions() == []


def test_the_checks_can_fail(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom usmqs import train\n\ndef f():\n    from usmqs.run import build\n")
    assert imports(src, {"usmqs.train", "usmqs.run"}) == [("usmqs.train", 2, False), ("usmqs.run", 5, True)]


if __name__ == "__main__":
    graph = import_graph()
    for i, groups in enumerate(LAYERS):
        print(f"layer {i}: {', '.join(groups)}")
    print()
    for m in sorted(graph, key=lambda m: (RANK.get(group(m), -1), m)):
        print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
    problems = layering_problems() + long_functions()
    cycle = find_cycle(graph)
    if cycle:
        problems.append("cycle: " + " -> ".join(cycle))
    print("\n".join(["", *problems]) if problems else "\nno problems")
    sys.exit(1 if problems else 0)
