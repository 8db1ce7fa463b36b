"""Grid definitions: named YAML fragments merged over a base config, times seeds.

A grid file (see ``configs/compare/``) is a YAML mapping::

    name: losses                      # used in titles (default: the file's stem)
    description: CE against the balanced loss ...
    seeds: {quick: 3, cpu: 3, full: 5}   # or one int; --seeds N overrides
    test_checkpoint: {quick: last, cpu: last, full: best}   # or one of best (by the checkpoint monitor), last
    baseline: ce                      # the configuration the others are paired against in summary.md
                                      # (or {configuration: its baseline, ...}); --baseline overrides
    common:                           # fragment of every configuration (every mode)
      model: {init_args: {loss: bce+dice}}
    quick:                            # fragment for --mode quick (reduced resolution, epochs)
      trainer: {max_epochs: 3}
    cpu:                              # fragment for --mode cpu, over a CPU training recipe as base
      trainer: {limit_train_batches: 50}
    full:                             # fragment for full mode (paper settings)
      trainer: {max_epochs: 100}
    configurations:                   # name -> fragment, in table order
      ce:  {model: {init_args: {loss: ce}}}
      wce: {model: {init_args: {loss: wce}}}
    axes:                             # optional: the product of named fragments per axis
      encoder:
        resnet18: {model: {init_args: {encoder: resnet18}}}
        mobilenet_v2: {model: {init_args: {encoder: mobilenet_v2}}}
    slurm:                            # optional: what each job asks for with --executor slurm
      partition: gpu                  # (see defectseg.experiments.cluster.ClusterSettings;
      time: "4:00:00"                 #  the --slurm-* options win)
      gpus_per_job: 1
      cpus_per_job: 8

The configurations are the product of ``configurations`` (one axis) and every axis of
``axes``, in file order; a configuration's name joins its values' names with ``-``
(``ce-resnet18``). A run's config is the base config, then ``common``, then the mode's
fragment, then the configuration's fragments, then command-line overrides. Fragments merge as LightningCLI merges config files: mappings merge key by
key, a ``class_path`` different from the base's replaces the whole block, lists and scalars
replace. The text ``${seed}`` anywhere in a fragment is replaced by the run's seed (a value
that is exactly ``${seed}`` becomes the integer), e.g. ``labeled_seed: ${seed}``.

Modes: ``quick`` checks the pipeline in minutes on a CPU, ``cpu`` trains for real on a CPU (its
base config is a fast-training recipe such as ``configs/magnetic_tile_cpu.yaml``; the grid's
``cpu`` fragment only adds what the grid needs on top of it), ``full`` is the paper settings.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from defectseg.config import merge_config

#: Keys a grid file may hold.
GRID_KEYS = (
    "name", "description", "seeds", "test_checkpoint", "baseline", "common", "quick", "cpu", "full",
    "configurations", "axes", "slurm",
)
#: Modes of a grid: ``quick`` (pipeline check on a CPU), ``cpu`` (a CPU training recipe as
#: base) and ``full`` (paper settings).
MODES = ("quick", "cpu", "full")
#: Default number of seeds per mode.
DEFAULT_SEEDS = {"quick": 3, "cpu": 3, "full": 5}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=]*$")


class GridError(ValueError):
    """A grid file or grid option that cannot be used; the message names the file and the fix."""


def substitute_seed(value: Any, seed: int) -> Any:
    """Replace ``${seed}`` in every string of a nested structure (``"${seed}"`` -> ``seed``)."""
    if isinstance(value, str):
        if value.strip() == "${seed}":
            return seed
        return value.replace("${seed}", str(seed))
    if isinstance(value, Mapping):
        return {k: substitute_seed(v, seed) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_seed(v, seed) for v in value]
    return value


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: a configuration and a seed."""

    config: str
    seed: int
    fragment: dict[str, Any] = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        """``<config>/seed_<seed>``: the run's folder under the grid's ``runs/``."""
        return f"{self.config}/seed_{self.seed}"


@dataclass
class Grid:
    """A parsed grid file.

    Attributes:
        name: grid name.
        description: free text shown in the summary.
        axes: ordered ``(axis, {value name: fragment})`` pairs.
        common: fragment of every configuration.
        modes: ``{"quick": fragment, "cpu": fragment, "full": fragment}``.
        seeds: default seed count per mode.
        test_checkpoint: ``best`` or ``last`` per mode.
        baseline: the configuration every other one is paired against (a name), or
            ``{configuration: its baseline}``; ``None`` for no paired comparison.
        defined_modes: the modes whose fragment the file has (even an empty one).
        slurm: the ``slurm:`` section (job resources for ``--executor slurm``), unparsed.
        source: the file it came from (for messages).
    """

    name: str
    description: str = ""
    axes: list[tuple[str, dict[str, dict[str, Any]]]] = field(default_factory=list)
    common: dict[str, Any] = field(default_factory=dict)
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SEEDS))
    test_checkpoint: dict[str, str] = field(default_factory=lambda: {mode: "best" for mode in MODES})
    baseline: str | dict[str, str] | None = None
    defined_modes: tuple[str, ...] = MODES
    slurm: dict[str, Any] = field(default_factory=dict)
    source: str = "<grid>"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | Path) -> Grid:
        """Read and check a grid file.

        Raises:
            GridError: missing file, not a mapping, unknown keys, bad names or values.
        """
        path = Path(path)
        if not path.is_file():
            raise GridError(f"grid file {str(path)!r} does not exist (see configs/compare/ for examples)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise GridError(f"grid file {str(path)!r} is not valid YAML: {err}") from None
        return cls.from_dict(data, source=str(path), default_name=path.stem)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<grid>", default_name: str = "grid") -> Grid:
        """Build a grid from the mapping of a grid file (see the module docstring)."""
        if not isinstance(data, Mapping):
            raise GridError(f"grid {source!r} must be a YAML mapping with 'configurations' and/or 'axes'")
        unknown = sorted(set(data) - set(GRID_KEYS))
        if unknown:
            raise GridError(f"grid {source!r} has unknown keys {unknown}; allowed keys: {list(GRID_KEYS)}")
        axes: list[tuple[str, dict[str, dict[str, Any]]]] = []
        if data.get("configurations") is not None:
            axes.append(("configuration", _values(data["configurations"], "configurations", source)))
        raw_axes = data.get("axes") or {}
        if not isinstance(raw_axes, Mapping):
            raise GridError(f"grid {source!r}: 'axes' must map axis names to {{value name: fragment}}")
        for axis, values in raw_axes.items():
            axes.append((str(axis), _values(values, f"axes.{axis}", source)))
        if not axes:
            raise GridError(f"grid {source!r} defines no configuration: add 'configurations' or 'axes'")
        slurm = data.get("slurm") or {}
        if not isinstance(slurm, Mapping):
            raise GridError(f"grid {source!r}: 'slurm' must map job settings (partition, time, ...) to values")
        common = data.get("common") or {}
        if not isinstance(common, Mapping):
            raise GridError(f"grid {source!r}: 'common' must be a config fragment (a mapping)")
        modes = {}
        for mode in MODES:
            fragment = data.get(mode) or {}
            if not isinstance(fragment, Mapping):
                raise GridError(f"grid {source!r}: '{mode}' must be a config fragment (a mapping)")
            modes[mode] = dict(fragment)
        seeds = dict(DEFAULT_SEEDS)
        raw_seeds = data.get("seeds")
        if isinstance(raw_seeds, int) and not isinstance(raw_seeds, bool):
            seeds = {mode: raw_seeds for mode in MODES}
        elif isinstance(raw_seeds, Mapping):
            bad = sorted(set(raw_seeds) - set(MODES))
            if bad:
                raise GridError(f"grid {source!r}: 'seeds' keys must be {list(MODES)}, got {bad}")
            seeds.update({k: v for k, v in raw_seeds.items()})
        elif raw_seeds is not None:
            raise GridError(f"grid {source!r}: 'seeds' must be an int or {{quick: N, cpu: N, full: M}}, got {raw_seeds!r}")
        for mode, count in seeds.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise GridError(f"grid {source!r}: seeds.{mode} must be an int >= 1, got {count!r}")
        raw_checkpoint = data.get("test_checkpoint", "best")
        if isinstance(raw_checkpoint, Mapping):
            bad = sorted(set(raw_checkpoint) - set(MODES))
            if bad:
                raise GridError(f"grid {source!r}: 'test_checkpoint' keys must be {list(MODES)}, got {bad}")
            test_checkpoint = {mode: raw_checkpoint.get(mode, "best") for mode in MODES}
        else:
            test_checkpoint = {mode: raw_checkpoint for mode in MODES}
        for value in test_checkpoint.values():
            if value not in ("best", "last"):
                raise GridError(
                    f"grid {source!r}: test_checkpoint must be 'best' or 'last' (or {{quick: ..., cpu: ..., full: ...}}), "
                    f"got {raw_checkpoint!r}"
                )
        grid = cls(
            name=str(data.get("name") or default_name),
            description=str(data.get("description") or "").strip(),
            axes=axes,
            common=dict(common),
            modes=modes,
            seeds=seeds,
            test_checkpoint=test_checkpoint,
            baseline=data.get("baseline"),
            defined_modes=tuple(mode for mode in MODES if mode in data),
            slurm=dict(slurm),
            source=source,
        )
        names = [name for name, _ in grid.configurations()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise GridError(f"grid {source!r}: configuration names {duplicates} occur more than once")
        grid.baseline = grid._checked_baseline(grid.baseline, names)
        return grid

    def _checked_baseline(self, raw: Any, names: list[str]) -> str | dict[str, str] | None:
        """``baseline`` as a configuration name or ``{configuration: baseline}``, checked."""
        if raw is None:
            return None
        pairs = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, Mapping) else None
        if pairs is None and not isinstance(raw, str):
            raise GridError(
                f"grid {self.source!r}: 'baseline' must be a configuration name or {{configuration: baseline}}, "
                f"got {raw!r}"
            )
        mentioned = {name for pair in pairs.items() for name in pair} if pairs is not None else {raw}
        unknown = sorted(mentioned - set(names))
        if unknown:
            raise GridError(f"grid {self.source!r}: baseline names {unknown} are not configurations; they are {names}")
        same = [k for k, v in (pairs or {}).items() if k == v]
        if same:
            raise GridError(f"grid {self.source!r}: baseline pairs {same} with themselves")
        return pairs if pairs is not None else raw

    def comparisons(self, configs: Iterable[str], baseline: str | None = None) -> list[tuple[str, str]]:
        """``(configuration, its baseline)`` pairs among ``configs`` (in their order).

        Args:
            configs: the configurations that were run (e.g. after ``--only``).
            baseline: a configuration name that replaces the grid's ``baseline`` (``--baseline``).

        Raises:
            GridError: ``baseline`` is not a configuration of the grid.
        """
        configs = list(configs)
        if baseline is not None:
            known = [name for name, _ in self.configurations()]
            if baseline not in known:
                raise GridError(f"--baseline {baseline!r}: not a configuration of {self.source!r}; they are {known}")
            chosen: str | dict[str, str] | None = baseline
        else:
            chosen = self.baseline
        if chosen is None:
            return []
        if isinstance(chosen, str):
            return [(c, chosen) for c in configs if c != chosen] if chosen in configs else []
        return [(c, chosen[c]) for c in configs if c in chosen and chosen[c] in configs]

    # ------------------------------------------------------------------ expansion
    def configurations(self) -> list[tuple[str, dict[str, Any]]]:
        """``(name, fragment)`` of every configuration: the product of the axes, in order."""
        out = []
        for combo in itertools.product(*[list(values.items()) for _, values in self.axes]):
            name = "-".join(value_name for value_name, _ in combo)
            fragment: dict[str, Any] = {}
            for _, part in combo:
                fragment = merge_config(fragment, part)
            out.append((name, fragment))
        return out

    def seed_list(self, mode: str, seeds: int | Iterable[int] | None = None) -> list[int]:
        """Seeds of ``mode``: ``0..N-1`` for a count (the grid's default when ``None``), or a list."""
        if mode not in MODES:
            raise GridError(f"mode must be one of {MODES}, got {mode!r}")
        if seeds is None:
            seeds = self.seeds[mode]
        if isinstance(seeds, int):
            if seeds < 1:
                raise GridError(f"the number of seeds must be >= 1, got {seeds}")
            return list(range(seeds))
        values = [int(s) for s in seeds]
        if not values or len(set(values)) != len(values):
            raise GridError(f"seeds must be a non-empty list of distinct ints, got {values}")
        return values

    def runs(
        self, mode: str, seeds: int | Iterable[int] | None = None, only: Iterable[str] | None = None
    ) -> list[RunSpec]:
        """Every run (configuration x seed), configurations outermost.

        Args:
            mode: ``quick``, ``cpu`` or ``full``.
            seeds: seed count or list (default: the grid's for ``mode``).
            only: keep these configurations only (names as in :meth:`configurations`).

        Raises:
            GridError: an ``only`` name that is not a configuration of the grid.
        """
        configurations = self.configurations()
        if only is not None:
            only = list(only)
            known = [name for name, _ in configurations]
            missing = [name for name in only if name not in known]
            if missing:
                raise GridError(f"--only {missing}: not configurations of {self.source!r}; they are {known}")
            configurations = [(n, f) for n, f in configurations if n in only]
        seed_values = self.seed_list(mode, seeds)
        return [
            RunSpec(name, seed, substitute_seed(fragment, seed))
            for name, fragment in configurations
            for seed in seed_values
        ]


def _values(raw: Any, where: str, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, Mapping) or not raw:
        raise GridError(f"grid {source!r}: '{where}' must be a non-empty mapping of name -> config fragment")
    values = {}
    for name, fragment in raw.items():
        name = str(name)
        if not _NAME.match(name):
            raise GridError(
                f"grid {source!r}: name {name!r} in '{where}' must start with a letter or digit and hold "
                "only letters, digits and _ . + = (it names a folder)"
            )
        if fragment is None:
            fragment = {}
        if not isinstance(fragment, Mapping):
            raise GridError(f"grid {source!r}: '{where}.{name}' must be a config fragment (a mapping), got {fragment!r}")
        values[name] = dict(fragment)
    return values
