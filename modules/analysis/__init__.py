"""Analysis pieces that live at the module layer: TuCo's block decomposition, ``FTCScaler`` and its
callback (:mod:`.tuco`), and the tuning-free URIAL module (:mod:`.urial`). The ``zoo analyze`` commands
that use them are in :mod:`zoo.harness.analyze`."""

from zoo.modules.analysis.tuco import BlockPair, FTCScaler, TuCoCallback, TuCoResult, decompose, tuco

__all__ = ["BlockPair", "FTCScaler", "TuCoCallback", "TuCoResult", "decompose", "tuco"]
