"""Read an offline W&B run's ``.wandb`` file (a LevelDB-style log of protobuf records), to check in tests what
would be uploaded: the run record (id, group, job type, tags, name), config, history keys. wandb >= 0.2x has
no Python reader any more; the format is wandb's documented log format (7-byte header, 32 KiB blocks)."""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # checksum (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:3] == b":W&" or data[:4] == b":W&B", data[:8]
    pos, out, chunks = 7, [], []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        if kind in (FULL, FIRST):
            chunks = [payload]
        else:
            chunks.append(payload)
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            out.append(rec)
    return out


def run_record(path: str | Path):
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def history_keys(path: str | Path) -> set[str]:
    keys = set()
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            keys |= {i.key or "/".join(i.nested_key) for i in r.history.item}
    return keys
