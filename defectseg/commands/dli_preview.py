"""``defectseg dli-preview``: write a grid of DLI-injected training samples (see
:mod:`defectseg.data.preview`)."""

from __future__ import annotations

from pathlib import Path

from defectseg.commands.registry import register_command

DESCRIPTION = (
    "Plan one epoch of Dynamic Label Injection on a config's training split and write donor | "
    "target | result triplets with the injected defects outlined. Uses the config's dli "
    "block (the defaults when it has none); augmentation is left out."
)


def _arguments(parser) -> None:
    parser.add_argument("--out", type=str, required=True, help="PNG (or JPEG) file to write")
    parser.add_argument("--num", type=int, default=8, help="injections shown (default 8)")
    parser.add_argument("--columns", type=int, default=2, help="triplets per row (default 2)")
    parser.add_argument("--tile", type=int, default=160, help="tile side in pixels (default 160)")
    parser.add_argument("--epoch", type=int, default=0, help="epoch whose plans are shown (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


@register_command("dli-preview", "write a grid of DLI-injected training samples with the defects outlined")
def dli_preview_command(argv: list[str]) -> int:
    import cv2

    from defectseg.config import parse_config
    from defectseg.data.dli import DLIConfig
    from defectseg.data.preview import render_preview

    args, datamodule = parse_config(argv, "defectseg dli-preview", DESCRIPTION, _arguments)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} already exists; pass --overwrite to replace it")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise SystemExit(f"--out must end in .png, .jpg or .jpeg, got {out.name}")
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
