"""Pachyderm 2.x: the spout commits through pachd over gRPC: the double (pachd_double.py) under
make test, real pachd (real_pachd.py) under make test-pachd."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import (PACH_REPO, SPOUT, committed_offsets, create_topic, double_only, free_port,
                      pach_client, pfs_env, produce, read_back, spout_commits, wait_until)

import spout

REPO = PACH_REPO


def head_files(pachd, repo: str = REPO) -> dict:
    """The files of the head once finished: pachd sets `finished` a little after FinishCommit
    has returned (`finishing`), and never while the head is open."""
    return wait_until(lambda: (head := pachd.head(repo)).finished and head, 10,
                      "the head to be finished").files


def all_finished(pachd) -> bool:
    return all(c.finished for c in pachd.commits(REPO))


def expected_paths(topic: str, truth: dict) -> dict:
    return {f"/{topic}/{p}/{o:020d}": value for (p, o), value in truth.items()}


def held_ranges(description: str) -> list[tuple[str, int, int]]:
    """(topic/partition, first, last) of each offset range a commit's first line names."""
    held = description.splitlines()[0].split(" from ", 1)[1]
    ranges = []
    for part in held.split(", "):
        name, span = part.rsplit(" ", 1)
        first, last = span.split("-")
        ranges.append((name, int(first), int(last)))
    return ranges


def assert_each_file_written_once(pachd) -> None:
    """Every file comes from exactly one finished commit: none missing, none written twice.
    Real pachd's DiffFile cannot see a file rewritten with the same bytes, so the offset
    ranges the commits' descriptions name must not overlap either."""
    wait_until(lambda: all_finished(pachd), 10, "every commit finished")  # two-step finishing
    writers: dict = {}
    spans: dict = {}
    for commit in spout_commits(pachd):
        assert commit.finished
        assert commit.modify_streams in (1, None)  # one ModifyFile stream (None: unseen)
        for path in commit.changed:
            writers.setdefault(path, []).append(commit.id)
        for name, first, last in held_ranges(commit.description):
            spans.setdefault(name, []).append((first, last))
    doubled = {path: ids for path, ids in writers.items() if len(ids) > 1}
    assert not doubled, f"{len(doubled)} file(s) written by more than one commit"
    for name, ranges in spans.items():
        ranges.sort()
        overlaps = [(a, b) for a, b in zip(ranges, ranges[1:]) if b[0] <= a[1]]
        assert not overlaps, f"{name}: offsets in more than one commit: {overlaps[:3]}"


def test_description_record_round_trip():
    positions = {("orders", 0): 400, ("orders", 1): 12, ("refunds", 0): 3}
    text = spout.describe_commit({("orders", 0): (100, 400)}, 300, ["orders", "refunds"],
                                 positions)
    first, second, _ = text.splitlines()
    assert first == "kafka-spout: 300 message(s) from orders/0 100-399"
    assert second == "next offsets: orders/0=400 orders/1=12 refunds/0=3"
    assert spout.record_from_description(text) == (["orders", "refunds"], positions)
    assert spout.record_from_description("") is None
    assert spout.record_from_description("pachctl put file") is None
    with pytest.raises(ValueError):
        spout.record_from_description("kafka-spout: 3 message(s)\nrecord: {oops")


def test_mixed_sizes_land_one_commit_per_batch_and_offsets_follow(broker, pachd, tmp_path,
                                                                  spouts):
    topic = create_topic(broker, 3)
    rng = random.Random(7)
    sizes = [0, 1, 100, 10_000, 200_000] * 400 + [1_300_000] * 4
    rng.shuffle(sizes)
    produce(broker, topic, [(i % 3, None, rng.randbytes(size)) for i, size in enumerate(sizes)])
    truth = read_back(broker, topic, len(sizes))
    expected = expected_paths(topic, truth)
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, BATCH_MAX_BYTES="4MiB"))
    wait_until(lambda: len(pachd.head(REPO).files) >= len(expected) or process.process.poll(),
               120, "every message in a finished commit", interval=0.2)
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0, process.log
    files = head_files(pachd)
    assert files == expected
    commits = spout_commits(pachd)
    # One commit per batch: no batch over 4 MiB of data unless a single message.
    for commit in commits:
        size = sum(len(files[path]) for path in commit.changed)
        assert size <= 4 * 1024 * 1024 or len(commit.changed) == 1
    assert_each_file_written_once(pachd)
    if pachd.is_double:  # real pachd does not count calls
        calls = pachd.calls
        assert calls.count("StartCommit") == calls.count("FinishCommit") == len(commits)
        assert calls.count("ModifyFile") == len(commits)
    ends = {p: max(o for (q, o) in truth if q == p) + 1 for p in range(3)}
    assert committed_offsets(broker, f"g-{topic}", topic) == ends
    # The head's record is where each partition resumes.
    _, positions = spout.record_from_description(pachd.head(REPO).description)
    assert positions == {(topic, p): end for p, end in ends.items()}
    print(f"messages={len(sizes)} commits={len(commits)} "
          f"commits/message={len(commits) / len(sizes):.4f}")


def held_rows(pachd) -> list:
    """((partition, offset), value) of every row of every segment at the head."""
    from test_segments import segment_rows
    return [((row["partition"], row["offset"]), row["value"])
            for path, data in pachd.head(REPO).files.items() for row in segment_rows(path, data)]


@pytest.mark.parametrize("format", ["raw", "parquet"])
def test_chaos_sigkill_every_message_in_exactly_one_commit(broker, pachd, tmp_path, spouts,
                                                           format):
    """SIGKILL at random moments, mid-stream, and between FinishCommit and its answer (the
    last two need the double's hooks: real pachd gets random moments only)."""
    topic = create_topic(broker, 3)
    total = 3000
    produce(broker, topic, [(i % 3, None, b"m-%d" % i) for i in range(total)])
    truth = read_back(broker, topic, total)
    expected = expected_paths(topic, truth)
    env = pfs_env(broker, topic, pachd, tmp_path, BATCH_MAX_MESSAGES=60, FORMAT=format)
    if format == "raw":
        def delivered():
            return len(pachd.head(REPO).files)
    else:  # a segment holds many messages, each in one row
        expected = truth

        def delivered():
            return len(held_rows(pachd))
    rng = random.Random(11)
    kills = []
    moments = ["random", "mid-stream", "finish-unanswered", "random", "mid-stream",
               "finish-unanswered", "random"]
    if not pachd.is_double:
        moments = ["random"] * len(moments)
    started = []
    for moment in moments:
        process = spouts(env)
        started.append(process)
        if moment == "random":
            wait_until(lambda: len(spout_commits(pachd)) > len(kills) * 3, 60, "a commit")
            time.sleep(rng.uniform(0, 0.3))  # a random moment, not a synchronisation
        elif moment == "mid-stream":
            pachd.modify_stream_open.clear()
            pachd.hold_modify_streams(True)
            wait_until(pachd.modify_stream_open.is_set, 60, "a ModifyFile stream under way")
        else:
            pachd.finish_applied.clear()
            pachd.delay_finish_reply(30)
            wait_until(pachd.finish_applied.is_set, 60, "a FinishCommit applied")
        process.process.kill()
        process.process.wait()
        if pachd.is_double:
            pachd.hold_modify_streams(False)
            pachd.delay_finish_reply(0)
        kills.append(moment)
    final = spouts(env)
    # Started too (its handlers set): the killed ones may have delivered everything already.
    wait_until(lambda: (delivered() >= len(expected) and "starting:" in final.log) or
               final.process.poll(), 120, "every message", interval=0.2)
    final.signal(signal.SIGTERM)
    assert final.wait(10) == 0, final.log
    files = head_files(pachd) if format == "raw" else dict(held_rows(pachd))
    missing = set(expected) - set(files)
    assert not missing
    assert files == expected
    if format != "raw":
        assert len(held_rows(pachd)) == total, "a message is in two rows"
    assert_each_file_written_once(pachd)
    wait_until(lambda: all_finished(pachd), 10, "every commit finished")
    commits = spout_commits(pachd)
    dropped = sum(p.log.count("dropped") for p in [*started, final])
    print(f"pachd={'double' if pachd.is_double else 'real'} format={format} "
          f"kills={len(kills)} messages={total} commits={len(commits)} "
          f"missing={len(missing)} doubled=0 commits/message={len(commits) / total:.4f} "
          f"open-commits-dropped={dropped}")


def test_pachd_away_and_back_mid_stream(broker, pachd, tmp_path, spouts):
    double_only(pachd, "stop()/start() that keep its state")
    topic = create_topic(broker, 3)
    produce(broker, topic, [(i % 3, None, b"a-%d" % i) for i in range(300)])
    process = spouts(pfs_env(broker, topic, pachd, tmp_path))
    wait_until(lambda: len(pachd.head(REPO).files) >= 300, 60, "the first messages")
    pachd.stop()
    produce(broker, topic, [(i % 3, None, b"b-%d" % i) for i in range(300)])
    wait_until(lambda: "failed" in process.log and pachd.address in process.log, 30,
               "a warning naming pachd's address")
    assert process.process.poll() is None
    pachd.start()
    wait_until(lambda: len(pachd.head(REPO).files) >= 600, 60, "the messages held back")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    truth = read_back(broker, topic, 600)
    assert head_files(pachd) == expected_paths(topic, truth)
    assert_each_file_written_once(pachd)


def test_sigterm_while_pachd_withholds_an_answer_exits_in_time(broker, pachd, tmp_path,
                                                               spouts):
    double_only(pachd, "delay_finish_reply")
    topic = create_topic(broker, 3)
    produce(broker, topic, [(0, None, b"x")])
    process = spouts(pfs_env(broker, topic, pachd, tmp_path))
    wait_until(lambda: spout_commits(pachd), 60, "the first commit")
    pachd.finish_applied.clear()
    pachd.delay_finish_reply(60)
    produce(broker, topic, [(1, None, b"y")])
    wait_until(pachd.finish_applied.is_set, 30, "FinishCommit applied, its answer withheld")
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert process.wait(12) == 0
    assert time.monotonic() - started < 10
    pachd.delay_finish_reply(0)
    wait_until(lambda: all_finished(pachd), 10, "no open commit after a clean stop")


def test_open_head_left_by_a_dead_spout_is_dropped_and_a_foreign_one_waited_for(
        broker, pachd, tmp_path, spouts):
    from pachyderm_sdk.api import pfs
    topic = create_topic(broker, 3)
    produce(broker, topic, [(p, None, b"v%d" % p) for p in range(3)])
    client = pach_client(pachd)
    branch = pfs.Branch.from_uri(f"default/{REPO}@master")
    # A commit someone else holds open: the spout waits for it and says so.
    foreign = client.pfs.start_commit(branch=branch, description="a person's commit")
    process = spouts(pfs_env(broker, topic, pachd, tmp_path))
    wait_until(lambda: "not started by kafka-spout" in process.log, 30, "the waiting line")
    assert not spout_commits(pachd)
    client.pfs.finish_commit(commit=foreign)
    wait_until(lambda: len(pachd.head(REPO).files) >= 3, 60, "the messages")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    # One of its own, left open by a spout that died mid-commit: dropped, then rewritten.
    produce(broker, topic, [(0, None, b"later")])
    left_open = client.pfs.start_commit(branch=branch, description="kafka-spout: 1 message(s)")
    process = spouts(pfs_env(broker, topic, pachd, tmp_path))
    wait_until(lambda: len(pachd.head(REPO).files) >= 4, 60, "the later message")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert left_open.id in process.log and "dropped" in process.log
    assert left_open.id not in [c.id for c in pachd.commits(REPO)]
    assert_each_file_written_once(pachd)


def test_a_start_commit_whose_answer_was_lost_is_found_and_dropped(broker, pachd, tmp_path,
                                                                    spouts):
    """pachd started the commit but the spout never learnt its id: the next StartCommit is
    refused (the head is open) until the spout finds that commit of its own and drops it."""
    from pachyderm_sdk.api import pfs
    topic = create_topic(broker, 3)
    produce(broker, topic, [(0, None, b"first")])
    process = spouts(pfs_env(broker, topic, pachd, tmp_path))
    # Finished: real pachd shows an open commit's files, and a start would meet it open.
    wait_until(lambda: (head := pachd.head(REPO)).finished and len(head.files) >= 1, 60,
               "the first message, its commit finished")
    client = pach_client(pachd)
    lost = client.pfs.start_commit(branch=pfs.Branch.from_uri(f"default/{REPO}@master"),
                                   description=spout.describe_commit({}, 0, [topic], {}))
    produce(broker, topic, [(1, None, b"second")])
    wait_until(lambda: len(pachd.head(REPO).files) >= 2, 60, "the second message")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert "has not been finished" in process.log
    assert f"dropped the unfinished commit {lost.id}" in process.log
    assert lost.id not in [c.id for c in pachd.commits(REPO)]
    assert_each_file_written_once(pachd)


def test_group_mode_resumes_at_the_larger_of_record_and_group_offset(broker, pachd, tmp_path,
                                                                     spouts):
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata
    from pachyderm_sdk.api import pfs
    topic = create_topic(broker, 3)
    produce(broker, topic, [(p, None, b"%d-%d" % (p, i)) for i in range(10) for p in range(3)])
    group = KafkaConsumer(bootstrap_servers=broker, group_id=f"g-{topic}",
                          enable_auto_commit=False)
    group.commit({TopicPartition(topic, 0): OffsetAndMetadata(8, "", -1),
                  TopicPartition(topic, 1): OffsetAndMetadata(2, "", -1)})
    group.close(autocommit=False)
    # The repo records 0 -> 4 and 1 -> 6; partition 2 only has AUTO_OFFSET_RESET.
    client = pach_client(pachd)
    branch = pfs.Branch.from_uri(f"default/{REPO}@master")
    description = spout.describe_commit({}, 0, [topic], {(topic, 0): 4, (topic, 1): 6})
    commit = client.pfs.start_commit(branch=branch, description=description)
    client.pfs.finish_commit(commit=commit)
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, MODE="group"))
    expected = {f"/{topic}/{p}/{o:020d}": b"%d-%d" % (p, o)
                for p, first in ((0, 8), (1, 6), (2, 0)) for o in range(first, 10)}
    wait_until(lambda: len(pachd.head(REPO).files) >= len(expected) or process.process.poll(),
               90, "the resumed messages", interval=0.2)
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0, process.log
    assert head_files(pachd) == expected


def run_spout(env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SPOUT)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def base_env(tmp_path):
    return {"HOST": "127.0.0.1", "PORT": "9", "TOPIC": "events",
            "OUTPUT_PIPE": str(tmp_path / "no-pipe"), "OUTPUT_REPO": f"default/{REPO}",
            "PATH": "/usr/bin:/bin"}


@pytest.mark.parametrize("change, culprit", [
    ({"PACH_CONFIG": "/nonexistent.json"}, "PACH_CONFIG: /nonexistent.json does not exist"),
    ({"PACH_CONFIG": "{bad}"}, "is not JSON"),
    ({"PACH_CONFIG": "{empty}"}, "has no active context"),
    ({"DELIVERY": "pfs", "PACHD_ADDRESS": "ftp://pachd:1"}, "PACHD_ADDRESS: 'ftp://pachd:1'"),
    ({"DELIVERY": "pfs", "PACHD_ADDRESS": "pachd:1", "MARKER": "offsets"},
     "MARKER: a Pachyderm 1.x setting"),
    ({"PACHD_ADDRESS": "pachd:1", "OUTPUT_REPO": "a/b/c"}, "OUTPUT_REPO: 'a/b/c' is not"),
    ({"PACHD_ADDRESS": "pachd:1", "OUTPUT_REPO": None}, "OUTPUT_REPO: required outside"),
    ({"PACHD_ADDRESS": "pachd:1", "PACH_TOKEN_FILE": "/nonexistent"},
     "PACH_TOKEN_FILE: cannot read /nonexistent"),
    ({}, "OUTPUT_PIPE: "),
])
def test_configuration_errors_are_one_line_and_exit_2(base_env, tmp_path, change, culprit):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text(json.dumps({"v2": {}}))
    env = dict(base_env)
    for key, value in change.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value.replace("{bad}", str(tmp_path / "bad.json")).replace(
                "{empty}", str(tmp_path / "empty.json"))
    result = run_spout(env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change, culprit", [
    ({"PACH_TOKEN": "wrong"}, "PACH_TOKEN: pachd at grpc://127.0.0.1:"),
    ({"PACH_TOKEN": None}, "PACH_TOKEN: pachd at grpc://127.0.0.1:"),
    ({"OUTPUT_REPO": "default/nope"}, "OUTPUT_REPO: repo default/nope does not exist on pachd"),
])
def test_what_pachd_refuses_is_one_line_and_exit_2(base_env, pachd, change, culprit):
    env = {**base_env, "PACHD_ADDRESS": pachd.address, "PACH_TOKEN": pachd.token}
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    result = run_spout(env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"spout.py: error: {culprit}")
    assert "Traceback" not in result.stderr
    assert pachd.token not in result.stderr
    if "OUTPUT_REPO" in change:
        assert result.stderr.rstrip().endswith(
            "create it with pachctl create repo nope --project default")


def test_a_plain_repo_without_a_branch_gets_one_from_the_first_commit(broker, pachd, tmp_path,
                                                                      spouts):
    """`pachctl create repo` makes no branch: the spout starts as with no commits yet, and its
    first StartCommit creates the branch (here both master of a new repo and a new branch of
    the pipeline's repo)."""
    topic = create_topic(broker, 3)
    produce(broker, topic, [(i % 3, None, b"p-%d" % i) for i in range(30)])
    truth = read_back(broker, topic, 30)
    pachd.create_repo("plain")
    for repo, branch in (("plain", "master"), (REPO, "dev")):
        process = spouts(pfs_env(broker, topic, pachd, tmp_path, GROUP_ID=f"g-{repo}-{branch}",
                                 OUTPUT_REPO=f"default/{repo}@{branch}"))
        wait_until(lambda: pachd.file_count(repo, branch=branch) >= 30 or process.process.poll(),
                   60, "the messages on the new branch")
        process.signal(signal.SIGTERM)
        assert process.wait(10) == 0, process.log
        assert "has no branch" in process.log and "Traceback" not in process.log
        commits = pachd.commits(repo, branch=branch)
        assert commits[0].parent_id is None and commits[0].description.startswith("kafka-spout")
        wait_until(lambda: pachd.head(repo, branch=branch).finished, 10, "the head finished")
        assert pachd.head(repo, branch=branch).files == expected_paths(topic, truth)
    assert [c.description for c in pachd.commits(REPO)] == [""]  # master untouched


def test_pachd_unreachable_at_start_is_retried_and_sigterm_still_stops(base_env, spouts):
    port = free_port()
    process = spouts({**base_env, "PACHD_ADDRESS": f"127.0.0.1:{port}"})
    wait_until(lambda: f"cannot reach pachd at grpc://127.0.0.1:{port}" in process.log, 30,
               "the warning naming the address")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert "Traceback" not in process.log


@pytest.mark.parametrize("sizes", [[0], [1, 127, 128], [16383, 16384, 300_000], [9_000_001]])
def test_hand_encoded_modify_file_requests_equal_the_sdks(sizes):
    from pachyderm_sdk.api import pfs
    members = [(f"t/{i}/" + "k" * (i * 70), bytes([i % 251]) * size, 0)
               for i, size in enumerate(sizes)]
    chunk = 4 * 1024 * 1024
    expected = []
    for name, data, _ in members:
        expected.append(bytes(pfs.ModifyFileRequest(delete_file=pfs.DeleteFile(path=name))))
        for start in range(0, len(data), chunk) if data else (0,):
            expected.append(bytes(pfs.ModifyFileRequest(
                add_file=pfs.AddFile(path=name, raw=data[start:start + chunk]))))
    assert list(spout.modify_file_requests(members, chunk)) == expected


def test_the_record_is_looked_for_past_other_commits_but_not_forever(pachd, tmp_path,
                                                                    monkeypatch):
    """Commits of others on top of the spout's last one are walked past; beyond the limit the
    spout says it found none."""
    import threading
    from pachyderm_sdk.api import pfs
    client = pach_client(pachd)
    branch = pfs.Branch.from_uri(f"default/{REPO}@master")
    ours = spout.describe_commit({}, 0, ["t"], {("t", 0): 42})
    client.pfs.finish_commit(commit=client.pfs.start_commit(branch=branch, description=ours))
    for _ in range(3):
        client.pfs.finish_commit(commit=client.pfs.start_commit(branch=branch))
    config = spout.Config.from_sources({
        "HOST": "127.0.0.1", "PORT": "9", "TOPIC": "t", "DELIVERY": "pfs",
        "PACHD_ADDRESS": pachd.address, "PACH_TOKEN": pachd.token,
        "OUTPUT_REPO": f"default/{REPO}"})
    delivery = spout.PfsDelivery(config, threading.Event())
    assert delivery.start() == (["t"], {("t", 0): 42})
    monkeypatch.setattr(spout, "RECORD_SEARCH_COMMITS", 3)
    assert delivery.start() == ([], {})
    delivery.close(time.monotonic() + 1)


def test_a_second_writer_on_the_branch_is_waited_for_never_dropped(broker, pachd, tmp_path,
                                                                    spouts):
    """Someone else commits to the spout's branch while it commits: the spout waits while
    their commit is open, never drops it, and lands every message exactly once."""
    import threading
    from pachyderm_sdk.api import pfs
    topic = create_topic(broker, 3)
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, BATCH_MAX_MESSAGES=40))
    client = pach_client(pachd)
    branch = pfs.Branch.from_uri(f"default/{REPO}@master")
    written: list[str] = []
    done = threading.Event()

    def writer():
        for number in range(12):
            while True:  # the spout's commit may be open: pachd refuses, as it refuses it
                try:
                    commit = client.pfs.start_commit(branch=branch,
                                                     description=f"writer {number}")
                    break
                except Exception as error:  # grpc.RpcError
                    assert "has not been finished" in str(error), error
                    time.sleep(0.02)
            client.pfs.modify_file(iter([
                pfs.ModifyFileRequest(set_commit=commit),
                pfs.ModifyFileRequest(add_file=pfs.AddFile(path=f"/writer/{number}",
                                                           raw=b"w%d" % number))]))
            time.sleep(0.3)  # held open while the spout wants to commit
            client.pfs.finish_commit(commit=commit)
            written.append(commit.id)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    for round_ in range(6):
        produce(broker, topic, [(i % 3, None, b"r%d-%d" % (round_, i)) for i in range(100)])
        time.sleep(0.4)  # spread over the writer's commits: a workload, not a synchronisation
    thread.join(120)
    assert done.is_set() and len(written) == 12
    truth = read_back(broker, topic, 600)
    expected = {**expected_paths(topic, truth),
                **{f"/writer/{n}": b"w%d" % n for n in range(12)}}
    wait_until(lambda: len(pachd.head(REPO).files) >= len(expected) or process.process.poll(),
               120, "every message and every writer file", interval=0.2)
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0, process.log
    assert head_files(pachd) == expected
    chain = [c.id for c in pachd.commits(REPO)]
    assert all(commit_id in chain for commit_id in written), "a writer's commit was dropped"
    drops = [line for line in process.log.splitlines() if "dropped" in line]
    assert not [line for line in drops if any(c in line for c in written)], drops
    assert_each_file_written_once(pachd)
    waits = process.log.count("has not been finished")
    print(f"pachd={'double' if pachd.is_double else 'real'} writer-commits=12 "
          f"spout-commits={len(spout_commits(pachd))} refused-start-commits={waits}")


@pytest.mark.parametrize("token, reason", [
    ("not-the-token", "provided auth token is corrupted or has expired"),
    (None, "no authentication token"),
])
def test_auth_a_wrong_or_missing_token_is_one_line_a_good_one_commits(
        broker, pachd, tmp_path, spouts, token, reason):
    """pachd with auth on (testpachd -auth under make test-pachd): the token decides."""
    topic = create_topic(broker, 3)
    produce(broker, topic, [(0, None, b"authorised")])
    env = {**pfs_env(broker, topic, pachd, tmp_path), "PACHD_ADDRESS": pachd.address}
    env.pop("PACH_CONFIG")
    refused = run_spout({**env, **({"PACH_TOKEN": token} if token else {})})
    assert refused.returncode == 2, refused.stderr
    [line] = [text for text in refused.stderr.splitlines() if "error:" in text]
    assert line.startswith(f"spout.py: error: PACH_TOKEN: pachd at grpc://{pachd.address} "
                           "refused the spout") and reason in line, refused.stderr
    assert "Traceback" not in refused.stderr and pachd.token not in refused.stderr
    assert not spout_commits(pachd)
    good = spouts({**env, "PACH_TOKEN": pachd.token})
    wait_until(lambda: pachd.file_count(REPO) >= 1 or good.process.poll(), 60, "the message")
    good.signal(signal.SIGTERM)
    assert good.wait(10) == 0, good.log
    assert list(head_files(pachd).values()) == [b"authorised"]


def delivery_for(pachd, repo: str = f"default/{REPO}"):
    import threading
    config = spout.Config.from_sources({
        "HOST": "127.0.0.1", "PORT": "9", "TOPIC": "t", "DELIVERY": "pfs",
        "PACHD_ADDRESS": pachd.address, "PACH_TOKEN": pachd.token, "OUTPUT_REPO": repo})
    return spout.PfsDelivery(config, threading.Event())


def test_a_commit_still_finishing_when_its_answer_was_lost_is_not_made_again(pachd,
                                                                            monkeypatch):
    """FinishCommit applied, its answer lost, and pachd not done finishing it (real pachd
    sets `finished` later): the commit is held, not dropped, not written again."""
    import threading
    import grpc
    import pachd_double
    double_only(pachd, "delay_finish_reply")
    monkeypatch.setattr(pachd_double, "FINISH_SECONDS", 30.0)
    delivery = delivery_for(pachd)
    assert delivery.start() == ([], {})
    description = spout.describe_commit({("t", 0): (0, 1)}, 1, ["t"], {("t", 0): 1})
    pachd.finish_applied.clear()
    pachd.delay_finish_reply(30)
    # pachd goes away once FinishCommit is applied, before its answer: the call fails.
    cut = threading.Thread(target=lambda: pachd.finish_applied.wait(10) and pachd.stop())
    cut.start()
    with pytest.raises(grpc.RpcError):
        delivery._commit([("t/0/0", b"x", 0)], 1, description, None)
    cut.join(10)
    pachd.delay_finish_reply(0)
    pachd.start()
    delivery._commit([("t/0/0", b"x", 0)], 1, description, None)  # settles: already made
    [made] = spout_commits(pachd)
    assert not made.finished and made.description == description  # finishing, not finished
    assert pachd.calls.count("StartCommit") == 1 and pachd.calls.count("DropCommitSet") == 0
    delivery.close(time.monotonic() + 1)


def test_a_lost_first_start_commit_on_a_repo_without_branch_is_retried(pachd):
    """The StartCommit that would create the branch fails: settling finds no branch, so
    nothing of ours is open, and the next attempt creates the branch."""
    import grpc
    double_only(pachd, "fail_next")
    pachd.create_repo("plain")
    delivery = delivery_for(pachd, "default/plain")
    assert delivery.start() == ([], {})
    description = spout.describe_commit({("t", 0): (0, 1)}, 1, ["t"], {("t", 0): 1})
    pachd.fail_next("StartCommit")
    with pytest.raises(grpc.RpcError):
        delivery._commit([("t/0/0", b"x", 0)], 1, description, None)
    assert not pachd.has_branch("plain")
    delivery._commit([("t/0/0", b"x", 0)], 1, description, None)
    [made] = pachd.commits("plain")
    assert made.parent_id is None and made.description == description
    assert made.files == {"/t/0/0": b"x"}
    delivery.close(time.monotonic() + 1)
