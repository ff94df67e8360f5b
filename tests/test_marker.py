"""Marker mode: the marker's format, reading it back, and resuming exactly from it."""

from __future__ import annotations

import json
import signal

import pytest
from conftest import committed_offsets, create_topic, produce, spout_env, wait_until
from test_config import run_spout

import spout


def test_marker_round_trip():
    positions = {("orders", 0): 17, ("orders", 10): 3, ("refunds", 1): 0}
    data = spout.encode_marker(["refunds", "orders"], positions)
    assert json.loads(data) == {"format": "kafka-spout/1", "topics": ["orders", "refunds"],
                                "offsets": {"orders": {"0": 17, "10": 3}, "refunds": {"1": 0}}}
    assert spout.decode_marker(data) == (["orders", "refunds"], positions)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"format": "other"}',
                                  b'{"format": "kafka-spout/1", "topics": []}',
                                  b'{"format": "kafka-spout/1", "topics": [], '
                                  b'"offsets": {"t": {"0": -1}}}',
                                  b'{"format": "kafka-spout/1", "topics": [], '
                                  b'"offsets": {"t": {"x": 1}}}'])
def test_malformed_markers_are_refused(data):
    with pytest.raises(ValueError, match="not a kafka-spout marker"):
        spout.decode_marker(data)


def test_a_missing_or_dangling_marker_means_none_yet(tmp_path):
    assert spout.read_marker(str(tmp_path / "offsets")) is None
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert spout.read_marker(str(tmp_path / "link")) is None


@pytest.fixture
def base(fifo):
    return {"BOOTSTRAP_SERVERS": "127.0.0.1:1", "TOPIC": "events", "OUTPUT_PIPE": str(fifo)}


def test_the_marker_lives_beside_the_pipe(base):
    config = spout.Config.from_sources({**base, "MARKER": "offsets"})
    assert config.marker_path == str(spout.os.path.join(
        spout.os.path.dirname(base["OUTPUT_PIPE"]), "offsets"))


@pytest.mark.parametrize("change, culprit", [
    ({"MARKER": "../up"}, "MARKER: '../up' is not a marker name"),
    ({"MARKER": "has space"}, "MARKER: 'has space' is not a marker name"),
    ({"MARKER": "event"}, "MARKER: names such as 'events/0/"),
    ({"MARKER": "k", "NAME_TEMPLATE": "{key}-{offset}"}, "start with the marker name 'k'"),
])
def test_marker_names_that_would_swallow_data_are_refused(base, change, culprit):
    result = run_spout({**base, **change})
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert culprit in result.stderr


def test_a_malformed_marker_stops_the_spout_naming_the_file(broker, topic, fifo, spouts):
    produce(broker, topic, [(0, None, b"x")])
    marker = fifo.parent / "offsets"
    marker.write_text("not json")
    spout_process = spouts(spout_env(broker, topic, fifo, MARKER="offsets"))
    assert spout_process.wait(30) == 2
    lines = spout_process.log.strip().splitlines()
    assert lines[-1].startswith(f"spout.py: error: MARKER: {marker}: not a kafka-spout marker")
    assert "Traceback" not in spout_process.log
    assert committed_offsets(broker, f"g-{topic}", topic) == {0: None, 1: None, 2: None}


def test_resumes_exactly_from_the_marker_then_the_group_then_the_reset(broker, topic, fifo,
                                                                        spouts, readers):
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata
    produce(broker, topic, [(p, None, b"%d-%d" % (p, i)) for i in range(10) for p in range(3)])
    # Partition 2 has only a group offset; 0 and 1 are in the marker, which wins over the group.
    group = KafkaConsumer(bootstrap_servers=broker, group_id=f"g-{topic}",
                          enable_auto_commit=False)
    group.commit({TopicPartition(topic, 2): OffsetAndMetadata(3, "", -1),
                  TopicPartition(topic, 0): OffsetAndMetadata(8, "", -1)})
    group.close(autocommit=False)
    (fifo.parent / "offsets").write_bytes(spout.encode_marker([topic], {(topic, 0): 5,
                                                                       (topic, 1): 10}))
    reader = readers(fifo, generation="g3", marker="offsets")
    expected = {f"/{topic}/{p}/{o:020d}": b"%d-%d" % (p, o)
                for p, first in ((0, 5), (2, 3)) for o in range(first, 10)}
    spout_process = spouts(spout_env(broker, topic, fifo, MARKER="offsets"))
    wait_until(lambda: len(reader.snapshot()) >= len(expected), 60, "the resumed messages")
    spout_process.signal(signal.SIGTERM)
    assert spout_process.wait(10) == 0
    assert reader.snapshot() == expected
    assert spout.decode_marker((fifo.parent / "offsets").read_bytes())[1] == {
        (topic, 0): 10, (topic, 1): 10, (topic, 2): 10}
    # The group's offsets follow, for lag monitoring.
    assert committed_offsets(broker, f"g-{topic}", topic) == {0: 10, 1: 10, 2: 10}


def test_topics_and_partitions_that_appear_later_are_picked_up(broker, fifo, spouts, readers):
    first = create_topic(broker, 2)
    later = f"{first}-later"
    reader = readers(fifo, generation="g3", marker="offsets")
    spout_process = spouts(spout_env(broker, f"{first},{later}", fifo, MARKER="offsets",
                                     KAFKA_METADATA_MAX_AGE_MS=500))
    produce(broker, first, [(0, None, b"a"), (1, None, b"b")])
    wait_until(lambda: len(reader.snapshot()) >= 2, 60, "the first topic")
    create_topic(broker, 2, name=later)
    produce(broker, later, [(0, None, b"c"), (1, None, b"d")])
    wait_until(lambda: len(reader.snapshot()) >= 4, 60, "the topic created after start")
    spout_process.signal(signal.SIGTERM)
    assert spout_process.wait(10) == 0
    assert reader.snapshot() == {f"/{first}/0/{0:020d}": b"a", f"/{first}/1/{0:020d}": b"b",
                                 f"/{later}/0/{0:020d}": b"c", f"/{later}/1/{0:020d}": b"d"}
