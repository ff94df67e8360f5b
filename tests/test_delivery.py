"""The pipe writer and the delivery policy, on a real FIFO."""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import wait_until
from pfs_reader import PfsReader

import spout


def archive(tag: str, size: int) -> spout.Archive:
    return spout.encode_archive([(f"{tag}/data", tag.encode() * size, 0)])


def raw(archive_: spout.Archive) -> bytes:
    return b"".join(bytes(part) for part in archive_.parts)


def read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        assert chunk, "writer closed early"
        data += chunk
    return data


@pytest.fixture
def delivery(fifo):
    stop = threading.Event()
    d = spout.PipeArchives(spout.PipeWriter(str(fifo), stop), retry_max_seconds=0.1)
    yield d
    stop.set()
    d.pipe.close()


def in_thread(function, *args):
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_the_writer_waits_for_a_reader_then_writes_the_whole_archive(fifo, delivery):
    a = archive("a", 300_000)
    thread, outcome = in_thread(delivery.send, a, {"p": 1})
    time.sleep(0.05)  # give the writer time to find nobody there; it must keep waiting
    assert thread.is_alive()
    fd = os.open(fifo, os.O_RDONLY)
    try:
        assert read_exactly(fd, a.size) == raw(a)
        thread.join(5)
        assert outcome == {"result": None}
    finally:
        os.close(fd)


def test_offsets_are_released_once_the_reader_reads_past_the_archive(fifo, delivery):
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        a, b = archive("a", 1000), archive("b", 1000)
        delivery.send(a, {"p": 1})
        delivery.send(b, {"p": 2})
        assert delivery.poll() == []
        read_exactly(fd, a.size)
        assert delivery.poll() == []           # read to its end: maybe not committed yet
        read_exactly(fd, 512)
        assert delivery.poll() == [{"p": 1}]   # the reader moved on: it was committed
        read_exactly(fd, b.size - 512)
        assert delivery.poll() == []
        assert delivery.poll(final=True) == [{"p": 2}]
    finally:
        os.close(fd)


def test_an_archive_without_members_is_not_written_but_follows_its_predecessor(fifo, delivery):
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        a = archive("a", 10)
        delivery.send(a, {"p": 1})
        delivery.send(spout.encode_archive([]), {"p": 5})
        assert delivery.pipe.written == a.size
        assert delivery.poll() == []
        read_exactly(fd, a.size)
        assert delivery.poll(final=True) == [{"p": 1}, {"p": 5}]
    finally:
        os.close(fd)


def test_tombstones_alone_are_committed_without_waiting(fifo, delivery):
    delivery.send(spout.encode_archive([]), {"p": 5})
    assert delivery.pipe.fd is None  # nothing to write, so the pipe was not even opened
    assert delivery.poll() == [{"p": 5}]


def test_a_broken_pipe_sends_every_unfinished_archive_again_whole_and_in_order(fifo, delivery):
    # b and c are larger than the pipe (1 MiB at most): the writer must wait for the reader.
    a, b, c = archive("a", 2000), archive("b", 1_500_000), archive("c", 1_500_000)
    first = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    delivery.send(a, {"p": 1})
    thread, outcome = in_thread(lambda: (delivery.send(b, {"p": 2}), delivery.send(c, {"p": 3})))
    wait_until(lambda: delivery.pipe.written > a.size + 1000, 5, "b to be under way")
    os.set_blocking(first, True)
    read_exactly(first, a.size + 700)    # all of a, the start of b: then the reader dies
    os.close(first)
    wait_until(lambda: delivery.broken_pipes, 5, "the writer to see the broken pipe")
    reader = PfsReader(str(fifo), "g3").start()
    try:
        wait_until(lambda: len(reader.commits) >= 2, 10, "b and c to arrive again")
        thread.join(5)
        assert not thread.is_alive() and "error" not in outcome
        assert reader.tar_errors == []
        assert [sorted(path for path, _ in commit.puts) for commit in reader.commits] == \
            [["/b/data"], ["/c/data"]]
        assert reader.snapshot() == {"/b/data": b"b" * 1_500_000, "/c/data": b"c" * 1_500_000}
        # a was read to its end before the reader went: it is not sent again.
        assert delivery.poll(final=True) == [{"p": 1}, {"p": 2}, {"p": 3}]
    finally:
        delivery.pipe.close()
        reader.stop()


def test_a_stop_request_ends_the_wait_for_a_reader(delivery):
    threading.Timer(0.2, delivery.pipe.stop.set).start()
    started = time.monotonic()
    with pytest.raises(spout.Stopped):
        delivery.send(archive("a", 10), {"p": 1})
    assert time.monotonic() - started < 2


def test_a_reader_that_stops_reading_is_abandoned_at_the_deadline(fifo, delivery):
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        started = time.monotonic()
        with pytest.raises(spout.Stopped):
            delivery.send(archive("a", 2_000_000), {"p": 1}, deadline=started + 0.3)
        assert 0.25 < time.monotonic() - started < 2
        assert delivery.pipe.torn and delivery.pipe.fd is None
        # Half an archive is in the pipe: nothing may follow it, and nothing was delivered.
        with pytest.raises(spout.Stopped):
            delivery.send(archive("b", 1), {"p": 2}, deadline=time.monotonic() + 1)
        assert delivery.poll(final=True) == []
    finally:
        os.close(fd)


def test_a_reader_that_reopens_the_same_pipe_between_archives_gets_the_rest_whole(fifo,
                                                                                 delivery):
    """The 1.8-1.10 pattern: read one archive, close, open again. Nothing is written twice."""
    a, b = archive("a", 2000), archive("b", 1_500_000)
    first = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    delivery.send(a, {"p": 1})
    thread, outcome = in_thread(delivery.send, b, {"p": 2})
    wait_until(lambda: delivery.pipe.written > a.size + 1000, 5, "b to be under way")
    os.set_blocking(first, True)
    read_exactly(first, a.size)  # exactly a, then the reader goes away and comes back
    os.close(first)
    time.sleep(0.02)  # the reader's commit: the writer must see it gone, and wait
    second = os.open(fifo, os.O_RDONLY)
    try:
        assert read_exactly(second, b.size) == raw(b)
        thread.join(5)
        assert not thread.is_alive() and "error" not in outcome
        assert delivery.broken_pipes == 0
        assert delivery.poll(final=True) == [{"p": 1}, {"p": 2}]
    finally:
        delivery.pipe.close()
        os.close(second)


def test_archives_left_for_a_reader_that_never_returns_go_to_the_next_fifo(fifo, delivery):
    """A restarted worker makes a fresh FIFO: what waited in the old one is written again."""
    old_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    delivery.send(archive("a", 100), {"p": 1})
    delivery.send(archive("b", 100), {"p": 2})
    os.close(old_reader)
    os.unlink(fifo)
    os.mkfifo(fifo)
    reader = PfsReader(str(fifo), "g3").start()
    try:
        delivery.check_reader()
        assert delivery.broken_pipes == 0  # gone for a moment only, so far
        wait_until(lambda: (delivery.check_reader(), delivery.broken_pipes)[1], 5,
                   "the writer to give up on the old FIFO")
        wait_until(lambda: len(reader.commits) == 2, 5, "both archives in the new FIFO")
        assert reader.snapshot() == {"/a/data": b"a" * 100, "/b/data": b"b" * 100}
    finally:
        delivery.pipe.close()
        reader.stop()
