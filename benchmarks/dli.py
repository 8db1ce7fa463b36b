"""Benchmark of Dynamic Label Injection: training-loader throughput with DLI on and off, and
the cost of one Poisson and one cut-paste injection.

    /work/venv/bin/python benchmarks/dli.py            # 256x256, 0 and 2 workers
    /work/venv/bin/python benchmarks/dli.py --size 128 --workers 0

The loader runs on the built-in synthetic data (images are generated in the workers, as a
decoder would produce them) with the default augmentation. Each configuration runs
one warm-up epoch (worker start-up; it fills DLI's per-worker donor cache, reported as the
cold ratio), then ``--rounds`` epochs, plain and DLI interleaved so that load from other
processes hits both alike; the median is reported. Goal: with DLI on, a batch costs at most
1.5x the plain loader's time.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from defectseg.data import SyntheticDefectsDataModule
from defectseg.data.dli import DLIConfig, extract_defect, inject_defect


def build_loader(size: int, images: int, batch_size: int, workers: int, dli: bool):
    """The synthetic training loader, with DLI on or off."""
    dm = SyntheticDefectsDataModule(
        num_images=images, image_size=size, batch_size=batch_size, num_workers=workers,
        dli={"p_poisson": 0.5} if dli else None, seed=0,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def time_epoch(loader, epoch: int) -> tuple[float, int]:
    """``(seconds, images)`` of one epoch of ``loader``."""
    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)
    count, start = 0, time.perf_counter()
    for batch in loader:
        count += batch["image"].shape[0]
    return time.perf_counter() - start, count


def compare_loaders(size: int, images: int, batch_size: int, workers: int, rounds: int) -> dict[str, list[float]]:
    """Images/s of the plain and the DLI loader: a warm-up epoch each (worker start-up, DLI's
    donor cache), then ``rounds`` epochs each, interleaved so that background load hits both."""
    loaders = {name: build_loader(size, images, batch_size, workers, name == "on") for name in ("off", "on")}
    rates: dict[str, list[float]] = {"off": [], "on": [], "off_cold": [], "on_cold": []}
    for name, loader in loaders.items():
        seconds, count = time_epoch(loader, 0)
        rates[f"{name}_cold"].append(count / seconds)
    for epoch in range(1, rounds + 1):
        for name, loader in loaders.items():
            seconds, count = time_epoch(loader, epoch)
            rates[name].append(count / seconds)
    return rates


def injection_costs(size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Mean milliseconds of one injection (donor crop cached) per method and defect class."""
    dm = SyntheticDefectsDataModule(num_images=200, image_size=size, augment=False)
    dm.setup("fit")
    dataset = dm.make_dataset("train")
    samples = dataset.samples
    free = [i for i, s in enumerate(samples) if s.defect_free][:repeats]
    targets = [dataset.load(i)[:2] for i in free]
    out: dict[str, dict[str, float]] = {}
    for method, p_poisson in (("poisson", 1.0), ("cut-paste", 0.0)):
        config = DLIConfig(p_poisson=p_poisson)
        per_class = {}
        for label in range(1, dm.num_classes):
            donors = [i for i, s in enumerate(samples) if label in s.classes][:4]
            crops = []
            for d in donors:
                image, mask = dataset.load(d)[:2]
                crops.append(extract_defect(image, mask, label, config.transform, config.margin()))
            timings = []
            for r in range(repeats):
                image, mask = targets[r % len(targets)]
                crop = crops[r % len(crops)]
                start = time.perf_counter()
                inject_defect(image, mask, crop, label, r, config)
                timings.append(time.perf_counter() - start)
            per_class[dm.class_names[label]] = 1000 * float(np.mean(timings))
        out[method] = per_class
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=320, help="synthetic images (70 %% train)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per loader after the warm-up")
    parser.add_argument("--repeats", type=int, default=40, help="injections timed per method and class")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="DLI")
    torch.set_num_threads(1)  # as in DataLoader workers; avoids thread oversubscription with 0 workers

    print(f"## Training loader, synthetic {args.size}x{args.size}, batch {args.batch_size}, default augmentation\n")
    print("| workers | plain images/s | DLI images/s | DLI batch time / plain | first epoch (cold) ratio |")
    print("|---:|---:|---:|---:|---:|")
    summary = []
    for workers in args.workers:
        rates = compare_loaders(args.size, args.images, args.batch_size, workers, args.rounds)
        off, on = float(np.median(rates["off"])), float(np.median(rates["on"]))
        cold = rates["off_cold"][0] / rates["on_cold"][0]
        print(f"| {workers} | {off:.1f} | {on:.1f} | {off / on:.2f}x | {cold:.2f}x |")
        summary.append((workers, off / on))
    print()
    for workers, ratio in summary:
        verdict = "meets" if ratio <= 1.5 else "misses"
        print(f"workers={workers}: a DLI batch costs {ratio:.2f}x a plain one (median of {args.rounds} epochs) -> {verdict} the 1.5x goal")
    print(f"\n## One injection at {args.size}x{args.size} (donor crop cached), mean ms\n")
    costs = injection_costs(args.size, args.repeats)
    classes = list(next(iter(costs.values())))
    print("| method | " + " | ".join(classes) + " | mean |")
    print("|:---|" + "---:|" * (len(classes) + 1))
    for method, per_class in costs.items():
        values = [per_class[c] for c in classes]
        print(f"| {method} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {np.mean(values):.2f} |")


if __name__ == "__main__":
    main()
