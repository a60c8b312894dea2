"""Imports point one way: kernels <- core <- datamodules <- modules <- harness <- CLI (DESIGN.md "Layers").

Every ``.py`` file of the package is parsed with ``ast``; every import of a zoo module, at module level or
inside a function, and every ``importlib.import_module`` / ``importlib.util.find_spec`` / ``__import__`` of a
literal zoo name, must point to its own layer or a lower one. Kernels import only the standard library,
torch and triton.

Layers (by file): ``kernels/`` (``zoo.kernels``); core = the top-level files of ``zoo/`` (errors, labels,
backbone, chat, decoding, tasks, registry, sandbox, ...); ``datamodules/``; ``modules/``; ``zoo/harness/``;
CLI = ``zoo/cli.py``, ``zoo/__main__.py`` and ``zoo/__init__.py``.

``zoo/__init__.py`` counts as the CLI layer: it is the public facade (``zoo.load`` reaches the harness's
loader through ``importlib``), it imports nothing at import time (so importing any ``zoo.*`` module does not
pull the harness in), and placing it on top makes ``from zoo import load`` an error in every lower layer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"zoo": REPO / "zoo", "zoo.modules": REPO / "modules", "zoo.datamodules": REPO / "datamodules",
         "zoo.kernels": REPO / "kernels"}
LAYERS = ("kernels", "core", "datamodules", "modules", "harness", "cli")
CLI_MODULES = {"zoo", "zoo.cli", "zoo.__main__"}
KERNEL_THIRD_PARTY = {"torch", "triton"}

#: (file relative to the repository, imported zoo module) -> why the upward arrow is tolerated for now.
#: Keep it empty: an entry that is no longer needed fails the test, so it is removed with the fix.
ALLOWED: dict[tuple[str, str], str] = {}  # no exception: every arrow points down


def module_name(path: Path) -> str:
    for name, root in sorted(ROOTS.items(), key=lambda item: -len(str(item[1]))):
        if path.is_relative_to(root):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join([name, *parts])
    raise AssertionError(f"{path} is outside the package roots")


def source_files() -> dict[str, Path]:
    files = {}
    for root in ROOTS.values():
        for path in root.rglob("*.py"):
            if "__pycache__" not in path.parts:
                files[module_name(path)] = path
    return files


FILES = source_files()


def layer(module: str) -> str:
    if module in CLI_MODULES:
        return "cli"
    for prefix, name in (("zoo.kernels", "kernels"), ("zoo.datamodules", "datamodules"),
                         ("zoo.modules", "modules"), ("zoo.harness", "harness")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "core"


def resolve(name: str) -> str:
    """The longest prefix of a dotted import target that is a module of the package (``zoo.x.y.f`` ->
    ``zoo.x.y``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in FILES:
            return ".".join(parts[:end])
    return name


def imports(path: Path, module: str):
    """(line, imported name, source line) for each import in the file; ``from a import b`` yields ``a.b``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = path.read_text(encoding="utf-8").splitlines()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "find_spec", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        for name in names:
            yield node.lineno, name, lines[node.lineno - 1].strip()


def violations() -> tuple[list[str], set[tuple[str, str]]]:
    found, used = [], set()
    for module, path in sorted(FILES.items()):
        rel = path.relative_to(REPO).as_posix()
        here = layer(module)
        seen = set()
        for line, name, text in imports(path, module):
            top = name.split(".")[0]
            if here == "kernels" and top not in ("zoo", "") and top not in KERNEL_THIRD_PARTY \
                    and top not in sys.stdlib_module_names:
                found.append(f"{rel}:{line}: kernels import only torch and triton: `{text}`")
            if top != "zoo":
                continue
            target = resolve(name)
            if LAYERS.index(layer(target)) <= LAYERS.index(here) or (line, target) in seen:
                continue
            seen.add((line, target))
            if (rel, target) in ALLOWED:
                used.add((rel, target))
                continue
            found.append(f"{rel}:{line}: {here} imports {target} ({layer(target)}): `{text}`")
    return found, used


def test_imports_point_down_the_layers():
    found, used = violations()
    assert not found, "imports against the layer direction (DESIGN.md, Layers):\n" + "\n".join(found)
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"ALLOWED entries no longer needed, remove them: {stale}"


def test_the_checker_sees_imports_inside_functions_relative_and_dynamic(tmp_path):
    probe = tmp_path / "probe.py"  # read as the core module zoo._probe
    probe.write_text("import importlib\n\nimport torch\nfrom zoo import load, registry\n\n\ndef f():\n"
                     "    from zoo.modules.base import CausalLMModule\n    from .harness import runner\n"
                     "    return importlib.import_module('zoo.cli')\n")
    seen = {(line, resolve(name)) for line, name, _ in imports(probe, "zoo._probe") if name.startswith("zoo")}
    assert seen == {(4, "zoo"), (4, "zoo.registry"), (8, "zoo.modules.base"), (9, "zoo.harness.runner"),
                    (10, "zoo.cli")}
    expected = {"zoo": "cli", "zoo.registry": "core", "zoo.modules.base": "modules",
                "zoo.harness.runner": "harness", "zoo.cli": "cli", "zoo.kernels.selected_ce": "kernels",
                "zoo.datamodules.sft": "datamodules"}
    assert {name: layer(name) for name in expected} == expected
