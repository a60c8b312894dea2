"""Registry entry of GOT-D, a data selector (the selector and its DataModule live on the data side:
:mod:`zoo.datamodules.got_d`, :mod:`zoo.datamodules.selection`; the registry imports method entries from
``zoo.modules`` only, so the entry is declared here)."""

from __future__ import annotations

from zoo.datamodules.got_d import GOTDSelector
from zoo.registry import register_method

register_method(
    name="got_d",
    paper="Get more for less: Principled Data Selection for Warming Up Fine-Tuning in LLMs (2024)",
    spec="16",
    scope="selector + two-stage DataModule (pool texts, then the task); frozen MiniLM encoder (not a "
          "target-fine-tuned one); no per-domain OT pre-filter; paper-scale pools and toxicity scoring "
          "user-side",
    kind="datamodule",
)(GOTDSelector)
