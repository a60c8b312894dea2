"""Shared LightningDataModules and collators."""

from zoo.datamodules.sft import (
    SEGMENT_ANSWER,
    SEGMENT_PAD,
    SEGMENT_PROMPT,
    SEGMENT_REASONING,
    DataError,
    SFTDataModule,
)

__all__ = ["DataError", "SEGMENT_ANSWER", "SEGMENT_PAD", "SEGMENT_PROMPT", "SEGMENT_REASONING",
           "SFTDataModule"]
