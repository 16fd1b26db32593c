"""Metric writers: JSON lines and TensorBoard event files, without TensorFlow.

A run's workdir gets ``metrics.jsonl`` (one JSON object per logged training step), ``eval.jsonl`` (one per
evaluation) and ``events.out.tfevents.*`` files that TensorBoard reads. The event files are written here directly:
the format is a TFRecord stream (``uint64 length, masked crc32c(length), data, masked crc32c(data)``, little endian)
of ``tensorboard.Event`` protocol buffers, of which only scalar summaries are needed (``Event{wall_time=1, step=2,
file_version=3, summary=5}``, ``Summary{repeated Value value=1}``, ``Value{tag=1, simple_value=2}``), so a few lines
of hand encoding replace the tensorboard / TensorFlow dependency.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

# ------------------------------------------------------------------------------------------- crc32c (Castagnoli)


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli polynomial, reflected), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked crc, the data, its masked crc."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ----------------------------------------------------------------------------------------- protobuf encoding


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 fields: negative values are ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def scalar_event(step: int, values: Mapping[str, float], wall_time: float | None = None) -> bytes:
    """A serialized ``Event`` holding one scalar summary value per entry of ``values``."""
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
        for tag, v in values.items()
    )
    wall = time.time() if wall_time is None else wall_time
    return b"\x09" + struct.pack("<d", wall) + b"\x10" + _varint(int(step)) + _length_delimited(5, summary)


def version_event(wall_time: float | None = None) -> bytes:
    """The first event of every file: ``file_version = "brain.Event:2"``."""
    wall = time.time() if wall_time is None else wall_time
    return b"\x09" + struct.pack("<d", wall) + _length_delimited(3, b"brain.Event:2")


class EventFileWriter:
    """Appends scalar events to a new ``events.out.tfevents.<time>.<host>`` file in ``logdir``."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(version_event()))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: v for k, v in values.items() if v is not None}
        if finite:
            self._file.write(tfrecord(scalar_event(step, finite)))
            self._file.flush()

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------------- the writer


def _json_value(v):
    """JSON-safe scalars: numpy / jax scalars to Python, non-finite floats as strings ("nan", "inf")."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricWriter:
    """Writes training and evaluation metrics of one run (process 0 only; other processes pass ``enabled=False``).

    Args:
      workdir: the run's directory.
      tensorboard: also write TensorBoard event files.
      enabled: False makes every method a no-op (processes other than 0).
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.train_path = os.path.join(workdir, "metrics.jsonl")
        self.eval_path = os.path.join(workdir, "eval.jsonl")
        self._events = EventFileWriter(workdir) if (enabled and tensorboard) else None

    def truncate_after(self, step: int) -> None:
        """Drops records of steps after ``step`` (a resumed run re-logs the steps after its checkpoint)."""
        if not self.enabled:
            return
        for path in (self.train_path, self.eval_path):
            if not os.path.exists(path):
                continue
            with open(path) as f:
                lines = f.readlines()
            keep = []
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: drop it
                    continue
                if record.get("step", 0) <= step:
                    keep.append(json.dumps(record) + "\n")
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)

    def _append(self, path: str, record: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_train(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One line of metrics.jsonl and the same scalars under ``train/`` in TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        self._append(self.train_path, record)
        if self._events is not None:
            self._events.scalars(step, {f"train/{k}": v for k, v in record.items() if _is_number(v) and k != "step"})

    def write_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One line of eval.jsonl and the scalars under ``eval/`` in TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        self._append(self.eval_path, record)
        if self._events is not None:
            self._events.scalars(step, {f"eval/{k}": v for k, v in record.items() if _is_number(v) and k != "step"})

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


__all__ = ["EventFileWriter", "MetricWriter", "crc32c", "masked_crc32c", "scalar_event", "tfrecord"]
