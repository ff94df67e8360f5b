"""The offset ledger: property-based runs of the loop's transitions, and the batch
bookkeeping a rebalance relies on.

The state machine below plays the loop against a model of Kafka (partitions whose offsets
have gaps, as transaction markers leave) and of Pachyderm (batches held in the order they
were handed over, a reader that can go away). After every step it checks, from the model
and not from the ledger's own fields, that neither the group's offset nor any record
Pachyderm holds passes a message that Pachyderm (this spout's repo, or another spout's)
does not hold; and, in exactly-once mode, across stops and restarts, that no message is
held twice.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

import spout

PARTITIONS = (TopicPartition("t", 0), TopicPartition("t", 1))


def record(tp, offset, value=b"v"):
    return ConsumerRecord(tp.topic, tp.partition, 0, offset, 1_700_000_000_000, 0, b"k", value,
                          [], None, 1, len(value) if value is not None else -1, 0)


class LoopModel(RuleBasedStateMachine):
    """The loop's uses of the ledger, in any order the loop can make them."""

    exactly_once = True

    @initialize(gaps=st.lists(st.lists(st.integers(1, 3), min_size=30, max_size=30),
                              min_size=2, max_size=2),
                stops=st.none() | st.lists(st.integers(0, 20) | st.integers(60, 64),
                                           min_size=2, max_size=2))
    def start(self, gaps, stops):
        # Kafka: each partition's message offsets, gaps between them (markers, aborted).
        self.log = {}
        for tp, steps in zip(PARTITIONS, gaps):
            offsets, offset = [], 0
            for step in steps:
                offset += step
                offsets.append(offset)
            self.log[tp] = offsets
        self.group: dict = {}            # the group's committed offsets
        self.held_by_us: list = []       # (tp, offset) of every message our batches hold
        self.held_elsewhere: set = set() # group mode: what another spout delivered
        self.record: dict = {}           # the newest record Pachyderm holds
        # A bounded read (exactly-once only): each partition's stop at a message, just
        # before one (in a gap, where markers lie), or past the end.
        self.stops = None
        if stops is not None and self.exactly_once:
            self.stops = {tp: (self.log[tp][index // 2] - index % 2 if index < 60
                               else self.log[tp][-1] + index)
                          for tp, index in zip(PARTITIONS, stops)}
        self.closed = False
        self.start_spout()

    def start_spout(self):
        self.ledger = spout.Ledger()
        self.ledger.recorded(self.record)
        self.position: dict = {}
        self.decoding: list = []
        self.batch = spout.Batch()
        self.in_flight: list = []        # (Outgoing, given up)
        self.reader = True
        self.stopped = False
        if self.exactly_once:
            for tp in PARTITIONS:
                progress = self.ledger.get(tp)
                start = progress.held if progress is not None else self.group.get(tp, 0)
                self.position[tp] = start
                self.ledger.started(tp, start)
                if self.stops is not None:
                    self.ledger.set_stop(tp, self.stops[tp])

    # -- Kafka's side
    def next_position(self, tp, after: int) -> int:
        """The consumer's position once every message before `after` was returned: past the
        gap that follows (markers), as read_committed fetches leave it."""
        later = [o for o in self.log[tp] if o >= after]
        return later[0] if later else self.log[tp][-1] + 2

    @precondition(lambda self: not self.stopped)
    @rule(which=st.sampled_from(PARTITIONS), count=st.integers(1, 6))
    def poll(self, which, count):
        progress = self.ledger.get(which)
        if progress is None or not progress.owned or not progress.resolved:
            return
        start = self.position[which]
        if progress.reached:
            return   # paused at its stop
        offsets = [o for o in self.log[which] if o >= start][:count]
        if not offsets:
            return
        records = {which: [record(which, o) for o in offsets]}
        self.position[which] = self.next_position(which, offsets[-1] + 1)
        records, _reached = self.ledger.clip(records)
        if not records:
            return
        self.ledger.polled(records)
        self.decoding.append(records)

    @precondition(lambda self: not self.stopped and self.decoding)
    @rule()
    def decoded(self):
        """Decoding done: the poll goes into the batch."""
        for records in self.decoding:
            for tp, messages in records.items():
                self.batch.take(tp, messages[0].offset, messages[-1].offset + 1,
                                len(messages), len(messages))
                self.batch.members.extend((f"{tp.partition}/{m.offset}", b"v", 0)
                                          for m in messages)
                self.batch.partitions.extend([tp] * len(messages))
        self.decoding = []

    def flush(self, stopping: bool = False):
        batch, self.batch = self.batch, spout.Batch()
        if not batch.records:
            return
        try:
            outgoing = self.ledger.hand_over(batch, ("t",))
        except spout.Stopped:
            return
        if stopping and not self.reader:
            self.ledger.give_up(outgoing)  # shutdown's deadline passed inside send()
            return
        self.in_flight.append(outgoing)

    @precondition(lambda self: not self.stopped)
    @rule()
    def close_batch(self):
        self.flush()

    # -- Pachyderm's side
    @precondition(lambda self: not self.stopped and self.in_flight)
    @rule()
    def pachyderm_holds_one(self):
        if not self.reader:
            return
        outgoing = self.in_flight.pop(0)
        self.hold(outgoing)
        self.ledger.held(outgoing)

    def hold(self, outgoing):
        batch = outgoing.batch
        for (name, _, _), tp in zip(batch.members, batch.partitions):
            self.held_by_us.append((tp, int(name.split("/")[1])))
        self.record = dict(outgoing.positions)

    @precondition(lambda self: not self.stopped)
    @rule()
    def reader_goes(self):
        self.reader = False

    @precondition(lambda self: not self.stopped)
    @rule()
    def reader_comes_back(self):
        self.reader = True

    # -- the group's offsets
    @precondition(lambda self: not self.stopped)
    @rule()
    def adopt_positions(self):
        """The consumer's position of every partition it owns and fetches, offered."""
        for tp in PARTITIONS:
            progress = self.ledger.get(tp)
            if progress is not None and progress.owned and progress.resolved and \
                    tp in self.position:
                self.ledger.caught_up(tp, progress.stop if progress.reached
                                      else self.position[tp])

    @precondition(lambda self: not self.stopped and self.stops is not None and
                  not self.closed and self.reader)
    @rule()
    def close_the_range(self):
        """Spout.finish(): once every partition is read to its stop."""
        if not all(self.ledger[tp].done(self.position[tp]) for tp in PARTITIONS):
            return
        self.decoded()
        self.flush()
        while self.in_flight:
            self.pachyderm_holds_one()
        self.adopt_positions()
        closing = self.ledger.hand_over(spout.Batch(), ("t",), closed=True)
        self.hold(closing)
        self.ledger.held(closing)
        self.commit()
        self.closed = True
        held = self.holds()
        for tp, offsets in self.log.items():
            missing = [o for o in offsets if o < self.stops[tp] and (tp, o) not in held]
            assert not missing, f"{tp} closed at {self.stops[tp]} without {missing}"
            assert self.group[tp] == self.stops[tp] == self.record[tp]

    @precondition(lambda self: not self.stopped)
    @rule()
    def commit(self):
        owned = None if self.exactly_once else self.ledger.owned()
        offsets = self.ledger.to_commit(owned)
        self.ledger.check()
        self.group.update(offsets)
        self.ledger.committed(offsets)

    # -- stopping: the decoding wait, the shutdown, a restart from Pachyderm's record
    @precondition(lambda self: not self.stopped)
    @rule(decoding_finishes=st.booleans(), reader_drains=st.booleans())
    def stop(self, decoding_finishes, reader_drains):
        if decoding_finishes:
            self.decoded()
        # else: stopped inside decoding's wait for the registry; those records stay there
        self.flush(stopping=True)
        if reader_drains and self.reader:
            while self.in_flight:
                outgoing = self.in_flight.pop(0)
                self.hold(outgoing)
                self.ledger.held(outgoing)
        self.adopt_positions()
        self.commit()
        self.stopped = True

    @precondition(lambda self: self.stopped)
    @rule()
    def restart(self):
        # Whatever was in the pipe and not taken is gone with the old pipe.
        self.start_spout()

    # -- what must hold after every step
    def holds(self) -> set:
        return set(self.held_by_us) | self.held_elsewhere

    @invariant()
    def nothing_passed_that_pachyderm_does_not_hold(self):
        if not hasattr(self, "ledger"):
            return
        held = self.holds()
        for tp, offsets in self.log.items():
            for what, mark in (("the group's offset", self.group.get(tp)),
                               ("the record", self.record.get(tp))):
                if mark is None:
                    continue
                missing = [o for o in offsets if o < mark and (tp, o) not in held]
                assert not missing, f"{what} of {tp} is {mark}, past unheld {missing}"
        self.ledger.check()

    @invariant()
    def nothing_at_or_past_a_stop_is_taken(self):
        if getattr(self, "stops", None) is None:
            return
        for tp, offset in self.held_by_us:
            assert offset < self.stops[tp], (tp, offset, self.stops[tp])
        for tp, stop in self.stops.items():
            assert self.group.get(tp, 0) <= stop and self.record.get(tp, 0) <= stop

    @invariant()
    def exactly_once_holds_nothing_twice(self):
        if self.exactly_once and hasattr(self, "ledger"):
            assert len(self.held_by_us) == len(set(self.held_by_us)), sorted(self.held_by_us)


class GroupLoopModel(LoopModel):
    """Group mode: the group takes partitions away and gives them back; while one is away
    another spout may deliver some of it and commit."""

    exactly_once = False

    def start_spout(self):
        super().start_spout()
        self.assign(PARTITIONS[0])
        self.assign(PARTITIONS[1])

    def assign(self, tp):
        self.ledger.assigned([tp])
        committed = self.group.get(tp)
        resume_at = self.ledger.resume_at(tp, committed)
        self.ledger.resolve(tp, resume_at, committed)
        self.position[tp] = resume_at if resume_at is not None else 0

    @precondition(lambda self: not self.stopped)
    @rule(which=st.sampled_from(PARTITIONS))
    def revoke(self, which):
        progress = self.ledger.get(which)
        if progress is None or not progress.owned:
            return
        self.decoded()  # callbacks run inside poll(): nothing waits in decoding then
        for tp, first in self.batch.drop({which}).items():
            self.position[tp] = first
        self.ledger.revoked({which})

    @precondition(lambda self: not self.stopped)
    @rule(which=st.sampled_from(PARTITIONS), count=st.integers(0, 5))
    def another_spout_delivers(self, which, count):
        progress = self.ledger.get(which)
        if progress is not None and progress.owned:
            return
        start = self.group.get(which, 0)
        offsets = [o for o in self.log[which] if o >= start][:count]
        self.held_elsewhere |= {(which, o) for o in offsets}
        if offsets:
            self.group[which] = offsets[-1] + 1

    @precondition(lambda self: not self.stopped)
    @rule(which=st.sampled_from(PARTITIONS))
    def reassign(self, which):
        progress = self.ledger.get(which)
        if progress is None or not progress.owned:
            self.assign(which)


LOOP_SETTINGS = settings(max_examples=300, stateful_step_count=60, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])
TestExactlyOnceLoop = LoopModel.TestCase
TestExactlyOnceLoop.settings = LOOP_SETTINGS
TestGroupLoop = GroupLoopModel.TestCase
TestGroupLoop.settings = LOOP_SETTINGS


# -- the ledger refuses what would break the invariant

def test_a_batch_held_out_of_order_is_refused():
    ledger = spout.Ledger()
    tp = PARTITIONS[0]
    ledger.started(tp, 0)
    batches = []
    for first in (0, 5):
        ledger.polled({tp: [record(tp, o) for o in range(first, first + 5)]})
        batch = spout.Batch()
        batch.take(tp, first, first + 5, 5, 5)
        batches.append(ledger.hand_over(batch, ("t",)))
    with pytest.raises(spout.OffsetLedgerError):
        ledger.held(batches[1])


def test_records_waiting_in_decoding_keep_the_consumer_position_out():
    """Case 1's cause: a poll inside decoding is in no batch, yet not held."""
    ledger = spout.Ledger()
    tp = PARTITIONS[0]
    ledger.assigned([tp])
    ledger.resolve(tp, 0, None)
    ledger.polled({tp: [record(tp, o) for o in range(10)]})
    assert not ledger.caught_up(tp, 10)
    assert ledger.to_commit({tp}) == {tp: 0}


def test_a_batch_held_late_does_not_move_the_group_back():
    """Held after its partition went to another spout and came back."""
    ledger = spout.Ledger()
    tp = PARTITIONS[0]
    ledger.assigned([tp])
    ledger.resolve(tp, 0, None)
    ledger.polled({tp: [record(tp, o) for o in range(10)]})
    batch = spout.Batch()
    batch.take(tp, 0, 10, 10, 10)
    late = ledger.hand_over(batch, ("t",))
    ledger.revoked([tp])
    ledger.assigned([tp])           # back, after another spout committed 300
    ledger.resolve(tp, ledger.resume_at(tp, 300), 300)
    ledger.held(late)
    assert ledger.to_commit({tp}) == {}
    assert ledger[tp].held == 300


# -- batch bookkeeping (case 10)

def consumer_record(partition, offset, value, topic="t"):
    return ConsumerRecord(topic, partition, 0, offset, 1_700_000_000_000, 0, b"k", value, [],
                          None, 1, -1 if value is None else len(value), 0)


def dead_lettering_segments(shipped: list):
    config = spout.Config(bootstrap_servers=("127.0.0.1:9",), topics=("t",), format="jsonl",
                          output_pipe="/nonexistent", decode=("value",),
                          schema_registry_url=("http://registry",),
                          on_bad_record="dead-letter",
                          name_template="{topic}/{partition}/{offset:020d}.jsonl")
    return spout.Segments(config, spout.Stats(), lambda: shipped.append(1))


def bad(partition, offset):
    plain = consumer_record(partition, offset, b"not framed")
    return spout.DecodedRecord(plain.topic, plain.partition, plain.offset, plain.timestamp,
                               plain.timestamp_type, plain.key, plain.value, plain.headers,
                               problem=spout.BadRecord("no-magic-byte", "not framed"))


def good(partition, offset):
    plain = consumer_record(partition, offset, b"\x00\x00\x00\x00\x01x")
    return spout.DecodedRecord(plain.topic, plain.partition, plain.offset, plain.timestamp,
                               plain.timestamp_type, plain.key, plain.value, plain.headers,
                               document={"n": offset}, schema_id=1)


def test_a_rebalance_keeps_the_dead_letters_of_partitions_still_owned():
    shipped: list = []
    segments = dead_lettering_segments(shipped)
    kept, revoked = TopicPartition("t", 0), TopicPartition("t", 1)
    segments.add({kept: [bad(0, 0), bad(0, 1), bad(0, 2)],
                  revoked: [good(1, 0), good(1, 1)]})
    assert segments.drop({revoked}) == {revoked: 0}
    assert segments.batch.records == 3           # three messages, all dead-lettered
    assert segments.batch.offsets == {kept: 3}
    batch = segments.take()
    names = sorted(name for name, _, _ in batch.members)
    # Two files per dead letter: the message's bytes and its metadata.
    assert len(names) == 6 and all(name.startswith("_errors/t/0/") for name in names), names
    assert batch.records == 3 and not shipped


def test_dropping_counts_messages_not_files():
    config = spout.Config(bootstrap_servers=("127.0.0.1:9",), topics=("t",), format="raw+meta",
                          output_pipe="/nonexistent")
    files = spout.MessageFiles(config, spout.Stats(), lambda: None)
    kept, revoked = TopicPartition("t", 0), TopicPartition("t", 1)
    files.add({kept: [consumer_record(0, o, b"x" * 10) for o in range(3)],
               revoked: [consumer_record(1, o, b"y" * 10) for o in range(2)]})
    sizes = sum(len(data) for (_, data, _), tp in zip(files.batch.members,
                                                      files.batch.partitions) if tp == kept)
    files.drop({revoked})
    assert files.batch.records == 3          # not 6: each message has two files
    assert files.batch.data_bytes == sizes
    assert len(files.batch.members) == 6


def test_a_batch_of_dead_letters_alone_is_handed_over_and_committed():
    """After the drop only dead letters remain: the flush must still deliver them, and the
    group's offset move past them only once Pachyderm holds them."""
    shipped: list = []
    segments = dead_lettering_segments(shipped)
    kept, revoked = TopicPartition("t", 0), TopicPartition("t", 1)
    ledger = spout.Ledger()
    ledger.assigned([kept, revoked])
    for tp in (kept, revoked):
        ledger.resolve(tp, 0, None)
    polled = {kept: [bad(0, 0)], revoked: [good(1, 0)]}
    ledger.polled(polled)
    segments.add(polled)
    segments.drop({revoked})
    ledger.revoked({revoked})
    batch = segments.take()
    assert batch.records == 1
    outgoing = ledger.hand_over(batch, ("t",))
    assert ledger.to_commit({kept}) == {kept: 0}
    ledger.held(outgoing)
    assert ledger.to_commit({kept}) == {kept: 1}


def test_spout_flush_hands_the_batch_to_the_delivery_through_the_ledger():
    config = spout.Config(bootstrap_servers=("127.0.0.1:9",), topics=("t",), format="raw",
                          output_pipe="/nonexistent")
    sent = []

    class Collecting(spout.Delivery):
        def send(self, outgoing, deadline=None):
            sent.append(outgoing)

        def held(self, final=False):
            return []

    instance = spout.Spout(config, threading.Event(), Collecting())
    tp = PARTITIONS[0]
    instance.ledger.started(tp, 0)
    polled = {tp: [record(tp, o) for o in range(4)]}
    instance.ledger.polled(polled)
    instance.add(polled)
    instance.flush()
    assert [dict(o.positions) for o in sent] == [{tp: 4}]
    assert instance.ledger.to_commit() == {tp: 0}   # handed over, not held
