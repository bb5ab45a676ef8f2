"""The package's layers (docs/ARCHITECTURE.md), checked on the source: no module imports
from a higher layer, and fedscore imports inside function bodies are kept for what must be
lazy (optional heavy dependencies, CLI start-up), each with a comment saying why."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedscore"

# bottom to top; a module may import from its own layer and the ones below
LAYERS = [
    {"errors", "io", "cache", "runtime", "config", "plotting"},
    {"diffusion", "toy", "data", "models"},
    {"federated", "inference", "metrics", "theory", "privacy"},
    {"runs", "experiments", "demo", "export"},  # export: a run folder -> a diffusers folder
    {"flower"},
    {"cli", "__main__"},
]


def layer_of(module: str) -> int:
    """Layer index of a dotted fedscore module name (fedscore.X.Y -> X's layer)."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module}: package {head!r} is in no layer of tests/test_layers.py")


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        if name == "fedscore":
            continue
        yield name, path


def fedscore_imports(tree: ast.AST, module: str):
    """(node, imported fedscore module) for every import of a fedscore module."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "fedscore":  # from fedscore import data, diffusion
                for alias in node.names:
                    yield node, f"fedscore.{alias.name}"
            elif target.startswith("fedscore."):
                yield node, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fedscore."):
                    yield node, alias.name


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for module, path in modules():
        tree = ast.parse(path.read_text())
        mine = layer_of(module)
        for node, target in fedscore_imports(tree, module):
            if layer_of(target) > mine:
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} imports {target}")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


# the CLI imports each command's machinery inside the command so that `fedscore --help`
# starts in a fraction of a second (its module docstring says so); nothing else is exempt
LAZY_MODULES = {"fedscore.cli"}


def test_fedscore_imports_inside_functions_are_commented():
    """An import inside a function hides a dependency; allowed where it must be lazy (CLI
    start-up, optional heavy packages, a cycle) and then with a comment on that line or the
    line above saying why."""
    bad = []
    for module, path in modules():
        if module in LAZY_MODULES:
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                if not any(True for _ in fedscore_imports(node, module)):
                    continue
                here = lines[node.lineno - 1]
                above = lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {here.strip()}")
    assert not bad, "uncommented fedscore imports inside functions:\n" + "\n".join(bad)
