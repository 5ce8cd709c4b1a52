"""Reads the records of an offline wandb run (`run-*.wandb`): leveldb-log framing after a 7-byte ':W&B' header,
each record a wandb_internal_pb2.Record. wandb 0.31 no longer ships a Python reader for these files."""
import json

from wandb.proto import wandb_internal_pb2

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        if _BLOCK - position % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            position += _BLOCK - position % _BLOCK
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk = data[position + _HEADER:position + _HEADER + length]
        position += _HEADER + length
        if kind == _FULL:
            yield _parse(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield _parse(pending + chunk)


def _parse(raw: bytes):
    record = wandb_internal_pb2.Record()
    record.ParseFromString(raw)
    return record


def history_and_config(path: str):
    """({series name: [values by step]}, {config key: value})."""
    history, config = {}, {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
        elif kind in ("run", "config"):  # the run record carries the initial config
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                config[item.key] = json.loads(item.value_json)
    return history, config
