"""1.x pipe delivery against readers that leave at the worst moment (issue 22): nothing lost,
nothing hung, and a marker never ahead of an archive the reader has not taken."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import create_topic, produce, spout_env, wait_until
from pfs_reader import PfsReader, StreamReader, clean_path, iter_archive
from test_delivery import archive, in_thread, raw, read_exactly

import spout


def fresh_fifo(path: Path) -> None:
    """What a restarted worker does: a new FIFO at the same path (renamed in, so that the
    path never goes missing under the spout)."""
    spare = path.with_name(path.name + ".new")
    os.mkfifo(spare)
    os.rename(spare, path)


@pytest.fixture
def stop():
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def delivery(fifo, stop):
    d = spout.PipeArchives(spout.PipeWriter(str(fifo), stop), retry_max_seconds=0.1)
    yield d
    d.pipe.close()


# -- case 2: archives a stopped requeue left behind come first

def test_archives_a_stopped_requeue_left_behind_go_before_the_next_one(fifo, delivery, stop):
    old_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    a, b, c = archive("a", 100), archive("b", 100), archive("c", 100)
    delivery.send(a, "a")
    delivery.send(b, "b")
    os.close(old_reader)     # gone for good, a and b unread: the worker restarts
    fresh_fifo(fifo)
    requeue, outcome = in_thread(wait_until, lambda: (delivery.check_reader(),
                                                      delivery.broken_pipes)[1], 10, "requeue")
    wait_until(lambda: delivery.pipe.waiting_since is not None, 10,
               "the requeue to wait for a reader")
    stop.set()               # SIGTERM while the requeue waits
    requeue.join(5)
    assert isinstance(outcome.get("error"), spout.Stopped)
    # The shutdown's last batch, with a marker past a and b: a and b must go first.
    last, last_outcome = in_thread(delivery.send, c, "c", time.monotonic() + 10)
    reader = PfsReader(str(fifo), "g3").start()
    try:
        wait_until(lambda: len(reader.commits) >= 3, 10, "three archives")
        last.join(5)
        assert last_outcome == {"result": None}
        assert [commit.puts[0][0] for commit in reader.commits] == \
            ["/a/data", "/b/data", "/c/data"]
        wait_until(lambda: delivery.pipe.unread() == 0, 5, "the reader to read all")
        assert delivery.poll(final=True) == ["a", "b", "c"]
    finally:
        delivery.pipe.close()
        reader.stop()


def test_the_drain_writes_what_a_stopped_requeue_left_behind(fifo, delivery, stop):
    """The same with no last batch at shutdown: the drain writes them, in order."""
    old_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    delivery.send(archive("a", 100), "a")
    delivery.send(archive("b", 100), "b")
    os.close(old_reader)
    fresh_fifo(fifo)
    requeue, outcome = in_thread(wait_until, lambda: (delivery.check_reader(),
                                                      delivery.broken_pipes)[1], 10, "requeue")
    wait_until(lambda: delivery.pipe.waiting_since is not None, 10,
               "the requeue to wait for a reader")
    stop.set()
    requeue.join(5)
    reader = PfsReader(str(fifo), "g3").start()
    try:
        assert delivery.drain(time.monotonic() + 10) == ["a", "b"]
        assert [commit.puts[0][0] for commit in reader.commits] == ["/a/data", "/b/data"]
    finally:
        delivery.pipe.close()
        reader.stop()


def marker_offsets(data: bytes, topic: str) -> int:
    return spout.decode_marker(data)[1][(topic, 0)]


def take_one_archive_then_leave(fifo: Path) -> list:
    """A g3 reader that commits one archive, reads the next one's first block and is then
    gone for good (the worker dies): the puts of the archive it committed."""
    fd = os.open(fifo, os.O_RDONLY)  # blocks until the spout opens
    try:
        stream = StreamReader(fd)
        members = list(iter_archive(stream))
        puts = [(clean_path(m.name)[0], m.data) for m in members]
        for path, data in puts:
            if path == "/offsets":  # the marker branch, exposed beside the pipe
                (fifo.parent / "offsets").write_bytes(data)
        assert stream.read_full(512)  # the next archive has begun: this one was committed
        return puts
    finally:
        os.close(fd)


def test_a_stop_while_the_requeue_waits_loses_no_offset_and_no_marker_passes_one(
        broker, fifo, spouts, readers):
    topic = create_topic(broker, 1)
    # Full batches of 5 ship at once; a short one waits in the open batch.
    env = spout_env(broker, topic, fifo, MARKER="offsets", BATCH_MAX_MESSAGES=5,
                    BATCH_MAX_SECONDS=120)
    first, first_outcome = in_thread(take_one_archive_then_leave, fifo)
    produce(broker, topic, [(0, None, b"m-%d" % i) for i in range(5)])
    spout1 = spouts(env)
    wait_until(lambda: (fifo.parent / "offsets").exists(), 60, "0-4 to be committed")
    # 5-9 go into the pipe; the reader takes their first block and leaves for good; 10-13
    # wait in the open batch.
    produce(broker, topic, [(0, None, b"m-%d" % i) for i in range(5, 14)])
    first.join(60)
    assert "result" in first_outcome, first_outcome
    wait_until(lambda: sum(int(n) for n in re.findall(r"polled (\d+) record", spout1.log))
               >= 14, 30, "10-13 to be polled")
    wait_until(lambda: "has had no reader" in spout1.log, 30, "the requeue")
    spout1.signal(signal.SIGTERM)
    wait_until(lambda: "stopping:" in spout1.log, 10, "the shutdown")
    fresh_fifo(fifo)     # the restarted worker's reader comes while the spout shuts down
    second = readers(fifo, generation="g3", marker="offsets")
    assert spout1.wait(15) == 0, spout1.log
    # The worker starts the spout again; it resumes from the marker.
    spout2 = spouts(env)
    produce(broker, topic, [(0, None, b"m-%d" % i) for i in range(14, 19)])
    expected = {f"/{topic}/0/{o:020d}": b"m-%d" % o for o in range(19)}
    first_files = {path: data for path, data in first_outcome["result"] if path != "/offsets"}
    wait_until(lambda: set(first_files) | set(second.snapshot()) >= set(expected), 60,
               "every message")
    spout2.signal(signal.SIGTERM)
    assert spout2.wait(15) == 0, spout2.log
    # Every offset exactly once: appended to, a message written twice would double its file.
    assert not set(first_files) & set(second.snapshot())
    assert {**first_files, **second.snapshot()} == expected
    # Commit by commit, the marker never passes an offset not yet committed.
    held: set = set()
    markers = []
    for puts in [first_outcome["result"]] + [commit.puts for commit in second.commits]:
        held |= {path for path, _ in puts if path != "/offsets"}
        for path, data in puts:
            if path == "/offsets":
                markers.append(marker_offsets(data, topic))
                assert {f"/{topic}/0/{o:020d}" for o in range(markers[-1])} <= held, \
                    f"marker {markers[-1]} passes offsets not committed"
    assert markers[0] == 5 and markers[-1] == 19
    assert marker_offsets((fifo.parent / "offsets").read_bytes(), topic) == 19


# -- case 6: a write that waits for room notices the reader is gone

def test_a_write_waiting_for_room_notices_the_reader_gone_for_good(fifo, stop):
    config = spout.Config.from_sources({"BOOTSTRAP_SERVERS": "127.0.0.1:1", "TOPIC": "events",
                                        "OUTPUT_PIPE": str(fifo)})
    pipe_delivery = spout.PipeDelivery(config, stop)
    archives = pipe_delivery.archives
    # Each fits the 1 MiB pipe, both do not: b waits for room that a's reader would make.
    a, b = archive("a", 600_000), archive("b", 600_000)
    old_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    reader = None
    try:
        archives.send(a, "a")
        writing, outcome = in_thread(archives.send, b, "b")
        wait_until(lambda: len(archives.in_flight) == 2, 5, "b to wait for room")
        os.close(old_reader)  # the reader leaves for good without the write seeing EPIPE
        fresh_fifo(fifo)
        wait_until(pipe_delivery.unreachable, 5, "the missing reader to be reported")
        assert writing.is_alive()
        reader = PfsReader(str(fifo), "g3").start()
        wait_until(lambda: len(reader.commits) >= 2, 10, "a and b in the new FIFO")
        writing.join(5)
        assert outcome == {"result": None}
        assert reader.snapshot() == {"/a/data": b"a" * 600_000, "/b/data": b"b" * 600_000}
        wait_until(lambda: archives.pipe.unread() == 0, 5, "the reader to read all")
        assert pipe_delivery.held(final=True) == ["a", "b"]
        pipe_delivery.check()
        assert pipe_delivery.unreachable() is None
        assert pipe_delivery.redelivered() == 2
    finally:
        archives.pipe.close()
        if reader:
            reader.stop()


# -- a reader back on the same pipe mid-archive never gets the rest of it

def test_a_reader_back_mid_archive_gets_the_archive_again_from_its_first_byte(fifo, delivery):
    """1.8-1.10 reopen the same pipe after an error mid-archive (a failed put, a tar error):
    if that reader is back before the writer looks, it never saw the archive's beginning."""
    a, b = archive("a", 2000), archive("b", 1_500_000)
    first = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    late: dict = {}
    write = delivery.pipe.write

    def write_then_reader_back(*args, **kwargs):
        try:
            return write(*args, **kwargs)
        except BrokenPipeError:
            if not late:  # the reader is back before the writer looks
                late["fd"] = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            raise
    delivery.pipe.write = write_then_reader_back
    delivery.send(a, "a")
    writing, outcome = in_thread(delivery.send, b, "b")
    wait_until(lambda: delivery.pipe.written > a.size + 1000, 5, "b to be under way")
    os.set_blocking(first, True)
    mid_b = a.size + 100_000
    read_exactly(first, mid_b)
    # The writer refilled what was read, so it saw the reader there, mid-b.
    wait_until(lambda: delivery.pipe.written - mid_b >= delivery.pipe.capacity - 8192, 5,
               "the writer to refill the pipe")
    os.close(first)
    wait_until(lambda: late, 5, "the broken pipe")
    received = bytearray()
    done = threading.Event()

    def drain():
        while True:
            try:
                chunk = os.read(late["fd"], 1 << 20)
            except BlockingIOError:
                chunk = None
            if chunk:
                received.extend(chunk)
            elif done.is_set() and chunk == b"":
                return
            else:
                time.sleep(0.002)  # nothing to read yet: not a synchronisation
    draining = threading.Thread(target=drain, daemon=True)
    draining.start()
    try:
        writing.join(10)
        assert outcome == {"result": None}
        wait_until(lambda: delivery.pipe.unread() == 0, 5, "the late reader to read all")
        # Whatever the pipe held of b reaches it first; then b again, whole.
        assert delivery.broken_pipes == 1
        assert bytes(received).endswith(raw(b))
        assert delivery.poll(final=True) == ["a", "b"]
    finally:
        delivery.pipe.close()
        done.set()
        draining.join(5)
        os.close(late["fd"])
