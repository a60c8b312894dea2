"""The run's seed for a component's own random streams (sampling, re-initialisation, data order)."""

from __future__ import annotations

import os


def run_seed(seed: int | None, fallback: int = 0) -> int:
    """``seed`` when given, else the global seed Lightning's ``seed_everything`` set (``PL_GLOBAL_SEED``; the
    CLI and ``zoo bench --seeds`` set it before any component is built), else ``fallback``. A component that
    keeps its own generator uses this, so bench seeds vary it."""
    if seed is not None:
        return int(seed)
    return int(os.environ.get("PL_GLOBAL_SEED", fallback))
