"""Crashes, restarts and rebalances: nothing lost, and with a marker nothing doubled."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import (Tansu, committed_offsets, create_topic, expected_files, produce, read_back,
                      spout_env, wait_until)
from pfs_reader import load_materialized

HERE = Path(__file__).resolve().parent


def chaos_messages(count: int, seed: int):
    rng = random.Random(seed)
    return [(i % 3, b"k%d" % (i % 11), rng.randbytes(rng.choice([0, 10, 511, 513, 3000, 20000])))
            for i in range(count)]


def kill(spout) -> None:
    spout.process.send_signal(signal.SIGKILL)
    spout.process.wait()


def run_with_kills(spouts, reader, env, expected: dict, kills: int, seed: int,
                   delivered=None) -> int:
    """Starts the spout, SIGKILLs it at random moments after each new commit, restarts it as
    the worker would (also when the reader double restarted the "user code"), then lets it
    finish. delivered() counts the messages the reader holds (default: its files). Returns
    how many kills landed."""
    rng = random.Random(seed)
    landed = 0
    delivered = delivered or (lambda: len(reader.snapshot()))
    spout = spouts(env)
    while landed < kills and delivered() < len(expected):
        commits = len(reader.commits)
        restarts = reader.restarts
        wait_until(lambda: len(reader.commits) > commits or reader.restarts > restarts
                   or delivered() >= len(expected), 60, "a commit")
        time.sleep(rng.uniform(0, 0.4))  # a random moment to crash, not a synchronisation
        kill(spout)
        landed += 1
        # The worker restarts user code after a back-off: by then its reader has committed
        # every whole archive the dead spout wrote, and the marker says so.
        wait_until(reader.settled, 30, "the reader to take what the killed spout wrote")
        spout = spouts(env)
    while delivered() < len(expected):
        restarts = reader.restarts
        wait_until(lambda: delivered() >= len(expected) or reader.restarts > restarts,
                   120, "every message after the last kill")
        if reader.restarts > restarts:  # the worker restarts the user code after a tar error
            kill(spout)
            spout = spouts(env)
    wait_until(lambda: "starting:" in spout.log, 30, "the last spout to start")  # handlers set
    spout.signal(signal.SIGTERM)
    assert spout.wait(10) == 0, spout.log
    return landed


def chaos_env(broker, topic, fifo, **extra):
    settings = {"BATCH_MAX_MESSAGES": 40, "BATCH_MAX_SECONDS": 0.1, "LOG_LEVEL": "INFO"}
    return spout_env(broker, topic, fifo, **{**settings, **extra})


def test_marker_mode_gives_exactly_once_through_sigkills(broker, topic, fifo, spouts, readers):
    messages = chaos_messages(2500, seed=11)
    produce(broker, topic, messages)
    expected = expected_files(topic, read_back(broker, topic, len(messages)))
    # Append semantics: a message written twice would double its file.
    reader = readers(fifo, generation="g3", marker="offsets", keep_open=True,
                     commit_delay=0.02)
    kills = run_with_kills(spouts, reader, chaos_env(broker, topic, fifo, MARKER="offsets"),
                           expected, kills=4, seed=5)
    files = reader.snapshot()
    missing = set(expected) - set(files)
    doubled = [name for name in files if files[name] != expected.get(name)]
    print(f"marker chaos: kills={kills} messages={len(expected)} commits={len(reader.commits)} "
          f"restarts={reader.restarts} missing={len(missing)} doubled={len(doubled)}")
    assert kills == 4
    assert not missing and not doubled
    assert files == expected
    assert reader.invalid_paths == []


def test_marker_mode_segments_exactly_once_through_sigkills(broker, topic, fifo, spouts,
                                                            readers):
    """FORMAT=jsonl, appended to: a segment written twice would repeat its lines."""
    from test_segments import segment_rows
    messages = chaos_messages(1500, seed=13)
    produce(broker, topic, messages)
    truth = read_back(broker, topic, len(messages))
    reader = readers(fifo, generation="g3", marker="offsets", keep_open=True,
                     commit_delay=0.02)

    def rows():
        return [((row["partition"], row["offset"]), row["value"])
                for path, data in reader.snapshot().items()
                for row in segment_rows(path, data)]
    # Small batches: a segment archive is cheap, and at 40 messages a spout's four lives
    # could deliver all 1,500 before the fourth kill (seen in 5 of 12 runs).
    kills = run_with_kills(spouts, reader, chaos_env(broker, topic, fifo, MARKER="offsets",
                                                     FORMAT="jsonl", BATCH_MAX_MESSAGES=10),
                           truth, kills=4, seed=7, delivered=lambda: len(rows()))
    held = rows()
    print(f"segment chaos: kills={kills} messages={len(truth)} commits={len(reader.commits)} "
          f"files={len(reader.snapshot())} missing={len(set(truth) - dict(held).keys())} "
          f"doubled={len(held) - len(dict(held))}")
    assert kills == 4
    assert len(held) == len(dict(held)), "a message is in two rows"
    assert dict(held) == truth
    assert reader.invalid_paths == []


def test_group_mode_loses_nothing_through_sigkills(broker, topic, fifo, spouts, readers):
    messages = chaos_messages(2500, seed=12)
    produce(broker, topic, messages)
    expected = expected_files(topic, read_back(broker, topic, len(messages)))
    reader = readers(fifo, generation="g3", overwrite=True, keep_open=True, commit_delay=0.02)
    kills = run_with_kills(spouts, reader, chaos_env(broker, topic, fifo), expected, kills=4,
                           seed=6)
    replayed = reader.member_count - len(expected)
    print(f"group chaos: kills={kills} messages={len(expected)} commits={len(reader.commits)} "
          f"replayed={replayed}")
    assert kills == 4
    assert reader.snapshot() == expected  # overwrite: a replay rewrites the same bytes


class ReaderProcess:
    """The reader double as its own process, so that it can be SIGKILLed; its commits are
    materialised atomically on disk and survive it."""

    def __init__(self, fifo: Path, out: Path, commit_delay: float = 0.03):
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "pfs_reader.py"), str(fifo), "--generation", "g3",
             "--overwrite", "--commit-delay", str(commit_delay), "--materialize", str(out)])

    def files(self) -> dict:
        return load_materialized(str(self.out), overwrite=True) if self.out.exists() else {}

    def commits(self) -> int:
        return len([n for n in os.listdir(self.out) if n.startswith("commit-")]) \
            if self.out.exists() else 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def test_killing_spout_and_reader_together_loses_nothing(broker, topic, fifo, spouts, tmp_path):
    """A pod dies: written but unread bytes vanish with the pipe. Offsets must not have moved."""
    messages = chaos_messages(2000, seed=13)
    produce(broker, topic, messages)
    expected = expected_files(topic, read_back(broker, topic, len(messages)))
    out = tmp_path / "repo"
    env = chaos_env(broker, topic, fifo)
    rng = random.Random(8)
    for _ in range(4):
        reader = ReaderProcess(fifo, out)
        spout = spouts(env)
        commits = reader.commits()
        wait_until(lambda: reader.commits() > commits or len(reader.files()) >= len(expected),
                   60, "a commit", interval=0.05)
        time.sleep(rng.uniform(0, 0.3))  # a random moment to crash
        kill(spout)
        reader.kill()
    reader = ReaderProcess(fifo, out)
    spout = spouts(env)
    try:
        wait_until(lambda: len(reader.files()) >= len(expected), 120, "every message",
                   interval=0.1)
        spout.signal(signal.SIGTERM)
        assert spout.wait(10) == 0
    finally:
        reader.stop()
    assert reader.files() == expected


def test_a_reader_killed_mid_archive_and_restarted_loses_and_corrupts_nothing(
        broker, topic, fifo, spouts, tmp_path):
    rng = random.Random(14)
    messages = [(i % 3, None, rng.randbytes(300_000)) for i in range(24)]
    produce(broker, topic, messages)
    expected = expected_files(topic, read_back(broker, topic, len(messages)))
    out = tmp_path / "repo"
    reader = ReaderProcess(fifo, out, commit_delay=0.2)
    spout = spouts(chaos_env(broker, topic, fifo, BATCH_MAX_MESSAGES=8))
    try:
        wait_until(lambda: reader.commits() >= 1, 60, "a first commit", interval=0.05)
        reader.kill()  # mid-archive: the spout was writing ~2.4 MB archives into a 1 MiB pipe
        reader = ReaderProcess(fifo, out, commit_delay=0.2)
        wait_until(lambda: len(reader.files()) >= len(expected), 60, "every message",
                   interval=0.1)
        assert spout.process.poll() is None
        spout.signal(signal.SIGTERM)
        assert spout.wait(10) == 0
    finally:
        reader.stop()
    assert reader.files() == expected
    assert "broken" in spout.log


def test_two_spouts_in_one_group_share_the_work_and_survive_one_leaving(
        broker, topic, tmp_path, spouts, readers):
    messages = [(i % 3, None, b"m-%d" % i) for i in range(900)]
    pipes = []
    for name in ("a", "b"):
        pipe = tmp_path / name / "out"
        pipe.parent.mkdir()
        os.mkfifo(pipe)
        pipes.append(pipe)
    reader_a = readers(pipes[0], generation="g3", overwrite=True)
    reader_b = readers(pipes[1], generation="g3", overwrite=True)
    env_a = chaos_env(broker, topic, pipes[0], GROUP_ID=f"shared-{topic}")
    env_b = chaos_env(broker, topic, pipes[1], GROUP_ID=f"shared-{topic}")
    spout_a, spout_b = spouts(env_a), spouts(env_b)
    # Both in the group before the first message: Apache Kafka lets the first spout join
    # (and read everything) before the second has joined.
    wait_until(lambda: all("assigned ['" in s.log for s in (spout_a, spout_b)), 90,
               "both spouts to hold partitions")
    produce(broker, topic, messages[:450])
    wait_until(lambda: len(reader_a.snapshot()) + len(reader_b.snapshot()) >= 450, 90,
               "the first half")
    spout_b.signal(signal.SIGTERM)
    assert spout_b.wait(10) == 0
    produce(broker, topic, messages[450:])
    expected = expected_files(topic, read_back(broker, topic, len(messages)))
    wait_until(lambda: set(reader_a.snapshot()) | set(reader_b.snapshot()) >= set(expected),
               90, "the second half, all on the spout that stayed")
    spout_a.signal(signal.SIGTERM)
    assert spout_a.wait(10) == 0
    together = {**reader_b.snapshot(), **reader_a.snapshot()}
    assert together == expected
    assert reader_b.snapshot(), "the second spout took a share before it left"
    assert committed_offsets(broker, f"shared-{topic}", topic) == {0: 300, 1: 300, 2: 300}


def test_a_broker_paused_past_the_session_timeout(fifo, spouts, readers):
    tansu = Tansu()
    try:
        topic = create_topic(tansu.bootstrap)
        reader = readers(fifo, generation="g3", overwrite=True)
        spout = spouts(chaos_env(tansu.bootstrap, topic, fifo))
        first = [(i % 3, None, b"before-%d" % i) for i in range(60)]
        produce(tansu.bootstrap, topic, first)
        wait_until(lambda: len(reader.snapshot()) >= 60, 60, "the first messages")
        tansu.pause()
        time.sleep(8)  # the outage itself: longer than the 6 s session timeout
        tansu.resume()
        second = [(i % 3, None, b"after-%d" % i) for i in range(60)]
        produce(tansu.bootstrap, topic, second)
        expected = expected_files(topic, read_back(tansu.bootstrap, topic, 120))
        wait_until(lambda: len(reader.snapshot()) >= 120, 90, "the messages after the outage")
        assert spout.process.poll() is None
        spout.signal(signal.SIGTERM)
        assert spout.wait(10) == 0
        assert reader.snapshot() == expected
    finally:
        tansu.resume()
        tansu.stop()
