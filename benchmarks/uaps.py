"""Cost of UAPS against the supervised SegmentationModule: training step, where it goes, inference.

Usage (from the repository root)::

    python benchmarks/uaps.py [--size 128] [--batch 8] [--unlabeled-batch 8] [--repeats 3]

Both modules use the same architecture, encoder and loss (``0.5 * ce + 0.5 * dice``). Every
figure of one table is measured in one run, interleaved (A, B, C, A, B, C...) so that machine
load affects all alike; medians are printed. Times are the CPU time of the process (all
threads) unless ``--clock wall``: on a machine shared with other jobs, wall time mostly measures
the others.

* **Training step** (forward, backward, AdamW step) for two settings: fp32 in the default memory
  format, and bf16 autocast with channels_last (the fast-training defaults). Per setting:
  ``SegmentationModule`` on the labelled batch, and ``UAPSModule`` on the labelled plus the
  unlabelled batch with ``forward_passes: joint`` (one pass over both) and ``separate`` (one
  pass each, batch norm not mixed, as in the reference). The ratio is UAPS / supervised.
* **What the ratio is made of** (bf16 + channels_last, same interleaved run): UAPS with
  ``unsupervised_weight: 0`` (every decoder, labelled images only), without perturbations, and
  with one auxiliary decoder. With ``D`` the decoder's share of a supervised step, a UAPS step
  runs twice the images through the encoder and ``K`` decoders: about ``2 (1 + (K - 1) D)``
  supervised steps; ``D`` is estimated from the ``unsupervised_weight: 0`` row.
* **Where a UAPS step goes** (bf16 + channels_last, the warmed-up modules of the table): the
  encoder, the main decoder, the auxiliary decoders with their perturbations, the pseudo-label
  mixing and KL uncertainty, the losses, the backward pass and the optimizer step of the joint
  UAPS step, and the same parts of the supervised step (``--no-parts`` skips it).
* **Inference** (``eval``, ``no_grad``, ``module(image)``) at batch 1 and ``--batch``: UAPS runs
  the main decoder only, so the goal is a ratio of 1.0 within noise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from defectseg.models import SegmentationModule, UAPSModule
from defectseg.models import uaps as uaps_module

SETTINGS = {"fp32": (False, False), "bf16 + channels_last": (True, True)}
#: functions of defectseg.models.uaps timed as parts (looked up by name at every call)
MODULE_PARTS = {
    "mix_pseudo_labels": "KL uncertainty + mixing",
    "kl_uncertainty": "KL uncertainty + mixing",
    "uaps_unsupervised_loss": "unsupervised loss (softmax, CE, certainty)",
}


#: the clock of every measurement: CPU time of this process (all its threads) by default, which
#: a machine shared with other jobs inflates far less than wall time; ``--clock wall`` for wall time
CLOCK = {"clock": time.process_time}


def now() -> float:
    return CLOCK["clock"]()


def timed(function: Callable[[], object]) -> float:
    start = now()
    function()
    return now() - start


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


class PartTimer:
    """Wall time of named parts of a step, from forward hooks and wrapped functions.

    Parts nest (the unsupervised loss calls the mixing and KL functions): a part's time excludes
    the parts timed inside it, so the parts add up to the step.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [name, start, time of inner parts]
        self.enabled = False

    def start(self, name: str) -> None:
        if self.enabled:
            self.stack.append([name, now(), 0.0])

    def stop(self) -> None:
        if not self.enabled:
            return
        name, start, inner = self.stack.pop()
        elapsed = now() - start
        self.totals[name] += elapsed - inner
        if self.stack:
            self.stack[-1][2] += elapsed

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def hook(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *args: self.start(name))
        module.register_forward_hook(lambda *args: self.stop())

    def wrap(self, owner: object, attribute: str, name: str) -> None:
        function = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            with self.part(name):
                return function(*args, **kwargs)

        setattr(owner, attribute, wrapper)


def instrument(module: torch.nn.Module, timer: PartTimer) -> None:
    """Hook the network's parts and wrap the losses of ``module`` (supervised or UAPS)."""
    network = module.net.network
    timer.hook(network.encoder, "encoder")
    timer.hook(network.decoder, "main decoder")
    timer.hook(network.segmentation_head, "main decoder")
    for branch in getattr(network, "aux_decoders", []):
        timer.hook(branch, "aux decoders + perturbations")
    timer.wrap(module.loss_fn, "forward", "losses")
    dice = uaps_module.find_dice(module.loss_fn)
    if dice is not None and dice is not module.loss_fn:
        timer.wrap(dice, "forward", "losses")  # the pseudo-label loss's Dice


def train_step(
    module: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, bf16: bool, timer: PartTimer | None = None
) -> Callable[[], None]:
    timer = timer or PartTimer()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(batch, 1)
        with timer.part("backward"):
            loss.backward()
        with timer.part("optimizer step"):
            optimizer.step()

    return step


ABLATIONS = {
    "uaps, unsupervised_weight 0": {"unsupervised_weight": 0.0},
    "uaps joint, perturbations none": {"perturbations": ["none"]},
    "uaps joint, 1 auxiliary decoder": {"num_aux_decoders": 1},
}


def build(args: argparse.Namespace, channels_last: bool, ablations: bool = False) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    common = {
        "num_classes": args.classes, "arch": args.arch, "encoder": args.encoder, "encoder_depth": args.encoder_depth,
        "decoder_channels": args.decoder_channels, "loss": "0.5 * ce + 0.5 * dice", "channels_last": channels_last,
    }
    uaps = {"num_aux_decoders": args.num_aux_decoders, "rampup_steps": 0, **common}
    modules = {
        "supervised": SegmentationModule(**common),
        "uaps joint": UAPSModule(forward_passes="joint", **uaps),
        "uaps separate": UAPSModule(forward_passes="separate", **uaps),
    }
    for name, change in ABLATIONS.items() if ablations else ():
        modules[name] = UAPSModule(**{**uaps, **change})
    for module in modules.values():
        quiet(module).train()
        module.configure_memory_format("cpu")  # what setup() does when a trainer runs the module
    return modules


def batches(args: argparse.Namespace, channels_last: bool) -> tuple[dict, dict]:
    size = args.size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    labeled = {
        "image": torch.randn(args.batch, 3, size, size).contiguous(memory_format=fmt),
        "mask": torch.randint(0, args.classes, (args.batch, size, size)),
    }
    unlabeled = {
        "image": torch.randn(args.unlabeled_batch, 3, size, size).contiguous(memory_format=fmt),
        "mask": torch.full((args.unlabeled_batch, size, size), 255),
        "valid_size": torch.tensor([[size, size]] * args.unlabeled_batch),
    }
    return labeled, {"labeled": labeled, "unlabeled": unlabeled}


def measure_parts(
    args: argparse.Namespace, modules: dict[str, torch.nn.Module], labeled: dict, combined: dict, bf16: bool
) -> dict[str, dict[str, float]]:
    """Seconds per part (mean of ``--repeats`` steps) of the supervised and the joint UAPS step."""
    timers = {"supervised": PartTimer(), "uaps joint": PartTimer()}
    originals = {name: getattr(uaps_module, name) for name in MODULE_PARTS}
    try:
        steps = {}
        for name, timer in timers.items():
            module = modules[name]
            instrument(module, timer)
            if name == "uaps joint":
                for function, part in MODULE_PARTS.items():
                    timer.wrap(uaps_module, function, part)
            batch = labeled if name == "supervised" else combined
            steps[name] = train_step(module, batch, torch.optim.AdamW(module.parameters()), bf16, timer)
        for timer in timers.values():
            timer.enabled = True
        step_times = interleaved(steps, args.repeats, 0)
    finally:
        for name, function in originals.items():
            setattr(uaps_module, name, function)
    totals = {}
    for name, timer in timers.items():
        parts = {part: value / args.repeats for part, value in timer.totals.items()}
        parts["rest (slicing, padding, logging)"] = max(0.0, step_times[name] - sum(parts.values()))
        totals[name] = parts
    return totals


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decoder-channels", type=int, nargs="+", default=None, help="Unet decoder widths")
    parser.add_argument("--no-ablation", action="store_true", help="skip the rows that explain the ratio")
    parser.add_argument("--no-parts", action="store_true", help="skip the per-part timing")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference latency")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock", choices=["process", "wall"], default="process",
        help="process: CPU time of all threads (robust on a shared machine); wall: elapsed time",
    )
    args = parser.parse_args()
    CLOCK["clock"] = time.process_time if args.clock == "process" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    steps, references, inputs = {}, {}, {}
    for setting, (bf16, channels_last) in SETTINGS.items():
        modules = build(args, channels_last, ablations=bf16 and not args.no_ablation)
        labeled, combined = batches(args, channels_last)
        for name, module in modules.items():
            batch = labeled if name == "supervised" else combined
            steps[(setting, name)] = train_step(module, batch, torch.optim.AdamW(module.parameters()), bf16)
        references[setting], inputs[setting] = modules, (labeled, combined)
    train = interleaved(steps, args.repeats, args.warmup)

    print(
        f"UAPS benchmark: {args.arch}/{args.encoder} depth {args.encoder_depth}, decoder "
        f"{args.decoder_channels or 'default'}, {args.num_aux_decoders} aux decoders, {args.size}x{args.size}, "
        f"{args.batch} labelled + {args.unlabeled_batch} unlabelled images, {args.classes} classes, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{torch.get_num_threads()} threads; medians of {args.repeats} interleaved steps, "
        f"{'CPU time of the process' if args.clock == 'process' else 'wall time'} in ms\n"
    )
    print("| training step | supervised (ms) | UAPS joint (ms) | ratio | UAPS separate (ms) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for setting in SETTINGS:
        sup, joint, separate = (train[(setting, n)] for n in ("supervised", "uaps joint", "uaps separate"))
        print(
            f"| {setting} | {sup * 1e3:.0f} | {joint * 1e3:.0f} | {joint / sup:.2f} | "
            f"{separate * 1e3:.0f} | {separate / sup:.2f} |"
        )
    fast = "bf16 + channels_last"
    print(
        f"\n{fast} vs fp32: supervised step {train[(fast, 'supervised')] / train[('fp32', 'supervised')]:.2f}x, "
        f"UAPS joint step {train[(fast, 'uaps joint')] / train[('fp32', 'uaps joint')]:.2f}x; "
        f"the {fast} UAPS joint step costs {train[(fast, 'uaps joint')] / train[('fp32', 'supervised')]:.2f} "
        "fp32 supervised steps"
    )
    if not args.no_ablation:
        sup = train[(fast, "supervised")]
        print(f"\n| {fast}: what the ratio is made of | ms | ratio to supervised |")
        print("|---|---:|---:|")
        for name in ("uaps joint", *ABLATIONS):
            print(f"| {name} | {train[(fast, name)] * 1e3:.0f} | {train[(fast, name)] / sup:.2f} |")
        decoders = args.num_aux_decoders + 1
        share = (train[(fast, "uaps, unsupervised_weight 0")] / sup - 1) / max(1, decoders - 1)
        print(
            f"\ndecoder share of a supervised step D = (ratio with unsupervised_weight 0 - 1) / {decoders - 1} = "
            f"{share:.2f}; twice the images through the encoder and {decoders} decoders: "
            f"2 (1 + {decoders - 1} D) = {2 * (1 + (decoders - 1) * share):.2f} supervised steps "
            f"(a ratio of 2.5 needs D <= {0.25 / max(1, decoders - 1):.3f})"
        )

    if not args.no_parts:
        labeled, combined = inputs[fast]
        parts = measure_parts(args, references[fast], labeled, combined, SETTINGS[fast][0])
        names = list(dict.fromkeys([*parts["uaps joint"], *parts["supervised"]]))
        sup_total, uaps_total = sum(parts["supervised"].values()), sum(parts["uaps joint"].values())
        print(f"\nWhere the step goes, {fast} (ms per step, mean of {args.repeats}):\n")
        print("| part | supervised | UAPS joint | share of UAPS | UAPS - supervised, in supervised steps |")
        print("|---|---:|---:|---:|---:|")
        for name in names:
            s_, u = parts["supervised"].get(name, 0.0), parts["uaps joint"].get(name, 0.0)
            print(f"| {name} | {s_ * 1e3:.0f} | {u * 1e3:.0f} | {u / uaps_total:.0%} | {(u - s_) / sup_total:+.2f} |")
        print(f"| total | {sup_total * 1e3:.0f} | {uaps_total * 1e3:.0f} | 100% | {uaps_total / sup_total - 1:+.2f} |")

    if not args.no_inference:
        supervised, uaps = references["fp32"]["supervised"], references["fp32"]["uaps joint"]
        for module in (supervised, uaps):
            module.eval()
        print("\n| inference (fp32) | supervised (ms) | UAPS (ms) | ratio |")
        print("|---|---:|---:|---:|")
        for batch in sorted({1, args.batch}):
            image = torch.randn(batch, 3, args.size, args.size)

            def run(module: torch.nn.Module, image: torch.Tensor = image) -> Callable[[], None]:
                def call() -> None:
                    with torch.no_grad():
                        module(image)

                return call

            times = interleaved({"supervised": run(supervised), "uaps": run(uaps)}, args.repeats * 3, args.warmup)
            print(
                f"| batch {batch} | {times['supervised'] * 1e3:.1f} | {times['uaps'] * 1e3:.1f} | "
                f"{times['uaps'] / times['supervised']:.2f} |"
            )
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    uaps = references["fp32"]["uaps joint"]
    main_params = sum(
        p.numel() for name, p in uaps.uaps_net.named_parameters() if not name.startswith("aux_decoders.")
    ) / 1e6
    print(
        f"\nparameters: supervised {params(references['fp32']['supervised']):.2f} M, UAPS {params(uaps):.2f} M "
        f"(main path {main_params:.2f} M)"
    )


if __name__ == "__main__":
    main()
