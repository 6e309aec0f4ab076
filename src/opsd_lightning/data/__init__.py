"""Data modules that yield raw-text batches of problem, privileged solution and answer."""

from opsd_lightning.data.arith import ArithDataModule
from opsd_lightning.data.datamodule import RawTextDataModule, ReasoningDataModule, collate_raw_text
from opsd_lightning.data.sources import OPTIONAL_FIELDS, REQUIRED_FIELDS

__all__ = [
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "ArithDataModule",
    "RawTextDataModule",
    "ReasoningDataModule",
    "collate_raw_text",
]
