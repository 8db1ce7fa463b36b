"""Time the metadata scan of the real datasets and the NEU-Seg near-duplicate search.

Usage (from the repository root; the data are found through ``DEFECTSEG_DATA_ROOT``, default
``../shared/datasets``)::

    python benchmarks/dataset_scan.py [--brute-force-sample 400]

Prints, for Magnetic Tile and NEU-Seg: the first scan (headers, masks, and for NEU-Seg the
duplicate groups), the cached load that every later run does, and their ratio; then the
duplicate search split into thumbnails and pair search, against an all-pairs brute force
measured on a sample and scaled to the full set (pairs grow with the square of the count).
Everything is measured in one run on this machine, so ratios are comparable.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from defectseg.data import MagneticTileDataModule, NEUSegDataModule
from defectseg.data.base import default_data_root
from defectseg.data.duplicates import near_duplicate_pairs, thumbnail
from defectseg.data.files import parallel_map, scan_workers


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def brute_force_seconds(thumbs: np.ndarray, sample: int) -> float:
    """All-pairs, all-rotations mean absolute difference on ``sample`` thumbnails, scaled up."""
    part = thumbs[:sample].reshape(sample, -1)
    rotated = [np.rot90(thumbs[:sample], r, axes=(1, 2)).reshape(sample, -1) for r in range(4)]
    start = time.perf_counter()
    for i in range(sample):
        for rot in rotated:
            np.abs(part[i + 1 :] - rot[i]).mean(axis=1)
    elapsed = time.perf_counter() - start
    n = len(thumbs)
    return elapsed * (n * (n - 1)) / (sample * (sample - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--brute-force-sample", type=int, default=400)
    args = parser.parse_args()
    print(f"# dataset scan on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{scan_workers()} scan threads, load average {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for cls, sub in ((MagneticTileDataModule, "magnetic_tile"), (NEUSegDataModule, "neu_seg")):
            root = os.path.join(args.data_root, sub)
            if not os.path.isdir(root):
                print(f"skipping {cls.__name__}: {root} not found")
                continue
            samples, first = timed(lambda c=cls, r=root: c(root=r, cache_dir=cache).metadata)
            _, cached = timed(lambda c=cls, r=root: c(root=r, cache_dir=cache).metadata)
            rows.append((cls.__name__, len(samples), first, cached))
    print("\n| dataset | images | first scan (s) | cached load (s) | first / cached |")
    print("|---|---:|---:|---:|---:|")
    for name, count, first, cached in rows:
        print(f"| {name} | {count} | {first:.2f} | {cached:.2f} | {first / cached:.0f}x |")

    neu = os.path.join(args.data_root, "neu_seg")
    if os.path.isdir(neu):
        paths = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(neu, "images")) for f in files]
        thumbs, t_thumbs = timed(lambda: np.stack(parallel_map(thumbnail, sorted(paths))))
        pairs, t_pairs = timed(lambda: near_duplicate_pairs(thumbs, 1.0))
        brute = brute_force_seconds(thumbs, min(args.brute_force_sample, len(thumbs)))
        print(f"\nNEU-Seg near-duplicate search over {len(thumbs)} images ({len(pairs)} pairs found)")
        print("| step | seconds |")
        print("|---|---:|")
        print(f"| 64x64 thumbnails (decode + resize) | {t_thumbs:.2f} |")
        print(f"| pruned pair search (mean, 4x4, 16x16 bounds) | {t_pairs:.2f} |")
        print(f"| all-pairs brute force (estimated from {args.brute_force_sample}) | {brute:.1f} |")
        print(f"| brute force / pruned search | {brute / t_pairs:.0f}x |")


if __name__ == "__main__":
    main()
