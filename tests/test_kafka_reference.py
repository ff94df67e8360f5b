"""What only Apache Kafka itself can show: group rebalances at scale, static membership,
pattern subscriptions, CreatePartitions, transactions, compaction, SASL/SCRAM over TLS,
a broker restart, and offsets deleted under a group. `make test-kafka` runs these.

Each test prints one line of what it measured (pytest -s, or -rA, shows it).
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (committed_offsets, create_topic, free_port, spout_commits, spout_env,
                      start_apache_kafka, wait_until)
from test_metrics import by_partition, healthz, metrics_env, scrape, serving, unhealthy

pytestmark = pytest.mark.kafka_reference


# --------------------------------------------------------------------------- delivery

@dataclass
class Output:
    """One spout's output repo as the delivery under test sees it."""
    env: dict
    reader: object = None
    label: str = ""

    def files(self) -> dict:
        return self.reader.snapshot()

    @property
    def writes(self) -> int:
        """Files written, replays included."""
        return self.reader.member_count


@pytest.fixture(params=["pipe"])
def outputs(request, tmp_path, readers):
    """Makes outputs for spouts. "pipe": the 1.x delivery, a real FIFO read by the reader
    double (g3, keeping the pipe open as the worker does). A 2.x delivery can be added as
    another param returning the same Output shape."""
    made: list[Output] = []

    def new(label: str = "out", overwrite: bool = True, marker: str | None = None) -> Output:
        folder = tmp_path / f"{label}-{len(made)}" / "pfs"
        folder.mkdir(parents=True)
        pipe = folder / "out"
        os.mkfifo(pipe)
        reader = readers(pipe, generation="g3", overwrite=overwrite, marker=marker,
                         keep_open=True)
        output = Output({"OUTPUT_PIPE": str(pipe)}, reader, label)
        made.append(output)
        return output

    assert request.param == "pipe"
    return new


# --------------------------------------------------------------------------- Kafka helpers

def topic_name(prefix: str = "r") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def read_all(bootstrap: str, topic: str, partitions: int,
             isolation: str = "read_committed", **security) -> dict:
    """Ground truth: {(partition, offset): record} up to each partition's end."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level=isolation, max_partition_fetch_bytes=4 << 20,
                             **security)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends = consumer.end_offsets(tps)  # right on Apache Kafka (the LSO under read_committed)
    found: dict = {}

    def done():
        for tp, records in consumer.poll(200).items():
            for record in records:
                found[(tp.partition, record.offset)] = record
        return all(consumer.position(tp) >= ends[tp] for tp in tps)
    try:
        wait_until(done, 60, f"{topic} to be read back")
    finally:
        consumer.close()
    return found


def files_of(topic: str, truth: dict) -> dict:
    return {f"/{topic}/{p}/{o:020d}": record.value for (p, o), record in truth.items()
            if record.value is not None}


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict:
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, messages) -> None:
    """messages: (partition, key, value), sent in order, flushed, every send checked."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        futures = [producer.send(topic, key=key, value=value, partition=partition)
                   for partition, key, value in messages]
        producer.flush(60)
        for future in futures:
            future.get(10)
    finally:
        producer.close()


class SteadyProducer(threading.Thread):
    """Produces at a steady rate, round-robin over the partitions, until stopped; the rate
    is load, not synchronisation. Counts what the broker acknowledged."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, rate: float):
        super().__init__(daemon=True)
        from kafka import KafkaProducer
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all",
                                      retries=1000, retry_backoff_ms=200,
                                      delivery_timeout_ms=120_000,
                                      reconnect_backoff_max_ms=1000)
        self.topic, self.partitions, self.interval = topic, partitions, 1 / rate
        self.sent = self.acked = self.failed = 0
        self.ack_times: list[float] = []  # time.monotonic() of each acknowledgement
        self._halt = threading.Event()

    def _on_ack(self, _metadata):
        self.acked += 1
        self.ack_times.append(time.monotonic())

    def _on_error(self, _error):
        self.failed += 1

    def run(self):
        next_send = time.monotonic()
        while not self._halt.is_set():
            value = b"m-%06d" % self.sent
            self.producer.send(self.topic, value=value, partition=self.sent % self.partitions
                               ).add_callback(self._on_ack).add_errback(self._on_error)
            self.sent += 1
            next_send += self.interval
            self._halt.wait(max(next_send - time.monotonic(), 0))

    def finish(self) -> None:
        self._halt.set()
        self.join(10)
        self.producer.flush(120)
        self.producer.close()


# --------------------------------------------------------------------------- spout logs

_EVENT = re.compile(r"kafka-spout: (assigned|revoked) (\[.*\])$")


def group_events(spout) -> list[tuple[str, set]]:
    events = []
    for line in spout.log.splitlines():
        match = _EVENT.search(line)
        if match:
            events.append((match.group(1), set(ast.literal_eval(match.group(2)))))
    return events


def owned(spout) -> set:
    """The partitions a group-mode spout holds now, from its assigned/revoked lines."""
    held: set = set()
    for kind, partitions in group_events(spout):
        held = set(partitions) if kind == "assigned" else held - partitions
    return held


def owners(members: dict) -> dict | None:
    """{partition: member} when the live members' holdings are a partition of the topic."""
    table: dict = {}
    for name, spout in members.items():
        for partition in owned(spout):
            if partition in table:
                return None
            table[partition] = name
    return table


def stop(*spouts, within: float = 10) -> None:
    """SIGTERM to all at once (one leaving alone would move the others' partitions), then
    a clean exit from each."""
    for spout in spouts:
        spout.signal(signal.SIGTERM)
    for spout in spouts:
        assert spout.wait(within) == 0, spout.log[-3000:]
        assert "Traceback" not in spout.log


def union_files(outputs: list[Output]) -> dict:
    merged: dict = {}
    for output in outputs:
        for name, data in output.files().items():
            assert merged.get(name, data) == data, f"{name} differs between repos"
            merged[name] = data
    return merged


# --------------------------------------------------------------------------- group mode

def test_group_of_three_then_four_under_steady_production(apache_kafka, spouts, outputs):
    """Three spouts on six partitions; one stops, comes back, a fourth joins: partitions
    move, every message lands, none lost, replays rewrite the same bytes (overwrite)."""
    bootstrap, partitions = apache_kafka.bootstrap, 6
    topic = create_topic(bootstrap, partitions)
    group = f"g-{topic}"
    repos = {name: outputs(name) for name in "abcd"}

    def start(name):
        return spouts(spout_env(bootstrap, topic, None, GROUP_ID=group, LOG_LEVEL="INFO",
                                BATCH_MAX_MESSAGES=200, **repos[name].env))

    def flowing(more: int = 400):
        """Waits for `more` new files: production goes on between the phases."""
        now = len(union_files(list(repos.values())))
        wait_until(lambda: len(union_files(list(repos.values()))) >= now + more, 60,
                   f"{more} more messages")

    def settled(expected_members: set):
        table = owners({n: members[n] for n in expected_members})
        return table if table and len(table) == partitions and \
            set(table.values()) == expected_members else None

    producer = SteadyProducer(bootstrap, topic, partitions, rate=400)
    producer.start()
    started = time.monotonic()
    members = {name: start(name) for name in "abc"}
    phases = [wait_until(lambda: settled({"a", "b", "c"}), 60, "three members to settle")]
    wait_until(lambda: all(repos[n].files() for n in "abc"), 30, "all three to deliver")
    flowing()
    stop(members.pop("b"))
    phases.append(wait_until(lambda: settled({"a", "c"}), 60, "a and c to take b's share"))
    flowing()
    members["b"] = start("b")
    phases.append(wait_until(lambda: settled({"a", "b", "c"}), 60, "b to get a share back"))
    flowing()
    members["d"] = start("d")
    phases.append(wait_until(lambda: settled({"a", "b", "c", "d"}), 60, "d to get a share"))
    wait_until(lambda: repos["d"].files(), 30, "d to deliver")
    flowing()

    producer.finish()
    assert producer.failed == 0
    truth = files_of(topic, read_all(bootstrap, topic, partitions))
    assert len(truth) == producer.acked == producer.sent
    wait_until(lambda: len(union_files(list(repos.values()))) >= len(truth), 120,
               "every message in some repo")
    stop(*members.values())
    elapsed = time.monotonic() - started
    landed = union_files(list(repos.values()))
    lost = set(truth) - set(landed)
    wrong = [name for name in landed if truth.get(name) != landed[name]]
    writes = sum(repo.writes for repo in repos.values())
    moves = sum(1 for before, after in zip(phases, phases[1:]) for p in before
                if before[p] != after[p])
    offsets = committed_offsets(bootstrap, group, topic, partitions)
    ends = end_offsets(bootstrap, topic, partitions)
    behind = sum(ends[p] - (offsets[p] or 0) for p in range(partitions))
    print(f"\ngroup at scale: messages={len(truth)} in {elapsed:.0f}s at 400/s, rebalances="
          f"{len(phases) - 1}, partition moves={moves}, writes={writes} "
          f"(replayed {writes - len(truth)}), lost={len(lost)}, wrong={len(wrong)}; "
          f"group offsets behind the end after the stop: {behind}")
    assert not lost and not wrong
    assert landed == truth
    assert moves >= 4  # b's two partitions leave, come back, and d takes some
    assert all(offsets[p] is not None and offsets[p] <= ends[p] for p in range(partitions))


def test_static_member_restarted_gets_its_partitions_back_without_a_rebalance(
        apache_kafka, spouts, outputs):
    bootstrap, partitions = apache_kafka.bootstrap, 6
    topic = create_topic(bootstrap, partitions)
    group = f"g-{topic}"
    repos = {name: outputs(name) for name in "ab"}

    def start(name):
        return spouts(spout_env(bootstrap, topic, None, GROUP_ID=group, LOG_LEVEL="INFO",
                                GROUP_INSTANCE_ID=f"spout-{name}",
                                # the restart must come within the session timeout
                                KAFKA_SESSION_TIMEOUT_MS=30_000,
                                KAFKA_HEARTBEAT_INTERVAL_MS=1000,
                                KAFKA_MAX_POLL_INTERVAL_MS=30_000, **repos[name].env))

    first = [(i % partitions, None, b"first-%d" % i) for i in range(600)]
    produce(bootstrap, topic, first)
    members = {"a": start("a")}
    wait_until(lambda: len(owned(members["a"])) == partitions, 60, "a to hold everything")
    members["b"] = start("b")
    table = wait_until(lambda: (t := owners(members)) and len(t) == partitions and
                       set(t.values()) == {"a", "b"} and t, 60, "a and b to share")
    wait_until(lambda: len(union_files(list(repos.values()))) >= len(first), 60, "first part")
    held_by_a = owned(members["a"])
    b_events = len(group_events(members["b"]))

    stop(members["a"])  # a static member sends no LeaveGroup: its partitions wait for it
    second = [(i % partitions, None, b"second-%d" % i) for i in range(600)]
    produce(bootstrap, topic, second)
    restarted = time.monotonic()
    members["a"] = start("a")
    wait_until(lambda: owned(members["a"]), 30, "the restarted a to be assigned")
    back_after = time.monotonic() - restarted
    truth = files_of(topic, read_all(bootstrap, topic, partitions))
    wait_until(lambda: len(union_files(list(repos.values()))) >= len(truth), 60,
               "the messages produced while a was away")
    # Before stopping: a spout that stops logs its partitions as revoked.
    new_b_events = group_events(members["b"])[b_events:]
    held_again, table_again = owned(members["a"]), owners(members)
    stop(*members.values())
    print(f"\nstatic membership: a held {len(held_by_a)} partitions, was assigned again "
          f"{back_after:.2f}s after its restart, same partitions: {held_again == held_by_a}; "
          f"b's assignment changes meanwhile: {len(new_b_events)}; messages={len(truth)}")
    assert held_again == held_by_a
    assert new_b_events == [], new_b_events
    assert table_again == table
    assert union_files(list(repos.values())) == truth


def test_pattern_subscription_in_group_mode_picks_up_a_new_topic(apache_kafka, spouts,
                                                                 outputs):
    bootstrap = apache_kafka.bootstrap
    prefix = topic_name("pat")
    first = create_topic(bootstrap, 2, name=f"{prefix}-one")
    repo = outputs("pattern")
    env = spout_env(bootstrap, "unused", None, TOPIC_PATTERN=f"{re.escape(prefix)}-.*",
                    GROUP_ID=f"g-{prefix}", KAFKA_METADATA_MAX_AGE_MS=1000, **repo.env)
    del env["TOPIC"]
    spout = spouts(env)
    produce(bootstrap, first, [(p, None, b"one-%d" % p) for p in range(2)])
    wait_until(lambda: len(repo.files()) >= 2, 60, "the first topic")
    created = time.monotonic()
    later = create_topic(bootstrap, 2, name=f"{prefix}-two")
    create_topic(bootstrap, 1, name=f"other-{prefix}")  # matches only as a substring
    produce(bootstrap, later, [(p, None, b"two-%d" % p) for p in range(2)])
    wait_until(lambda: len(repo.files()) >= 4, 60, "the topic created while running")
    picked_up = time.monotonic() - created
    stop(spout)
    print(f"\npattern subscription: new topic picked up and delivered {picked_up:.1f}s "
          "after it was created")
    assert repo.files() == {f"/{t}/{p}/{0:020d}": b"%s-%d" % (word, p)
                            for t, word in ((first, b"one"), (later, b"two")) for p in range(2)}


@pytest.mark.parametrize("mode", ["marker", "group"])
def test_partitions_added_while_running_are_consumed(mode, apache_kafka, spouts, outputs):
    from kafka import KafkaAdminClient
    from kafka.admin import NewPartitions
    bootstrap = apache_kafka.bootstrap
    topic = create_topic(bootstrap, 2)
    marker = "offsets" if mode == "marker" else None
    # Marker mode: append semantics, so a message written twice would double its file.
    repo = outputs(mode, overwrite=marker is None, marker=marker)
    extra = {"MARKER": marker} if marker else {}
    spout = spouts(spout_env(bootstrap, topic, None, KAFKA_METADATA_MAX_AGE_MS=1000,
                             **extra, **repo.env))
    produce(bootstrap, topic, [(p, None, b"before-%d-%d" % (p, i)) for i in range(20)
                               for p in range(2)])
    wait_until(lambda: len(repo.files()) >= 40, 60, "the first two partitions")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_partitions({topic: NewPartitions(total_count=4)})
    finally:
        admin.close()
    added = time.monotonic()
    produce(bootstrap, topic, [(p, None, b"after-%d-%d" % (p, i)) for i in range(20)
                               for p in range(4)])
    truth = files_of(topic, read_all(bootstrap, topic, 4))
    wait_until(lambda: len(repo.files()) >= len(truth), 90, "the added partitions")
    took = time.monotonic() - added
    stop(spout)
    print(f"\nCreatePartitions ({mode}): 2 -> 4 partitions, {len(truth)} messages, the new "
          f"partitions' messages landed {took:.1f}s after the partitions were added, "
          f"files written {repo.writes} (marker included in marker mode)")
    assert repo.files() == truth
    if marker:
        import spout as spout_module
        _topics, positions = spout_module.decode_marker(
            (Path(repo.env["OUTPUT_PIPE"]).parent / marker).read_bytes())
        assert positions == {(topic, 0): 40, (topic, 1): 40, (topic, 2): 20, (topic, 3): 20}
    else:
        assert committed_offsets(bootstrap, f"g-{topic}", topic, 4) == {0: 40, 1: 40, 2: 20, 3: 20}


# --------------------------------------------------------------------------- transactions

def test_transactions_deliver_committed_records_only(apache_kafka, spouts, outputs):
    """Batches alternately committed and aborted, interleaved with plain records: the spout
    (read_committed by default) delivers the committed ones only; control records and the
    offset gaps they leave stall no partition; commits record the next offset to read."""
    from kafka import KafkaProducer
    bootstrap, partitions = apache_kafka.bootstrap, 3
    topic = create_topic(bootstrap, partitions)
    transactional = KafkaProducer(bootstrap_servers=bootstrap,
                                  transactional_id=f"tx-{topic}")
    plain = KafkaProducer(bootstrap_servers=bootstrap)
    transactional.init_transactions()
    fates = []
    try:
        for batch in range(12):
            fate = "abort" if batch % 3 == 1 else "commit"
            transactional.begin_transaction()
            for i in range(30):
                transactional.send(topic, value=b"%s-%d-%d" % (fate.encode(), batch, i),
                                   partition=i % partitions)
            transactional.flush()
            if batch % 4 == 0:  # a non-transactional record in the middle of it
                plain.send(topic, value=b"plain-%d" % batch, partition=batch % partitions)
                plain.flush()
            if fate == "abort":
                transactional.abort_transaction()
            else:
                transactional.commit_transaction()
            fates.append(fate)
    finally:
        transactional.close()
        plain.close()
    truth = files_of(topic, read_all(bootstrap, topic, partitions))
    everything = read_all(bootstrap, topic, partitions, isolation="read_uncommitted")
    aborted = {record.value for record in everything.values()
               if record.value.startswith(b"abort")}
    ends = end_offsets(bootstrap, topic, partitions)

    committed_repo, uncommitted_repo = outputs("committed"), outputs("uncommitted")
    port = free_port()
    spout = spouts(spout_env(bootstrap, topic, None, HEALTH_MAX_DELIVERY_SECONDS=HEALTH_MAX,
                             **metrics_env(port), **committed_repo.env))
    # The same topic read_uncommitted shows the aborted records are there to be seen.
    control = spouts(spout_env(bootstrap, topic, None, GROUP_ID=f"u-{topic}",
                               KAFKA_ISOLATION_LEVEL="read_uncommitted",
                               **uncommitted_repo.env))
    wait_until(lambda: len(committed_repo.files()) >= len(truth), 60, "the committed records")
    wait_until(lambda: len(uncommitted_repo.files()) >= len(everything), 60,
               "every record, read_uncommitted")
    health = stays_healthy(port, 2 * HEALTH_MAX)
    stop(spout)
    stop(control)
    files = committed_repo.files()
    delivered_aborted = [v for v in files.values() if v.startswith(b"abort")]
    offsets = committed_offsets(bootstrap, f"g-{topic}", topic, partitions)
    last_data = {p: max(o for (q, o) in truth_offsets(truth) if q == p) for p in range(3)}
    final_lag = re.findall(r"stopped; .* lag=(\S+)", spout.log)
    print(f"\ntransactions: {fates.count('commit')} committed and {fates.count('abort')} "
          f"aborted batches; records in the log {len(everything)} (offsets up to "
          f"{ends}, control records fill the rest); delivered {len(files)} = committed "
          f"{len(truth)}; aborted delivered {len(delivered_aborted)} (read_uncommitted saw "
          f"{len(aborted)}); group offsets {offsets}, lag at stop {final_lag}; /healthz "
          f"while idle {health}")
    assert files == truth
    assert not delivered_aborted
    assert aborted and aborted <= set(uncommitted_repo.files().values())
    # The last record of each partition is followed by its commit marker, which the group's
    # offset passes too (at exit the newest archive, read to its end, is held).
    assert all(ends[p] == last_data[p] + 2 for p in range(3))
    assert offsets == ends
    assert final_lag == ["0"]
    assert not health["waiting"]


def truth_offsets(truth: dict):
    for name in truth:
        _topic, partition, offset = name.strip("/").rsplit("/", 2)
        yield int(partition), int(offset)


def test_transactions_through_pachd_record_offsets_past_control_records(apache_kafka,
                                                                         spouts, tmp_path):
    """The 2.x delivery on a transactional topic: committed records only, one commit record
    whose offsets a restart resumes from exactly, across the gaps control records leave."""
    import spout as spout_module
    from kafka import KafkaProducer
    from pachd_double import PachdDouble
    bootstrap, partitions = apache_kafka.bootstrap, 3
    topic = create_topic(bootstrap, partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
    producer.init_transactions()

    def transaction(label: bytes, commit: bool) -> None:
        producer.begin_transaction()
        for i in range(30):
            producer.send(topic, value=b"%s-%d" % (label, i), partition=i % partitions)
        producer.flush()
        producer.commit_transaction() if commit else producer.abort_transaction()

    pachd = PachdDouble().start()
    pachd.create_pipeline_repo("out")
    port = free_port()
    env = spout_env(bootstrap, topic, tmp_path / "no-pipe", DELIVERY="pfs",
                    PACHD_ADDRESS=pachd.address, OUTPUT_REPO="default/out",
                    HEALTH_MAX_DELIVERY_SECONDS=HEALTH_MAX, **metrics_env(port))
    try:
        for number in range(4):
            transaction(b"first-%d" % number, commit=number != 1)
        truth = files_of(topic, read_all(bootstrap, topic, partitions))
        first_ends = end_offsets(bootstrap, topic, partitions)
        first = spouts(env)
        wait_until(lambda: pachd.file_count("out") >= len(truth), 60, "the committed records")
        wait_until(lambda: idle_figures(bootstrap, topic, port, first_ends), 15,
                   "the group's offsets, lag and delivered offsets at the ends", interval=0.2)
        stays_healthy(port, 2 * HEALTH_MAX)
        stop(first)
        for number in range(4):
            transaction(b"later-%d" % number, commit=number != 2)
        truth = files_of(topic, read_all(bootstrap, topic, partitions))
        ends = end_offsets(bootstrap, topic, partitions)
        second = spouts(env)
        wait_until(lambda: pachd.file_count("out") >= len(truth), 60, "the later records")
        figures = wait_until(lambda: idle_figures(bootstrap, topic, port, ends), 15,
                             "the group's offsets, lag and delivered offsets at the ends",
                             interval=0.2)
        health = stays_healthy(port, 2 * HEALTH_MAX)
        stop(second)
        group = committed_offsets(bootstrap, f"g-{topic}", topic, partitions)
        head = pachd.head("out")
        _, positions = spout_module.record_from_description(head.description)
        writes = sum(len(c.changed) for c in pachd.commits("out"))
    finally:
        producer.close()
        pachd.stop()
    print(f"\ntransactions through pachd: {len(truth)} committed records in "
          f"{len(pachd.commits('out')) - 1} commits, {writes} files written, record "
          f"{ {p: positions[(topic, p)] for p in range(partitions)} } against ends {ends}; "
          f"idle: {figures}, /healthz {health}; group offsets after stop {group}")
    assert head.files == truth
    assert not [v for v in head.files.values() if v.startswith((b"first-1-", b"later-2-"))]
    assert writes == len(truth)  # nothing written twice across the restart
    last_data = {p: max(o for (q, o) in truth_offsets(truth) if q == p) for p in range(3)}
    for p in range(partitions):
        assert last_data[p] < positions[(topic, p)] <= ends[p]
    assert group == ends
    assert not health["waiting"]


# --------------------------------------------------------------------------- transactions, idle

# HEALTH_MAX_DELIVERY_SECONDS in these tests: a stall fails /healthz within seconds.
HEALTH_MAX = 1


def write_transactions(bootstrap: str, topic: str, partitions: int, fates: str,
                       per_partition: int = 10) -> None:
    """One transaction per letter of fates (c: committed, a: aborted), each with
    per_partition records on every partition."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
    producer.init_transactions()
    try:
        for number, fate in enumerate(fates):
            producer.begin_transaction()
            for i in range(per_partition * partitions):
                producer.send(topic, value=b"%s-%d-%d" % (fate.encode(), number, i),
                              partition=i % partitions)
            producer.flush()
            producer.commit_transaction() if fate == "c" else producer.abort_transaction()
    finally:
        producer.close()


def idle_figures(bootstrap: str, topic: str, port: int, ends: dict) -> dict | None:
    """The group's offsets, the delivered offsets and the lag, once all three show the end
    of every partition (offsets at the ends, lag 0); None before."""
    group = committed_offsets(bootstrap, f"g-{topic}", topic, len(ends))
    samples = scrape(port)
    delivered = by_partition(samples, "kafka_spout_delivered_offset", topic)
    lag = by_partition(samples, "kafka_spout_consumer_lag", topic)
    if group == ends and delivered == ends and lag == {p: 0 for p in ends}:
        return {"group": group, "delivered": {p: int(o) for p, o in delivered.items()},
                "lag": {p: int(v) for p, v in lag.items()}}
    return None


def stays_healthy(port: int, seconds: float) -> dict:
    """Asks /healthz for `seconds` (longer than HEALTH_MAX_DELIVERY_SECONDS), failing on any
    answer but 200; returns the last body."""
    until = time.monotonic() + seconds
    while True:
        status, body = healthz(port)
        assert status == 200, body
        if time.monotonic() >= until:
            return body
        time.sleep(0.1)  # the pace of the probe, not synchronisation


@pytest.mark.parametrize("mode", ["exactly-once", "group"])
def test_an_idle_transactional_topic_is_caught_up_through_pachd(mode, apache_kafka, spouts,
                                                               tmp_path):
    """Every partition ends with an aborted transaction and its markers. Once idle, the
    group's offsets reach the end offsets, the lag is 0 and /healthz stays 200 past
    HEALTH_MAX_DELIVERY_SECONDS, with no commit made for it: the record trails by the
    markers. A restart (group mode: paused until the record is weighed against the group's
    offset) writes nothing and shows the same."""
    import spout as spout_module
    from pachd_double import PachdDouble
    bootstrap, partitions = apache_kafka.bootstrap, 3
    topic = create_topic(bootstrap, partitions)
    write_transactions(bootstrap, topic, partitions, "cacca")
    truth = files_of(topic, read_all(bootstrap, topic, partitions))
    ends = end_offsets(bootstrap, topic, partitions)
    last_data = {p: max(o for (q, o) in truth_offsets(truth) if q == p)
                 for p in range(partitions)}
    # After the last committed record: its commit marker, 10 aborted records, their marker.
    assert all(ends[p] == last_data[p] + 13 for p in range(partitions))
    pachd = PachdDouble().start()
    pachd.create_pipeline_repo("out")
    port = free_port()
    env = spout_env(bootstrap, topic, tmp_path / "no-pipe", DELIVERY="pfs", MODE=mode,
                    PACHD_ADDRESS=pachd.address, OUTPUT_REPO="default/out",
                    HEALTH_MAX_DELIVERY_SECONDS=HEALTH_MAX, **metrics_env(port))
    try:
        first = spouts(env)
        wait_until(lambda: pachd.file_count("out") >= len(truth), 60, "the committed records")
        delivered_at = time.monotonic()
        figures = wait_until(lambda: idle_figures(bootstrap, topic, port, ends), 15,
                             "the group's offsets, lag and delivered offsets at the ends",
                             interval=0.2)
        took = time.monotonic() - delivered_at
        health = stays_healthy(port, 2 * HEALTH_MAX)
        stop(first)
        commits = spout_commits(pachd)
        head = pachd.head("out")
        _, record = spout_module.record_from_description(head.description)

        second = spouts(env)
        wait_until(lambda: serving(port) or second.process.poll() is not None, 20,
                   "the restarted spout's server")
        again = wait_until(lambda: idle_figures(bootstrap, topic, port, ends), 15,
                           "the restarted spout at the ends", interval=0.2)
        health_again = stays_healthy(port, 2 * HEALTH_MAX)
        stop(second)
        after_restart = spout_commits(pachd)
    finally:
        pachd.stop()
    record = {p: record[(topic, p)] for p in range(partitions)}
    print(f"\nidle transactional topic through pachd, {mode}: ends {ends}, last records "
          f"{last_data}; {took:.1f}s after the last file: {figures}; /healthz {health}; "
          f"{len(commits)} commits, record {record}; after a restart: {again}, "
          f"{len(after_restart) - len(commits)} new commits, /healthz {health_again}")
    assert head.files == truth
    assert all(commit.changed for commit in commits)  # no commit without data
    assert all(last_data[p] < record[p] < ends[p] for p in range(partitions))
    assert not health["waiting"] and not health_again["waiting"]
    assert [c.id for c in after_restart] == [c.id for c in commits]


def test_an_idle_transactional_topic_is_caught_up_in_marker_mode(apache_kafka, spouts,
                                                                outputs):
    """1.x with a marker: the newest archive is held only once the reader moves on, so the
    group's offsets reach the ends at exit; while idle /healthz stays 200. A restart from
    the marker (which trails by the markers) writes nothing, and shows the group's offsets
    at the ends and lag 0."""
    bootstrap, partitions = apache_kafka.bootstrap, 3
    topic = create_topic(bootstrap, partitions)
    write_transactions(bootstrap, topic, partitions, "cacca")
    truth = files_of(topic, read_all(bootstrap, topic, partitions))
    ends = end_offsets(bootstrap, topic, partitions)
    last_data = {p: max(o for (q, o) in truth_offsets(truth) if q == p)
                 for p in range(partitions)}
    repo = outputs("marker", marker="offsets")
    marker_path = Path(repo.env["OUTPUT_PIPE"]).parent / "offsets"
    port = free_port()
    env = spout_env(bootstrap, topic, None, MARKER="offsets",
                    HEALTH_MAX_DELIVERY_SECONDS=HEALTH_MAX, **metrics_env(port), **repo.env)
    first = spouts(env)
    wait_until(lambda: repo.files() == truth, 60, "the committed records")
    health = stays_healthy(port, 2 * HEALTH_MAX)
    idle_group = committed_offsets(bootstrap, f"g-{topic}", topic, partitions)
    stop(first)
    group = committed_offsets(bootstrap, f"g-{topic}", topic, partitions)
    import spout as spout_module
    _, marker = spout_module.decode_marker(marker_path.read_bytes())
    marker = {p: marker[(topic, p)] for p in range(partitions)}
    archives = len(repo.reader.commits)

    second = spouts(env)
    wait_until(lambda: serving(port) or second.process.poll() is not None, 20,
               "the restarted spout's server")
    again = wait_until(lambda: idle_figures(bootstrap, topic, port, ends), 15,
                       "the restarted spout at the ends", interval=0.2)
    health_again = stays_healthy(port, 2 * HEALTH_MAX)
    stop(second)
    print(f"\nidle transactional topic, marker mode: ends {ends}, last records {last_data}; "
          f"while idle /healthz {health}, group offsets {idle_group}; at exit {group}; "
          f"marker {marker}; after a restart from it: {again}, "
          f"{len(repo.reader.commits) - archives} new archives, /healthz {health_again}")
    assert repo.files() == truth
    assert not health["waiting"] and not health_again["waiting"]
    assert group == ends
    assert all(last_data[p] < marker[p] < ends[p] for p in range(partitions))
    assert len(repo.reader.commits) == archives
    assert spout_module.decode_marker(marker_path.read_bytes())[1][(topic, 0)] == marker[0]


def test_a_transaction_left_open_counts_as_messages_waiting(apache_kafka, spouts, tmp_path):
    """kafka-python 3.0.12 keeps no last stable offset: records of a transaction left open
    are lag, and /healthz fails once they wait past HEALTH_MAX_DELIVERY_SECONDS; the
    group's offsets stand at the open transaction's first record. Committed, it is
    delivered and all is back at the ends."""
    from kafka import KafkaProducer
    from pachd_double import PachdDouble
    bootstrap, partitions = apache_kafka.bootstrap, 3
    topic = create_topic(bootstrap, partitions)
    write_transactions(bootstrap, topic, partitions, "ca")
    stable = end_offsets(bootstrap, topic, partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"open-{topic}")
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(5 * partitions):
        producer.send(topic, value=b"open-%d" % i, partition=i % partitions)
    producer.flush()
    pachd = PachdDouble().start()
    pachd.create_pipeline_repo("out")
    port = free_port()
    env = spout_env(bootstrap, topic, tmp_path / "no-pipe", DELIVERY="pfs",
                    PACHD_ADDRESS=pachd.address, OUTPUT_REPO="default/out",
                    HEALTH_MAX_DELIVERY_SECONDS=HEALTH_MAX, **metrics_env(port))
    try:
        spout = spouts(env)
        wait_until(lambda: pachd.file_count("out") >= 10 * partitions, 60,
                   "the committed records")
        delivered_at = time.monotonic()
        body = wait_until(lambda: unhealthy(port, spout, "while messages wait"), 20,
                          "/healthz to count the open transaction as waiting")
        failed_after = time.monotonic() - delivered_at
        samples = scrape(port)
        lag = by_partition(samples, "kafka_spout_consumer_lag", topic)
        delivered = by_partition(samples, "kafka_spout_delivered_offset", topic)
        group = wait_until(lambda: (lambda offsets: offsets if offsets == stable else None)(
            committed_offsets(bootstrap, f"g-{topic}", topic, partitions)), 10,
            "the group's offsets at the open transaction", interval=0.2)
        producer.commit_transaction()
        ends = end_offsets(bootstrap, topic, partitions)
        wait_until(lambda: pachd.file_count("out") >= 15 * partitions, 60,
                   "the records of the transaction once committed")
        figures = wait_until(lambda: idle_figures(bootstrap, topic, port, ends), 15,
                             "the group's offsets, lag and delivered offsets at the ends",
                             interval=0.2)
        health = stays_healthy(port, 2 * HEALTH_MAX)
        stop(spout)
    finally:
        producer.close()
        pachd.stop()
    print(f"\na transaction left open: stable up to {stable}; /healthz 503 "
          f"{failed_after:.1f}s after the last file: {body['reasons']}; lag {lag}, "
          f"delivered {delivered}, group {group}; committed: {figures}, /healthz {health}")
    assert lag == {p: 5 for p in range(partitions)}
    assert delivered == stable and group == stable
    assert not health["waiting"]


# --------------------------------------------------------------------------- compaction

def test_compacted_topic_ends_as_the_latest_value_per_key(apache_kafka, spouts, outputs):
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    bootstrap = apache_kafka.bootstrap
    topic = topic_name("compact")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={
            "cleanup.policy": "compact", "segment.ms": "100",
            "min.cleanable.dirty.ratio": "0.001", "min.compaction.lag.ms": "0",
            "delete.retention.ms": "86400000"})])
    finally:
        admin.close()
    keys = [b"key-%02d" % k for k in range(20)]
    latest: dict = {}
    written = [0]

    def write(pairs):
        produce(bootstrap, topic, [(0, key, value) for key, value in pairs])
        latest.update(pairs)
        written[0] += len(pairs)

    for round_ in range(5):
        write([(key, b"v%d-%s" % (round_, key)) for key in keys])
    write([(key, None) for key in keys[:5]])  # tombstones
    produced = 5 * len(keys) + 5

    def compacted():
        time.sleep(0.2)  # segment.ms: the next record rolls the segment the cleaner can take
        write([(keys[-1], b"roll-%f" % time.time())])
        return len(read_all(bootstrap, topic, 1)) < produced / 2
    wait_until(compacted, 60, "the log cleaner to compact the topic", interval=0.5)
    in_log = len(read_all(bootstrap, topic, 1))
    produced_before = written[0]

    repo = outputs("compact")
    spout = spouts(spout_env(bootstrap, topic, None, NAME_TEMPLATE="{topic}/{key}",
                             FORMAT="json", TOMBSTONES="keep", **repo.env))

    def repo_values():
        return {name: json.loads(data)["value"] for name, data in repo.files().items()}

    def expected():
        return {f"/{topic}/{key.decode()}": None if value is None else value.decode()
                for key, value in latest.items()}
    wait_until(lambda: repo_values() == expected(), 60, "the compacted state")
    # While running: overwrite some keys, delete others, bring a deleted one back.
    write([(key, b"late-%s" % key) for key in keys[5:10]])
    write([(key, None) for key in keys[10:13]])
    write([(keys[0], b"back-" + keys[0])])
    wait_until(lambda: repo_values() == expected(), 60, "the later overwrites and deletions")
    stop(spout)
    values = repo_values()
    print(f"\ncompaction: {len(keys)} keys, {produced_before} records produced, {in_log} "
          f"left in the log after compaction before the spout started; repo holds "
          f"{len(values)} files: {sum(v is not None for v in values.values())} values, "
          f"{sum(v is None for v in values.values())} deleted (null); {written[0]} "
          "records produced in all")
    assert values == expected()
    assert in_log < produced / 2


# --------------------------------------------------------------------------- security

def sasl_env(node, password_file: Path) -> dict:
    return {"BOOTSTRAP_SERVERS": node.sasl_bootstrap, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_PLAIN_USERNAME": "spout",
            "KAFKA_SASL_PLAIN_PASSWORD_FILE": str(password_file),
            "KAFKA_SSL_CAFILE": str(node.ca.ca_file)}


def test_scram_over_tls_with_the_password_from_a_file(apache_kafka, spouts, outputs,
                                                       tmp_path):
    node = apache_kafka
    topic = create_topic(node.bootstrap, 3)
    password_file = tmp_path / "password"
    password_file.write_text(node.scram_password + "\n")
    messages = [(i % 3, None, b"secure-%d" % i) for i in range(90)]
    produce(node.bootstrap, topic, messages)
    truth = files_of(topic, read_all(node.bootstrap, topic, 3))
    repo = outputs("secure")
    spout = spouts(spout_env(node.bootstrap, topic, None, **repo.env,
                             **sasl_env(node, password_file)))
    wait_until(lambda: len(repo.files()) >= len(truth), 60, "the messages over SASL_SSL")
    stop(spout)
    assert repo.files() == truth
    assert node.scram_password not in spout.log
    assert "'sasl_plain_password': '***'" in spout.log
    print(f"\nSASL_SSL: {len(truth)} messages over SCRAM-SHA-512/TLS with the test CA; "
          "password absent from the DEBUG log")


def test_a_wrong_password_says_why_and_never_logs_it(apache_kafka, spouts, tmp_path):
    node = apache_kafka
    topic = create_topic(node.bootstrap, 1)
    wrong = f"wrong-{uuid.uuid4().hex}"
    password_file = tmp_path / "password"
    password_file.write_text(wrong)
    pipe = tmp_path / "out"
    os.mkfifo(pipe)
    started = time.monotonic()
    spout = spouts(spout_env(node.bootstrap, topic, pipe, **sasl_env(node, password_file)))

    def said_why():
        return [line.split("kafka-spout: ")[1] for line in spout.log.splitlines()
                if "kafka-spout: " in line and "SASL authentication" in line]
    wait_until(said_why, 30, "the spout to say the authentication failed")
    said_after = time.monotonic() - started
    exited = spout.process.poll()
    if exited is None:  # a retry loop, then: it must say why again, and stop on SIGTERM
        wait_until(lambda: len(said_why()) >= 2 or spout.process.poll() is not None, 30,
                   "the second attempt")
        exited = spout.process.poll()
    lines = said_why()
    if exited is None:
        stop(spout)
    print(f"\nwrong password: said after {said_after:.1f}s: {lines[0]!r}; "
          f"{'exited ' + str(exited) if exited is not None else f'{len(lines)} attempts'}")
    assert wrong not in spout.log and node.scram_password not in spout.log
    assert all(f"Kafka at {node.sasl_bootstrap} refused this spout in SASL authentication "
               "(SCRAM-SHA-512): the username or password is probably wrong" in line
               for line in lines)
    assert exited is None or exited != 0
    assert "cannot reach" not in spout.log  # the cause is named, not a vague outage


# --------------------------------------------------------------------------- broker restart

def test_the_broker_restarted_mid_stream_loses_nothing(spouts, outputs):
    node = start_apache_kafka("kafka-restart")
    try:
        partitions = 3
        topic = create_topic(node.bootstrap, partitions)
        repo = outputs("restart")
        spout = spouts(spout_env(node.bootstrap, topic, None, **repo.env))
        producer = SteadyProducer(node.bootstrap, topic, partitions, rate=300)
        producer.start()
        wait_until(lambda: len(repo.files()) >= 500, 60, "the stream to flow")
        stopped = time.monotonic()
        node.stop(hard=True)  # a crash: SIGKILL, no clean shutdown
        time.sleep(3)  # the outage itself
        startup = node.start()
        back = time.monotonic()
        outage = back - stopped
        acked_at_restart, files_at_restart = producer.acked, len(repo.files())
        resumed = wait_until(lambda: len(repo.files()) > files_at_restart and
                             time.monotonic(), 120, "delivery to resume")
        acked_at_resume = producer.acked
        wait_until(lambda: len(repo.files()) > files_at_restart + 300, 120,
                   "300 more messages")
        producer.finish()
        first_ack = min(t for t in producer.ack_times if t >= back)
        truth = files_of(topic, read_all(node.bootstrap, topic, partitions))
        wait_until(lambda: len(repo.files()) >= len(truth), 120, "every message")
        stop(spout)
        files = repo.files()
        lost = set(truth) - set(files)
        print(f"\nbroker restart: {len(truth)} messages ({producer.sent} sent, "
              f"{producer.failed} failed sends), outage {outage:.1f}s (restart "
              f"{startup:.1f}s); after the broker was back: the producer's first ack "
              f"{first_ack - back:.1f}s, the spout's first new file {resumed - back:.1f}s, "
              f"lost={len(lost)}, writes={repo.writes}; producer acks at restart "
              f"{acked_at_restart}, at resume {acked_at_resume}")
        assert files == truth and not lost
        assert spout.process.returncode == 0
        assert committed_offsets(node.bootstrap, f"g-{topic}", topic, partitions) == end_offsets(
            node.bootstrap, topic, partitions)
    finally:
        node.remove()


# --------------------------------------------------------------------------- retention

@pytest.mark.parametrize("removal", ["retention", "delete_records"])
def test_a_committed_offset_deleted_under_the_group_restarts_from_the_reset_with_a_warning(
        removal, apache_kafka, spouts, outputs):
    """retention: the broker's own retention (retention.ms=1000) deletes the segments the
    group's offsets point into; delete_records: DeleteRecords moves one partition's start."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.admin import ConfigResource, NewTopic
    from kafka.structs import OffsetAndMetadata
    bootstrap, partitions = apache_kafka.bootstrap, 3
    topic = topic_name("gone")
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        configs = {"retention.ms": "1000", "segment.ms": "100"} if removal == "retention" \
            else {}
        admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=configs)])
        produce(bootstrap, topic, [(p, None, b"%d-%d" % (p, i)) for i in range(100)
                                   for p in range(partitions)])
        group = f"g-{topic}"
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                 enable_auto_commit=False)
        consumer.commit({tp: OffsetAndMetadata(10, "", -1) for tp in tps})
        if removal == "delete_records":
            admin.delete_records({tps[0]: 60})
        else:
            def deleted():
                time.sleep(0.2)  # segment.ms: the next record rolls a segment retention takes
                produce(bootstrap, topic, [(p, None, b"roll") for p in range(partitions)])
                return all(o > 10 for o in consumer.beginning_offsets(tps).values())
            wait_until(deleted, 60, "retention to delete the old segments", interval=0.5)
            # What is left stays while the spout reads it.
            admin.alter_configs([ConfigResource("TOPIC", topic, {"retention.ms": "-1"})])
        consumer.close(autocommit=False)
    finally:
        admin.close()
    produce(bootstrap, topic, [(p, None, b"after-%d-%d" % (p, i)) for i in range(20)
                               for p in range(partitions)])
    truth = read_all(bootstrap, topic, partitions)
    log_start = {p: min(o for (q, o) in truth if q == p) for p in range(partitions)}
    resumes = {p: max(log_start[p], 10) for p in range(partitions)}
    expected = {f"/{topic}/{p}/{o:020d}": record.value for (p, o), record in truth.items()
                if o >= resumes[p]}
    repo = outputs("reset")
    spout = spouts(spout_env(bootstrap, topic, None, LOG_LEVEL="INFO", **repo.env))
    wait_until(lambda: len(repo.files()) >= len(expected), 60, "the remaining messages")
    stop(spout)
    warnings = sorted(line.split("kafka-spout: ")[1] for line in spout.log.splitlines()
                      if " WARNING kafka-spout: " in line and "out of range" in line)
    print(f"\noffsets out of range ({removal}): group at 10, log now starts at {log_start}; "
          f"{len(repo.files())} delivered; warnings: {warnings}")
    assert repo.files() == expected
    gaps = [p for p in range(partitions) if log_start[p] > 10]
    assert gaps == ([0] if removal == "delete_records" else [0, 1, 2])
    assert len(warnings) == len(gaps)
    for p, warning in zip(gaps, warnings):
        assert warning.startswith(f"{topic}/{p}: offset 10 is out of range on {bootstrap}")
        assert (f"AUTO_OFFSET_RESET=earliest restarts it at offset {log_start[p]}: offsets "
                f"10..{log_start[p] - 1} ({log_start[p] - 10}) are skipped") in warning
    ends = end_offsets(bootstrap, topic, partitions)
    assert committed_offsets(bootstrap, group, topic, partitions) == ends
