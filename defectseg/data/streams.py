"""The training stream: the one place that decides what a training batch is made of.

A datamodule's ``train_dataloader()`` calls :func:`train_loader`, which picks one of three
streams and builds its loader:

* **plain**: the training :class:`~defectseg.data.dataset.DefectDataset`, shuffled (or drawn
  with a set share of defective images, ``defect_image_fraction``);
* **DLI** (``dli:`` set): the same dataset wrapped in a
  :class:`~defectseg.data.dli.DLIDataset` and batched by a
  :class:`~defectseg.data.dli.DLIBatchSampler` (class-balanced batches);
* **semi-supervised** (``labeled_fraction``, ``num_labeled`` or ``unlabeled_dirs`` set): the
  plain or DLI stream of the labelled subset beside the unlabelled pool, as a Lightning
  ``CombinedLoader`` yielding ``{"labeled": batch, "unlabeled": batch}``.

A batch's route only goes down: datamodule -> this module -> dataset (and DLI) -> io. The
datamodule is only read here (batch size, workers, seed, trainer), never imported.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from defectseg.data.contract import collate_batch
from defectseg.data.dataset import DefectDataset
from defectseg.data.dli import DefectInjector, DLIBatchSampler, DLIConfig, DLIDataset, collate_dli, process_group


def make_loader(datamodule: Any, dataset: Dataset, shuffle: bool, **kwargs: Any) -> DataLoader:
    """A DataLoader over ``dataset`` with the datamodule's batch size, workers and pinning.

    Raises:
        ValueError: ``dataset`` is empty (naming the split and the datamodule's split sizes).
    """
    if len(dataset) == 0:
        split = getattr(dataset, "split", None) or "this"
        raise ValueError(
            f"{type(datamodule).__name__}: the {split} split has no samples ({datamodule.describe()}); with "
            "a small dataset raise val_fraction/test_fraction, or set them to 0 and skip that stage"
        )
    kwargs.setdefault("batch_size", datamodule.batch_size)
    kwargs.setdefault("collate_fn", collate_batch)
    return DataLoader(
        dataset,
        shuffle=shuffle,
        num_workers=datamodule.num_workers,
        pin_memory=getattr(datamodule, "pin_memory", False),
        persistent_workers=datamodule.num_workers > 0,
        **kwargs,
    )


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank ``rank``'s share of ``size`` items in order: ``rank, rank + replicas, ...``.

    Unlike :class:`~torch.utils.data.DistributedSampler` it pads nothing, so every image of a
    validation or test split is counted once over the ranks (the shares differ by at most one).
    """

    def __init__(self, size: int, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"ShardSampler: rank {rank} is not in 0..{num_replicas - 1}")
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(datamodule: Any, dataset: Dataset) -> DataLoader:
    """The loader of a validation, test or predict split, in order.

    Under a multi-process trainer with ``use_distributed_sampler=False`` (as DLI needs), each
    rank gets its own share of the split (:class:`ShardSampler`); Lightning's sampler, when it
    is on, does the same. Metrics are synced over the ranks, so they describe the whole split.
    """
    trainer = getattr(datamodule, "trainer", None)
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    connector = getattr(trainer, "_accelerator_connector", None)
    if world > 1 and not getattr(connector, "use_distributed_sampler", True):
        sampler = ShardSampler(len(dataset), world, int(trainer.global_rank))
        return make_loader(datamodule, dataset, shuffle=False, sampler=sampler)
    return make_loader(datamodule, dataset, shuffle=False)


def distributed_context(datamodule: Any) -> tuple[int, int]:
    """``(world_size, rank)`` for the training loader, from the attached trainer if any.

    Raises:
        RuntimeError: DLI under a multi-process trainer with ``use_distributed_sampler=True``:
            Lightning would then replace DLI's batch sampler.
    """
    trainer = getattr(datamodule, "trainer", None)
    if trainer is not None:
        world, rank = int(trainer.world_size), int(trainer.global_rank)
        connector = getattr(trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise RuntimeError(
                "DLI splits the training batches across ranks itself, but the trainer has "
                "use_distributed_sampler=True, which would replace its batch sampler. Set "
                "trainer.use_distributed_sampler: false in the config (the validation and test loaders "
                "then split their images across the ranks themselves)."
            )
        return world, rank
    return process_group()


def dli_loader(
    datamodule: Any,
    dataset: DefectDataset | None = None,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """The DLI training loader of ``datamodule`` (class-balanced batches).

    Args:
        datamodule: batch size, workers, seed, classes and ``dli_config`` come from it.
        dataset: the training dataset (``datamodule.make_dataset('train')`` if ``None``).
        num_replicas: ranks (default: from the trainer, else the process group, else 1).
        rank: this rank (likewise).
    """
    config = getattr(datamodule, "dli_config", None) or DLIConfig()
    if dataset is None:
        dataset = datamodule.make_dataset("train")
    if num_replicas is None or rank is None:
        world, this_rank = distributed_context(datamodule)
        num_replicas = world if num_replicas is None else num_replicas
        rank = this_rank if rank is None else rank
    class_names = list(datamodule.class_names)
    if not any(s.defect_free for s in dataset.samples):
        warnings.warn(
            f"DLI: the training split of {type(datamodule).__name__} has no defect-free image to "
            "inject into; batches are served as they are",
            stacklevel=2,
        )
    sampler = DLIBatchSampler(
        dataset.samples,
        datamodule.batch_size,
        datamodule.num_classes,
        config,
        seed=datamodule.seed,
        num_replicas=num_replicas,
        rank=rank,
        class_names=class_names,
    )
    return DataLoader(
        DLIDataset(dataset, DefectInjector(config, class_names)),
        batch_sampler=sampler,
        num_workers=datamodule.num_workers,
        collate_fn=collate_dli,
        pin_memory=getattr(datamodule, "pin_memory", False),
        persistent_workers=datamodule.num_workers > 0,
    )


def defect_image_sampler(samples: list[Any], fraction: float, seed: int) -> WeightedRandomSampler | None:
    """A seeded sampler drawing ``fraction`` of its ``len(samples)`` picks from defective images.

    Each defective image has weight ``fraction / n_defective``, each defect-free one
    ``(1 - fraction) / n_free`` (draws with replacement). ``None`` when the split has only one
    kind of image (nothing to rebalance; the caller shuffles it as it is).
    """
    defective = [not s.defect_free for s in samples]
    n_defective = sum(defective)
    n_free = len(samples) - n_defective
    if n_defective == 0 or n_free == 0:
        warnings.warn(
            f"defect_image_fraction={fraction}: the training split has {n_defective} defective and {n_free} "
            "defect-free images, so there is nothing to rebalance; it is shuffled as it is",
            stacklevel=3,
        )
        return None
    weights = [fraction / n_defective if d else (1.0 - fraction) / n_free for d in defective]
    generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=generator)


def labeled_loader(datamodule: Any) -> DataLoader:
    """The supervised stream: DLI batches when ``dli`` is set, else the shuffled training set
    (drawn with ``defect_image_fraction`` defective images when that is set)."""
    dataset = datamodule.make_dataset("train")
    if getattr(datamodule, "dli_config", None) is not None:
        return dli_loader(datamodule, dataset)
    fraction = getattr(datamodule, "defect_image_fraction", None)
    sampler = defect_image_sampler(dataset.samples, fraction, datamodule.seed) if fraction is not None else None
    if sampler is not None:
        return make_loader(datamodule, dataset, shuffle=False, sampler=sampler, drop_last=False)
    return make_loader(datamodule, dataset, shuffle=True, drop_last=False)


def unlabeled_loader(datamodule: Any) -> DataLoader:
    """Shuffled loader of the unlabelled pool, ``unlabeled_batch_size`` images a batch.

    Under DDP (a trainer with ``world_size > 1``) each rank gets its own shard through a seeded
    :class:`~torch.utils.data.DistributedSampler`, also when ``use_distributed_sampler`` is off
    (as DLI needs for the labelled stream); Lightning sets its epoch.
    """
    dataset = datamodule.make_unlabeled_dataset()
    trainer = getattr(datamodule, "trainer", None)
    world_size = int(getattr(trainer, "world_size", 1) or 1)
    kwargs: dict[str, Any] = {"shuffle": True}
    if world_size > 1:
        kwargs = {
            "shuffle": False,
            "sampler": DistributedSampler(
                dataset, num_replicas=world_size, rank=int(trainer.global_rank), shuffle=True, seed=datamodule.seed
            ),
        }
    batch_size = datamodule.semi.unlabeled_batch_size or datamodule.batch_size
    return make_loader(datamodule, dataset, drop_last=False, batch_size=batch_size, **kwargs)


def train_loader(datamodule: Any) -> Any:
    """The training loader: plain, DLI, or labelled + unlabelled (see the module doc)."""
    labeled = labeled_loader(datamodule)
    if not datamodule.semi_supervised:
        return labeled
    from lightning.pytorch.utilities import CombinedLoader

    return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled_loader(datamodule)}, mode="max_size_cycle")
