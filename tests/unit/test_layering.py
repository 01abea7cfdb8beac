"""The package's import rules, checked on the source (every import, module-level or in a function).

- cairn.checkpoint's modules run one way: each imports only modules of lower layers (LAYERS);
- cairn.models imports nothing of cairn.checkpoint but the adapter protocol and the errors;
- no module imports a ``_private`` name of another cairn module, nor reaches one through it;
- there is no import cycle among cairn's modules.

A new module must be placed in LAYERS (the test fails until it is), so the rule is stated in
one place and enforced.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cairn"

# Lowest first. A module may import modules of strictly lower layers only.
LAYERS: list[set[str]] = [
    {"errors"},
    {"layout", "faults", "adapter", "state", "results"},
    {"fsio", "lease", "s3_client"},
    {"manifest", "torchzip", "planner", "s3_conditions"},
    {"dcp_metadata", "commit", "writer_process"},
    {"writer", "reader", "groups"},
    {"local", "s3_writer", "s3_reader"},
    {"s3"},
    {"store"},
    {"staging", "hf", "retention", "mirror", "memory_slots"},
    {"api", "memory"},
    {"manager"},
    {"readers"},
    {"convert"},
    {"cli.output"},
    {"cli.folder"},
    {"cli.commands", "cli.plot"},
    {"cli"},
]
# What cairn.models may import of cairn.checkpoint (and, through it, nothing else).
MODELS_MAY_IMPORT = {"cairn.checkpoint.adapter", "cairn.checkpoint.errors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, tree: ast.Module) -> list[tuple[str, str | None, int]]:
    """(imported cairn module, imported name or None, line) for every import of a cairn module."""
    package = name if (PACKAGE.parent / Path(*name.split("."))).is_dir() else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("cairn")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("cairn"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if (PACKAGE.parent / Path(*full.split("."))).with_suffix(".py").exists() or \
                        (PACKAGE.parent / Path(*full.split("."))).is_dir():
                    out.append((full, None, node.lineno))  # `from cairn.checkpoint import fsio`
                else:
                    out.append((base, alias.name, node.lineno))
    return out


def layer_of(name: str) -> int | None:
    short = name.removeprefix("cairn.checkpoint.")
    for index, layer in enumerate(LAYERS):
        if short in layer:
            return index
    return None


ALL = modules()


@pytest.mark.parametrize("name", sorted(n for n in ALL if n.startswith("cairn.checkpoint.")))
def test_checkpoint_layers_run_one_way(name):
    mine = layer_of(name)
    assert mine is not None, f"{name} is in no layer: add it to LAYERS in {Path(__file__).name}"
    for target, _, line in imports(name, ALL[name]):
        if not target.startswith("cairn.checkpoint.") or target == name:
            continue
        theirs = layer_of(target)
        assert theirs is not None, f"{name}:{line} imports {target}, which is in no layer"
        assert theirs < mine, (f"{name}:{line} imports {target} (layer {theirs}); {name} is in layer {mine}: "
                               "imports go to lower layers only")


def test_models_import_only_the_adapter_protocol_and_errors():
    for name, tree in ALL.items():
        if not name.startswith("cairn.models"):
            continue
        for target, _, line in imports(name, tree):
            if target.startswith("cairn.checkpoint"):
                assert target in MODELS_MAY_IMPORT, f"{name}:{line} imports {target}"


def test_no_private_names_cross_modules():
    problems = []
    for name, tree in ALL.items():
        cairn_modules: dict[str, str] = {}  # local alias -> cairn module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("cairn") and alias.asname:
                        cairn_modules[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cairn"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        problems.append(f"{name}:{node.lineno} imports {node.module}.{alias.name}")
                    full = f"{node.module}.{alias.name}"
                    if full.replace(".", "/") and (PACKAGE.parent / Path(*full.split("."))).with_suffix(".py").exists():
                        cairn_modules[alias.asname or alias.name] = full
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in cairn_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                problems.append(f"{name}:{node.lineno} uses {cairn_modules[node.value.id]}.{node.attr}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {name: {target for target, _, _ in imports(name, tree) if target in ALL and target != name}
             for name, tree in ALL.items()}
    # a package's __init__ re-exporting its modules lazily is not an edge (see cairn.checkpoint.__init__)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_contract_fails_on_an_inversion(tmp_path):
    """The checks above would notice: a lower layer importing a higher one, and a cycle."""
    tree = ast.parse("from cairn.checkpoint.manager import CheckpointManager\n")
    (target, _, _), = imports("cairn.checkpoint.fsio", tree)
    assert layer_of(target) > layer_of("cairn.checkpoint.fsio")
    tree = ast.parse("from cairn.checkpoint import _private_thing\n")
    assert any(name and name.startswith("_") for _, name, _ in imports("cairn.checkpoint.api", tree))
