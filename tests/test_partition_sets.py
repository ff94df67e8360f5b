"""Partition sets (PARTITIONS) and resharding (RESUME_FROM): several exactly-once spouts split
a topic, each into its own repo; across SIGKILLs every message lands once, and a new split
takes over from the old one's records without losing or repeating a message."""

from __future__ import annotations

import random
import signal
import time

import pytest
from conftest import create_topic, pfs_env, produce, spout_env, wait_until

import spout
from test_bounded_reads import refused_in_one_line
from test_verify import tool


def commits_of(pachd, repo: str) -> list:
    if not pachd.has_branch(repo):
        return []
    return [c for c in pachd.commits(repo) if c.description.startswith("kafka-spout: ")]


def held_ranges(pachd, repo: str) -> list[tuple[str, int]]:
    """(topic/partition, offset) of every message each commit's title says it holds."""
    held = []
    for commit in commits_of(pachd, repo):
        title = commit.description.splitlines()[0]
        if " from " not in title:
            continue
        for part in title.split(" from ", 1)[1].split(", "):
            where, span = part.rsplit(" ", 1)
            first, last = map(int, span.split("-"))
            held += [(where, offset) for offset in range(first, last + 1)]
    return held


def files_of(pachd, repo: str) -> dict:
    return dict(pachd.head(repo).files) if pachd.has_branch(repo) else {}


def every_message(topic: str, partitions: int, count: int, start: int = 0) -> dict:
    return {f"/{topic}/{p}/{o:020d}": b"%d-%d" % (p, o) for p in range(partitions)
            for o in range(start, count)}


def produce_each(broker: str, topic: str, partitions: int, first: int, last: int) -> None:
    produce(broker, topic, [(p, None, b"%d-%d" % (p, o)) for o in range(first, last)
                            for p in range(partitions)])


SPLIT = {"s0": "0-1", "s1": "2-3", "s2": "4-5"}


def test_three_spouts_split_a_topic_and_sigkill_loses_or_repeats_nothing(
        broker, pachd, tmp_path, spouts):
    topic = create_topic(broker, 6)
    produce_each(broker, topic, 6, 0, 100)
    envs = {}
    for repo, partitions in SPLIT.items():
        pachd.create_repo(repo)
        (tmp_path / repo).mkdir()
        envs[repo] = pfs_env(broker, topic, pachd, tmp_path / repo,
                             OUTPUT_REPO=f"default/{repo}", PARTITIONS=partitions,
                             BATCH_MAX_MESSAGES=10, GROUP_ID=f"g-{topic}-{repo}")
    rng = random.Random(23)
    for round_ in range(2):   # each spout killed twice, at some commit count
        running = {repo: spouts(env) for repo, env in envs.items()}
        for repo, process in running.items():
            wait_until(lambda: len(commits_of(pachd, repo)) > 3 * (round_ + 1) or
                       process.process.poll() is not None, 60, f"{repo} to commit")
            time.sleep(rng.uniform(0, 0.05))  # a random moment, not a synchronisation
            process.process.kill()
            process.process.wait()
    final = {repo: spouts(env) for repo, env in envs.items()}
    expected = every_message(topic, 6, 100)
    wait_until(lambda: sum(len(files_of(pachd, repo)) for repo in SPLIT) >= len(expected),
               90, "every message in some repo", interval=0.2)
    for process in final.values():
        wait_until(lambda: "starting:" in process.log, 30, "the spout started")
        process.signal(signal.SIGTERM)
        assert process.wait(15) == 0, process.log
    union: dict = {}
    for repo, partitions in SPLIT.items():
        files = files_of(pachd, repo)
        owned = spout.parse_partition_set(partitions)
        assert all(int(name.split("/")[2]) in owned for name in files), (repo, sorted(files))
        assert not set(union) & set(files)
        union.update(files)
        held = held_ranges(pachd, repo)
        assert len(held) == len(set(held)), f"{repo}: a message in two commits"
        record = spout.record_from_description(commits_of(pachd, repo)[-1].description)
        assert {partition for _topic, partition in record[1]} == owned
    assert union == expected
    verified = tool(pachd, tmp_path, "verify", *SPLIT)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # A fourth spout on partition 1, into a repo of its own: the same messages twice.
    pachd.create_repo("s3")
    (tmp_path / "s3").mkdir()
    fourth = spouts(pfs_env(broker, topic, pachd, tmp_path / "s3", OUTPUT_REPO="default/s3",
                            PARTITIONS="1", GROUP_ID=f"g-{topic}-s3"))
    wait_until(lambda: len(files_of(pachd, "s3")) >= 100 or fourth.process.poll() is not None,
               60, "the fourth spout's copy of partition 1")
    fourth.signal(signal.SIGTERM)
    assert fourth.wait(15) == 0, fourth.log
    result = tool(pachd, tmp_path, "verify", *SPLIT, "s3")
    assert result.returncode == 1, result.stdout + result.stderr
    overlaps = [line for line in result.stdout.splitlines() if line.startswith("overlap ")]
    assert overlaps and all(line.startswith(f"overlap {topic}/1 ") for line in overlaps)
    assert all("default/s0@master commit " in line and "default/s3@master commit " in line
               for line in overlaps), overlaps
    ids = {c.id for c in commits_of(pachd, "s3")}
    assert any(set(line.replace("(", " ").split()) & ids for line in overlaps)


def test_resharding_two_spouts_into_three_with_resume_from(broker, pachd, tmp_path, spouts):
    topic = create_topic(broker, 6)
    produce_each(broker, topic, 6, 0, 30)
    old = {"a0": "0-2", "a1": "3-5"}
    for repo, partitions in old.items():
        pachd.create_repo(repo)
        (tmp_path / repo).mkdir()
        process = spouts(pfs_env(broker, topic, pachd, tmp_path / repo,
                                 OUTPUT_REPO=f"default/{repo}", PARTITIONS=partitions,
                                 GROUP_ID=f"g-{topic}-{repo}"))
        wait_until(lambda: len(files_of(pachd, repo)) >= 90 or process.process.poll(), 60,
                   f"{repo} to land its partitions")
        process.signal(signal.SIGTERM)   # the procedure: stop the old spouts first
        assert process.wait(15) == 0, process.log
    produce_each(broker, topic, 6, 30, 50)
    resume = ",".join(f"default/{repo}@master" for repo in old)
    new = {"b0": "0-1", "b1": "2-3", "b2": "4-5"}
    running = []
    for repo, partitions in new.items():
        pachd.create_repo(repo)
        (tmp_path / repo).mkdir()
        running.append(spouts(pfs_env(broker, topic, pachd, tmp_path / repo,
                                      OUTPUT_REPO=f"default/{repo}", PARTITIONS=partitions,
                                      RESUME_FROM=resume, GROUP_ID=f"g-{topic}-{repo}")))
    expected = every_message(topic, 6, 50, start=30)
    wait_until(lambda: sum(len(files_of(pachd, repo)) for repo in new) >= len(expected), 60,
               "the messages after the old split", interval=0.2)
    for process in running:
        wait_until(lambda: "RESUME_FROM" in process.log, 30, "the resumed start")
        process.signal(signal.SIGTERM)
        assert process.wait(15) == 0, process.log
    union: dict = {}
    for repo in new:
        files = files_of(pachd, repo)
        assert not set(union) & set(files)
        union.update(files)
    assert union == expected   # nothing before the old records' ends, nothing missing


def test_a_partition_named_but_absent_is_reported_once_and_the_others_flow(
        broker, fifo, spouts, readers):
    topic = create_topic(broker, 2)
    produce_each(broker, topic, 2, 0, 5)
    reader = readers(fifo, generation="g3", marker="offsets")
    process = spouts(spout_env(broker, topic, fifo, MARKER="offsets", PARTITIONS="1-3",
                               KAFKA_METADATA_MAX_AGE_MS=500))
    wait_until(lambda: len(reader.snapshot()) >= 5, 60, "partition 1's messages")
    wait_until(lambda: process.log.count(f"{topic}/2 still absent") >= 3, 30,
               "three partition checks")
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.log
    assert reader.snapshot() == {f"/{topic}/1/{o:020d}": b"1-%d" % o for o in range(5)}
    for partition in (2, 3):
        assert process.log.count(f"PARTITIONS names {topic}/{partition},") == 1, process.log


@pytest.mark.parametrize("settings, culprit", [
    ({"PARTITIONS": "0-1", "MODE": "group"}, "PARTITIONS: partition sets are for exactly-once"),
    ({"PARTITIONS": "3-1"}, "PARTITIONS: '3-1' ends before it starts"),
    ({"PARTITIONS": "one"}, "PARTITIONS: 'one' is not a partition number"),
    ({"RESUME_FROM": "default/old@master", "MARKER": "offsets", "DELIVERY": "pipe"},
     "RESUME_FROM: reads other repos' records through pachd"),
    ({"RESUME_FROM": "default/nowhere@master"}, "RESUME_FROM: repo default/nowhere does not exist"),
])
def test_bad_splits_stop_the_spout_with_one_line(broker, pachd, tmp_path, fifo, settings,
                                                 culprit):
    env = pfs_env(broker, "t", pachd, tmp_path, **settings)
    if settings.get("DELIVERY") == "pipe":
        env["OUTPUT_PIPE"] = str(fifo)
    refused_in_one_line(env, culprit)


def test_the_sharded_example_specs_parse_strictly_and_split_the_partitions(tmp_path):
    """demo/sharded/specs.py: a spec per spout and the union pipeline, as pachctl 2.x parses
    them; the spouts' PARTITIONS cover the topic once; a resharding generation resumes from
    the old repos."""
    import importlib.util

    from pachd_double import write_pach_config
    from pachyderm_sdk.api import pps
    from test_packaging import ROOT, check_message
    loader = importlib.util.spec_from_file_location("specs", ROOT / "demo/sharded/specs.py")
    specs = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(specs)
    config_file = write_pach_config(tmp_path / "config.json", "localhost:1653", "token")
    for generation, resume in ((1, None), (2, ["kafka-spout-0", "kafka-spout-1"])):
        made = specs.specs(3, 8, generation, resume)
        covered: list[int] = []
        for name, spec in made.items():
            check_message(pps.CreatePipelineRequest, spec, "")
            if "union" in spec.get("input", {}):
                repos = [item["pfs"]["repo"] for item in spec["input"]["union"]]
                assert repos == [n[:-5] for n in made if not n.endswith("-union.json")]
                continue
            env = dict(spec["transform"]["env"], PACH_CONFIG=str(config_file),
                       PPS_PIPELINE_NAME=spec["pipeline"]["name"], PPS_PROJECT_NAME="default")
            config = spout.Config.from_sources(env)
            assert config.exactly_once and config.group_id == spec["pipeline"]["name"]
            covered += sorted(config.partitions)
            assert [str(repo) for repo in config.resume_from] == \
                [f"default/{repo}@master" for repo in resume or ()]
        assert covered == list(range(8))
