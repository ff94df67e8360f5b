"""What users ask for after "don't lose data": metadata, layouts, topic patterns, secrets."""

from __future__ import annotations

import base64
import json
import signal
from datetime import datetime, timezone

import pytest
from conftest import create_topic, spout_env, wait_until
from test_config import run_spout

import spout


def produce_rich(bootstrap: str, topic: str, messages) -> None:
    """messages: (partition, key, value, headers, timestamp_ms)."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for partition, key, value, headers, timestamp in messages:
        producer.send(topic, key=key, value=value, partition=partition, headers=headers,
                      timestamp_ms=timestamp)
    producer.flush(30)
    producer.close()


def decoded(field):
    if isinstance(field, dict):
        return base64.b64decode(field["base64"])
    return None if field is None else field.encode()


TS = 1_732_441_800_000  # 2024-11-24 09:50:00 UTC
RICH = [
    (0, b"text-key", "héllo".encode(), [("trace", b"abc"), ("bin", b"\xff\x00")], TS),
    (1, b"\xff\xfe binary key", b"\x00\x01\xfe\xff", [], TS + 3_600_000),
    (2, None, b"", [("empty", b""), ("latin", b"\xe9t\xe9")], TS + 86_400_000),
    (0, b"gone", None, [], TS + 1),
]


def run_format(broker, topic, fifo, spouts, readers, expected_files: int, **settings):
    produce_rich(broker, topic, RICH)
    reader = readers(fifo, generation="g3")
    process = spouts(spout_env(broker, topic, fifo, **settings))
    wait_until(lambda: len(reader.snapshot()) >= expected_files or process.process.poll(), 60,
               "the files")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0, process.log
    return reader.snapshot()


def check_metadata(document: dict, sent) -> None:
    partition, key, value, headers, timestamp = sent
    assert document["partition"] == partition
    assert document["timestamp"] == timestamp and document["timestamp_type"] == "CreateTime"
    assert decoded(document["key"]) == key
    assert [[name, decoded(v)] for name, v in document["headers"]] == \
        [[name, v] for name, v in headers]


def test_json_format_round_trips_binary_keys_headers_and_kept_tombstones(
        broker, topic, fifo, spouts, readers):
    files = run_format(broker, topic, fifo, spouts, readers, 4, FORMAT="json",
                       TOMBSTONES="keep")
    documents = {(d["partition"], d["offset"]): d
                 for d in (json.loads(data) for data in files.values())}
    sent = {(0, 0): RICH[0], (1, 0): RICH[1], (2, 0): RICH[2], (0, 1): RICH[3]}
    assert set(documents) == set(sent)
    for place, message in sent.items():
        document = documents[place]
        assert document["topic"] == topic and document["offset"] == place[1]
        check_metadata(document, message)
        assert decoded(document["value"]) == message[2]
    assert documents[(0, 0)]["value"] == "héllo"                   # UTF-8 stays text
    assert documents[(1, 0)]["value"] == {"base64": "AAH+/w=="}    # the rest is marked base64
    assert documents[(0, 1)]["value"] is None                      # a kept tombstone


def test_raw_with_sidecars(broker, topic, fifo, spouts, readers):
    files = run_format(broker, topic, fifo, spouts, readers, 6, FORMAT="raw+meta")
    for partition, offset, message in [(0, 0, RICH[0]), (1, 0, RICH[1]), (2, 0, RICH[2])]:
        name = f"/{topic}/{partition}/{offset:020d}"
        assert files[name] == message[2]
        sidecar = json.loads(files[name + ".meta.json"])
        assert "value" not in sidecar
        check_metadata(sidecar, message)
    assert f"/{topic}/0/{1:020d}" not in files  # tombstones skipped by default


def test_date_layout_uses_the_message_timestamp_in_utc(broker, topic, fifo, spouts, readers):
    files = run_format(broker, topic, fifo, spouts, readers, 3,
                       NAME_TEMPLATE="{topic}/{date}/{hour}/{key_hash}-{offset}")
    def day(ts):
        return datetime.fromtimestamp(ts / 1000, timezone.utc).strftime("%Y-%m-%d/%H")
    assert set(files) == {
        f"/{topic}/{day(TS)}/{spout.key_hash(b'text-key')}-0",
        f"/{topic}/{day(TS + 3_600_000)}/{spout.key_hash(RICH[1][1])}-0",
        f"/{topic}/{day(TS + 86_400_000)}/null-0"}
    assert f"/{topic}/2024-11-24/09/{spout.key_hash(b'text-key')}-0" in files


def test_key_hash_is_short_stable_and_distinct():
    assert spout.key_hash(b"a") == spout.key_hash(b"a") != spout.key_hash(b"b")
    assert len(spout.key_hash(b"a")) == 16 and spout.key_hash(None) == "null"


def test_a_pattern_picks_up_topics_created_after_start(broker, fifo, spouts, readers):
    prefix = create_topic(broker, 1)
    reader = readers(fifo, generation="g3", marker="offsets")
    env = spout_env(broker, prefix, fifo, TOPIC_PATTERN=f"{prefix}(-.*)?", MARKER="offsets",
                    KAFKA_METADATA_MAX_AGE_MS=500)
    del env["TOPIC"]
    process = spouts(env)
    produce_rich(broker, prefix, [(0, None, b"first", [], TS)])
    wait_until(lambda: len(reader.snapshot()) >= 1, 60, "the first topic")
    later = create_topic(broker, 1, name=f"{prefix}-later")
    create_topic(broker, 1, name=f"x{prefix}")  # does not match the whole name
    produce_rich(broker, later, [(0, None, b"second", [], TS)])
    produce_rich(broker, f"x{prefix}", [(0, None, b"other", [], TS)])
    wait_until(lambda: len(reader.snapshot()) >= 2, 60, "the topic created after start")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert reader.snapshot() == {f"/{prefix}/0/{0:020d}": b"first",
                                 f"/{later}/0/{0:020d}": b"second"}


@pytest.fixture
def base(fifo):
    return {"BOOTSTRAP_SERVERS": "127.0.0.1:1", "TOPIC": "events", "OUTPUT_PIPE": str(fifo)}


def test_secrets_come_from_files_and_never_reach_the_log(base, tmp_path, fifo):
    secret = tmp_path / "password"
    secret.write_text("s3cr3t-value\n")
    env = {**base, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
           "KAFKA_SASL_PLAIN_USERNAME_FILE": str(secret), "KAFKA_SASL_PLAIN_PASSWORD_FILE":
           str(secret)}
    config = spout.Config.from_sources(env)
    assert config.kafka_options["sasl_plain_password"] == "s3cr3t-value"
    assert "s3cr3t" not in config.describe()


@pytest.mark.parametrize("change, culprit", [
    ({"TOPIC": None}, "TOPIC: required (or set TOPIC_PATTERN)"),
    ({"TOPIC_PATTERN": "a.*"}, "TOPIC_PATTERN: set TOPIC or TOPIC_PATTERN, not both"),
    ({"TOPIC": None, "TOPIC_PATTERN": "(unclosed"}, "TOPIC_PATTERN: '(unclosed' is not a "
                                                    "regular expression"),
    ({"FORMAT": "xml"}, "FORMAT: must be one of raw, json, raw+meta"),
    ({"TOMBSTONES": "keep"}, "TOMBSTONES: keep needs FORMAT=json, raw+meta, jsonl or parquet"),
    ({"KAFKA_SASL_PLAIN_PASSWORD_FILE": "/nonexistent/secret"},
     "KAFKA_SASL_PLAIN_PASSWORD_FILE: cannot read /nonexistent/secret"),
    ({"KAFKA_SSL_CAFILE": "/nonexistent/ca.pem", "KAFKA_SECURITY_PROTOCOL": "SSL"},
     "KAFKA_SSL_CAFILE: /nonexistent/ca.pem is not a readable file"),
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"},
     "KAFKA_SECURITY_PROTOCOL: must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
     "KAFKA_SASL_MECHANISM: required with SASL_SSL: one of PLAIN, SCRAM-SHA-256"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "MD5"},
     "KAFKA_SASL_MECHANISM: must be one of PLAIN"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
      "KAFKA_SASL_PLAIN_USERNAME": "u"}, "KAFKA_SASL_PLAIN_PASSWORD: required with SCRAM"),
    ({"KAFKA_SASL_PLAIN_PASSWORD": "x", "KAFKA_SASL_PLAIN_PASSWORD_FILE": "/etc/hostname"},
     "set KAFKA_SASL_PLAIN_PASSWORD or KAFKA_SASL_PLAIN_PASSWORD_FILE, not both"),
])
def test_format_and_security_mistakes_exit_2_naming_them(base, change, culprit):
    env = {k: v for k, v in {**base, **change}.items() if v is not None}
    result = run_spout(env)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert culprit in result.stderr
