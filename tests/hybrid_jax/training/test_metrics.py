"""Metric writers: JSON lines, and TensorBoard event files decoded by protobuf from the event.proto field numbers."""

import json
import os
import struct

import pytest

from hybrid_jax.training.metrics import MetricWriter, crc32c, masked_crc32c


def test_crc32c_known_vectors():
    # RFC 3720 (iSCSI) appendix B.4 test vectors and the usual check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def event_class():
    """``tensorboard.Event`` / ``Summary`` / ``Summary.Value`` with the field numbers of tensorboard's event.proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="test_event.proto", package="tb", syntax="proto3")
    value = fdp.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary = fdp.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".tb.Value", label=F.LABEL_REPEATED)
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".tb.Summary", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tb.Event"))


def read_records(path):
    data = open(path, "rb").read()
    records, at = [], 0
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at : at + 8])
        assert struct.unpack("<I", data[at + 8 : at + 12])[0] == masked_crc32c(data[at : at + 8])
        payload = data[at + 12 : at + 12 + n]
        assert struct.unpack("<I", data[at + 12 + n : at + 16 + n])[0] == masked_crc32c(payload)
        records.append(payload)
        at += 16 + n
    return records


def test_event_file_holds_scalars_tensorboard_can_read(tmp_path):
    pytest.importorskip("google.protobuf")
    writer = MetricWriter(str(tmp_path))
    writer.write_train(3, {"loss": 2.5, "learning_rate": 1e-3, "mfu": None, "sal_selection_rate/0": 0.25})
    writer.write_eval(10, {"loss": 1.75, "bits_per_byte": 2.0})
    writer.close()
    (name,) = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents.")]
    Event = event_class()
    events = [Event.FromString(r) for r in read_records(str(tmp_path / name))]
    assert events[0].file_version == "brain.Event:2"
    scalars = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
    assert scalars == {
        (3, "train/loss"): 2.5,
        (3, "train/learning_rate"): pytest.approx(1e-3),
        (3, "train/sal_selection_rate/0"): 0.25,
        (10, "eval/loss"): 1.75,
        (10, "eval/bits_per_byte"): 2.0,
    }


def test_jsonl_records_and_truncation_on_resume(tmp_path):
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    for step in range(1, 6):
        writer.write_train(step, {"loss": float(step), "learning_rate": 0.1, "tokens_per_sec": 1.0})
    writer.write_eval(4, {"loss": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut by SIGKILL
    writer.truncate_after(3)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[0] == {
        "step": 1, "loss": 1.0, "learning_rate": 0.1, "tokens_per_sec": 1.0}  # fmt: skip
    assert open(tmp_path / "eval.jsonl").read() == ""
    writer.write_train(4, {"loss": float("nan")})
    assert json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1]) == {"step": 4, "loss": "nan"}


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricWriter(str(tmp_path), enabled=False)
    writer.write_train(1, {"loss": 1.0})
    writer.close()
    assert os.listdir(tmp_path) == []
