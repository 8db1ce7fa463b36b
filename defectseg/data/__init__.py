"""Datamodules, the batch contract and the shared dataset machinery."""

from defectseg.data.base import DatasetNotFoundError, DefectDataModule, DefectDataset, Sample
from defectseg.data.contract import IGNORE_INDEX, collate_batch
from defectseg.data.synthetic import SyntheticDefectsDataModule

__all__ = [
    "IGNORE_INDEX",
    "DatasetNotFoundError",
    "DefectDataModule",
    "DefectDataset",
    "Sample",
    "SyntheticDefectsDataModule",
    "collate_batch",
]
