"""Cost of UAPS against the supervised SegmentationModule: training step and inference latency.

Usage (from the repository root)::

    python benchmarks/uaps.py [--size 128] [--batch 8] [--unlabeled-batch 8] [--repeats 10]

Both modules use the same architecture, encoder and loss (``ce+dice``). Measured in one run,
interleaved (A, B, A, B...) so that machine load affects both alike; medians are printed.

* Training step (forward, backward, AdamW step) on the same labelled batch:
  ``SegmentationModule`` on the labelled batch; ``UAPSModule`` with the labelled batch plus an
  unlabelled batch (the semi-supervised step); ``UAPSModule`` with ``unsupervised_weight: 0``
  (supervised baseline: all decoders, labelled batch only).
* Inference (``eval``, ``no_grad``, ``module(image)``) at batch 1 and ``--batch``: UAPS runs the
  main decoder only, so the goal is a ratio of 1.0 within noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from defectseg.models import SegmentationModule, UAPSModule


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(functions: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, calling them in turn ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(timed(function))
    return {name: statistics.median(values) for name, values in times.items()}


def quiet(module: torch.nn.Module) -> torch.nn.Module:
    module.log = lambda *args, **kwargs: None  # no trainer here: logging is a no-op
    return module


def train_step(module: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(batch, 1)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--batch", type=int, default=8, help="labelled batch (and inference batch)")
    parser.add_argument("--unlabeled-batch", type=int, default=8)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--encoder-depth", type=int, default=5)
    parser.add_argument("--num-aux-decoders", type=int, default=3)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common = {
        "num_classes": args.classes, "arch": args.arch, "encoder": args.encoder,
        "encoder_depth": args.encoder_depth, "loss": "ce+dice",
    }
    supervised = quiet(SegmentationModule(**common))
    uaps = quiet(UAPSModule(num_aux_decoders=args.num_aux_decoders, unsupervised_weight=0.1, rampup_steps=0, **common))
    baseline = quiet(UAPSModule(num_aux_decoders=args.num_aux_decoders, unsupervised_weight=0.0, **common))
    size = args.size
    labeled = {
        "image": torch.randn(args.batch, 3, size, size),
        "mask": torch.randint(0, args.classes, (args.batch, size, size)),
    }
    unlabeled = {
        "image": torch.randn(args.unlabeled_batch, 3, size, size),
        "mask": torch.full((args.unlabeled_batch, size, size), 255),
        "valid_size": torch.tensor([[size, size]] * args.unlabeled_batch),
    }
    combined = {"labeled": labeled, "unlabeled": unlabeled}
    for module in (supervised, uaps, baseline):
        module.train()
    train = interleaved(
        {
            "supervised": train_step(supervised, labeled, torch.optim.AdamW(supervised.parameters())),
            "uaps": train_step(uaps, combined, torch.optim.AdamW(uaps.parameters())),
            "uaps_w0": train_step(baseline, combined, torch.optim.AdamW(baseline.parameters())),
        },
        args.repeats,
        args.warmup,
    )
    for module in (supervised, uaps):
        module.eval()
    infer = {}
    for batch in sorted({1, args.batch}):
        image = torch.randn(batch, 3, size, size)

        def run(module: torch.nn.Module, image: torch.Tensor = image) -> Callable[[], None]:
            def call() -> None:
                with torch.no_grad():
                    module(image)

            return call

        infer[batch] = interleaved(
            {"supervised": run(supervised), "uaps": run(uaps)}, args.repeats * 3, args.warmup
        )
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    main_params = sum(
        p.numel() for name, p in uaps.uaps_net.named_parameters() if not name.startswith("aux_decoders.")
    ) / 1e6
    print(
        f"UAPS benchmark: {args.arch}/{args.encoder} depth {args.encoder_depth}, {args.num_aux_decoders} aux "
        f"decoders, {size}x{size}, {args.classes} classes, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads"
    )
    print(
        f"parameters: supervised {params(supervised):.2f} M, UAPS {params(uaps):.2f} M "
        f"(main path {main_params:.2f} M)\n"
    )
    print("| measurement | supervised (ms) | UAPS (ms) | ratio |")
    print("|---|---:|---:|---:|")
    ref = train["supervised"] * 1e3
    print(
        f"| train step, {args.batch} labelled + {args.unlabeled_batch} unlabelled | {ref:.0f} | "
        f"{train['uaps'] * 1e3:.0f} | {train['uaps'] / train['supervised']:.2f} |"
    )
    print(
        f"| train step, {args.batch} labelled, unsupervised_weight 0 | {ref:.0f} | "
        f"{train['uaps_w0'] * 1e3:.0f} | {train['uaps_w0'] / train['supervised']:.2f} |"
    )
    for batch, times in infer.items():
        print(
            f"| inference, batch {batch} | {times['supervised'] * 1e3:.1f} | {times['uaps'] * 1e3:.1f} | "
            f"{times['uaps'] / times['supervised']:.2f} |"
        )


if __name__ == "__main__":
    main()
