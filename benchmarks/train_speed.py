"""Images per second of a full ``SegmentationModule`` training step: fp32 / bf16, channels_last.

    python benchmarks/train_speed.py                    # 128 and 256, batch 16, 2 threads, CPU
    python benchmarks/train_speed.py --sizes 128 --repeats 5 --threads 2
    python benchmarks/train_speed.py --device cuda      # on a GPU (bf16 where supported)

A step is what ``trainer.fit`` runs per batch, data already in memory: the module's forward
(padding, memory format), the loss in float32, backward and an AdamW step; bf16 runs the forward
under ``torch.autocast`` as ``trainer.precision: bf16-mixed`` does. The network is the quickstart
and recipe family: smp Unet, ResNet-18 encoder of depth 3 (``--depth`` 4 or 5), random weights.
Settings are timed in interleaved rounds (each setting once per round) and the median is reported,
so a machine shared with other work slows them alike; ratios are within one run.

The second table is the cost of the loss inside a bf16 + channels_last step at the largest size:
the step time with ``ce``, ``balanced`` and ``bce+dice`` and the share of the step taken by the
loss's own forward and backward. Goal: the balanced loss adds at most 10 % to the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from defectseg.data.synthetic import SyntheticDefectGenerator
from defectseg.models import SegmentationModule

SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
LOSS_GOAL = 0.10


def batch(size: int, batch_size: int, classes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = SyntheticDefectGenerator(batch_size, (size, size), classes - 1, 0.3, None, 0)
    masks = torch.from_numpy(np.stack([generator.mask(i) for i in range(batch_size)])).long()
    images = torch.randn(batch_size, 3, size, size)
    return images.to(device), masks.to(device)


DECODERS = {3: [64, 32, 16], 4: [128, 64, 32, 16], 5: [256, 128, 64, 32, 16]}


def make_step(loss: str, channels_last: bool, precision: str, device: str, classes: int, depth: int = 3):
    torch.manual_seed(0)
    model = SegmentationModule(
        num_classes=classes, encoder_depth=depth, decoder_channels=DECODERS[depth], loss=loss,
        channels_last=channels_last,
    ).to(device)
    model.configure_memory_format(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(images: torch.Tensor, masks: torch.Tensor, loss_only: bool = False) -> float:
        if loss_only:  # the loss's forward and backward on logits of the right size and type
            logits = torch.randn(images.shape[0], classes, *images.shape[-2:], device=device, requires_grad=True)
            start = time.perf_counter()
            model.loss_fn(logits, masks).backward()
        else:
            start = time.perf_counter()
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(images)
            model.loss_fn(logits.float(), masks).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def timed(steps: dict, data: tuple[torch.Tensor, torch.Tensor], repeats: int, loss_only: bool = False) -> dict:
    for step in steps.values():  # warm-up: oneDNN primitive creation, allocator
        step(*data, loss_only=loss_only)
        step(*data, loss_only=loss_only)
    times: dict = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            times[key].append(step(*data, loss_only=loss_only))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", type=int, default=3, choices=sorted(DECODERS), help="encoder depth of the Unet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads, batch {args.batch_size}, "
          f"Unet/ResNet-18 depth {args.depth}, "
          f"load average {load:.1f} at start")
    print("\n| size | " + " | ".join(f"{p}{' + cl' if cl else ''}" for p, cl in SETTINGS) + " | bf16+cl / fp32 |")
    print("|---|" + "---:|" * (len(SETTINGS) + 1))
    for size in args.sizes:
        data = batch(size, args.batch_size, args.classes, args.device)
        steps = {(p, cl): make_step("ce", cl, p, args.device, args.classes, args.depth) for p, cl in SETTINGS}
        median = timed(steps, data, args.repeats)
        rates = {key: args.batch_size / t for key, t in median.items()}
        cells = " | ".join(f"{rates[key]:.1f} img/s" for key in SETTINGS)
        print(f"| {size}x{size} | {cells} | {rates[('bf16', True)] / rates[('fp32', False)]:.2f}x |")
    size = max(args.sizes)
    data = batch(size, args.batch_size, args.classes, args.device)
    losses = ["ce", "balanced", "bce+dice"]
    steps = {loss: make_step(loss, True, "bf16", args.device, args.classes, args.depth) for loss in losses}
    step_time = timed(steps, data, args.repeats)
    loss_time = timed(steps, data, args.repeats, loss_only=True)
    print(f"\nLoss inside a bf16 + channels_last step at {size}x{size}:\n")
    print("| loss | step | loss fwd+bwd | share of the step | step vs ce |")
    print("|---|---:|---:|---:|---:|")
    for loss in losses:
        print(f"| {loss} | {step_time[loss] * 1e3:.0f} ms | {loss_time[loss] * 1e3:.0f} ms | "
              f"{loss_time[loss] / step_time[loss]:.0%} | {step_time[loss] / step_time['ce'] - 1:+.1%} |")
    extra = step_time["balanced"] / step_time["ce"] - 1
    verdict = "met" if extra <= LOSS_GOAL else "NOT met"
    print(f"\nGoal (balanced adds at most {LOSS_GOAL:.0%} to a bf16 step at {size}x{size}): {verdict} ({extra:+.1%}).")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (above ~{args.threads} the machine was busy)")


if __name__ == "__main__":
    main()
