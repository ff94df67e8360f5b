"""The spout's behaviour against a real broker: codecs, tombstones, limits, signals, outages."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import (Tansu, committed_offsets, create_topic, free_port, produce, spout_env,
                      wait_until)


def files_for(topic: str, messages) -> dict:
    """Expected files when each partition's messages were produced in order from offset 0."""
    counters: dict = {}
    files = {}
    for partition, _key, value in messages:
        offset = counters.get(partition, 0)
        counters[partition] = offset + 1
        if value is not None:
            files[f"/{topic}/{partition}/{offset:020d}"] = value
    return files


def run_until_landed(spouts, readers, fifo, env, expected: dict, generation="g3", **reader_kw):
    reader = readers(fifo, generation=generation, **reader_kw)
    spout = spouts(env)
    wait_until(lambda: len(reader.snapshot()) >= len(expected) or spout.process.poll() is not None,
               60, "the messages to land")
    return reader, spout


def stop_cleanly(spout, within: float = 10.0) -> float:
    started = time.monotonic()
    spout.signal(signal.SIGTERM)
    assert spout.wait(within) == 0, spout.log
    assert "Traceback" not in spout.log
    return time.monotonic() - started


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_topics_are_decoded(codec, broker, topic, fifo, spouts, readers):
    messages = [(i % 3, None, f"{codec}-{i}-".encode() * (i % 50)) for i in range(150)]
    produce(broker, topic, messages, compression=codec)
    expected = files_for(topic, messages)
    reader, spout = run_until_landed(spouts, readers, fifo, spout_env(broker, topic, fifo),
                                     expected)
    stop_cleanly(spout)
    assert reader.snapshot() == expected


def test_tombstones_are_skipped_counted_and_committed(broker, topic, fifo, spouts, readers):
    messages = [(i % 3, b"k%d" % i, None if i % 4 == 0 else b"v%d" % i) for i in range(60)]
    produce(broker, topic, messages)
    expected = files_for(topic, messages)
    reader, spout = run_until_landed(spouts, readers, fifo, spout_env(broker, topic, fifo),
                                     expected)
    stop_cleanly(spout)
    assert reader.snapshot() == expected
    assert "tombstones=15" in spout.log
    assert committed_offsets(broker, f"g-{topic}", topic) == {0: 20, 1: 20, 2: 20}


def test_a_message_over_the_byte_limit_travels_alone(broker, topic, fifo, spouts, readers):
    messages = [(0, None, b"s" * 300) for _ in range(5)] + [(0, None, b"B" * 5000)] + \
        [(0, None, b"t" * 300) for _ in range(5)]
    produce(broker, topic, messages)
    expected = files_for(topic, messages)
    env = spout_env(broker, topic, fifo, BATCH_MAX_BYTES=1000, BATCH_MAX_SECONDS=1)
    reader, spout = run_until_landed(spouts, readers, fifo, env, expected)
    stop_cleanly(spout)
    assert reader.snapshot() == expected
    big = f"/{topic}/0/{5:020d}"
    sizes = [[len(data) for _, data in commit.puts] for commit in reader.commits]
    assert [5000] in sizes, sizes
    assert all(sum(s) <= 1000 for s in sizes if s != [5000])
    assert all(big not in dict(c.puts) or len(c.puts) == 1 for c in reader.commits)


def test_message_count_limit_closes_archives(broker, topic, fifo, spouts, readers):
    messages = [(0, None, b"%d" % i) for i in range(100)]
    produce(broker, topic, messages)
    expected = files_for(topic, messages)
    env = spout_env(broker, topic, fifo, BATCH_MAX_MESSAGES=10, BATCH_MAX_SECONDS=30)
    reader, spout = run_until_landed(spouts, readers, fifo, env, expected)
    stop_cleanly(spout)
    assert [len(commit.puts) for commit in reader.commits] == [10] * 10


def test_sigterm_writes_the_pending_batch_and_commits_it(broker, topic, fifo, spouts, readers):
    messages = [(i % 3, None, b"pending-%d" % i) for i in range(30)]
    produce(broker, topic, messages)
    reader = readers(fifo, generation="g3")
    # The batch would wait a minute: only the shutdown can write it.
    spout = spouts(spout_env(broker, topic, fifo, BATCH_MAX_SECONDS=60))
    wait_until(lambda: spout.log.count("polled") and
               sum(int(line.split("polled ")[1].split()[0]) for line in spout.log.splitlines()
                   if "polled " in line) >= 30, 30, "the spout to hold all 30 messages")
    assert reader.snapshot() == {}
    assert stop_cleanly(spout) < 10
    assert reader.snapshot() == files_for(topic, messages)
    assert committed_offsets(broker, f"g-{topic}", topic) == {0: 10, 1: 10, 2: 10}


def test_sigterm_without_a_reader_exits_and_commits_nothing(broker, topic, fifo, spouts):
    produce(broker, topic, [(0, None, b"x")] * 5)
    spout = spouts(spout_env(broker, topic, fifo, BATCH_MAX_SECONDS=0.1))
    wait_until(lambda: "polled" in spout.log, 30, "the spout to consume")
    assert stop_cleanly(spout) < 10
    # Nothing past what Pachyderm holds: at most where the partitions started (committed
    # for a partition with nothing waiting, once all polled before it is held).
    assert set(committed_offsets(broker, f"g-{topic}", topic).values()) <= {None, 0}


def test_an_unreachable_broker_is_named_and_retried_until_sigterm(fifo, spouts):
    address = f"127.0.0.1:{free_port()}"
    spout = spouts({"BOOTSTRAP_SERVERS": address, "TOPIC": "t", "OUTPUT_PIPE": str(fifo)})
    wait_until(lambda: spout.log.count(f"cannot reach Kafka at {address}") >= 2, 30,
               "two connection attempts")
    assert spout.process.poll() is None
    assert stop_cleanly(spout) < 10


def test_a_broker_that_goes_away_is_logged_and_sigterm_still_stops(fifo, spouts, readers):
    """The broker dies mid-stream: the spout keeps running, says so, and still stops."""
    tansu = Tansu()
    try:
        topic = create_topic(tansu.bootstrap)
        first = [(i % 3, None, b"before-%d" % i) for i in range(30)]
        produce(tansu.bootstrap, topic, first)
        reader, spout = run_until_landed(spouts, readers, fifo,
                                         spout_env(tansu.bootstrap, topic, fifo),
                                         files_for(topic, first))
        tansu.stop()
        wait_until(lambda: f"lost contact with Kafka at {tansu.bootstrap}" in spout.log, 30,
                   "the outage to be logged")
        assert spout.process.poll() is None
        assert stop_cleanly(spout) < 10
    finally:
        tansu.stop()


def test_start_up_line_names_the_checksum_and_warns_once_without_the_c_one(
        broker, topic, fifo, spouts, tmp_path):
    spout = spouts(spout_env(broker, topic, fifo, LOG_LEVEL="INFO"))
    wait_until(lambda: "starting:" in spout.log, 30, "the start-up line")
    assert "crc32c='crc32c C extension" in spout.log, spout.log
    assert "pure Python" not in spout.log
    stop_cleanly(spout)
    # A crc32c that cannot be imported, first on the path: kafka-python falls back for real.
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "crc32c.py").write_text("raise ImportError('hidden by the test')\n")
    spout = spouts(spout_env(broker, topic, fifo, LOG_LEVEL="INFO", PYTHONPATH=str(hidden)))
    wait_until(lambda: "starting:" in spout.log, 30, "the start-up line")
    stop_cleanly(spout)
    assert "crc32c='pure Python'" in spout.log, spout.log
    assert spout.log.count("CRC32C in pure Python") == 1
