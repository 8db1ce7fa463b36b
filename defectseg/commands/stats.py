"""``defectseg stats``: per-class statistics of a config's dataset."""

from __future__ import annotations

from defectseg.commands.registry import register_command


def _arguments(parser) -> None:
    from typing import Literal

    parser.add_argument("--split", type=Literal["train", "val", "test"] | None, default=None, help="one split only")


@register_command("stats", "print per-class pixel and image ratios of a config's dataset")
def stats_command(argv: list[str]) -> int:
    from defectseg.config import parse_config
    from defectseg.data.statistics import format_statistics

    args, datamodule = parse_config(
        argv, "defectseg stats", "Per-class statistics (pixel ratio, image ratio) of a dataset.", _arguments
    )
    print(f"{type(datamodule).__name__}: {len(datamodule.metadata)} images ({datamodule.describe()})")
    print(format_statistics(datamodule, args.split))
    return 0
