"""``defectseg export``: write a checkpoint as ONNX or TorchScript that takes raw uint8 images."""

from __future__ import annotations

import argparse

from defectseg.commands.infer import _size
from defectseg.commands.registry import register_command

EPILOG = """examples:
  defectseg export --ckpt model.ckpt --format onnx --out model.onnx
  defectseg export --ckpt model.ckpt --format onnx --out model_256x1600.onnx --size 256x1600 --static
  defectseg export --ckpt model.ckpt --format torchscript --out model.pt

The exported model takes 'image': uint8 (batch, height, width, channels), RGB (gray for 1-channel
models), raw 0..255 pixels -- normalisation is inside. It returns 'probabilities' float32
(batch, classes, height, width) and 'mask' uint8 (batch, height, width). Height and width must
be at least 32. Class names and normalisation are stored in the file; defectseg infer and
defectseg.Predictor run it directly.
"""


@register_command("export", "export a checkpoint to ONNX or TorchScript (raw uint8 images in)")
def export_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="defectseg export",
        description="Export a defectseg checkpoint to ONNX or TorchScript with the normalisation "
        "inside the graph, then verify it against PyTorch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", "--ckpt_path", dest="ckpt", required=True, help="checkpoint written by defectseg fit")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="output format (default onnx)")
    parser.add_argument("--out", "--output", "-o", dest="out", required=True, help="file to write (model.onnx, model.pt)")
    parser.add_argument("--size", type=_size, default=(256, 256),
                        help="example input size N or HxW; the fixed size with --static (default 256)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                        help="example batch; the fixed batch with --static (default 1)")
    parser.add_argument("--static", action="store_true",
                        help="fix batch, height and width to --batch-size and --size (default: dynamic)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto",
                        help="ONNX exporter: torch.export-based dynamo (needs onnxscript), legacy, or auto")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted probability difference with PyTorch (default 1e-4)")
    parser.add_argument("--overwrite", nargs="?", const="true", default="false", choices=["true", "false"],
                        help="replace an existing file")
    args = parser.parse_args(argv)

    from defectseg.inference.checkpoint import CheckpointError
    from defectseg.inference.export import export_model

    kwargs = dict(
        size=args.size,
        batch_size=args.batch_size,
        dynamic=not args.static,
        overwrite=args.overwrite == "true",
        tolerance=args.tolerance,
    )
    if args.format == "onnx":
        kwargs.update(opset=args.opset, exporter=args.exporter)
    try:
        result = export_model(args.ckpt, args.out, format=args.format, **kwargs)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, CheckpointError, ValueError, ImportError,
            RuntimeError) as err:
        raise SystemExit(f"defectseg export: error: {err}") from None
    info = result.info
    shape = (
        f"({info.static_batch}, {info.static_size[0]}, {info.static_size[1]}, {info.in_channels})"
        if info.static_size else f"(batch, height, width, {info.in_channels}) with height, width >= {info.min_size}"
    )
    print(f"wrote {result.path} ({result.format}{', ' + result.exporter if result.exporter else ''})")
    print(f"  input  'image': uint8 {shape}, {'RGB' if info.in_channels == 3 else 'gray'} raw pixels")
    print(f"  output 'probabilities': float32 (batch, {info.num_classes}, height, width); 'mask': uint8 (batch, height, width)")
    print(f"  classes: {info.class_names}")
    print(f"  verified on inputs {result.checked_sizes}: max |probability difference| vs PyTorch = {result.max_abs_diff:.2e}")
    return 0
