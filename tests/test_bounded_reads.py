"""Bounded reads (START_AT, STOP_AT): a range lands once, the spout closes it and exits 0;
a restart does nothing, or goes on to a later stop. Explicit offsets here (Tansu answers
ListOffsets for the end wrongly); times, `end` and transactions in test_kafka_reference.py."""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import (PACH_REPO, committed_offsets, create_topic, pfs_env, produce,
                      spout_commits, spout_env, wait_until)

import spout
from test_pfs_delivery import run_spout

EXIT_WITHIN = 60   # the spout exits by itself once the range is closed


def offsets_text(topic: str, offsets: dict) -> str:
    return ",".join(f"{topic}/{partition}={offset}" for partition, offset in offsets.items())


def landed(pachd, repo: str = PACH_REPO) -> dict:
    return dict(pachd.head(repo).files) if pachd.has_branch(repo) else {}


def expected(topic: str, starts: dict, stops: dict) -> dict:
    return {f"/{topic}/{p}/{o:020d}": b"%d-%d" % (p, o)
            for p in starts for o in range(starts[p], stops[p])}


@pytest.fixture
def ten_each(broker):
    topic = create_topic(broker, 3)
    produce(broker, topic, [(p, None, b"%d-%d" % (p, i)) for i in range(10) for p in range(3)])
    return topic


def test_explicit_offsets_land_exactly_the_range_then_the_spout_exits(
        broker, ten_each, pachd, tmp_path, spouts):
    topic = ten_each
    starts, stops = {0: 2, 1: 0, 2: 5}, {0: 7, 1: 10, 2: 5}   # partition 2: an empty range
    env = pfs_env(broker, topic, pachd, tmp_path, START_AT=offsets_text(topic, starts),
                  STOP_AT=offsets_text(topic, stops))
    process = spouts(env)
    assert process.wait(EXIT_WITHIN) == 0, process.log
    assert "Traceback" not in process.log
    assert landed(pachd) == expected(topic, starts, stops)
    head = spout_commits(pachd)[-1]
    assert head.description.startswith("kafka-spout: range closed"), head.description
    record = spout.record_from_description(head.description)
    assert record.closed and record[1] == {(topic, p): o for p, o in stops.items()}
    assert record.stops == record[1]
    assert committed_offsets(broker, f"g-{topic}", topic) == stops

    # The same settings again: the record closes the range already.
    commits = len(spout_commits(pachd))
    again = spouts(env)
    assert again.wait(EXIT_WITHIN) == 0, again.log
    assert len(spout_commits(pachd)) == commits
    assert "the range was closed already" in again.log

    # A later stop: on from where the record ends, and closed again.
    later = {0: 9, 1: 10, 2: 6}
    more = spouts({**env, "STOP_AT": offsets_text(topic, later)})
    assert more.wait(EXIT_WITHIN) == 0, more.log
    assert landed(pachd) == expected(topic, starts, later)
    assert spout.record_from_description(spout_commits(pachd)[-1].description).closed
    assert committed_offsets(broker, f"g-{topic}", topic) == later


def test_a_backfill_through_the_pipe_with_its_marker(broker, ten_each, fifo, spouts, readers):
    topic = ten_each
    reader = readers(fifo, generation="g3", marker="offsets")
    stops = {0: 4, 1: 10, 2: 0}
    process = spouts(spout_env(broker, topic, fifo, MARKER="offsets",
                               STOP_AT=offsets_text(topic, stops)))
    assert process.wait(EXIT_WITHIN) == 0, process.log
    assert reader.snapshot() == expected(topic, {0: 0, 1: 0, 2: 0}, stops)
    marker = spout.decode_marker((fifo.parent / "offsets").read_bytes())
    assert marker.closed and marker[1] == {(topic, p): o for p, o in stops.items()}
    assert committed_offsets(broker, f"g-{topic}", topic) == stops


def test_sigkill_mid_backfill_then_a_restart_lands_every_message_once(
        broker, pachd, tmp_path, spouts):
    topic = create_topic(broker, 3)
    produce(broker, topic, [(p, None, b"%d-%d" % (p, i)) for i in range(200) for p in range(3)])
    stops = {0: 180, 1: 200, 2: 90}
    env = pfs_env(broker, topic, pachd, tmp_path, STOP_AT=offsets_text(topic, stops),
                  BATCH_MAX_MESSAGES=2)
    first = spouts(env)
    wait_until(lambda: len(spout_commits(pachd)) >= 3 or first.process.poll() is not None, 60,
               "some batches committed")
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL   # killed mid-way, not done already
    assert not spout.record_from_description(spout_commits(pachd)[-1].description).closed
    second = spouts(env)
    assert second.wait(EXIT_WITHIN) == 0, second.log
    assert landed(pachd) == expected(topic, {0: 0, 1: 0, 2: 0}, stops)
    # Each commit's title names its ranges: together they cover the range once.
    covered: list = []
    for commit in spout_commits(pachd):
        title = commit.description.splitlines()[0]
        if " from " in title:
            for part in title.split(" from ", 1)[1].split(", "):
                where, span = part.rsplit(" ", 1)
                first, last = map(int, span.split("-"))
                covered += [(where, o) for o in range(first, last + 1)]
    assert sorted(covered) == sorted({(f"{topic}/{p}", o) for p in stops
                                      for o in range(stops[p])})
    assert committed_offsets(broker, f"g-{topic}", topic) == stops


def test_in_a_pipeline_the_spout_idles_once_the_range_is_closed(
        broker, ten_each, pachd, tmp_path, spouts):
    topic = ten_each
    stops = {0: 1, 1: 1, 2: 1}
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, PPS_PIPELINE_NAME="backfill",
                             GROUP_ID=f"g-{topic}", STOP_AT=offsets_text(topic, stops)))
    wait_until(lambda: "idling until stopped" in process.log or process.process.poll() is not None,
               EXIT_WITHIN, "the range closed")
    assert process.process.poll() is None, process.log
    assert landed(pachd) == expected(topic, {0: 0, 1: 0, 2: 0}, stops)
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0


def test_a_backfill_into_a_fresh_plain_repo_verified_message_by_message(
        broker, pachd, tmp_path, spouts):
    """The recipe outside a pipeline: a repo of its own, DELIVERY=pfs, STOP_AT."""
    topic = create_topic(broker, 2)
    values = {(p, i): b"backfill %d/%d " % (p, i) * (i % 5 + 1) for i in range(25)
              for p in range(2)}
    produce(broker, topic, [(p, None, value) for (p, _), value in sorted(values.items())])
    pachd.create_repo("backfill")
    stops = {0: 25, 1: 18}
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, OUTPUT_REPO="default/backfill",
                             STOP_AT=offsets_text(topic, stops)))
    assert process.wait(EXIT_WITHIN) == 0, process.log
    files = landed(pachd, "backfill")
    assert files == {f"/{topic}/{p}/{i:020d}": value for (p, i), value in values.items()
                     if i < stops[p]}
    head = pachd.head("backfill")
    assert head.description.startswith("kafka-spout: range closed")


@pytest.mark.parametrize("settings, culprit", [
    ({"STOP_AT": "2026-01-01T00:00:00"}, "STOP_AT: '2026-01-01T00:00:00' has no time zone"),
    ({"START_AT": "2026-02-01T00:00:00Z", "STOP_AT": "2026-01-01T00:00:00Z"},
     "STOP_AT: 2026-01-01T00:00:00Z is before START_AT=2026-02-01T00:00:00Z"),
    ({"START_AT": "{t}/0=9", "STOP_AT": "{t}/0=5,{t}/1=1,{t}/2=1"},
     "STOP_AT: {t}/0=5 is before START_AT's 9"),
    ({"START_AT": "latest", "AUTO_OFFSET_RESET": "earliest"},
     "START_AT: latest disagrees with AUTO_OFFSET_RESET=earliest"),
    ({"STOP_AT": "end", "MODE": "group"}, "STOP_AT: a bounded read needs MODE=exactly-once"),
    ({"STOP_AT": "{t}/7=3"}, "STOP_AT: {t}/7 is no partition this spout reads"),
    ({"START_AT": "other/0=3"}, "START_AT: other/0 is no partition this spout reads"),
    ({"STOP_AT": "{t}/0=3"}, "STOP_AT: names no stop for {t}/1"),
])
def test_bad_bounds_stop_the_spout_with_one_line(broker, ten_each, pachd, tmp_path, settings,
                                                 culprit):
    topic = ten_each
    env = pfs_env(broker, topic, pachd, tmp_path,
                  **{k: v.replace("{t}", topic) for k, v in settings.items()})
    refused_in_one_line(env, culprit.replace("{t}", topic))
    assert spout_commits(pachd) == []


def refused_in_one_line(env: dict, culprit: str) -> None:
    """The spout stops at start: exit 2, its last line naming the culprit, no traceback."""
    result = run_spout(env, timeout=60)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"spout.py: error: {culprit}"), result.stderr
    assert "Traceback" not in result.stderr


# -- what only Apache Kafka answers right: offsets-for-times, the end, transactions

def record_of(pachd) -> spout.Record:
    return spout.record_from_description(spout_commits(pachd)[-1].description)


def produce_at(bootstrap: str, topic: str, messages) -> None:
    """(partition, value, timestamp in ms), sent in order and checked."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        futures = [producer.send(topic, value=value, partition=partition, timestamp_ms=stamp)
                   for partition, value, stamp in messages]
        producer.flush(60)
        for future in futures:
            future.get(10)
    finally:
        producer.close()


@pytest.mark.kafka_reference
def test_start_at_a_time_between_two_runs_lands_only_the_second(
        apache_kafka, pachd, tmp_path, spouts):
    bootstrap = apache_kafka.bootstrap
    topic = create_topic(bootstrap, 3)
    import datetime
    second_run = (int(time.time()) - 3600) * 1000   # recent: retention keeps it
    produce_at(bootstrap, topic, [(p, b"early-%d-%d" % (p, i), second_run - 3_600_000 + i)
                                  for i in range(5) for p in range(3)])
    produce_at(bootstrap, topic, [(p, b"late-%d-%d" % (p, i), second_run + i)
                                  for i in range(7) for p in range(3)])
    between = datetime.datetime.fromtimestamp(second_run / 1000 - 1800,
                                              datetime.timezone(datetime.timedelta(hours=2)))
    process = spouts(pfs_env(bootstrap, topic, pachd, tmp_path, START_AT=between.isoformat(),
                             STOP_AT="end"))
    assert process.wait(EXIT_WITHIN) == 0, process.log
    assert landed(pachd) == {f"/{topic}/{p}/{o:020d}": b"late-%d-%d" % (p, o - 5)
                             for o in range(5, 12) for p in range(3)}
    assert record_of(pachd).closed


@pytest.mark.kafka_reference
def test_stop_at_end_takes_the_end_as_the_read_began_while_the_topic_is_written(
        apache_kafka, pachd, tmp_path, spouts):
    from test_kafka_reference import SteadyProducer, end_offsets
    bootstrap, partitions = apache_kafka.bootstrap, 3
    topic = create_topic(bootstrap, partitions)
    producer = SteadyProducer(bootstrap, topic, partitions, rate=300)
    producer.start()
    try:
        wait_until(lambda: producer.acked >= 300, 30, "a backlog")
        before = end_offsets(bootstrap, topic, partitions)
        process = spouts(pfs_env(bootstrap, topic, pachd, tmp_path, STOP_AT="end",
                                 BATCH_MAX_SECONDS=1))
        assert process.wait(EXIT_WITHIN) == 0, process.log
        after = end_offsets(bootstrap, topic, partitions)
    finally:
        producer.finish()
    record = record_of(pachd)
    stops = {p: record.stops[(topic, p)] for p in range(partitions)}
    assert all(before[p] <= stops[p] <= after[p] for p in range(partitions)), (before, stops)
    assert after != stops   # the topic went on past the stops, and none of that was taken
    files = landed(pachd)
    assert sorted(files) == sorted(f"/{topic}/{p}/{o:020d}" for p in range(partitions)
                                   for o in range(stops[p]))
    assert record.closed and committed_offsets(bootstrap, f"g-{topic}", topic) == stops


@pytest.mark.kafka_reference
def test_a_transactional_topic_with_an_open_and_an_aborted_transaction_ends_at_its_stable_offset(
        apache_kafka, pachd, tmp_path, spouts):
    from kafka import KafkaProducer
    from test_kafka_reference import end_offsets, read_all, write_transactions
    bootstrap, partitions = apache_kafka.bootstrap, 3
    topic = create_topic(bootstrap, partitions)
    write_transactions(bootstrap, topic, partitions, "cac", per_partition=4)
    truth = read_all(bootstrap, topic, partitions)           # the committed records
    stable = end_offsets(bootstrap, topic, partitions)        # past the last marker
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"open-{topic}")
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(3 * partitions):
        producer.send(topic, value=b"open-%d" % i, partition=i % partitions)
    producer.flush()
    try:
        process = spouts(pfs_env(bootstrap, topic, pachd, tmp_path, STOP_AT="end"))
        assert process.wait(EXIT_WITHIN) == 0, process.log
    finally:
        producer.abort_transaction()
        producer.close()
    assert landed(pachd) == {f"/{topic}/{p}/{o:020d}": record.value
                             for (p, o), record in truth.items()}
    record = record_of(pachd)
    assert record.closed and record.stops == {(topic, p): stable[p] for p in range(partitions)}
    assert committed_offsets(bootstrap, f"g-{topic}", topic) == stable


@pytest.mark.kafka_reference
def test_sigkill_mid_backfill_keeps_the_end_the_read_began_with(
        apache_kafka, pachd, tmp_path, spouts):
    bootstrap = apache_kafka.bootstrap
    topic = create_topic(bootstrap, 3)
    produce(bootstrap, topic, [(p, None, b"%d-%d" % (p, i)) for i in range(150) for p in range(3)])
    env = pfs_env(bootstrap, topic, pachd, tmp_path, STOP_AT="end", BATCH_MAX_MESSAGES=2)
    first = spouts(env)
    wait_until(lambda: len(spout_commits(pachd)) >= 3 or first.process.poll() is not None, 60,
               "some batches committed")
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    produce(bootstrap, topic, [(p, None, b"after-%d" % p) for p in range(3)])  # past the end
    second = spouts(env)
    assert second.wait(EXIT_WITHIN) == 0, second.log
    assert landed(pachd) == expected(topic, {0: 0, 1: 0, 2: 0}, {0: 150, 1: 150, 2: 150})
    assert record_of(pachd).stops == {(topic, p): 150 for p in range(3)}


@pytest.mark.parametrize("format", ["jsonl", "parquet"])
def test_a_bounded_read_of_segments_holds_exactly_the_range(broker, ten_each, pachd, tmp_path,
                                                           spouts, format):
    from test_segments import segment_rows
    topic = ten_each
    starts, stops = {0: 3, 1: 0, 2: 9}, {0: 8, 1: 4, 2: 10}
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, FORMAT=format,
                             START_AT=offsets_text(topic, starts),
                             STOP_AT=offsets_text(topic, stops)))
    assert process.wait(EXIT_WITHIN) == 0, process.log
    rows = sorted((row["partition"], row["offset"], row["value"])
                  for path, data in landed(pachd).items() for row in segment_rows(path, data))
    assert rows == [(p, o, b"%d-%d" % (p, o)) for p in range(3)
                    for o in range(starts[p], stops[p])]
    assert record_of(pachd).closed


def test_a_bounded_read_of_a_partition_set_with_decode(broker, pachd, tmp_path, spouts):
    """STOP_AT with PARTITIONS and DECODE: only the spout's partitions, decoded, up to the
    stops, then closed."""
    from test_decoding_hostile import RegistryDouble, avro, framed
    schema = {"type": "record", "name": "Reading", "fields": [{"name": "n", "type": "long"}]}
    topic = create_topic(broker, 3)
    registry = RegistryDouble({7: ("AVRO", json.dumps(schema))})
    try:
        produce(broker, topic, [(p, None, framed(7, avro(schema, {"n": 100 * p + i})))
                                for i in range(10) for p in range(3)])
        stops = {1: 6, 2: 3}
        process = spouts(pfs_env(broker, topic, pachd, tmp_path, PARTITIONS="1-2",
                                 DECODE="value", SCHEMA_REGISTRY_URL=registry.url,
                                 FORMAT="json", STOP_AT=offsets_text(topic, stops)))
        assert process.wait(EXIT_WITHIN) == 0, process.log
    finally:
        registry.stop()
    files = landed(pachd)
    assert sorted(files) == sorted(f"/{topic}/{p}/{o:020d}" for p in stops
                                   for o in range(stops[p]))
    assert json.loads(files[f"/{topic}/2/{2:020d}"])["value"] == {"n": 202}
    record = record_of(pachd)
    assert record.closed and record[1] == {(topic, p): o for p, o in stops.items()}
