"""FORMAT=jsonl and parquet: one file per partition per batch, read back by pyarrow and DuckDB."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from conftest import PACH_REPO, create_topic, pfs_env, spout_env, wait_until
from test_config import run_spout
from test_formats import TS, decoded, produce_rich

import spout


def consumer_record(partition, offset, value, timestamp=TS, key=b"k", headers=(), topic="t"):
    from kafka.consumer.fetcher import ConsumerRecord
    return ConsumerRecord(topic, partition, 0, offset, timestamp, 0, key, value, list(headers),
                          None, len(key or b""), -1 if value is None else len(value), 0)


def segment_rows(path: str, data: bytes) -> list[dict]:
    """A segment's rows as {partition, offset, timestamp (ms or None), key, value, headers},
    with pyarrow for Parquet and json for JSON Lines."""
    if path.endswith(".jsonl"):
        assert data.endswith(b"\n")
        rows = []
        for line in data.decode().splitlines():
            document = json.loads(line)
            rows.append({"partition": document["partition"], "offset": document["offset"],
                         "timestamp": None if document["timestamp"] < 0
                         else document["timestamp"],
                         "key": decoded(document["key"]), "value": decoded(document["value"]),
                         "headers": [(name, decoded(value))
                                     for name, value in document["headers"]]})
        return rows
    import pyarrow.parquet as parquet
    table = parquet.read_table(io.BytesIO(data))
    rows = []
    for row in table.to_pylist():
        stamp = row["timestamp"]
        rows.append({"partition": row["partition"], "offset": row["offset"],
                     "timestamp": None if stamp is None else int(stamp.timestamp() * 1000),
                     "key": row["key"], "value": row["value"],
                     "headers": [(h["key"], h["value"]) for h in row["headers"]]})
    return rows


def duckdb_rows(files: dict, tmp_path: Path, hive: bool = False) -> list[tuple]:
    """The same files through DuckDB: (partition, offset, key, value[, date, hour]) sorted."""
    import duckdb
    root = tmp_path / "duck"
    for path, data in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    columns = "partition, \"offset\", key, value" + (", date, hour" if hive else "")
    with duckdb.connect() as connection:
        return connection.sql(
            f"SELECT {columns} FROM read_parquet('{root}/**/*.parquet', "
            f"hive_partitioning = {str(hive).lower()}) ORDER BY partition, \"offset\"").fetchall()


def check_segments(files: dict, truth: dict, topic: str, extension: str) -> int:
    """Every message of truth {(partition, offset): value} in exactly one row, each file one
    partition's run of messages in offset order, named by its first offset. Returns files."""
    seen = []
    for path, data in files.items():
        rows = segment_rows(path, data)
        assert rows, path
        partition, first = rows[0]["partition"], rows[0]["offset"]
        assert path == f"/{topic}/{partition}/{first:020d}{extension}"
        assert {row["partition"] for row in rows} == {partition}
        offsets = [row["offset"] for row in rows]
        assert offsets == sorted(offsets)
        seen += [((row["partition"], row["offset"]), row["value"]) for row in rows]
    assert len(seen) == len(dict(seen)), "a message is in more than one row"
    assert dict(seen) == truth
    return len(files)


# ----------------------------------------------------------------------------- no broker

def test_a_jsonl_line_is_the_json_format_document():
    records = [consumer_record(0, 1, b"plain"),
               consumer_record(1, 2, '"é\\\n\u2028'.encode(), key=None,
                               headers=[("h", b"\xff"), ("n", None), ("é", b"")]),
               consumer_record(2, 3, b"\xff\x00", timestamp=-1, key=b""),
               consumer_record(0, 4, None, key=b"\xfe")]
    for record in records:
        document = spout.record_metadata(record)
        document["value"] = spout.json_bytes(record.value)
        assert spout.json_lines([record]) == json.dumps(document, ensure_ascii=False) + "\n"
    assert spout.json_lines(records) == "".join(map(spout.json_lines, ([r] for r in records)))


def batcher(**settings):
    """A Segments batcher and the batches it ships."""
    values = {"bootstrap_servers": ("x:1",), "topics": ("t",), "format": "jsonl",
              "name_template": "{topic}/{partition}/{offset:020d}.jsonl", **settings}
    shipped = []
    stats = spout.Stats()
    segments = spout.make_batcher(spout.Config(**values), stats,
                                  lambda: shipped.append(segments.take()))
    assert isinstance(segments, spout.Segments)
    return segments, shipped, stats


@pytest.mark.parametrize("tombstones", ["keep", "skip"])
def test_tombstones_kept_as_null_rows_or_skipped_with_their_offsets_delivered(tombstones):
    from kafka import TopicPartition
    segments, _, stats = batcher(tombstones=tombstones)
    tp = TopicPartition("t", 0)
    segments.add({tp: [consumer_record(0, 5, b"a"), consumer_record(0, 6, None),
                       consumer_record(0, 7, b"b")]})
    batch = segments.take()
    assert stats.tombstones == 1 and batch.offsets == {tp: 8} and batch.records == 3
    (name, data, _), = batch.members
    rows = segment_rows(name, bytes(data))
    values = [(row["offset"], row["value"]) for row in rows]
    if tombstones == "keep":
        assert values == [(5, b"a"), (6, None), (7, b"b")]
    else:
        assert values == [(5, b"a"), (7, b"b")]
    assert batch.written == {"t": len(rows)}
    segments.add({tp: [consumer_record(0, 8, None)]})
    only = segments.take()
    assert only.offsets == {tp: 9} and len(only.members) == (tombstones == "keep")


def test_byte_limit_bounds_a_batch_and_an_oversized_message_travels_alone():
    from kafka import TopicPartition
    segments, shipped, _ = batcher(batch_max_bytes=1000)
    tp = TopicPartition("t", 0)
    sizes = [300, 300, 5000, 300, 300, 300, 300]
    segments.add({tp: [consumer_record(0, i, bytes(size)) for i, size in enumerate(sizes)]})
    shipped.append(segments.take())
    assert [[len(row["value"]) for member in batch.members
             for row in segment_rows(member[0], bytes(member[1]))] for batch in shipped] == \
        [[300, 300], [5000], [300, 300, 300], [300]]


def test_time_templates_group_by_the_messages_own_hour():
    from kafka import TopicPartition
    segments, _, _ = batcher(
        format="parquet", name_template="{topic}/date={date}/hour={hour}/{partition}-{offset}"
        ".parquet")
    hour = 3_600_000
    stamps = [TS, TS + 1, TS + hour, TS + 2, TS + 25 * hour, -1]  # not in time order
    segments.add({TopicPartition("t", 1): [consumer_record(1, 10 + i, b"v%d" % i, stamp)
                                           for i, stamp in enumerate(stamps)]})
    files = {name: segment_rows(name, bytes(data)) for name, data, _ in segments.take().members}
    assert {name: [row["offset"] for row in rows] for name, rows in files.items()} == {
        "t/date=2024-11-24/hour=09/1-10.parquet": [10, 11, 13],
        "t/date=2024-11-24/hour=10/1-12.parquet": [12],
        "t/date=2024-11-25/hour=10/1-14.parquet": [14],
        "t/date=1970-01-01/hour=00/1-15.parquet": [15]}   # no timestamp


@pytest.mark.parametrize("codec", ["zstd", "snappy", "gzip", "none"])
def test_parquet_columns_types_and_codec(codec):
    import pyarrow as pa
    import pyarrow.parquet as parquet
    from kafka import TopicPartition
    segments, _, _ = batcher(format="parquet", parquet_compression=codec,
                             name_template="{topic}/{partition}/{offset:020d}.parquet",
                             tombstones="keep")
    segments.add({TopicPartition("t", 2): [
        consumer_record(2, 0, b"v", headers=[("h", b"\x00"), ("g", None)]),
        consumer_record(2, 1, None, timestamp=-1, key=None)]})
    (_, data, _), = segments.take().members
    file = parquet.ParquetFile(pa.BufferReader(bytes(data)))
    schema = file.schema_arrow
    assert [(field.name, str(field.type)) for field in schema] == [
        ("topic", "string"), ("partition", "int32"), ("offset", "int64"),
        ("timestamp", "timestamp[ms, tz=UTC]"), ("timestamp_type", "string"),
        ("key", "binary"), ("value", "binary"),
        ("headers", "list<element: struct<key: string not null, value: binary>>")]
    assert schema.field("key").nullable and schema.field("value").nullable
    assert file.metadata.row_group(0).column(0).compression == \
        {"none": "UNCOMPRESSED"}.get(codec, codec.upper())
    assert file.read().to_pylist()[1]["timestamp"] is None


@pytest.mark.parametrize("token", ["{key}", "{key_hash}", "{timestamp}"])
def test_per_message_tokens_are_refused_for_segments(fifo, token):
    result = run_spout({"HOST": "kafka", "PORT": "9092", "TOPIC": "events",
                        "OUTPUT_PIPE": str(fifo), "FORMAT": "parquet",
                        "NAME_TEMPLATE": f"{{topic}}/{token}-{{offset}}.parquet"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"spout.py: error: NAME_TEMPLATE: {token}"), result.stderr


@pytest.mark.parametrize("template, topics, culprit", [
    ("{topic}/{date}/{offset}.jsonl", "events", "{partition}"),
    ("{topic}/{partition}/{hour}.jsonl", "events", "{offset}"),
    ("{partition}/{offset}.jsonl", "events,more", "{topic}")])
def test_segment_names_must_tell_segments_apart(fifo, template, topics, culprit):
    with pytest.raises(spout.ConfigError, match=f"NAME_TEMPLATE: needs {culprit}"):
        spout.Config.from_sources({"HOST": "kafka", "PORT": "9092", "TOPIC": topics,
                                   "OUTPUT_PIPE": str(fifo), "FORMAT": "jsonl",
                                   "NAME_TEMPLATE": template})


def test_segment_defaults(fifo):
    base = {"HOST": "kafka", "PORT": "9092", "TOPIC": "events", "OUTPUT_PIPE": str(fifo)}
    config = spout.Config.from_sources({**base, "FORMAT": "jsonl"})
    assert (config.name_template, config.batch_max_messages, config.batch_max_bytes,
            config.batch_max_seconds) == ("{topic}/{partition}/{offset:020d}.jsonl", 100_000,
                                          64 * 1024 * 1024, 60.0)
    config = spout.Config.from_sources({**base, "FORMAT": "parquet", "BATCH_MAX_SECONDS": "5"})
    assert config.name_template.endswith(".parquet") and config.batch_max_seconds == 5
    assert config.parquet_compression == "zstd"


# ----------------------------------------------------------------------------- end to end

def rich_messages(count: int):
    """(partition, key, value, headers, timestamp) with tombstones, binary and empty values."""
    for i in range(count):
        value = None if i % 17 == 5 else (b"\xff%d" % i if i % 3 else b"v-%d" % i)
        yield (i % 3, b"k%d" % (i % 7) if i % 5 or value is None else None, value,
               [("n", b"%d" % i)] if i % 4 == 0 else [], TS + i * 1000)


def truth_of(messages, keep: bool) -> dict:
    offsets = [0, 0, 0]
    truth = {}
    for partition, _, value, _, _ in messages:
        if value is not None or keep:
            truth[(partition, offsets[partition])] = value
        offsets[partition] += 1
    return truth


def test_jsonl_through_the_pipe_with_a_marker(broker, fifo, spouts, readers):
    topic = create_topic(broker, 3)
    messages = list(rich_messages(600))
    produce_rich(broker, topic, messages)
    reader = readers(fifo, marker="offsets")
    process = spouts(spout_env(broker, topic, fifo, FORMAT="jsonl", MARKER="offsets",
                               TOMBSTONES="keep", BATCH_MAX_MESSAGES=100,
                               BATCH_MAX_SECONDS=0.2))
    truth = truth_of(messages, keep=True)
    wait_until(lambda: sum(len(segment_rows(p, d)) for p, d in reader.snapshot().items())
               >= len(truth), 60, "every message in a segment", interval=0.2)
    assert process.stop() == 0, process.log
    files = reader.snapshot()
    assert check_segments(files, truth, topic, ".jsonl") >= 6
    rows = [row for path, data in files.items() for row in segment_rows(path, data)]
    by_offset = {(row["partition"], row["offset"]): row for row in rows}
    for i, (partition, key, _, headers, stamp) in enumerate(messages):
        row = by_offset[(partition, i // 3)]
        assert (row["key"], row["headers"], row["timestamp"]) == (key, headers, stamp)


def test_parquet_through_pachd_hive_folders_read_by_pyarrow_and_duckdb(broker, pachd,
                                                                       tmp_path, spouts):
    topic = create_topic(broker, 3)
    hour = 3_600_000
    messages = [(i % 3, None, b"m-%d" % i, [], TS + (i // 100) * hour) for i in range(300)]
    produce_rich(broker, topic, messages)
    template = "{topic}/date={date}/hour={hour}/{partition}-{offset:020d}.parquet"
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, FORMAT="parquet",
                             NAME_TEMPLATE=template, BATCH_MAX_MESSAGES=150,
                             BATCH_MAX_SECONDS=0.2))

    def delivered():
        _, positions = spout.record_from_description(pachd.head(PACH_REPO).description) or \
            ([], {})
        return sum(positions.values()) >= len(messages)
    wait_until(delivered, 60, "every message in a commit", interval=0.2)
    assert process.stop() == 0, process.log
    files = pachd.head(PACH_REPO).files
    seen = {}
    for path, data in files.items():
        rows = segment_rows(path, data)
        hours = {row["timestamp"] // hour for row in rows}
        assert len(hours) == 1, f"{path} mixes hours"
        first = rows[0]
        stamp = spout.time.gmtime(first["timestamp"] // 1000)
        assert path == "/%s/date=%s/hour=%02d/%d-%020d.parquet" % (
            topic, spout.time.strftime("%Y-%m-%d", stamp), stamp.tm_hour,
            first["partition"], first["offset"])
        for row in rows:
            assert (row["partition"], row["offset"]) not in seen
            seen[(row["partition"], row["offset"])] = row["value"]
    truth = truth_of(messages, keep=False)
    assert seen == truth
    through_duckdb = duckdb_rows(files, tmp_path, hive=True)
    assert [(p, o, v) for p, o, _, v, _, _ in through_duckdb] == sorted(
        (p, o, v) for (p, o), v in truth.items())
    # Hive-style folders become columns: DuckDB takes date= for a DATE.
    assert {(str(date), str(hour)) for *_, date, hour in through_duckdb} == {
        ("2024-11-24", "09"), ("2024-11-24", "10"), ("2024-11-24", "11")}


def commit_group_offsets(bootstrap: str, group: str, topic: str, offsets: dict) -> None:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                             enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1)
                         for p, o in offsets.items()})
    finally:
        consumer.close(autocommit=False)


def test_group_mode_replay_rewrites_the_file_of_its_first_offset(broker, fifo, spouts,
                                                                 readers):
    """What docs/formats.md says a 1.x group-mode replay does: the replayed batch's segment
    replaces the file named by its first offset; files of later offsets written before stay,
    so their messages are then in two files. Nothing is lost."""
    from conftest import committed_offsets
    topic = create_topic(broker, 3)
    produce_rich(broker, topic, [(i % 3, None, b"m-%d" % i, [], TS) for i in range(90)])
    reader = readers(fifo, overwrite=True)  # "overwrite": true, as group mode's spec has

    def rows_by_file():
        return {path: [row["offset"] for row in segment_rows(path, data)]
                for path, data in reader.snapshot().items()}
    env = spout_env(broker, topic, fifo, FORMAT="jsonl", BATCH_MAX_MESSAGES=10)
    first = spouts(env)
    wait_until(lambda: sum(map(len, rows_by_file().values())) >= 90, 60, "every message",
               interval=0.2)
    assert first.stop() == 0, first.log
    assert committed_offsets(broker, f"g-{topic}", topic) == {0: 30, 1: 30, 2: 30}
    before = rows_by_file()
    assert sum(map(len, before.values())) == 90 and len(before) >= 9
    # The group's offsets fall behind what Pachyderm holds (a crash before the group commit
    # does this); the next spout replays from there, in larger batches.
    commit_group_offsets(broker, f"g-{topic}", topic, {0: 0, 1: 0, 2: 0})
    second = spouts({**env, "BATCH_MAX_MESSAGES": "1000", "BATCH_MAX_SECONDS": "1"})
    firsts = {p: f"/{topic}/{p}/{0:020d}.jsonl" for p in range(3)}
    wait_until(lambda: all(len(rows_by_file().get(path, ())) == 30 for path in firsts.values()),
               60, "the replay", interval=0.2)
    assert second.stop() == 0, second.log
    after = rows_by_file()
    for p, path in firsts.items():
        assert after[path] == list(range(30))   # replaced by the replayed batch's segment
    for path, offsets in before.items():
        if path not in firsts.values():
            assert after[path] == offsets       # left as they were: now held twice
    doubled = sum(len(offsets) for path, offsets in before.items()
                  if path not in firsts.values())
    assert sum(map(len, after.values())) == 90 + doubled and doubled > 0


def test_metrics_count_the_messages_in_segments_not_the_files():
    from kafka import TopicPartition
    config = spout.Config(bootstrap_servers=("127.0.0.1:9",), topics=("t", "u"),
                          format="jsonl", output_pipe="/nonexistent",
                          name_template="{topic}/{partition}/{offset:020d}.jsonl")
    instance = spout.Spout(config, threading.Event())
    monitor = spout.MetricsMonitor(config, instance)
    instance.add({TopicPartition("t", 0): [consumer_record(0, i, b"x") for i in range(5)],
                  TopicPartition("u", 1): [consumer_record(1, 7, b"y", topic="u"),
                                           consumer_record(1, 8, None, topic="u")]})
    batch = instance.batcher.take()
    monitor.held(spout.Outgoing(batch, ("t", "u"), dict(batch.offsets)))

    def sample(name, **labels):
        return monitor.registry.get_sample_value(name, labels)
    assert (sample("kafka_spout_messages_total", topic="t"),
            sample("kafka_spout_messages_total", topic="u")) == (5, 1)
    assert sample("kafka_spout_batch_messages_sum") == 6
    assert sample("kafka_spout_bytes_total", topic="t") == len(batch.members[0][1])
