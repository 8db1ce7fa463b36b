"""defectseg: imbalanced industrial surface-defect segmentation with PyTorch Lightning.

The package is organised by concern:

* :mod:`defectseg.data` -- the batch contract, the :class:`DefectDataModule` base class and
  one datamodule per dataset format (plus the built-in synthetic generator).
* :mod:`defectseg.losses` -- the loss registry (``ce``, ``dice``, ``focal``, ``balanced``...).
* :mod:`defectseg.models` -- plain ``nn.Module`` networks and the LightningModules that train
  them (:class:`SegmentationModule`).
* :mod:`defectseg.config` -- the one config parser of every command (:class:`DefectSegCLI`,
  a LightningCLI); :mod:`defectseg.cli` and :mod:`defectseg.commands` are the command line only.
* :mod:`defectseg.inference` -- :class:`Predictor` for raw images, reports, ONNX/TorchScript
  export (``defectseg.Predictor`` is imported lazily, so ``import defectseg`` stays light).
"""

from typing import Any

from defectseg.version import __version__

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from defectseg.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'defectseg' has no attribute {name!r}")
