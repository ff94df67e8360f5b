"""Issue 22: one hostile record must neither stall its partition nor make the spout deaf to
SIGTERM. kafka-python 3.0.12 spun in poll() at 100% CPU on any record it could not read
(spout.patch_kafka_python): these tests bound every wait, so the unpatched spout fails them
instead of hanging them."""

from __future__ import annotations

import contextlib
import signal
import struct

from conftest import spout_env, wait_until


def send_one_by_one(bootstrap: str, topic: str, messages) -> None:
    """messages: (partition, value, headers), one record batch each, in order."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    try:
        for partition, value, headers in messages:
            producer.send(topic, value=value, partition=partition, headers=headers).get(30)
    finally:
        producer.close()


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

