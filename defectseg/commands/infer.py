"""``defectseg infer``: predict a folder or glob of raw images with a checkpoint (no config).

Also reached as ``defectseg predict --input ...`` (``defectseg predict`` without ``--input``
is the LightningCLI subcommand that predicts a configured datamodule).
"""

from __future__ import annotations

import argparse
import sys

from defectseg.commands.registry import register_command

EPILOG = """examples:
  defectseg infer --ckpt model.ckpt --input 'images/*.png' --output out/
  defectseg infer --ckpt model.onnx --input line1/ --recursive --output out/ --tile 512 --overlap 64
  defectseg infer --ckpt model.ckpt --input a.png b.png --output out/ --tta flip --min-area scratch=20 --min-area pit=5

  defectseg infer --ckpt model.ckpt --input line1/ --output out/ --resume      # continue a stopped run

outputs (mirroring the inputs' sub-folders): <stem>_mask.png (class indices), <stem>_overlay.png,
report.csv and report.jsonl (per image: defect-free or not, per class area, components, boxes
[x y w h], max/mean confidence). Existing outputs stop the run unless --overwrite or --resume is
given. An image that cannot be read is a report row with its error; the run goes on and exits
with status 1 at the end, giving the count (--on-error raise stops at the first one instead).
Nothing written is removed: --resume continues in the same output folder.
"""


def _size(text: str) -> tuple[int, int]:
    """``512`` or ``256x1600`` (height x width)."""
    try:
        parts = [int(v) for v in text.lower().replace("*", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive numbers, got {text!r}")
    return parts[0], parts[1]


def _min_area(values: list[str]) -> int | dict[str, int] | None:
    """``20`` (all classes) or ``name=20`` items."""
    if not values:
        return None
    plain = [v for v in values if "=" not in v]
    if plain and len(values) > 1:
        raise SystemExit(f"--min-area takes either one number for every class or name=N items, got {values}")
    if plain:
        try:
            return int(plain[0])
        except ValueError:
            raise SystemExit(f"--min-area {plain[0]!r} is not a number of pixels") from None
    out: dict[str, int] = {}
    for item in values:
        name, _, number = item.partition("=")
        try:
            out[name.strip()] = int(number)
        except ValueError:
            raise SystemExit(f"--min-area {item!r}: expected name=N with N a number of pixels") from None
    return out


def build_parser(prog: str = "infer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"defectseg {prog}",
        description="Predict defects on raw images (files, folders, glob patterns) with a checkpoint "
        "(.ckpt) or an exported model (.onnx, TorchScript); write masks, overlays and a defect report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", "--ckpt_path", "--model", dest="ckpt", required=True,
                        help="checkpoint written by defectseg fit, or a model written by defectseg export")
    parser.add_argument("--input", "-i", nargs="+", required=True,
                        help="image files, folders and/or quoted glob patterns ('images/**/*.png')")
    parser.add_argument("--output", "--output_dir", "-o", dest="output", required=True, help="output folder")
    parser.add_argument("--recursive", action="store_true", help="also take images in sub-folders of folder inputs")
    parser.add_argument("--tile", type=_size, default=(1024, 1024),
                        help="tile size N or HxW for large images (default 1024; 0 = whole images)")
    parser.add_argument("--overlap", type=int, default=64, help="overlap of neighbouring tiles in pixels (default 64)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8,
                        help="tiles per forward pass (default 8)")
    parser.add_argument("--tta", choices=["none", "hflip", "vflip", "flip"], default="none",
                        help="flip test-time augmentation (flip = identity + horizontal + vertical + both)")
    parser.add_argument("--min-area", "--min_area", dest="min_area", nargs="+", default=[],
                        metavar="N|CLASS=N", help="drop components smaller than N pixels (all classes, or per class)")
    parser.add_argument("--connectivity", type=int, choices=[4, 8], default=8, help="pixel connectivity of components")
    parser.add_argument("--resize", type=_size, default=None,
                        help="resize images to HxW before the model (models trained with size_policy: resize)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU; the default), cpu, cuda, cuda:1")
    parser.add_argument("--workers", type=int, default=1, help="threads decoding images ahead (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (.onnx models)")
    parser.add_argument("--overwrite", nargs="?", const="true", default="false", choices=["true", "false"],
                        help="replace existing outputs")
    parser.add_argument("--on-error", "--on_error", dest="on_error", choices=["skip", "raise"], default="skip",
                        help="skip (default): an image that cannot be read is a report row with its error, the "
                        "run goes on and exits with status 1; raise: stop at the first one (outputs are kept)")
    parser.add_argument("--skip-unreadable", "--skip_unreadable", dest="on_error", action="store_const", const="skip",
                        help=argparse.SUPPRESS)  # the default since 0.2; kept for old scripts
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run in the same --output: images already in its report are not redone")
    parser.add_argument("--bit-depth", "--bit_depth", dest="bit_depth", default="auto",
                        choices=["auto", "8", "10", "12", "16"],
                        help="bits of data in 16-bit images (12 for 12-bit camera data stored in 16-bit PNG/TIFF); "
                        "auto (default) guesses from each file's largest value and warns")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false", help="do not write overlays")
    parser.add_argument("--no-masks", dest="masks", action="store_false", help="do not write mask PNGs")
    parser.add_argument("--no-boxes", dest="boxes", action="store_false", help="no bounding boxes on overlays")
    parser.add_argument("--expect-classes", "--expect_classes", dest="expect_classes", default=None,
                        help="comma-separated class names (background first) or a count the model must have")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def infer_command(argv: list[str], prog: str = "infer") -> int:
    from defectseg.inference.checkpoint import CheckpointError
    from defectseg.inference.folder import list_images, predict_folder
    from defectseg.inference.predictor import Predictor

    args = build_parser(prog).parse_args(argv)
    expect = None
    if args.expect_classes:
        text = args.expect_classes.strip()
        expect = {"num_classes": int(text)} if text.isdigit() else {"class_names": [n.strip() for n in text.split(",")]}
    tile = args.tile if args.tile and min(args.tile) > 0 else None
    try:
        inputs = list_images(args.input, recursive=args.recursive)  # fail fast, before loading the model
        predictor = Predictor(
            args.ckpt,
            device=args.device,
            tile_size=tile,
            overlap=args.overlap if tile else 0,
            batch_size=args.batch_size,
            tta=args.tta,
            min_area=_min_area(args.min_area),
            connectivity=args.connectivity,
            resize=args.resize,
            expect=expect,
            num_workers=args.workers,
            num_threads=args.threads,
            bit_depth=args.bit_depth,
        )
        summary = predict_folder(
            predictor,
            inputs,
            args.output,
            overwrite=args.overwrite == "true",
            recursive=args.recursive,
            save_masks=args.masks,
            save_overlays=args.overlays,
            boxes=args.boxes,
            on_error=args.on_error,
            progress=not args.quiet,
            resume=args.resume,
        )
    except (FileNotFoundError, FileExistsError, IsADirectoryError, CheckpointError, ValueError, ImportError) as err:
        hint = ""
        if "cannot decode" in str(err) or ("does not exist" in str(err) and "image" in str(err)):
            hint = (
                " (the outputs written so far are kept: fix or remove the image and rerun with --resume, "
                "or use --on-error skip to record such images in the report and go on)"
            )
        raise SystemExit(f"defectseg {prog}: error: {err}{hint}") from None
    rate = summary.images / summary.seconds if summary.seconds > 0 else float("nan")
    print(
        f"{summary.images} images in {summary.seconds:.1f} s ({rate:.2f} images/s): "
        f"{summary.defective} with defects, {summary.defect_free} defect-free"
        + (f", {len(summary.failed)} failed" if summary.failed else "")
        + (f" ({summary.resumed} done before, skipped)" if summary.resumed else "")
    )
    print(f"report: {summary.report_csv} and {summary.report_jsonl}")
    if summary.failed:
        print(
            f"defectseg {prog}: {len(summary.failed)} image(s) failed; their rows in {summary.report_csv} "
            "give the error (fix them and rerun with --resume)",
            file=sys.stderr,
        )
        return 1
    return 0


register_command("infer", "predict raw images (files, folders, globs) with a checkpoint: masks, overlays, report")(
    infer_command
)
