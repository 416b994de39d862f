"""Test helper: read an offline W&B run file (``run-<id>.wandb``) without uploading it.

The file is W&B's LevelDB-style record log (7-byte file header, 32 KiB blocks, 7-byte chunk
headers: crc32, length, type) of ``wandb_internal_pb2.Record`` protobufs.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32 * 1024, 7


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST extend
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def history_steps(path: Path, key: str = "trainer/global_step") -> list[int]:
    """The ``key`` value of every history row (Lightning logs the global step with each row)."""
    steps = []
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            if key in row:
                steps.append(int(row[key]))
    return steps


def history_rows(path: Path) -> list[dict]:
    """Every history row as ``{key: value}``; W&B splits media and histograms into nested items
    (``key/_type``, ``key/values``, ...), which are regrouped here into one dict per key."""
    rows = []
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in rec.history.item:
            value = json.loads(item.value_json)
            keys = [item.key] if item.key else list(item.nested_key)
            if len(keys) == 1:
                row[keys[0]] = value
            else:
                *head, leaf = keys
                row.setdefault("/".join(head), {})[leaf] = value
        rows.append(row)
    return rows


def offline_run_file(run_dir: Path) -> Path:
    """``<run dir>/wandb/offline-run-*-<id>/run-<id>.wandb`` of a MemLM run (its id in ``wandb_run_id``)."""
    run_id = (Path(run_dir) / "wandb_run_id").read_text().strip()
    [path] = list((Path(run_dir) / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    return path


def records_when_closed(path: Path, timeout: float = 60.0) -> list:
    """The run file's records once W&B has written its exit record (its service process may still
    be writing after ``wandb.finish()``), or what is there after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)
