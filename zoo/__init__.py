"""zoo: a PyTorch Lightning zoo of LLM fine-tuning methods, measured by one harness.

``zoo.load(RUN)`` rebuilds a trained run (any method) as a working module: see :mod:`zoo.harness.load`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: Any, model: str | None = None, device: Any = None) -> Any:
    """The run's own module, rebuilt from its export with its trained tensors
    (:func:`zoo.harness.load.load_run`)."""
    import importlib

    return importlib.import_module("zoo.harness.load").load_run(path, model=model, device=device)
