"""defectseg: imbalanced industrial surface-defect segmentation with PyTorch Lightning.

The package is organised by concern:

* :mod:`defectseg.data` -- the batch contract, the :class:`DefectDataModule` base class and
  one datamodule per dataset format (plus the built-in synthetic generator).
* :mod:`defectseg.losses` -- the loss registry (``ce``, ``dice``, ``focal``, ``balanced``...).
* :mod:`defectseg.models` -- plain ``nn.Module`` networks and the LightningModules that train
  them (:class:`SegmentationModule`).
* :mod:`defectseg.cli` -- the ``defectseg`` LightningCLI.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
