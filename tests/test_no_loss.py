"""Offsets never pass what Pachyderm holds: the loss paths of issue 22 that the ledger closes,
end to end against a real broker, a real FIFO and pachd."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from conftest import (Tansu, committed_offsets, create_topic, free_port, pfs_env,
                      produce, spout_commits, spout_env, wait_until)

import spout

FRAMED = b"\x00\x00\x00\x00\x07avro-bytes"   # schema id 7, which only a registry can resolve


@pytest.mark.parametrize("delivery", ["pipe", "pfs"])
def test_a_stop_while_decoding_waits_for_the_registry_commits_nothing(
        delivery, broker, fifo, spouts, readers, tmp_path, request):
    """Case 1: the polled records sit inside decoding, in no batch; a stop then must not
    take the consumer's position for a delivered point."""
    topic = create_topic(broker, 3)
    produce(broker, topic, [(p, None, FRAMED) for _ in range(10) for p in range(3)])
    nobody = f"http://127.0.0.1:{free_port()}"
    settings = dict(MODE="group", DECODE="value", SCHEMA_REGISTRY_URL=nobody, FORMAT="json")
    if delivery == "pipe":
        reader = readers(fifo, generation="g3")
        env = spout_env(broker, topic, fifo, **settings)
    else:
        pachd = request.getfixturevalue("pachd")
        env = pfs_env(broker, topic, pachd, tmp_path, **settings)
    process = spouts(env)
    wait_until(lambda: "decoding waits" in process.log or process.process.poll() is not None,
               60, "decoding to wait for the registry")
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.log
    assert "Traceback" not in process.log
    if delivery == "pipe":
        assert reader.snapshot() == {}
    else:
        assert spout_commits(pachd) == []
    assert set(committed_offsets(broker, f"g-{topic}", topic).values()) <= {None, 0}, \
        process.log


def test_a_broker_that_does_not_answer_the_committed_offset_leaves_the_loop_free():
    """Case 12: resolve_assigned asks the group's offset with a bound; an outage then keeps
    the partition paused, raises nothing, and the stop is heard."""
    from kafka import KafkaConsumer, TopicPartition
    tansu = Tansu()
    try:
        topic = create_topic(tansu.bootstrap, 1)
        produce(tansu.bootstrap, topic, [(0, None, b"m%d" % i) for i in range(5)])
        config = spout.Config(bootstrap_servers=(tansu.bootstrap,), topics=(topic,),
                              group_id=f"g-{topic}", output_pipe="/nonexistent", mode="group")
        instance = spout.Spout(config, threading.Event())
        instance.consumer = KafkaConsumer(**instance.consumer_options())
        tp = TopicPartition(topic, 0)
        instance.consumer.assign([tp])
        instance.consumer.pause(tp)
        instance.ledger.assigned([tp])
        instance.consumer.committed(tp, timeout_ms=10_000)   # the coordinator is known
        tansu.pause()
        started = time.monotonic()
        instance.resolve_assigned()
        took = time.monotonic() - started
        assert took < spout.RESOLVE_TIMEOUT_MS / 1000 + 3, took
        assert instance.ledger.unresolved == {tp}
        assert tp in instance.consumer.paused()
        tansu.resume()
        wait_until(lambda: instance.resolve_assigned() or not instance.ledger.unresolved, 30,
                   "the partition resolved once the broker answers")
        assert tp not in instance.consumer.paused()
        assert instance.ledger[tp].resolved
        instance.consumer.close(autocommit=False, timeout_ms=1000)
    finally:
        tansu.resume()
        tansu.stop()


def test_a_deleted_topic_leaves_the_record_and_the_group_commits_of_the_others(
        broker, pachd, tmp_path, spouts):
    """A topic deleted under TOPIC_PATTERN: a commit naming its partition failed for every
    partition, freezing the group's offsets, and its position stayed in every record."""
    from kafka import KafkaAdminClient
    prefix = create_topic(broker, 1)
    doomed = create_topic(broker, 1, name=f"{prefix}-doomed")
    produce(broker, prefix, [(0, None, b"a%d" % i) for i in range(3)])
    produce(broker, doomed, [(0, None, b"d%d" % i) for i in range(2)])
    env = pfs_env(broker, prefix, pachd, tmp_path, TOPIC_PATTERN=f"{prefix}(-.*)?",
                  KAFKA_METADATA_MAX_AGE_MS=500)
    del env["TOPIC"]
    process = spouts(env)

    def recorded():
        commits = spout_commits(pachd)
        return spout.record_from_description(commits[-1].description)[1] if commits else {}
    wait_until(lambda: recorded() == {(prefix, 0): 3, (doomed, 0): 2} or
               process.process.poll() is not None, 60, "both topics delivered")
    wait_until(lambda: committed_offsets(broker, f"g-{prefix}", prefix, 1) == {0: 3}, 30,
               "the group's offset of the first topic")
    admin = KafkaAdminClient(bootstrap_servers=broker)
    try:
        admin.delete_topics([doomed])
    finally:
        admin.close()
    produce(broker, prefix, [(0, None, b"a%d" % i) for i in range(3, 6)])
    wait_until(lambda: recorded() == {(prefix, 0): 6}, 60, "a record without the deleted topic")
    wait_until(lambda: committed_offsets(broker, f"g-{prefix}", prefix, 1) == {0: 6}, 30,
               "the group's offset to move on")
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.log


def test_the_spout_creates_no_topic(broker, fifo, spouts):
    """A misspelt TOPIC, or a topic deleted while its partitions are still fetched: brokers
    create topics that a metadata request names, unless the client says not to."""
    import uuid

    from kafka import KafkaConsumer
    missing = f"t-missing-{uuid.uuid4().hex[:8]}"
    process = spouts(spout_env(broker, missing, fifo, MARKER="offsets",
                               KAFKA_METADATA_MAX_AGE_MS=500))
    wait_until(lambda: process.log.count("have no partitions yet; waiting") >= 2 or
               process.process.poll() is not None, 60, "the spout to wait for the topic")
    assert process.stop() == 0, process.log
    consumer = KafkaConsumer(bootstrap_servers=broker, allow_auto_create_topics=False)
    try:
        assert missing not in consumer.topics()
    finally:
        consumer.close()
