"""Helpers shared by the extra ``defectseg`` commands: reading configs, building a datamodule."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import yaml

from defectseg.data.base import DefectDataModule


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge two config dicts as LightningCLI does for class_path/init_args blocks."""
    out = dict(base)
    for key, value in update.items():
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and not ("class_path" in value and value.get("class_path") != out[key].get("class_path"))
        ):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def load_config(configs: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read and merge YAML configs, then apply ``key.sub=value`` overrides."""
    import os

    config: dict[str, Any] = {}
    for path in configs:
        if not os.path.isfile(path):
            raise SystemExit(f"config file {path!r} does not exist")
        with open(path) as handle:
            loaded = yaml.safe_load(handle.read()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"config file {path!r} does not hold a mapping")
        config = _merge(config, loaded)
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"override {item!r} must look like data.init_args.root=/path")
        key, value = item.split("=", 1)
        _set_dotted(config, key.lstrip("-"), yaml.safe_load(value))
    return config


def load_datamodule(configs: Sequence[str], overrides: Sequence[str] = ()) -> DefectDataModule:
    """Instantiate only the ``data`` section of LightningCLI configs."""
    from jsonargparse import ArgumentParser

    config = load_config(configs, overrides)
    if "data" not in config:
        raise SystemExit(f"none of {list(configs)} has a 'data' section")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DefectDataModule, "data", required=True)
    parsed = parser.parse_object({"data": config["data"]})
    return parser.instantiate_classes(parsed).data


def format_statistics(datamodule: DefectDataModule, split: str | None = None) -> str:
    """A markdown table of :meth:`DefectDataModule.statistics`."""
    stats = datamodule.statistics(split)
    lines = ["| class | images | image ratio | pixel ratio |", "|---|---:|---:|---:|"]
    for name, row in stats.items():
        lines.append(
            f"| {name} | {int(row['images'])} | {row['image_ratio']:.4f} | {row['pixel_ratio']:.4f} |"
        )
    return "\n".join(lines)


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"defectseg {prog}", description=description)
    parser.add_argument("--config", "-c", action="append", default=[], required=True, help="YAML config (repeatable)")
    parser.add_argument("overrides", nargs="*", help="overrides such as data.init_args.root=/data/mt")
    return parser
