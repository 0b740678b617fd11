"""Reading an offline W&B run back from its files, as `wandb sync` would upload it.

An offline run is a folder <dir>/wandb/offline-run-<YYYYMMDD_HHMMSS>-<run id>/ holding run-<id>.wandb, the run's
transaction log, and files/ (media such as tables). wandb 0.31 has no Python reader for the log any more (its
`wandb.sdk.internal.datastore` went to the Go core), so this reads the format directly: LevelDB's log format
(a 7-byte header ":W&B", 0xBEE1, version 0; then 32 KiB blocks of chunks, each with a CRC-32 of its type byte and
data, a length and a type FULL/FIRST/MIDDLE/LAST) whose records are wandb's own protobuf `Record` messages
(wandb.proto.wandb_internal_pb2).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of a .wandb transaction log, in order; checksums verified."""
    data = path.read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    pos, pending = FILE_HEADER.size, b""
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER.size:  # a block's tail too small for a header is zero padding
            pos += room
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0:  # zeroed space: the writer's unused rest of the block
            pos += room
            continue
        chunk = data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += CHUNK_HEADER.size + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict:
    """History/config/summary items ({key or nested_key, value_json}) as a nested dict."""
    out: dict = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    folder: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    resume: bool = False
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per wandb.log call
    summary: dict = field(default_factory=dict)  # the run's summary as its updates left it

    @classmethod
    def read(cls, folder: Path) -> OfflineRun:
        (log,) = folder.glob("run-*.wandb")
        run = cls(folder)
        for record in read_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.run_id, run.project, run.group, run.name = r.run_id, r.project, r.run_group, r.display_name
                run.tags, run.resume = list(r.tags), r.resume
                run.config.update(_items(r.config.update))
            elif kind == "config":
                run.config.update(_items(record.config.update))
            elif kind == "history":
                run.history.append(_items(record.history.item))
            elif kind == "summary":
                run.summary.update(_items(record.summary.update))
        return run

    def values(self, key: str) -> list:
        """Every logged value of one metric, in order."""
        return [row[key] for row in self.history if key in row]

    def table(self, row: dict) -> dict:
        """A logged table ({"_type": "table-file", "path": ...}) as {"columns": [...], "data": [[...], ...]}."""
        return json.loads((self.folder / "files" / row["path"]).read_text())


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """The offline W&B runs under <run_dir>/wandb/, oldest first (folder names start with the start time)."""
    return [OfflineRun.read(folder) for folder in sorted((run_dir / "wandb").glob("offline-run-*"))]
