"""The layering rule: every module imports only from its own layer or the layers below.

    1 core      memlm.core
    2 models    memlm.models, memlm.memory           (no lightning import either)
    3 training  memlm.lightning_modules, memlm.callbacks, memlm.datamodules
    4 apps      memlm.apps, memlm.checkpoint, train.py, chat.py, serve.py

The walk reads every import statement (top level and inside functions) with ``ast``, so a
lazy import that runs upward fails too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> installed package name
FOLDERS = {
    "memlm": "memlm",
    "models": "memlm.models",
    "memory": "memlm.memory",
    "lightning_modules": "memlm.lightning_modules",
    "callbacks": "memlm.callbacks",
    "datamodules": "memlm.datamodules",
}
LAYERS = [  # (prefix, layer); the longest matching prefix wins
    ("memlm.core", 1),
    ("memlm.models", 2),
    ("memlm.memory", 2),
    ("memlm.lightning_modules", 3),
    ("memlm.callbacks", 3),
    ("memlm.datamodules", 3),
    ("memlm.apps", 4),
    ("memlm.checkpoint", 4),
    ("memlm", 4),  # memlm/__init__ and any future top-level tool
]
#: the bare names that the repository folders had before they moved under ``memlm.``
BARE = {"models", "memory", "lightning_modules", "callbacks", "datamodules"}


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return best[1] if best else None


def source_modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield path, ".".join([package, *parts])


def imports_of(path: Path, module: str):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.lineno, node.module


def test_the_walk_sees_every_layer():
    layers = {layer_of(m) for _, m in source_modules()}
    assert layers == {1, 2, 3, 4}


@pytest.mark.parametrize("path,module", list(source_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_run_downward(path: Path, module: str):
    own = layer_of(module)
    bad = []
    for lineno, target in imports_of(path, module):
        top = target.split(".")[0]
        if top in BARE:
            bad.append(f"{path.relative_to(ROOT)}:{lineno} imports the bare name {target!r}; use memlm.{target}")
            continue
        if own == 2 and top in ("lightning", "pytorch_lightning"):
            bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {target} (layer 2 is free of Lightning)")
        tl = layer_of(target)
        if tl is not None and tl > own:
            bad.append(f"{path.relative_to(ROOT)}:{lineno} (layer {own}) imports {target} (layer {tl})")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from memlm.apps.cli import MemLMCLI\n")
    found = [t for _, t in imports_of(bad, "memlm.core.bad")]
    assert found == ["memlm.apps.cli"] and layer_of(found[0]) > layer_of("memlm.core.bad")


def test_entry_points_are_thin():
    # train.py / chat.py / serve.py only hand over to memlm.apps (layer 4)
    for name in ("train.py", "chat.py", "serve.py"):
        targets = [t for _, t in imports_of(ROOT / name, name[:-3])]
        assert targets and all(t.startswith("memlm.apps") for t in targets), (name, targets)
