"""The spout against a real broker and a real FIFO, read by every generation of Pachyderm 1.x."""

from __future__ import annotations

import random
import signal

import pytest
from conftest import (committed_offsets, expected_files, produce, read_back, spout_env,
                      wait_until)

SIZES = [0, 1, 100, 511, 512, 513, 1024, 4096]


def mixed_messages(count: int, seed: int, big: int = 2):
    """(partition, key, value) with edge sizes, random binary, 64 KiB and a few over 1 MiB."""
    rng = random.Random(seed)
    messages = []
    for i in range(count):
        if i % 97 == 0:
            size = 64 * 1024
        else:
            size = rng.choice(SIZES + [rng.randrange(0, 3000)])
        messages.append((i % 3, f"key-{i % 17}".encode() if i % 5 else None, rng.randbytes(size)))
    for i in range(big):
        messages.append((i % 3, b"big", rng.randbytes(1024 * 1024 + 1000 * (i + 1))))
    return messages


def assert_clean(reader) -> None:
    assert reader.tar_errors == []
    assert reader.invalid_paths == []
    # A 1.8-1.10 reader waits in read() between archives, so the spout's exit, like any
    # writer's close, ends one empty archive there: at most that one empty commit.
    assert reader.empty_commits <= (1 if reader.generation == "g1" else 0)


@pytest.mark.parametrize("generation", ["g1", "g2", "g3"])
def test_every_message_lands_once_with_its_bytes(generation, broker, topic, fifo, spouts,
                                                  readers):
    messages = mixed_messages(3000, seed=hash(generation) & 0xFFFF)
    produce(broker, topic, messages)
    truth = read_back(broker, topic, len(messages))
    assert sorted(truth.values()) == sorted(value for _, _, value in messages)
    expected = expected_files(topic, truth)

    reader = readers(fifo, generation=generation)
    spout = spouts(spout_env(broker, topic, fifo))
    wait_until(lambda: len(reader.snapshot()) >= len(expected) or spout.process.poll(), 120,
               "every message to be committed")
    assert reader.empty_commits == 0
    spout.signal(signal.SIGTERM)
    assert spout.wait(10) == 0, spout.log

    # Append semantics: a message delivered twice would show as a doubled file.
    assert reader.snapshot() == expected
    assert_clean(reader)
    assert reader.member_count == len(expected)
    assert len(reader.commits) <= len(expected) // 100
    ends = {p: 1 + max(o for (q, o) in truth if q == p) for p in range(3)}
    assert committed_offsets(broker, f"g-{topic}", topic) == ends


def test_reader_that_reopens_after_random_pauses_loses_nothing(broker, topic, fifo, spouts,
                                                               readers):
    """The 1.8-1.10 pattern at its most hostile: close and reopen between archives, pausing."""
    messages = mixed_messages(2000, seed=7, big=0)
    produce(broker, topic, messages)
    truth = read_back(broker, topic, len(messages))
    expected = expected_files(topic, truth)

    reader = readers(fifo, generation="g1", pause=(0.001, 0.05), seed=3)
    spout = spouts(spout_env(broker, topic, fifo, BATCH_MAX_MESSAGES=37))
    wait_until(lambda: len(reader.snapshot()) >= len(expected) or spout.process.poll(), 120,
               "every message to be committed")
    spout.signal(signal.SIGTERM)
    assert spout.wait(10) == 0, spout.log
    assert reader.snapshot() == expected
    assert_clean(reader)
    assert len(reader.commits) >= len(expected) // 37
