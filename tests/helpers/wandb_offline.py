"""Read an offline W&B run folder: the records of its ``run-*.wandb`` file, as ``wandb sync``
would upload them (artifacts, history rows), and its media files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # record header: crc32 (4), length (2), type (1); the file starts with a 7-byte header too


def read_records(run_dir: Path) -> list[Any]:
    """The protobuf ``Record`` messages of an offline run, in order (leveldb-log framing)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    position, chunks, records = HEADER, b"", []
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # block trailer padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        position += HEADER
        chunk = data[position : position + length]
        position += length
        if kind == 0 and length == 0:
            break
        if kind in (1, 2):  # full, first
            chunks = chunk
        else:  # middle, last
            chunks += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def artifacts(run_dir: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """``(name, type, aliases, file names)`` of every artifact the run logged."""
    out = []
    for record in read_records(run_dir):
        if record.WhichOneof("record_type") == "artifact":
            entry = record.artifact
            out.append((entry.name, entry.type, list(entry.aliases), [c.path for c in entry.manifest.contents]))
    return out


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The logged rows: ``{key: value}``; a media value (table, images) is the dict W&B stores
    for it (``{"_type": "table-file", "path": ...}``). A chart logs its data table as
    ``<key>_table``."""
    rows = []
    for record in read_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                parts = [item.key] if item.key else list(item.nested_key)
                target = row
                for part in parts[:-1]:
                    target = target.setdefault(part, {})
                target[parts[-1]] = json.loads(item.value_json)
            rows.append(row)
    return rows


def table(run_dir: Path, path: str) -> dict[str, Any]:
    """A logged table (``{"columns": [...], "data": [...]}``) from its media path."""
    return json.loads((Path(run_dir) / "files" / path).read_text())
