"""Datamodules, the batch contract and the shared dataset machinery."""

from defectseg.data.base import DatasetNotFoundError, DefectDataModule, DefectDataset, Sample
from defectseg.data.contract import IGNORE_INDEX, collate_batch
from defectseg.data.dagm import DAGMDataModule
from defectseg.data.files import FileDataModule
from defectseg.data.folder import FolderDataModule
from defectseg.data.kolektor import KolektorSDD2DataModule
from defectseg.data.magnetic_tile import MagneticTileDataModule
from defectseg.data.neu_seg import NEUSegDataModule
from defectseg.data.severstal import SeverstalDataModule
from defectseg.data.synthetic import SyntheticDefectsDataModule

__all__ = [
    "IGNORE_INDEX",
    "DAGMDataModule",
    "DatasetNotFoundError",
    "DefectDataModule",
    "DefectDataset",
    "FileDataModule",
    "FolderDataModule",
    "KolektorSDD2DataModule",
    "MagneticTileDataModule",
    "NEUSegDataModule",
    "Sample",
    "SeverstalDataModule",
    "SyntheticDefectsDataModule",
    "collate_batch",
]
