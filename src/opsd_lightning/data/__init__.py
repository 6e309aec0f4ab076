"""Data modules that yield raw-text batches of problem, privileged solution and answer."""

from opsd_lightning.data.arith import ArithDataModule
from opsd_lightning.data.datamodule import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    RawTextDataModule,
    ReasoningDataModule,
    collate_raw_text,
)

__all__ = [
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "ArithDataModule",
    "RawTextDataModule",
    "ReasoningDataModule",
    "collate_raw_text",
]
