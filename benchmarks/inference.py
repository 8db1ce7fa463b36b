"""Inference latency and throughput: PyTorch eager vs ONNX Runtime (CPU; CUDA when available).

Runs the raw-image model (:class:`defectseg.inference.runtime.InferenceModel`: uint8 in,
normalisation, padding, network, softmax) at 256x256 and 512x512 with batch 1 and 8, and prints
a markdown table of the median batch latency, the latency per image and the throughput, plus the
ONNX Runtime speed-up over eager measured in the same run. A second table times the whole
:class:`~defectseg.Predictor` (decode-free) on a 256x1600 strip with sliding-window tiling.

The machine may be shared: every case is repeated and the median is reported (the min too).

    python benchmarks/inference.py                      # Unet/resnet18 (the default model)
    python benchmarks/inference.py --ckpt model.ckpt    # your trained model
    python benchmarks/inference.py --threads 2 --repeats 7 --sizes 256 512 --batches 1 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np


def _time(run: Callable[[], object], repeats: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _build_module(args: argparse.Namespace):
    import torch

    from defectseg.models import SegmentationModule

    if args.ckpt:
        from defectseg.inference import load_module

        return load_module(args.ckpt)
    torch.manual_seed(0)
    return SegmentationModule(
        num_classes=args.num_classes, arch=args.arch, encoder=args.encoder, encoder_depth=args.encoder_depth
    ).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="benchmark this checkpoint instead of a fresh model")
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--encoder-depth", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"])
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--no-strip", action="store_true", help="skip the Predictor strip benchmark")
    parser.add_argument("--spin", action="store_true",
                        help="let idle threads spin (OpenMP/ONNX Runtime defaults; fastest on a dedicated "
                        "machine). By default they sleep (OMP_WAIT_POLICY=PASSIVE, no ORT spinning): "
                        "spinning threads collapse when other processes share the cores")
    args = parser.parse_args(argv)

    if not args.spin:
        if "torch" in sys.modules:
            print("warning: torch already imported, OMP_WAIT_POLICY not applied", file=sys.stderr)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from defectseg.inference.runtime import InferenceModel

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    module = _build_module(args)
    model = InferenceModel.from_module(module).eval()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    rows: list[dict] = []
    sessions: dict[str, object] = {}
    tmp = tempfile.TemporaryDirectory()
    onnx_path = None
    if not args.no_onnx:
        try:
            import onnxruntime as ort

            from defectseg.inference.export import export_onnx

            onnx_path = os.path.join(tmp.name, "model.onnx")
            start = time.perf_counter()
            exported = export_onnx(module, onnx_path, size=min(args.sizes), exporter=args.exporter)
            print(f"exported ONNX ({exported.exporter}) in {time.perf_counter() - start:.1f} s, "
                  f"max |diff| vs PyTorch {exported.max_abs_diff:.1e}", file=sys.stderr)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            if not args.spin:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions["cpu"] = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
            if "cuda" in devices and "CUDAExecutionProvider" in ort.get_available_providers():
                sessions["cuda"] = ort.InferenceSession(onnx_path, providers=["CUDAExecutionProvider"])
        except ImportError as err:
            print(f"ONNX Runtime skipped: {err}", file=sys.stderr)

    rng = np.random.default_rng(0)
    for size in args.sizes:
        for batch in args.batches:
            images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            for device in devices:
                eager = model.to(device)
                tensor = torch.from_numpy(images)

                def run_eager(eager=eager, tensor=tensor, device=device):
                    with torch.inference_mode():
                        out = eager(tensor.to(device))
                        if device == "cuda":
                            torch.cuda.synchronize()
                        return out.cpu()

                median, best = _time(run_eager, args.repeats, args.warmup)
                rows.append(dict(runtime="PyTorch eager", device=device, size=size, batch=batch, median=median, best=best))
                print(f"  eager {device} {size} b{batch}: {median * 1e3:.1f} ms", file=sys.stderr)
                session = sessions.get(device)
                if session is not None:
                    def run_ort(session=session, images=images):
                        return session.run(["probabilities"], {"image": images})

                    median, best = _time(run_ort, args.repeats, args.warmup)
                    rows.append(dict(runtime="ONNX Runtime", device=device, size=size, batch=batch, median=median, best=best))
                    print(f"  onnxruntime {device} {size} b{batch}: {median * 1e3:.1f} ms", file=sys.stderr)
    model.to("cpu")

    name = args.ckpt or f"{args.arch}/{args.encoder} depth {args.encoder_depth}, {args.num_classes} classes"
    print(f"\n### Inference latency: {name}\n")
    print(f"torch {torch.__version__}, {args.threads} threads (torch.set_num_threads / intra_op_num_threads), "
          f"{'spinning' if args.spin else 'sleeping (OMP_WAIT_POLICY=PASSIVE)'} idle threads, "
          f"median of {args.repeats} runs after {args.warmup} warm-up; uint8 in, probabilities out.\n")
    print("| runtime | device | input | batch | batch latency (ms) | per image (ms) | images/s | speed-up vs eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    eager_times = {(r["device"], r["size"], r["batch"]): r["median"] for r in rows if r["runtime"] == "PyTorch eager"}
    for r in rows:
        base = eager_times.get((r["device"], r["size"], r["batch"]))
        speedup = f"{base / r['median']:.2f}x" if base and r["runtime"] != "PyTorch eager" else "1.00x"
        print(
            f"| {r['runtime']} | {r['device']} | {r['size']}x{r['size']} | {r['batch']} | {r['median'] * 1e3:.1f} "
            f"| {r['median'] * 1e3 / r['batch']:.1f} | {r['batch'] / r['median']:.2f} | {speedup} |"
        )

    if not args.no_strip:
        from defectseg.inference import Predictor

        strip = rng.integers(0, 256, (256, 1600, 3), dtype=np.uint8)
        print("\n### Predictor on a 256x1600 strip (tiles 256x512, overlap 64, batch 8, report included)\n")
        print("| runtime | device | tiles | per image (ms) | images/s |")
        print("|---|---|---:|---:|---:|")
        backends = [("PyTorch eager", module, "cpu")]
        if onnx_path and "cpu" in sessions:
            backends.append(("ONNX Runtime", onnx_path, "cpu"))
        for label, source, device in backends:
            predictor = Predictor(source, device=device, tile_size=512, overlap=64, batch_size=8,
                                  num_workers=0, num_threads=args.threads)
            from defectseg.inference.tiling import TilePlan

            tiles = len(TilePlan(256, 1600, 512, 64))
            median, _ = _time(lambda p=predictor: p.predict(strip), args.repeats, args.warmup)
            print(f"| {label} | {device} | {tiles} | {median * 1e3:.1f} | {1 / median:.2f} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
