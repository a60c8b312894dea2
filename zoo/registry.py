"""The method registry: one entry per method, declared where the method's class is defined.

Declare a method with the class decorator :func:`register_method` (it derives the class path, the kind
from the base class and the config path ``configs/<name>.yaml``), or with :func:`register` spelling out
every field. ``zoo list`` prints the registry, the README method table is generated from it (``python -m zoo
list --markdown``), and the test suite runs every registered config through ``fit --trainer.fast_dev_run``.

The registry is core: it imports no method. The packages that hold methods are named as data, by the
``zoo.methods`` entry-point group of installed distributions (the zoo declares ``zoo.modules`` in its
pyproject.toml; a user package can declare its own); :func:`methods` imports every module under them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from zoo.errors import ConfigError, ZooError

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


def register(name: str, kind: str, paper: str, spec: str, config: str, target: str,
             scope: str = "full") -> Method:
    """Declare a method. Re-registering the same name with different data is an error."""
    method = Method(name, kind, paper, spec, config, target, scope)
    existing = _REGISTRY.get(name)
    if existing is not None and existing != method:
        raise ValueError(f"method {name!r} registered twice with different entries: {existing} vs {method}")
    _REGISTRY[name] = method
    return method


#: The entry-point group naming the packages that hold methods (value: an importable package or module).
ENTRY_POINT_GROUP = "zoo.methods"

#: The kind a method class gets from its nearest base class listed here (qualified names: the registry
#: imports none of these classes).
KIND_BY_BASE = {
    "zoo.modules.adapters.base.Adapter": "adapter",
    "zoo.modules.base.CausalLMModule": "module",
    "lightning.pytorch.core.module.LightningModule": "module",
    "lightning.pytorch.callbacks.callback.Callback": "callback",
}

T = TypeVar("T", bound=type)


def register_method(name: str, paper: str, spec: str, scope: str = "full", *, kind: str | None = None,
                    config: str | None = None) -> Callable[[T], T]:
    """Class decorator: :func:`register` the decorated class as method ``name``.

    Derived unless given: ``target`` from the class (``module:QualName``), ``kind`` from its base classes
    (an ``Adapter`` is an "adapter", a ``CausalLMModule`` a "module", a Lightning ``Callback`` a
    "callback"; see :data:`KIND_BY_BASE`), ``config`` = ``configs/<name>.yaml``."""

    def decorate(cls: T) -> T:
        register(name=name, kind=kind or kind_of(cls), paper=paper, spec=spec,
                 config=config or f"configs/{name}.yaml", target=f"{cls.__module__}:{cls.__qualname__}",
                 scope=scope)
        return cls

    return decorate


def kind_of(cls: type) -> str:
    """The registry kind of a method class, from its nearest base class in :data:`KIND_BY_BASE`."""
    for base in cls.__mro__:
        kind = KIND_BY_BASE.get(f"{base.__module__}.{base.__qualname__}")
        if kind is not None:
            return kind
    bases = ", ".join(b.__qualname__ for b in cls.__mro__[1:])
    raise ConfigError(f"{cls.__qualname__}: no registry kind derives from its base classes ({bases}); "
                      "pass kind=... to register_method")


def method_packages() -> list[str]:
    """The packages named by the ``zoo.methods`` entry points of the installed distributions.

    Every distribution found on ``sys.path`` is read (not only the first of each name, as
    ``metadata.entry_points`` does), so a stale ``*.egg-info`` left in the working directory by an old
    build cannot hide the installed declaration."""
    return sorted({entry.value for dist in metadata.distributions() for entry in dist.entry_points
                   if entry.group == ENTRY_POINT_GROUP})


def _import_all_methods() -> None:
    """Import every module under the declared method packages, so their registrations run."""
    packages = method_packages()
    if not packages:
        raise ZooError(f"no method packages are declared (entry-point group {ENTRY_POINT_GROUP!r}): the "
                       "zoo's install predates them; reinstall it with `pip install --no-deps -e .`")
    for name in packages:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=f"{name}."):
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
        rows.append(f"| `{m.name}` | {m.kind} | {m.paper} | {spec} | `{m.config}` "
                    f"| `{m.target.split(':')[-1]}` | {m.scope} |")
    return "\n".join(rows)


def text_table() -> str:
    entries = methods()
    header = ("name", "kind", "spec", "config", "paper")
    lines = [(m.name, m.kind, m.spec or "-", m.config, m.paper) for m in entries]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = fmt.format(*("-" * w for w in widths))
    return "\n".join([fmt.format(*header), rule] + [fmt.format(*row) for row in lines])


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
