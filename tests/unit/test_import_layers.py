"""Imports go only downward through the package's layers, lazy imports inside functions included.

Layers, top to bottom (a module may import its own layer and any layer below it, never one above):

    entry points (train.py, eval.py, prepare.py, generate.py, benchmarks/)
    mmsuite.run                -> mmsuite.tokenize (run calls tokenize for prepare.py tokenize.*)
    mmsuite.config             -> the settings classes of every model and data module as Hydra schemas
    mmsuite.console            (warning filters and train.log; used by the entry points and run)
    mmsuite.tokenize
    mmsuite.lightning_modules
    mmsuite.callbacks
    mmsuite.datamodules
    mmsuite.tokenizers         -> tokenizers may use sources (image preprocessing) and nn
    mmsuite.sources            -> sources may use nn, never tokenizers
    mmsuite.nn                 -> plain torch building blocks; of mmsuite only the settings
    mmsuite.settings           -> typed settings (setting, parse), used by every layer above; no mmsuite import

Every module of the package must belong to one of these layers (a new top-level module or package gets a place
here first). Imports by string (``importlib.import_module``) are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mmsuite"
LAYERS = (
    "mmsuite.run",
    "mmsuite.config",
    "mmsuite.console",
    "mmsuite.tokenize",
    "mmsuite.lightning_modules",
    "mmsuite.callbacks",
    "mmsuite.datamodules",
    "mmsuite.tokenizers",
    "mmsuite.sources",
    "mmsuite.nn",
    "mmsuite.settings",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer ``module`` belongs to (None for the package root ``mmsuite`` itself)."""
    if module == "mmsuite":
        return None
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} belongs to no import layer; add it to LAYERS in {Path(__file__).name}")


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``mmsuite`` import anywhere in ``tree`` (function bodies too), relative imports
    resolved; ``from mmsuite.x import y`` counts as ``mmsuite.x.y`` so that ``from mmsuite import run`` is
    ``mmsuite.run``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "mmsuite" or name.startswith("mmsuite.")]


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    """One message per import in ``path`` (or in ``source``, read as if it were ``path``) from a layer above."""
    module = module_name(path)
    own = layer_of(module)
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    rel = path.relative_to(ROOT)
    problems = []
    for line, name in imported_modules(tree, module, path.name == "__init__.py"):
        target = layer_of(name)
        if own is None or target is None:
            continue
        if LAYERS.index(target) < LAYERS.index(own):
            problems.append(f"{rel}:{line}: {own} imports {name} from {target}, a layer above it")
    return problems


def test_every_module_imports_only_its_own_layer_or_below():
    problems = [msg for path in sorted(PACKAGE.rglob("*.py")) for msg in upward_imports(path)]
    assert not problems, "imports against the layer order (see this test's docstring):\n" + "\n".join(problems)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))  # raises for a module outside every layer


@pytest.mark.parametrize(
    ("file", "source", "message"),
    [
        (
            "mmsuite/tokenizers/text.py",
            "import os\n\n\ndef f():\n    from mmsuite.datamodules.base import settings_hash\n",
            "mmsuite/tokenizers/text.py:5: mmsuite.tokenizers imports mmsuite.datamodules.base.settings_hash "
            "from mmsuite.datamodules, a layer above it",
        ),
        (
            "mmsuite/sources/video.py",
            "from mmsuite.tokenizers import pretrained_image\n",
            "mmsuite/sources/video.py:1: mmsuite.sources imports mmsuite.tokenizers.pretrained_image from "
            "mmsuite.tokenizers, a layer above it",
        ),
        (
            "mmsuite/datamodules/nano4m.py",
            "class A:\n    def f(self):\n        import mmsuite.lightning_modules.audio_tokenizer as m\n",
            "mmsuite/datamodules/nano4m.py:3: mmsuite.datamodules imports mmsuite.lightning_modules.audio_tokenizer "
            "from mmsuite.lightning_modules, a layer above it",
        ),
        (
            "mmsuite/callbacks/samples.py",
            "from .. import run\n",
            "mmsuite/callbacks/samples.py:1: mmsuite.callbacks imports mmsuite.run from mmsuite.run, a layer above it",
        ),
    ],
)
def test_an_upward_import_is_named_with_file_line_and_both_layers(file, source, message):
    assert upward_imports(ROOT / file, source) == [message]


def test_downward_and_same_layer_imports_pass():
    source = (
        "from mmsuite.nn.transformer import Block\nfrom mmsuite.datamodules.base import ensure_tokenizer\n"
        "from . import masking\nfrom mmsuite.lightning_modules.dynamics import conventions\n"
    )
    assert upward_imports(ROOT / "mmsuite/lightning_modules/fourm/model.py", source) == []
