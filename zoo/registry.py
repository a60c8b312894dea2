"""The method registry: one entry per method, declared by ``register(...)`` at the end of its file.

``zoo list`` prints it, the README method table is generated from it (``python -m zoo list
--markdown``), and the test suite runs every registered config through ``fit --trainer.fast_dev_run``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "module" | "adapter" | "callback" | "loss" | "datamodule" | "strategy" | "analysis"
    paper: str
    spec: str  # "03" for papers/03-sstoken.md, "" for baselines
    config: str  # path relative to the repository root
    target: str  # "zoo.modules.x:ClassName"
    scope: str = "full"  # "full", or a one-line statement of what is left out

    @property
    def config_path(self) -> Path:
        return REPO_ROOT / self.config


_REGISTRY: dict[str, Method] = {}


def register(name: str, kind: str, paper: str, spec: str, config: str, target: str, scope: str = "full") -> Method:
    """Declare a method. Re-registering the same name with different data is an error."""
    method = Method(name, kind, paper, spec, config, target, scope)
    existing = _REGISTRY.get(name)
    if existing is not None and existing != method:
        raise ValueError(f"method {name!r} registered twice with different entries: {existing} vs {method}")
    _REGISTRY[name] = method
    return method


def _import_all_methods() -> None:
    import zoo.modules

    for info in pkgutil.walk_packages(zoo.modules.__path__, prefix="zoo.modules."):
        importlib.import_module(info.name)


def methods() -> list[Method]:
    """Every registered method, sorted by spec id then name (baselines first)."""
    _import_all_methods()
    return sorted(_REGISTRY.values(), key=lambda m: (m.spec or "00", m.name))


def get(name: str) -> Method:
    _import_all_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; `zoo list` shows the registered ones")
    return _REGISTRY[name]


def markdown_table() -> str:
    rows = ["| method | kind | paper | spec | config | class | scope |", "|---|---|---|---|---|---|---|"]
    for m in methods():
        spec = m.spec or "baseline"
        rows.append(f"| `{m.name}` | {m.kind} | {m.paper} | {spec} | `{m.config}` | `{m.target.split(':')[-1]}` "
                    f"| {m.scope} |")
    return "\n".join(rows)


def text_table() -> str:
    entries = methods()
    header = ("name", "kind", "spec", "config", "paper")
    lines = [(m.name, m.kind, m.spec or "-", m.config, m.paper) for m in entries]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines])


README_START, README_END = "<!-- methods:start -->", "<!-- methods:end -->"


def readme_table(readme: Path = REPO_ROOT / "README.md") -> str | None:
    """The method table currently between the README markers (None without markers)."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return None
    return text.split(README_START, 1)[1].split(README_END, 1)[0].strip()


def update_readme(readme: Path = REPO_ROOT / "README.md") -> None:
    """Rewrite the README method table from the registry (`python -m zoo list --update-readme`)."""
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n{markdown_table()}\n{README_END}{tail}", encoding="utf-8")
