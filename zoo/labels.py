"""Label conventions every layer shares: the ignored-label id and which positions are supervised.

Core, so data modules (held-out NLL of preference pairs), methods and the harness use one definition.
"""

from __future__ import annotations

from torch import Tensor

from zoo.kernels.selected_ce import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "target_mask"]


def target_mask(labels: Tensor) -> Tensor:
    """(B, T) bool: tokens that are supervised. Column 0 has no context, so it never is."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask
