"""``defectseg dli-preview``: a grid of Dynamic Label Injection results, for a visual check.

Each injection is shown as three tiles: the donor with the outline of the defect it gives, the
defect-free target as loaded, and the result with the outline of the injected label. The
images are shown after the datamodule's channel and size policy, without augmentation.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from defectseg.cli import register_command
from defectseg.commands.common import config_parser, load_datamodule
from defectseg.data.base import DefectDataModule
from defectseg.data.dli import DefectInjector, DLIBatchSampler, DLIConfig, InjectionPlan
from defectseg.utils.visualize import palette

_HEADER = 14
_GAP = 4
_BACKGROUND = (24, 24, 24)


def _tile(image: np.ndarray, outline: np.ndarray | None, colour: tuple[int, int, int], size: int, text: str) -> np.ndarray:
    """Letterbox ``image`` into a ``size`` square with ``outline`` drawn and a caption above."""
    rgb = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=2)
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    small = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    small = np.ascontiguousarray(small)
    if outline is not None and outline.any():
        region = cv2.resize(outline.astype(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        if not region.any():  # a defect smaller than a pixel of the thumbnail: mark its position
            ys, xs = np.nonzero(outline)
            region[min(new_h - 1, int(ys.mean() * scale)), min(new_w - 1, int(xs.mean() * scale))] = 1
        region = cv2.dilate(region, np.ones((5, 5), np.uint8))  # outline just outside the defect
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(small, contours, -1, colour, 1)
    canvas = np.full((size + _HEADER, size, 3), _BACKGROUND, np.uint8)
    top, left = _HEADER + (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = small
    cv2.putText(canvas, text[: max(4, size // 6)], (2, _HEADER - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.34, (235, 235, 235), 1, cv2.LINE_AA)
    return canvas


def collect_plans(sampler: DLIBatchSampler, num: int, epoch: int = 0) -> list[InjectionPlan]:
    """The first ``num`` injecting plan items of ``epoch``, cycling over the classes."""
    by_class: dict[int, list[InjectionPlan]] = {}
    sampler.set_epoch(epoch)
    for batch in sampler:
        for plan in batch:
            if plan.injects:
                by_class.setdefault(plan.label, []).append(plan)
    chosen: list[InjectionPlan] = []
    queues = [by_class[k] for k in sorted(by_class)]
    while len(chosen) < num and any(queues):
        for queue in queues:
            if queue and len(chosen) < num:
                chosen.append(queue.pop(0))
    return chosen


def render_preview(
    datamodule: DefectDataModule,
    config: DLIConfig | None = None,
    num: int = 8,
    columns: int = 2,
    tile: int = 160,
    epoch: int = 0,
) -> np.ndarray:
    """Render the preview grid of ``datamodule``'s training split as an RGB ``uint8`` image.

    Raises:
        ValueError: when no injection can be planned (no defect-free training image, or no
            defective one to take defects from).
    """
    if num < 1 or columns < 1 or tile < 32:
        raise ValueError(f"need num >= 1, columns >= 1 and tile >= 32; got {num}, {columns}, {tile}")
    config = config or datamodule.dli_config or DLIConfig()
    dataset = datamodule.make_dataset("train", augment=False)  # crops as in training, no augmentation
    class_names = list(datamodule.class_names)
    sampler = DLIBatchSampler(
        dataset.samples, datamodule.batch_size, datamodule.num_classes, config,
        seed=datamodule.seed, num_replicas=1, rank=0, class_names=class_names,
    )
    plans = collect_plans(sampler, num, epoch)
    if not plans:
        free = int(sampler.defect_free.sum())
        raise ValueError(
            f"no injection to preview: the training split has {free} defect-free images and "
            f"{len(sampler.eligible)} defect classes with donors; DLI needs both"
        )
    injector = DefectInjector(config, class_names)
    colours = palette(len(class_names))
    triplets = []
    for plan in plans:
        target, target_mask, _, _ = dataset.load(plan.index)
        donor, donor_mask, _, _ = dataset.load(plan.donor, crop=False)
        image, _, result = injector.apply(dataset, plan, target, target_mask)
        colour = tuple(int(v) for v in colours[plan.label])
        name = class_names[plan.label]
        tiles = [
            _tile(donor, donor_mask == plan.label, colour, tile, f"donor: {name}"),
            _tile(target, None, colour, tile, "target"),
            _tile(image, result.region, colour, tile, result.method.replace("_", " ")),
        ]
        gap = np.full((tiles[0].shape[0], _GAP, 3), _BACKGROUND, np.uint8)
        triplets.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
    rows = []
    blank = np.full_like(triplets[0], _BACKGROUND)
    wide_gap = np.full((triplets[0].shape[0], 4 * _GAP, 3), 60, np.uint8)
    for start in range(0, len(triplets), columns):
        row = triplets[start : start + columns]
        row += [blank] * (columns - len(row))
        parts = []
        for i, part in enumerate(row):
            parts += [wide_gap, part] if i else [part]
        rows.append(np.concatenate(parts, axis=1))
    spacer = np.full((_GAP, rows[0].shape[1], 3), _BACKGROUND, np.uint8)
    grid = [rows[0]]
    for row in rows[1:]:
        grid += [spacer, row]
    return np.concatenate(grid, axis=0)


@register_command("dli-preview", "write a grid of DLI-injected training samples with the defects outlined")
def dli_preview_command(argv: list[str]) -> int:
    parser = config_parser(
        "dli-preview",
        "Plan one epoch of Dynamic Label Injection on a config's training split and write donor | "
        "target | result triplets with the injected defects outlined. Uses the config's dli "
        "block (the defaults when it has none); augmentation is left out.",
    )
    parser.add_argument("--out", required=True, help="PNG (or JPEG) file to write")
    parser.add_argument("--num", type=int, default=8, help="injections shown (default 8)")
    parser.add_argument("--columns", type=int, default=2, help="triplets per row (default 2)")
    parser.add_argument("--tile", type=int, default=160, help="tile side in pixels (default 160)")
    parser.add_argument("--epoch", type=int, default=0, help="epoch whose plans are shown (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} already exists; pass --overwrite to replace it")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise SystemExit(f"--out must end in .png, .jpg or .jpeg, got {out.name}")
    datamodule = load_datamodule(args.config, args.overrides)
    config = datamodule.dli_config
    if config is None:
        print("the config has no dli block: previewing the default DLI settings")
        config = DLIConfig()
    try:
        grid = render_preview(datamodule, config, args.num, args.columns, args.tile, args.epoch)
    except ValueError as err:
        raise SystemExit(f"dli-preview: {err}") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 9] if out.suffix.lower() == ".png" else [cv2.IMWRITE_JPEG_QUALITY, 90]
    if not cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), params):
        raise SystemExit(f"could not write {out}")
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]} px)")
    return 0
