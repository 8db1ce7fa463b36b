"""Dynamic Label Injection (DLI): class-balanced training batches by defect injection.

After Caruso et al., "Dynamic Label Injection for Imbalanced Industrial Defect Segmentation"
(ECCV workshops 2024). For each training batch, every defect-free image (except an optional
share kept untouched) receives one defect of the class that is rarest in the batch so far,
taken from a donor training image of that class, transformed (flip, rotation, scale, shift) and
blended in by Poisson seamless cloning or by cut-paste. The batch ends up uniform over the
defect classes, or as uniform as its defect-free images allow.

The published implementation injects serially on the main process inside the training loop.
Here the work is split in two:

* :class:`DLIBatchSampler` plans every batch in the main process from the per-image metadata
  only (:attr:`~defectseg.data.records.Sample.pixel_counts`; nothing is decoded). It yields lists
  of :class:`InjectionPlan` items, handles the DDP rank split itself and is deterministic given
  its seed and epoch.
* :class:`DLIDataset` wraps the training :class:`~defectseg.data.dataset.DefectDataset` and
  runs in the DataLoader workers: for each plan item its :class:`DefectInjector` loads the target
  (with the training crop, if any) and the donor (whole), injects, then lets the dataset finish
  the item (augmentation, normalisation, padding); the item has two extra keys, ``dli_counts``
  and ``dli_injected``.

With training crops (``crop_size``) the defect is injected into the **crop**, not into the
whole image before cropping: a random crop of a whole image would often miss the injected
defect, and the batch would no longer be balanced, which is DLI's purpose. The donor's defect is
cut from the whole donor image (so a defect is never cut in half by the donor's crop); when it
is larger than the target crop, the part that overlaps the crop is kept. Cloning into a crop is
also cheaper than into a whole image.

The datamodule builds the loader in :mod:`defectseg.data.streams`.

Switch it on from YAML with a ``dli:`` block in the datamodule's ``init_args`` (see
:class:`DLIConfig` and ``docs/dli.md``).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from defectseg.data.contract import collate_batch
from defectseg.data.dataset import DefectDataset
from defectseg.data.records import Sample

PLACEMENTS = ("donor", "random")
CLONE_MODES = ("normal", "mixed")
BORDER_MODES = ("pad", "cut_paste")

#: Values of ``dli_injected`` / the ``method`` of :class:`InjectionResult`.
METHOD_NONE, METHOD_POISSON, METHOD_CUT_PASTE, METHOD_FALLBACK = "none", "poisson", "cut_paste", "cut_paste_fallback"

#: ``cv2.seamlessClone`` erodes its mask by 3 pixels (three 3x3 erosions) before solving; the
#: clone mask is grown by as much first, or thin defects would not be transferred at all.
SEAMLESS_CLONE_EROSION = 3


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DonorTransform:
    """Random transform of a donor defect before it is injected.

    Args:
        hflip: probability of mirroring the donor left-right (the defect's position is mirrored
            too, so a defect touching the left edge ends up touching the right edge).
        vflip: probability of mirroring the donor top-bottom.
        rotate: maximum rotation in degrees about the defect's centre (uniform in
            ``[-rotate, rotate]``); ``0`` for none.
        scale: ``(low, high)`` range of the uniform scale factor about the defect's centre.
        shift: maximum shift of the defect, as a share of the target's height and width
            (``placement: donor`` only).
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rotate: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"dli transform {name} is a probability in [0, 1], got {value}")
        if not 0.0 <= float(self.rotate) <= 180.0:
            raise ValueError(f"dli transform rotate is a maximum angle in [0, 180] degrees, got {self.rotate}")
        scale = self.scale
        if isinstance(scale, (int, float)):
            scale = (float(scale), float(scale))
        scale = tuple(float(v) for v in scale)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"dli transform scale must be [low, high] with 0 < low <= high, got {self.scale}")
        object.__setattr__(self, "scale", scale)
        if not 0.0 <= float(self.shift) < 1.0:
            raise ValueError(f"dli transform shift is a share of the image size in [0, 1), got {self.shift}")

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | DonorTransform | None, base: DonorTransform | None = None) -> DonorTransform:
        """Build a transform from a YAML mapping; keys not given come from ``base``."""
        base = base or cls()
        if spec is None:
            return base
        if isinstance(spec, DonorTransform):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"a dli transform must be a mapping such as {{rotate: 15}}, got {spec!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown dli transform keys {unknown}; valid keys are {sorted(known)}")
        return replace(base, **dict(spec))


@dataclass(frozen=True)
class DLIConfig:
    """Settings of Dynamic Label Injection (the ``dli:`` block of a datamodule).

    Args:
        p_poisson: probability that an injection uses Poisson seamless cloning; cut-paste
            otherwise (0.5 in the paper).
        clone_mode: ``mixed`` (OpenCV ``MIXED_CLONE``: the stronger of the donor's and the
            target's gradients, keeps the target's texture) or ``normal`` (``NORMAL_CLONE``).
        dilation: pixels by which the defect region is dilated to form the Poisson clone mask.
        feather: standard deviation in pixels of the Gaussian that softens the cut-paste edge;
            ``0`` pastes hard.
        placement: ``donor`` puts the defect where it is in the donor (as in the paper; with
            images of different sizes the defect keeps its distance to the nearest edge), then
            shifts it by ``transform.shift``; ``random`` puts it anywhere it fits.
        keep_defect_free: share of the defect-free images of each batch left untouched (0 in
            the paper), so the model still sees clean surfaces.
        transform: the donor transform (:class:`DonorTransform` keys).
        class_transforms: per-class overrides of ``transform``, keyed by class name or index,
            e.g. ``{Crack: {rotate: 0}}``.
        border: what Poisson cloning does when the clone mask reaches the image border, where
            ``cv2.seamlessClone`` cannot work: ``pad`` (reflect-pad the target, clone, crop
            back) or ``cut_paste`` (fall back to cut-paste).
        seed: seed of the plans and the injections; ``None`` uses the datamodule's ``seed``.
        donor_cache: donor defect crops kept in memory per worker (0 disables the cache).
    """

    p_poisson: float = 0.5
    clone_mode: str = "mixed"
    dilation: int = 2
    feather: float = 0.0
    placement: str = "donor"
    keep_defect_free: float = 0.0
    transform: DonorTransform = field(default_factory=DonorTransform)
    class_transforms: Mapping[Any, Any] = field(default_factory=dict)
    border: str = "pad"
    seed: int | None = None
    donor_cache: int = 256

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.p_poisson) <= 1.0:
            raise ValueError(f"dli.p_poisson is a probability in [0, 1], got {self.p_poisson}")
        if self.clone_mode not in CLONE_MODES:
            raise ValueError(f"dli.clone_mode must be one of {CLONE_MODES}, got {self.clone_mode!r}")
        if int(self.dilation) < 0:
            raise ValueError(f"dli.dilation must be >= 0 pixels, got {self.dilation}")
        if float(self.feather) < 0:
            raise ValueError(f"dli.feather must be >= 0 pixels, got {self.feather}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"dli.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not 0.0 <= float(self.keep_defect_free) <= 1.0:
            raise ValueError(f"dli.keep_defect_free is a share in [0, 1], got {self.keep_defect_free}")
        if self.border not in BORDER_MODES:
            raise ValueError(f"dli.border must be one of {BORDER_MODES}, got {self.border!r}")
        if int(self.donor_cache) < 0:
            raise ValueError(f"dli.donor_cache must be >= 0, got {self.donor_cache}")
        object.__setattr__(self, "transform", DonorTransform.from_spec(self.transform))
        if not isinstance(self.class_transforms, Mapping):
            raise ValueError(
                f"dli.class_transforms must map class names or indices to transforms, got {self.class_transforms!r}"
            )
        object.__setattr__(
            self,
            "class_transforms",
            {key: DonorTransform.from_spec(value, self.transform) for key, value in self.class_transforms.items()},
        )

    @classmethod
    def from_spec(cls, spec: bool | Mapping[str, Any] | DLIConfig | None) -> DLIConfig | None:
        """``None``/``False`` -> off, ``True`` -> defaults, a mapping (from YAML) -> its settings."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if isinstance(spec, DLIConfig):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"dli must be true, false or a mapping of settings, got {spec!r}")
        spec = dict(spec)
        if spec.pop("enabled", True) is False:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown dli settings {unknown}; valid settings are {sorted(known | {'enabled'})}")
        return cls(**spec)

    def resolve(self, class_names: Sequence[str]) -> dict[int, DonorTransform]:
        """The transform of each defect class ``1..K-1``, with class names resolved to indices."""
        num_classes = len(class_names)
        lookup = {name: k for k, name in enumerate(class_names)}
        overrides: dict[int, DonorTransform] = {}
        for key, value in self.class_transforms.items():
            if isinstance(key, str) and key in lookup:
                index = lookup[key]
            elif isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
                index = int(key)
            else:
                raise ValueError(
                    f"dli.class_transforms names the class {key!r}, which is not one of {list(class_names)}"
                )
            if not 1 <= index < num_classes:
                raise ValueError(
                    f"dli.class_transforms names class index {index}; defect classes are 1..{num_classes - 1} "
                    f"({list(class_names[1:])})"
                )
            overrides[index] = value
        return {k: overrides.get(k, self.transform) for k in range(1, num_classes)}

    def margin(self) -> int:
        """Pixels kept around a defect patch: room for the clone mask and the feathering."""
        return int(self.dilation) + SEAMLESS_CLONE_EROSION + int(math.ceil(3.0 * float(self.feather))) + 2


# ---------------------------------------------------------------------------- plan items
class InjectionPlan(NamedTuple):
    """One item of a planned batch: which image to load and what to inject into it.

    Attributes:
        index: the target image (index into the training dataset).
        donor: the donor image, ``-1`` when nothing is injected.
        label: the defect class taken from the donor (0 when nothing is injected).
        seed: seed of the injection's random choices (transform, method, placement).
    """

    index: int
    donor: int = -1
    label: int = 0
    seed: int = 0

    @property
    def injects(self) -> bool:
        """Whether this item receives a defect."""
        return self.donor >= 0 and self.label > 0


class _EpochHook:
    """Exposed as ``batch_sampler.sampler``: Lightning calls ``set_epoch`` on that attribute."""

    def __init__(self, owner: DLIBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for batch in self.owner:
            yield from (item.index for item in batch)

    def __len__(self) -> int:
        return sum(len(b) for b in self.owner.rank_batches())


# ---------------------------------------------------------------------------- the sampler
class DLIBatchSampler(Sampler[list[InjectionPlan]]):
    """Batch sampler that plans the injections of each batch from metadata only.

    Per epoch, the training images are shuffled with ``(seed, epoch)`` and cut into batches.
    With ``num_replicas`` ranks, rank ``r`` takes batches ``r, r + num_replicas, ...``: the
    ranks get disjoint batches that together cover the epoch, and the same number of them (when
    the images do not fill the last round, its images are spread evenly over the ranks). The
    plan of a batch depends on ``(seed, epoch, batch number)`` only, so it does not change with
    the number of ranks or workers.

    Planning a batch: count the images containing each defect class; then for each defect-free
    image (in batch order, except the ones kept untouched), pick the class with the fewest
    images so far among the classes that have a donor (ties broken at random), a random donor
    training image containing that class, and a seed for the injection.

    Args:
        samples: metadata of the training dataset, in dataset order.
        batch_size: images per batch and rank.
        num_classes: classes, background included.
        config: the DLI settings (defaults if ``None``).
        seed: seed of the shuffle and the plans (``config.seed`` wins when set).
        shuffle: shuffle the images each epoch (``False`` keeps dataset order, for tests).
        drop_last: drop the images that do not fill a last round of full batches.
        num_replicas: number of ranks (``None``: the initialised process group's, else 1).
        rank: this rank (``None``: the process group's, else 0).
        class_names: class names, background first, for warnings and per-class transforms.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        batch_size: int,
        num_classes: int,
        config: DLIConfig | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(samples, Sampler) or not isinstance(samples, Sequence):
            raise TypeError(
                "DLIBatchSampler takes the training samples' metadata (a list of Sample records), got "
                f"{type(samples).__name__}. If Lightning re-created it with a DistributedSampler, set "
                "trainer.use_distributed_sampler: false (DLI splits batches across ranks itself)."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one defect class), got {num_classes}")
        if num_replicas is None or rank is None:
            dist_world, dist_rank = process_group()
            num_replicas = dist_world if num_replicas is None else num_replicas
            rank = dist_rank if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas); got rank={rank}, num_replicas={num_replicas}")
        if not samples:
            raise ValueError("DLIBatchSampler got no training samples")
        if not drop_last and len(samples) < num_replicas:
            raise ValueError(
                f"{len(samples)} training images cannot give every one of {num_replicas} ranks a batch"
            )
        self.config = config or DLIConfig()
        self.batch_size = int(batch_size)
        self.num_classes = int(num_classes)
        self.seed = int(self.config.seed if self.config.seed is not None else seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.class_names = list(class_names) if class_names else [f"class_{k}" for k in range(num_classes)]
        self.num_samples = len(samples)
        self.labels: list[tuple[int, ...]] = []
        for position, sample in enumerate(samples):
            classes = tuple(int(c) for c in sample.classes)
            bad = [c for c in classes if not 1 <= c < num_classes]
            if bad:
                raise ValueError(
                    f"sample {position} ({sample.image}) has defect classes {bad} outside 1..{num_classes - 1}"
                )
            self.labels.append(classes)
        self.defect_free = np.array([not classes for classes in self.labels], dtype=bool)
        donors: dict[int, list[int]] = {k: [] for k in range(1, num_classes)}
        for position, classes in enumerate(self.labels):
            for c in classes:
                donors[c].append(position)
        self.donors = {k: np.asarray(v, dtype=np.int64) for k, v in donors.items()}
        self.eligible = [k for k in range(1, num_classes) if self.donors[k].size]
        missing = [self.class_names[k] for k in range(1, num_classes) if not self.donors[k].size]
        if missing:
            warnings.warn(
                f"DLI: no training image contains {missing}; these classes are never injected",
                stacklevel=2,
            )

    # -- epochs and batches
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (Lightning calls this through :attr:`sampler` at each epoch start)."""
        self.epoch = int(epoch)

    @property
    def sampler(self) -> _EpochHook:
        """A sampler-like view with ``set_epoch``, where Lightning looks for it."""
        return _EpochHook(self)

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of ``epoch`` (dataset positions), in global order."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self.num_samples
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0x5A3]).permutation(n)
        else:
            order = np.arange(n)
        per_round = self.num_replicas * self.batch_size
        if self.drop_last:
            usable = (n // per_round) * per_round
            return [order[i : i + self.batch_size].tolist() for i in range(0, usable, self.batch_size)]
        rounds = math.ceil(n / per_round)
        full = (rounds - 1) * per_round
        rest = n - full
        if rest < self.num_replicas:  # too few for one image per rank: spread the last full round too
            full -= per_round
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, full, self.batch_size)]
        batches += [part.tolist() for part in np.array_split(order[full:], self.num_replicas)]
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (dataset positions)."""
        return self.global_batches(epoch)[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        per_round = self.num_replicas * self.batch_size
        if self.drop_last:
            return self.num_samples // per_round
        rounds = math.ceil(self.num_samples / per_round)
        if self.num_samples - (rounds - 1) * per_round < self.num_replicas:
            rounds -= 1  # the last round's few images are spread over the one before
        return rounds

    def __iter__(self) -> Iterator[list[InjectionPlan]]:
        epoch = self.epoch
        batches = self.global_batches(epoch)
        for number in range(self.rank, len(batches), self.num_replicas):
            yield self.plan_batch(batches[number], number, epoch)

    # -- planning
    def class_counts(self, indices: Sequence[int]) -> np.ndarray:
        """Images containing each class (index 0: defect-free images) among ``indices``."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for i in indices:
            classes = self.labels[i]
            if classes:
                counts[list(classes)] += 1
            else:
                counts[0] += 1
        return counts

    def plan_batch(self, indices: Sequence[int], number: int = 0, epoch: int | None = None) -> list[InjectionPlan]:
        """Plan one batch: an :class:`InjectionPlan` per image, in the order of ``indices``."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, int(number), 0xD11])
        plans = [InjectionPlan(int(i)) for i in indices]
        free = [pos for pos, i in enumerate(indices) if self.defect_free[i]]
        if not free or not self.eligible:
            return plans
        n_keep = min(len(free), int(math.floor(float(self.config.keep_defect_free) * len(free) + rng.random())))
        kept = set(rng.choice(free, size=n_keep, replace=False).tolist()) if n_keep else set()
        counts = self.class_counts(indices)
        eligible = np.asarray(self.eligible)
        for pos in free:
            if pos in kept:
                continue
            current = counts[eligible]
            ties = eligible[current == current.min()]
            label = int(ties[rng.integers(len(ties))]) if len(ties) > 1 else int(ties[0])
            pool = self.donors[label]
            donor = int(pool[rng.integers(len(pool))])
            plans[pos] = InjectionPlan(int(indices[pos]), donor, label, int(rng.integers(2**62)))
            counts[label] += 1
        return plans


def process_group() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, else ``(1, 0)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


# ---------------------------------------------------------------------------- injection
@dataclass
class DonorCrop:
    """A donor's defect of one class, cut out with enough context for the transforms.

    Attributes:
        image: ``uint8`` ``(h, w, C)`` crop of the donor image.
        region: ``bool`` ``(h, w)``, the defect's pixels in the crop.
        origin: ``(y, x)`` of the crop's top-left corner in the donor.
        donor_size: ``(height, width)`` of the donor image.
        bbox: ``(y0, x0, y1, x1)`` of the defect in the donor (end exclusive).
    """

    image: np.ndarray
    region: np.ndarray
    origin: tuple[int, int]
    donor_size: tuple[int, int]
    bbox: tuple[int, int, int, int]


@dataclass
class TransformParams:
    """The random draws of one injection."""

    poisson: bool = False
    hflip: bool = False
    vflip: bool = False
    angle: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    position: tuple[float, float] = (0.5, 0.5)

    @classmethod
    def draw(cls, rng: np.random.Generator, transform: DonorTransform, p_poisson: float) -> TransformParams:
        """Draw the parameters in a fixed order (so a seed always gives the same injection)."""
        u = rng.random(9)
        low, high = transform.scale
        return cls(
            poisson=bool(u[0] < p_poisson),
            hflip=bool(u[1] < transform.hflip),
            vflip=bool(u[2] < transform.vflip),
            angle=float((2 * u[3] - 1) * transform.rotate),
            scale=float(low + u[4] * (high - low)),
            shift=(float((2 * u[5] - 1) * transform.shift), float((2 * u[6] - 1) * transform.shift)),
            position=(float(u[7]), float(u[8])),
        )


@dataclass
class InjectionResult:
    """What an injection did: the method used and the labelled region in the target."""

    method: str = METHOD_NONE
    region: np.ndarray | None = None
    top_left: tuple[int, int] = (0, 0)


def extract_defect(
    image: np.ndarray, mask: np.ndarray, label: int, transform: DonorTransform | None = None, margin: int = 4
) -> DonorCrop | None:
    """Cut the defect of class ``label`` out of a donor, with room for rotation and scaling.

    Args:
        image: donor image ``(H, W, C)`` or ``(H, W)``, ``uint8``.
        mask: donor mask ``(H, W)`` of class indices.
        label: the defect class to take.
        transform: the transform that will be applied (sets how much context is kept).
        margin: pixels the patch keeps around the defect (see :meth:`DLIConfig.margin`).

    Returns:
        The crop, or ``None`` when the donor holds no pixel of ``label`` (a tiny defect lost by
        resizing, for instance).
    """
    transform = transform or DonorTransform()
    region = np.asarray(mask) == label
    if not region.any():
        return None
    if image.ndim == 2:
        image = image[..., None]
    x, y, w, h = cv2.boundingRect(region.astype(np.uint8))
    # donor pixels the patch can sample beyond the defect's box (the patch covers the
    # transformed box plus ``margin``; mapped back, that is at most this far out)
    s_min = transform.scale[0]
    if transform.rotate > 0:
        context = (w + h) / math.sqrt(2.0) - min(w, h) / 2.0 + margin * math.sqrt(2.0) / s_min
    else:
        context = margin / s_min
    context = int(math.ceil(context)) + 2
    height, width = region.shape
    y0, y1 = max(0, y - context), min(height, y + h + context)
    x0, x1 = max(0, x - context), min(width, x + w + context)
    return DonorCrop(
        image=np.ascontiguousarray(image[y0:y1, x0:x1]),
        region=np.ascontiguousarray(region[y0:y1, x0:x1]),
        origin=(y0, x0),
        donor_size=(height, width),
        bbox=(y, x, y + h, x + w),
    )


def transform_defect(
    crop: DonorCrop, params: TransformParams, margin: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Flip, rotate and scale a donor defect into a patch.

    Flips mirror the whole donor (the defect's position too); rotation and scale act about the
    defect's bounding-box centre.

    Returns:
        ``(patch image (h, w, C) uint8, patch region (h, w) bool, origin)`` where ``origin`` is
        the ``(y, x)`` of the patch's top-left corner in the (flipped) donor's frame: with
        ``placement: donor`` and a target of the donor's size, the patch goes there.
    """
    height, width = crop.donor_size
    by0, bx0, by1, bx1 = crop.bbox
    cy, cx = (by0 + by1 - 1) / 2.0, (bx0 + bx1 - 1) / 2.0
    # crop -> donor
    to_donor = np.array([[1, 0, crop.origin[1]], [0, 1, crop.origin[0]], [0, 0, 1]], dtype=np.float64)
    flip = np.eye(3)
    if params.hflip:
        flip[0] = [-1, 0, width - 1]
        cx = width - 1 - cx
    if params.vflip:
        flip[1] = [0, -1, height - 1]
        cy = height - 1 - cy
    identity = params.angle == 0.0 and params.scale == 1.0
    rotate = np.eye(3)
    rotate[:2] = cv2.getRotationMatrix2D((cx, cy), params.angle, params.scale)
    theta = math.radians(params.angle)
    half_w, half_h = (bx1 - bx0) / 2.0, (by1 - by0) / 2.0
    ext_x = params.scale * (abs(math.cos(theta)) * half_w + abs(math.sin(theta)) * half_h)
    ext_y = params.scale * (abs(math.sin(theta)) * half_w + abs(math.cos(theta)) * half_h)
    ox = int(math.floor(cx - ext_x - margin))
    oy = int(math.floor(cy - ext_y - margin))
    out_w = int(math.ceil(cx + ext_x + margin)) - ox + 1
    out_h = int(math.ceil(cy + ext_y + margin)) - oy + 1
    to_patch = np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]], dtype=np.float64)
    matrix = (to_patch @ rotate @ flip @ to_donor)[:2]
    interpolation = cv2.INTER_NEAREST if identity else cv2.INTER_LINEAR
    patch = cv2.warpAffine(
        crop.image, matrix, (out_w, out_h), flags=interpolation, borderMode=cv2.BORDER_REFLECT
    )
    if patch.ndim == 2:
        patch = patch[..., None]
    region = cv2.warpAffine(
        crop.region.astype(np.uint8), matrix, (out_w, out_h), flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    ).astype(bool)
    if not region.any() and not identity:  # a thin defect lost by the resampling: keep it as it is
        plain = replace(params, angle=0.0, scale=1.0)
        return transform_defect(crop, plain, margin)
    return patch, region, (oy, ox)


def place_patch(
    region: np.ndarray,
    origin: tuple[int, int],
    donor_size: tuple[int, int],
    target_size: tuple[int, int],
    params: TransformParams,
    placement: str = "donor",
) -> tuple[int, int]:
    """Top-left corner ``(y, x)`` of the patch in the target.

    ``donor``: the donor's position (anchored to the nearest edge when the sizes differ) plus
    the shift; ``random``: anywhere. In both cases the defect's bounding box is then kept inside
    the target when it fits; along an axis where it does not (a large donor, a small target),
    the target shows the stretch of the defect holding the most defect pixels, so some of the
    defect always lands in the target.
    """
    if not region.any():
        raise ValueError("place_patch got an empty region")
    visible = region
    corner = []
    for axis in (0, 1):
        profile = visible.sum(axis=1 - axis)  # defect pixels per patch row (axis 0) or column
        present = np.nonzero(profile)[0]
        lo_r, hi_r = int(present[0]), int(present[-1]) + 1
        size_t, size_d = target_size[axis], donor_size[axis]
        low, high = -lo_r, size_t - hi_r  # the defect's box stays in [0, size_t)
        if placement == "random":
            start = low + int(math.floor(params.position[axis] * (high - low + 1))) if high >= low else low
        else:
            start = origin[axis]
            centre = origin[axis] + (lo_r + hi_r - 1) / 2.0
            if size_t != size_d and centre > (size_d - 1) / 2.0:
                start += size_t - size_d  # keep the distance to the far edge
            start += int(round(params.shift[axis] * size_t))
        if hi_r - lo_r <= size_t:
            start = min(max(start, low), high)
        else:  # the window of size_t patch rows/columns with the most defect pixels, nearest first
            sums = np.convolve(profile, np.ones(size_t, dtype=np.int64), mode="valid")
            best = np.nonzero(sums == sums.max())[0]
            start = -int(best[np.argmin(np.abs(best + start))])
        corner.append(int(start))
        if axis == 0:  # what the target shows of the patch's rows constrains the columns
            visible = np.zeros_like(region)
            first = max(0, -start)
            visible[first : first + size_t] = region[first : first + size_t]
    return corner[0], corner[1]


def _overlap(top_left: tuple[int, int], patch_shape: tuple[int, int], target_shape: tuple[int, int]):
    """Slices of the target and of the patch where they overlap (``None`` when they do not)."""
    (y, x), (ph, pw), (th, tw) = top_left, patch_shape, target_shape
    ty0, tx0, ty1, tx1 = max(y, 0), max(x, 0), min(y + ph, th), min(x + pw, tw)
    if ty0 >= ty1 or tx0 >= tx1:
        return None
    return (slice(ty0, ty1), slice(tx0, tx1)), (slice(ty0 - y, ty1 - y), slice(tx0 - x, tx1 - x))


def cut_paste(
    target: np.ndarray, patch: np.ndarray, region: np.ndarray, top_left: tuple[int, int], feather: float = 0.0
) -> np.ndarray:
    """Paste the ``region`` of ``patch`` into ``target`` at ``top_left``, optionally feathered.

    Returns a new ``uint8`` image; pixels change only where the (feathered) region reaches.
    """
    out = target.copy()
    view = out if out.ndim == 3 else out[..., None]
    slices = _overlap(top_left, region.shape, target.shape[:2])
    if slices is None:
        return out
    (t_rows, t_cols), (p_rows, p_cols) = slices
    alpha = region.astype(np.float32)
    if feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), float(feather))
    alpha = alpha[p_rows, p_cols][..., None]
    changed = alpha[..., 0] > 0
    source = patch[p_rows, p_cols].astype(np.float32)
    dest = view[t_rows, t_cols]
    blended = np.rint(alpha * source + (1.0 - alpha) * dest.astype(np.float32)).clip(0, 255).astype(np.uint8)
    dest[changed] = blended[changed]
    return out


def poisson_clone(
    target: np.ndarray,
    patch: np.ndarray,
    region: np.ndarray,
    top_left: tuple[int, int],
    mode: str = "mixed",
    dilation: int = 2,
    border: str = "pad",
) -> tuple[np.ndarray, str]:
    """Blend the ``region`` of ``patch`` into ``target`` with ``cv2.seamlessClone``.

    The clone mask is the region (cut to the target) dilated by ``dilation`` pixels (plus the
    3 pixels that OpenCV erodes from it, see :data:`SEAMLESS_CLONE_EROSION`). Where it
    reaches the target's border, seamlessClone would fail: with ``border='pad'`` the target is
    reflect-padded, cloned and cropped back; with ``border='cut_paste'`` (or if OpenCV still
    fails) the defect is cut-pasted instead.

    Returns:
        ``(new uint8 image, method)`` with method ``poisson`` or ``cut_paste_fallback``.
    """
    height, width = target.shape[:2]
    y, x = top_left
    ph, pw = region.shape
    # forget the part of the region outside the target; keep the patch around it for context
    visible = region.copy()
    visible[: max(0, -y)] = False
    visible[max(0, height - y) :] = False
    visible[:, : max(0, -x)] = False
    visible[:, max(0, width - x) :] = False
    if not visible.any():
        return target.copy(), METHOD_NONE
    mask = visible.astype(np.uint8) * 255
    if dilation > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
        mask = cv2.dilate(mask, kernel)
    grow = 2 * SEAMLESS_CLONE_EROSION + 1  # undone exactly by OpenCV's erosion (a 7x7 square)
    mask = cv2.dilate(mask, np.ones((grow, grow), np.uint8))
    mask[0, :] = mask[-1, :] = 0  # seamlessClone ignores the mask's outer ring
    mask[:, 0] = mask[:, -1] = 0
    sx, sy, sw, sh = cv2.boundingRect(mask)
    if sw == 0 or sh == 0:
        return cut_paste(target, patch, region, top_left), METHOD_FALLBACK
    dx, dy = x + sx, y + sy  # the mask's box in target coordinates
    pad_top, pad_left = max(0, 1 - dy), max(0, 1 - dx)
    pad_bottom, pad_right = max(0, dy + sh + 1 - height), max(0, dx + sw + 1 - width)
    padded = pad_top or pad_left or pad_bottom or pad_right
    if padded and border == "cut_paste":
        return cut_paste(target, patch, region, top_left), METHOD_FALLBACK
    dest = target if target.ndim == 3 else target[..., None]
    channels = dest.shape[2]
    dest3 = dest if channels == 3 else np.repeat(dest, 3, axis=2)
    src3 = patch if patch.shape[2] == 3 else np.repeat(patch, 3, axis=2)
    if padded:
        dest3 = cv2.copyMakeBorder(dest3, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_REFLECT)
    # a 3-channel mask: OpenCV 5.0's MIXED_CLONE silently returns dst unchanged with a 1-channel one
    mask3 = np.repeat(mask[..., None], 3, axis=2)
    center = (pad_left + dx + sw // 2, pad_top + dy + sh // 2)
    flag = cv2.MIXED_CLONE if mode == "mixed" else cv2.NORMAL_CLONE
    try:
        blended = cv2.seamlessClone(
            np.ascontiguousarray(src3), np.ascontiguousarray(dest3), mask3, center, flag
        )
    except cv2.error:
        return cut_paste(target, patch, region, top_left), METHOD_FALLBACK
    blended = blended[pad_top : pad_top + height, pad_left : pad_left + width]
    if channels == 1:
        blended = blended[..., :1]
    if target.ndim == 2:
        blended = blended[..., 0]
    return np.ascontiguousarray(blended), METHOD_POISSON


def inject_defect(
    target: np.ndarray,
    target_mask: np.ndarray,
    crop: DonorCrop,
    label: int,
    rng: np.random.Generator | int,
    config: DLIConfig | None = None,
    transform: DonorTransform | None = None,
) -> tuple[np.ndarray, np.ndarray, InjectionResult]:
    """Inject one donor defect into a target image and its mask.

    Args:
        target: ``uint8`` image ``(H, W, C)`` (after the datamodule's channel and size policy).
        target_mask: class-index mask ``(H, W)``.
        crop: the donor's defect (:func:`extract_defect`).
        label: the defect's class, written into the mask where the defect lands.
        rng: generator or seed of the random choices.
        config: DLI settings (defaults if ``None``).
        transform: the class's donor transform (``config.transform`` if ``None``).

    Returns:
        ``(image, mask, result)``: new arrays of the input dtypes and shapes; the mask changes
        only where the injected defect lies (set to ``label``).
    """
    config = config or DLIConfig()
    transform = transform or config.transform
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    params = TransformParams.draw(rng, transform, config.p_poisson)
    margin = config.margin()
    patch, region, origin = transform_defect(crop, params, margin)
    if patch.shape[2] != (target.shape[2] if target.ndim == 3 else 1):
        raise ValueError(
            f"donor has {patch.shape[2]} channels but the target {target.shape}; both must come "
            "from the same dataset's channel policy"
        )
    top_left = place_patch(region, origin, crop.donor_size, target.shape[:2], params, config.placement)
    if params.poisson:
        image, method = poisson_clone(
            target, patch, region, top_left, config.clone_mode, int(config.dilation), config.border
        )
    else:
        image, method = cut_paste(target, patch, region, top_left, float(config.feather)), METHOD_CUT_PASTE
    mask = target_mask.copy()
    slices = _overlap(top_left, region.shape, target.shape[:2])
    labelled = np.zeros(target.shape[:2], dtype=bool)
    if slices is not None:
        (t_rows, t_cols), (p_rows, p_cols) = slices
        labelled[t_rows, t_cols] = region[p_rows, p_cols]
    if not labelled.any():
        return target.copy(), target_mask.copy(), InjectionResult(METHOD_NONE)
    mask[labelled] = label
    return image, mask, InjectionResult(method, labelled, top_left)


def presence(mask: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """``int64`` vector: 1 for each defect class present in ``mask``; index 0 is 1 when none is."""
    values = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    values = values.ravel()
    if values.dtype != np.uint8:  # class masks hold 0..K-1 and IGNORE_INDEX (255): fits uint8
        values = values.astype(np.uint8) if values.size and values.max() <= 255 else values.astype(np.int64)
    counts = np.bincount(values, minlength=num_classes)
    found = (counts[:num_classes] > 0).astype(np.int64)
    found[0] = int(not found[1:].any())
    return found


class DefectInjector:
    """The DataLoader-worker half of DLI, used by :class:`DLIDataset`.

    Called with a dataset and an :class:`InjectionPlan`, it loads the target (``load``: channel
    and size policy, training crop), loads the donor whole (its defect crop is cached per worker),
    injects, then runs the dataset's ``finish`` (augmentation, normalisation, padding). The item
    gets two extra keys: ``dli_counts``, an ``int64`` ``(2, K)`` tensor with the classes present
    before (row 0) and after (row 1) injection (column 0 flags a defect-free image), and
    ``dli_injected``, whether a defect was injected.

    Args:
        config: the DLI settings.
        class_names: the datamodule's class names, background first.
    """

    def __init__(self, config: DLIConfig, class_names: Sequence[str]) -> None:
        self.config = config
        self.num_classes = len(class_names)
        self.transforms = config.resolve(class_names)
        self._cache: OrderedDict[tuple[int, int], DonorCrop | None] = OrderedDict()

    def donor_crop(self, dataset: DefectDataset, donor: int, label: int) -> DonorCrop | None:
        """The defect of class ``label`` in donor ``donor``, from the cache when possible."""
        key = (int(donor), int(label))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image, mask, _, _ = dataset.load(donor, crop=False)
        crop = extract_defect(image, mask, label, self.transforms[label], self.config.margin())
        if self.config.donor_cache > 0:
            self._cache[key] = crop
            while len(self._cache) > self.config.donor_cache:
                self._cache.popitem(last=False)
        return crop

    def apply(
        self, dataset: DefectDataset, plan: InjectionPlan, image: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, InjectionResult]:
        """Inject ``plan`` into an already loaded target (used by ``dli-preview`` too)."""
        if not plan.injects:
            return image, mask, InjectionResult(METHOD_NONE)
        if not 1 <= plan.label < self.num_classes:
            raise ValueError(f"plan {plan} names class {plan.label}; classes are 1..{self.num_classes - 1}")
        crop = self.donor_crop(dataset, plan.donor, plan.label)
        if crop is None:
            return image, mask, InjectionResult(METHOD_NONE)
        return inject_defect(image, mask, crop, plan.label, plan.seed, self.config, self.transforms[plan.label])

    def __call__(self, dataset: DefectDataset, plan: Any) -> dict[str, Any]:
        if not isinstance(plan, InjectionPlan):
            plan = InjectionPlan(*plan)
        image, mask, sample, original = dataset.load(plan.index)
        before = presence(mask, self.num_classes)
        image, mask, result = self.apply(dataset, plan, image, mask)
        item = dataset.finish(image, mask, sample, original)
        after = presence(item["mask"], self.num_classes)
        item["dli_counts"] = torch.from_numpy(np.stack([before, after]))
        item["dli_injected"] = result.method != METHOD_NONE
        return item


def collate_dli(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`~defectseg.data.contract.collate_batch`, with the DLI keys stacked into tensors:
    ``dli_counts`` ``(B, 2, K)`` and ``dli_injected`` ``(B,)``."""
    batch = collate_batch(items)
    if "dli_counts" in batch:
        batch["dli_counts"] = torch.stack(list(batch["dli_counts"]))
        batch["dli_injected"] = torch.tensor([bool(v) for v in batch["dli_injected"]])
    return batch


class DLIDataset(Dataset):
    """A training dataset whose items are DLI plan items (composition: it wraps the dataset).

    Indexed by the :class:`InjectionPlan` items of a :class:`DLIBatchSampler` (an integer index
    serves the sample unchanged, with ``dli_counts`` too), it returns the wrapped dataset's
    contract items with a defect injected as planned.

    Args:
        dataset: the training dataset (crops and augmentation included).
        injector: the worker half of DLI.
    """

    def __init__(self, dataset: DefectDataset, injector: DefectInjector) -> None:
        self.dataset = dataset
        self.injector = injector

    @property
    def samples(self) -> list[Sample]:
        return self.dataset.samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, plan: InjectionPlan | int) -> dict[str, Any]:
        if isinstance(plan, (int, np.integer)):
            plan = InjectionPlan(int(plan))
        return self.injector(self.dataset, plan)
