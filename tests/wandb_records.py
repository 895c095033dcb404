"""Read back an offline W&B run file (``run-<id>.wandb``) so tests can check what was logged.

The file is a 7-byte header (``:W&B``, magic, version) followed by a LevelDB-style log: 32 KiB
blocks of records, each ``crc32c (4) | length (2, LE) | type (1) | data``, types FULL=1,
FIRST=2, MIDDLE=3, LAST=4. Each assembled payload is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: str | Path) -> list[Any]:
    raw = Path(path).read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(raw):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", raw, pos + 4)
        data = raw[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def summarise(path: str | Path) -> dict[str, Any]:
    """Run id/group/name/tags, config keys and values (JSON text), and history metric keys."""
    out: dict[str, Any] = {"config": {}, "history_keys": set(), "images": 0}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(
                id=rec.run.run_id,
                group=rec.run.run_group,
                name=rec.run.display_name,
                tags=list(rec.run.tags),
            )
            for item in rec.run.config.update:
                out["config"][item.key] = item.value_json
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = item.value_json
        elif kind == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                out["history_keys"].add(key)
                if key.endswith("_type") and "image" in item.value_json:
                    out["images"] += 1
    return out
