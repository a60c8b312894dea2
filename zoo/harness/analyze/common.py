"""Shared pieces of the analysis tools: loading the models they compare and writing their outputs.

``Report``             what a tool's ``run`` returns: the printed table, the JSON record, the figure
``write_report``       prints the table, writes ``OUT/<tool>.json`` and ``OUT/<tool>.png``
``load_module``        a zoo run / export folder (:func:`zoo.harness.load.load_run`) or a backbone alias
``ModelPair``          the base and the tuned model; with an adapter run and no separate base, the base
                       is the same module inside ``adapter.disabled()`` (one backbone in memory)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule


@dataclass
class Report:
    """A tool's result: ``table`` is printed, ``record`` saved as JSON, ``figure`` (matplotlib) as PNG."""

    table: str
    record: dict[str, Any]
    figure: Any = None
    extra_files: dict[str, str] = field(default_factory=dict)  # file name -> text, written beside


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(name: str, report: Report, out: str | Path) -> dict[str, Path]:
    """Print ``report.table``; write ``OUT/<name>.json`` and, with a figure, ``OUT/<name>.png``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    print(report.table)
    paths = {"json": folder / f"{name}.json"}
    paths["json"].write_text(json.dumps(_json_safe({"tool": name, **report.record}), indent=2) + "\n",
                             encoding="utf-8")
    if report.figure is not None:
        import matplotlib.pyplot as plt

        paths["png"] = folder / f"{name}.png"
        report.figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
        plt.close(report.figure)
    for file_name, text in report.extra_files.items():
        (folder / file_name).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    """A headless matplotlib figure with ``ncols`` axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table (floats with 4 decimals)."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    return "\n".join([line, "-" * len(line), *("  ".join(c.ljust(w) for c, w in zip(r, widths))
                                                for r in cells)])


# ---------------------------------------------------------------------------------------------- models
def add_model_arguments(parser: argparse.ArgumentParser, base_required: bool = False) -> None:
    """``--tuned``, ``--base`` (default: the tuned run's adapter switched off, or its original backbone),
    ``--model`` (backbone for exports that do not carry one) and ``--device``."""
    parser.add_argument("--tuned", required=True,
                        help="the tuned model: a zoo run directory, an export folder or a backbone alias")
    parser.add_argument("--base", default=None, required=base_required,
                        help="the base model (run, export or alias); default: the tuned run with its adapter "
                             "disabled, or the backbone it was trained from")
    parser.add_argument("--model", default=None, help="backbone for exports that do not carry one")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _is_run_path(spec: str) -> bool:
    return Path(spec).expanduser().exists()


def load_module(spec: str, model: str | None = None, device: str | None = None) -> CausalLMModule:
    """A module from a run directory / export folder (its own class and trained tensors) or, for anything
    that is not a path, a plain module on the backbone ``spec`` (an alias such as ``tiny-llama``)."""
    if _is_run_path(spec):
        from zoo.harness.load import load_run

        module = load_run(spec, model=model, device=device)
    else:
        try:
            module = CausalLMModule(model=spec, export=False)
        except OSError as err:
            raise ConfigError(f"{spec!r} is neither a run/export folder nor a loadable backbone ({err}); "
                              "pass a zoo run directory, an export folder or an alias such as tiny-llama"
                              ) from err
        if device is not None:
            module.to(device)
    return module.eval()


@contextlib.contextmanager
def tuning_disabled(module: CausalLMModule) -> Iterator[CausalLMModule]:
    """``module`` with its tuning switched off: ``adapter.disabled()`` (or peft's ``disable_adapter``)."""
    if not module.adapter.is_identity:
        try:
            with module.adapter.disabled():
                yield module
        except NotImplementedError as err:
            raise ConfigError(f"{type(module.adapter).__name__} cannot be switched off: pass --base "
                              "(the backbone alias or run it was trained from)") from err
        return
    if hasattr(module.model, "disable_adapter"):
        with module.model.disable_adapter():
            yield module
        return
    raise ConfigError("the tuned model has no adapter to switch off: pass --base")


class ModelPair:
    """The base and the tuned model. ``with pair.base() as m`` / ``with pair.tuned() as m`` give a module;
    when ``shared`` the two are one module, the base being its adapter switched off."""

    def __init__(self, tuned: CausalLMModule, base: CausalLMModule | None = None,
                 names: tuple[str, str] = ("base", "tuned")) -> None:
        self._tuned, self._base = tuned, base
        self.names = names

    @property
    def shared(self) -> bool:
        return self._base is None

    @contextlib.contextmanager
    def base(self) -> Iterator[CausalLMModule]:
        if self._base is not None:
            yield self._base
        else:
            with tuning_disabled(self._tuned) as module:
                yield module

    @contextlib.contextmanager
    def tuned(self) -> Iterator[CausalLMModule]:
        yield self._tuned

    @property
    def separate_base(self) -> CausalLMModule | None:
        """The base module when it is a second model, None when it is the tuned one with tuning off."""
        return self._base

    @property
    def module(self) -> CausalLMModule:
        """The tuned module (the one holding the backbone when ``shared``)."""
        return self._tuned


def load_pair(args: argparse.Namespace) -> ModelPair:
    """The models named by ``--tuned`` / ``--base`` (:func:`add_model_arguments`)."""
    tuned = load_module(args.tuned, model=args.model, device=args.device)
    names = (args.base or f"{args.tuned} (tuning off)", args.tuned)
    if args.base is not None:
        return ModelPair(tuned, load_module(args.base, model=args.model, device=args.device), names)
    if not tuned.adapter.is_identity or hasattr(tuned.model, "disable_adapter"):
        return ModelPair(tuned, None, names)
    manifest = getattr(tuned, "export_manifest", None) or {}
    original = (manifest.get("init_args") or {}).get("model")
    if not original:
        raise ConfigError(f"{args.tuned}: cannot tell its base model (no adapter to switch off): pass --base")
    base = load_module(str(original), device=args.device)
    return ModelPair(tuned, base, (str(original), args.tuned))
