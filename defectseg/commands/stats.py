"""``defectseg stats``: per-class statistics of a config's dataset."""

from __future__ import annotations

from defectseg.cli import register_command
from defectseg.commands.common import config_parser, format_statistics, load_datamodule


@register_command("stats", "print per-class pixel and image ratios of a config's dataset")
def stats_command(argv: list[str]) -> int:
    parser = config_parser("stats", "Per-class statistics (pixel ratio, image ratio) of a dataset.")
    parser.add_argument("--split", choices=["train", "val", "test"], default=None, help="one split only")
    args = parser.parse_args(argv)
    datamodule = load_datamodule(args.config, args.overrides)
    print(f"{type(datamodule).__name__}: {len(datamodule.metadata)} images ({datamodule.describe()})")
    print(format_statistics(datamodule, args.split))
    return 0
