"""Issue 22: one hostile record must neither stall its partition nor make the spout deaf to
SIGTERM. kafka-python 3.0.12 spun in poll() at 100% CPU on any record it could not read
(spout.patch_kafka_python): these tests bound every wait, so the unpatched spout fails them
instead of hanging them."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import struct

import pytest
from conftest import REFERENCE_BROKER, spout_env, wait_until

BAD_KEY = b"\xff\xfe-not-utf8"
BAD_KEY_JSON = {"base64": base64.b64encode(BAD_KEY).decode("ascii")}


class RawHeaderKey(str):
    """A header key that kafka-python's producer writes as these bytes: it insists on str
    keys and encodes them with .encode("utf-8"), which this answers with the raw bytes."""

    def __new__(cls, raw: bytes):
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, *_args, **_kwargs) -> bytes:
        return self.raw


def send_one_by_one(bootstrap: str, topic: str, messages) -> None:
    """messages: (partition, value, headers), one record batch each, in order."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    try:
        for partition, value, headers in messages:
            producer.send(topic, value=value, partition=partition, headers=headers).get(30)
    finally:
        producer.close()


HOSTILE = [
    (0, b"before", [("trace", b"t0")]),
    (0, b"hostile", [("trace", b"t1"), (RawHeaderKey(BAD_KEY), b"v\xff"),
                     (RawHeaderKey(b"\xc3"), b"")]),
    (0, b"after", []),
    (1, b"elsewhere", []),
]
# The hostile record's headers as FORMAT=json writes them: a key that is not UTF-8 is
# {"base64": ...}, as keys and values that are not UTF-8 are.
HOSTILE_HEADERS = [["trace", "t1"], [BAD_KEY_JSON, {"base64": "dv8="}],
                   [{"base64": "ww=="}, ""]]


def run_until(broker, topic, fifo, spouts, readers, done, what: str, **settings):
    """Runs the spout until done(files, log); then SIGTERM, which it must obey within 10 s."""
    reader = readers(fifo, generation="g3")
    process = spouts(spout_env(broker, topic, fifo, **settings))
    wait_until(lambda: done(reader.snapshot(), process.log) or
               process.process.poll() is not None, 60, what)
    assert process.process.poll() is None, process.log
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0, process.log
    return reader.snapshot(), process


def test_header_key_not_utf8_is_delivered_and_its_partition_goes_on(broker, topic, fifo,
                                                                     spouts, readers):
    send_one_by_one(broker, topic, HOSTILE)
    files, _ = run_until(broker, topic, fifo, spouts, readers, lambda f, _log: len(f) >= 4,
                         "every message, the hostile one and the one after it included",
                         FORMAT="json")
    documents = {(d["partition"], d["offset"]): d
                 for d in (json.loads(data) for data in files.values())}
    assert {place: d["value"] for place, d in documents.items()} == {
        (0, 0): "before", (0, 1): "hostile", (0, 2): "after", (1, 0): "elsewhere"}
    assert documents[(0, 1)]["headers"] == HOSTILE_HEADERS
    assert documents[(0, 0)]["headers"] == [["trace", "t0"]]


@pytest.mark.parametrize("format", ["jsonl", "parquet"])
def test_header_key_not_utf8_in_segments(format, broker, topic, fifo, spouts, readers):
    send_one_by_one(broker, topic, HOSTILE)

    def rows(files):
        found = []
        for data in files.values():
            if format == "jsonl":
                found += [json.loads(line) for line in data.decode().splitlines()]
            else:
                import pyarrow.parquet
                found += pyarrow.parquet.read_table(io.BytesIO(data)).to_pylist()
        return found

    files, _ = run_until(broker, topic, fifo, spouts, readers, lambda f, _log: len(rows(f)) >= 4,
                         "every message in segments", FORMAT=format)
    by_place = {(row["partition"], row["offset"]): row for row in rows(files)}
    assert sorted(by_place) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    headers = by_place[(0, 1)]["headers"]
    if format == "jsonl":
        assert headers == HOSTILE_HEADERS
    else:  # a string column: the key is the JSON text that FORMAT=json gives it
        assert headers == [{"key": "trace", "value": b"t1"},
                           {"key": json.dumps(BAD_KEY_JSON), "value": b"v\xff"},
                           {"key": '{"base64": "ww=="}', "value": b""}]
    assert by_place[(0, 2)]["value"] in ("after", b"after")


@contextlib.contextmanager
def corrupt_record_lengths():
    """Batches built meanwhile claim their first record one byte longer than it is, under a
    valid CRC: a record that no client can read, whatever it holds."""
    from kafka.record.default_records import DefaultRecordBatchBuilder as Builder
    from kafka.record.util import calc_crc32c
    build = Builder.build

    def corrupt(self):
        buffer = build(self)
        start = Builder.HEADER_STRUCT.size  # the first record's length, a 1-byte varint
        assert buffer[start] < 0x7E
        buffer[start] += 2  # zigzag: length + 1
        crc = calc_crc32c(memoryview(buffer)[Builder.ATTRIBUTES_OFFSET:])
        struct.pack_into(">I", buffer, Builder.CRC_OFFSET, crc)
        return buffer

    Builder.build = corrupt
    try:
        yield
    finally:
        Builder.build = build


def test_unreadable_record_leaves_the_spout_stoppable(broker, topic, fifo, spouts, readers):
    if REFERENCE_BROKER:
        pytest.skip("Apache Kafka refuses such a record when it is produced "
                    "(InvalidRecordError); Tansu stores it as it comes")
    send_one_by_one(broker, topic, [(0, b"before", []), (1, b"elsewhere", [])])
    with corrupt_record_lengths():
        send_one_by_one(broker, topic, [(0, b"unreadable", [])])
    send_one_by_one(broker, topic, [(1, b"after", [])])

    files, process = run_until(
        broker, topic, fifo, spouts, readers,
        lambda files, log: len(files) >= 3 and "CorruptRecordError" in log,
        "the readable messages and the unreadable one's error")
    assert sorted(files.values()) == [b"after", b"before", b"elsewhere"]
    # Not skipped: the partition waits at the record, naming it, as the Java consumer does.
    assert f"CorruptRecordError: {topic}/0 at offset 1: Invalid record size" in process.log
    # Kafka answers all along: no outage reported, and one warning, not one per poll.
    assert "polling" not in process.log and "lost contact" not in process.log
    assert process.log.count("cannot read a record") == 1, process.log


def test_the_patched_parser_keeps_keys_that_are_not_utf8_as_bytes():
    """In process: what the patch reads, and how each format writes it, null values too
    (which kafka-python's producer cannot send)."""
    from kafka.consumer.fetcher import ConsumerRecord
    from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

    import spout
    spout.patch_kafka_python()
    read_msg = DefaultRecordBatch._read_msg
    spout.patch_kafka_python()  # once is enough; twice must not wrap twice
    assert DefaultRecordBatch._read_msg is read_msg
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 20)
    builder.append(0, timestamp=1, key=None, value=b"ok", headers=[("é", b"1")])
    builder.append(1, timestamp=1, key=b"k", value=b"v",
                   headers=[(RawHeaderKey(BAD_KEY), None), ("plain", b"2")])
    records = list(DefaultRecordBatch(bytes(builder.build())))
    assert [r.headers for r in records] == [[("é", b"1")], [(BAD_KEY, None), ("plain", b"2")]]
    assert type(records[0].headers[0][0]) is str
    assert isinstance(records[1].headers[0][0], spout.HeaderKeyBytes)

    record = ConsumerRecord("t", 0, -1, 1, 1, 0, b"k", b"v", records[1].headers, None, 1, 1, 1)
    assert spout.record_metadata(record)["headers"] == [[BAD_KEY_JSON, None], ["plain", "2"]]
    document = dict(spout.record_metadata(record), value="v")
    assert spout.json_lines([record]) == json.dumps(document, ensure_ascii=False) + "\n"
    writer = spout.ParquetWriter(spout.Config())
    assert writer.headers_column([record]).to_pylist() == [
        [{"key": json.dumps(BAD_KEY_JSON), "value": None}, {"key": "plain", "value": b"2"}]]
