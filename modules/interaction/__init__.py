"""Learning from interaction and from generated data: LeTI (sample, execute, fine-tune on feedback).

The registry imports every module under ``zoo.modules``; the thinking-then-translating study's DataModule
(:mod:`zoo.datamodules.translation`, registered as ``cot_translation``) is imported here so its
registration runs with the rest.
"""

from zoo.datamodules import translation as _translation  # noqa: F401  (registers cot_translation)
