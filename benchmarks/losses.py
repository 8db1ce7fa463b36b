"""Forward + backward time of every registered loss, relative to cross-entropy in the same run.

    python benchmarks/losses.py                      # (16, 6, 256, 256) on the CPU, 2 threads
    python benchmarks/losses.py --device cuda        # on a GPU
    python benchmarks/losses.py --threads 1 --repeats 15 --markdown

The targets are realistic defect masks from the built-in synthetic generator (``--defect-free``
sets the share of defect-free images; 0 by default, the costliest case for the confusion map);
``--noise`` adds rows with uniformly random labels, the worst case of the confusion map. Losses
are timed in interleaved rounds (every loss once per round, in a shuffled order) so that a
machine shared with other work slows them alike; the table gives the median over the rounds of
the wall-clock time and, on the CPU, of the process CPU time (less sensitive to other processes
taking the cores). Goal of the balanced loss: at most 1.5x cross-entropy on the CPU, checked at
the end with ce and balanced alone (interleaved), so that the large allocations of the other
losses do not land between them and disturb the allocator.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from defectseg.data.synthetic import SyntheticDefectGenerator
from defectseg.losses import available_losses, build_loss

GOAL = 1.5


def synthetic_masks(batch: int, classes: int, size: int, defect_free: float, seed: int) -> torch.Tensor:
    generator = SyntheticDefectGenerator(batch, (size, size), classes - 1, defect_free, None, seed)
    return torch.from_numpy(np.stack([generator.mask(i) for i in range(batch)])).long()


def loss_rows(classes: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """Name -> factory: every registered loss (aliases once) and the balanced loss's components."""
    frequencies = [0.9] + [0.1 / (classes - 1)] * (classes - 1)
    extra = {
        "wce": {"class_frequencies": frequencies},
        "class_balanced": {"samples_per_class": [f * 1e7 for f in frequencies]},
    }
    rows: dict[str, Callable[[], torch.nn.Module]] = {}
    for name in available_losses():
        if "+" in name:
            continue  # an alias of a registered name (bce+dice is bce_dice)
        rows[name] = lambda name=name: build_loss(name, loss_kwargs=extra.get(name))
    components = {
        "balanced: truncation only": {"class_weighting": False, "confusion_suppression": False},
        "balanced: class weighting only": {"truncation": False, "confusion_suppression": False},
        "balanced: confusion only": {"truncation": False, "class_weighting": False},
    }
    for label, kwargs in components.items():
        rows[label] = lambda kwargs=kwargs: build_loss("balanced", loss_kwargs=kwargs)
    return rows


def time_once(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor, device: str) -> tuple[float, float]:
    logits.grad = None
    if device != "cpu":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    loss(logits, target).backward()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--defect-free", type=float, default=0.0, help="share of defect-free images")
    parser.add_argument("--noise", action="store_true", help="also time the balanced loss on random labels")
    parser.add_argument("--only", nargs="*", help="time only these rows (and ce)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = args.device
    target = synthetic_masks(args.batch, args.classes, args.size, args.defect_free, args.seed).to(device)
    logits = torch.randn(args.batch, args.classes, args.size, args.size, device=device, requires_grad=True)
    rows = loss_rows(args.classes)
    if args.only:
        rows = {k: v for k, v in rows.items() if k == "ce" or k in args.only}
    cases = {name: (factory().to(device), target) for name, factory in rows.items()}
    if args.noise:
        noise = torch.randint(0, args.classes, target.shape, device=device)
        cases["balanced (random labels)"] = (build_loss("balanced").to(device), noise)
        cases["balanced: confusion only (random labels)"] = (
            build_loss("balanced", loss_kwargs={"truncation": False, "class_weighting": False}).to(device),
            noise,
        )

    load_before = os.getloadavg()
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(args.repeats + 2):
        order = list(cases)
        random.shuffle(order)
        for name in order:
            loss, mask = cases[name]
            wall, cpu = time_once(loss, logits, mask, device)
            if round_index >= 2:
                walls[name].append(wall)
                cpus[name].append(cpu)
    load_after = os.getloadavg()

    med_wall = {k: statistics.median(v) for k, v in walls.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    defect_share = float((target > 0).float().mean())
    print(
        f"loss forward+backward at ({args.batch}, {args.classes}, {args.size}, {args.size}) on {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} rounds; "
        f"defect pixels {defect_share:.1%}; load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    show_cpu = device == "cpu"
    header = ["loss", "wall ms", "x CE (wall)"] + (["CPU ms", "x CE (CPU)"] if show_cpu else [])
    lines = []
    for name in sorted(cases, key=lambda k: (k != "ce", med_wall[k])):
        cells = [name, f"{med_wall[name] * 1e3:.1f}", f"{med_wall[name] / med_wall['ce']:.2f}"]
        if show_cpu:
            cells += [f"{med_cpu[name] * 1e3:.1f}", f"{med_cpu[name] / med_cpu['ce']:.2f}"]
        lines.append(cells)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
        for cells in lines:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    if "balanced" in med_wall:
        ratio = med_wall["balanced"] / med_wall["ce"]
        print(f"in the table: balanced / ce = {ratio:.2f} (wall clock)")
        # the goal check: ce and balanced alone, interleaved, so that the allocations of the
        # other losses (lovasz, bce_dice: hundreds of MB) do not land between them
        pair = {"ce": cases["ce"], "balanced": cases["balanced"]}
        pair_walls: dict[str, list[float]] = {name: [] for name in pair}
        pair_cpus: dict[str, list[float]] = {name: [] for name in pair}
        for round_index in range(2 * args.repeats + 2):
            order = list(pair)
            random.shuffle(order)
            for name in order:
                wall, cpu = time_once(pair[name][0], logits, pair[name][1], device)
                if round_index >= 2:
                    pair_walls[name].append(wall)
                    pair_cpus[name].append(cpu)
        ratio = statistics.median(pair_walls["balanced"]) / statistics.median(pair_walls["ce"])
        cpu_ratio = statistics.median(pair_cpus["balanced"]) / statistics.median(pair_cpus["ce"])
        verdict = "meets" if ratio <= GOAL else "misses"
        print(
            f"goal check (ce and balanced alone, {2 * args.repeats} interleaved rounds): balanced / ce = "
            f"{ratio:.2f} wall clock, {cpu_ratio:.2f} CPU time -> {verdict} the goal of {GOAL}x"
        )


if __name__ == "__main__":
    main()
