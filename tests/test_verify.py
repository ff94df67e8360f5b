"""`spout.py verify` and `spout.py locate`: read-only checks of 2.x output repos from the
commits' records, against the pachd double (make test) or real pachd (make test-pachd)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import (PACH_REPO, SPOUT, create_topic, pach_client, pfs_env, produce,
                      wait_until)

import spout


def tool(pachd, tmp_path, *args, **env) -> subprocess.CompletedProcess:
    """spout.py verify/locate as a user runs it, with a pachctl config for this pachd."""
    from pachd_double import write_pach_config
    config = write_pach_config(tmp_path / "tools-pachctl.json", pachd.address, pachd.token)
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("KAFKA_", "PACH")) and k not in ("HOST", "PORT",
                                                                 "BOOTSTRAP_SERVERS")}
    full.update({"PACH_CONFIG": str(config), **{k: str(v) for k, v in env.items()}})
    return subprocess.run([sys.executable, str(SPOUT), *args], env=full, capture_output=True,
                          text=True, timeout=120)


def positions(pachd, repo: str) -> dict:
    record = spout.record_from_description(pachd.head(repo).description)
    return record[1] if record else {}


def fill(broker, pachd, tmp_path, spouts, topic, repo, ends: dict, **extra):
    """Runs a spout into repo until its record holds every partition to ends, then stops it."""
    env = pfs_env(broker, topic, pachd, tmp_path, OUTPUT_REPO=f"default/{repo}",
                  GROUP_ID=f"g-{repo}-{topic}", BATCH_MAX_MESSAGES=7, **extra)
    process = spouts(env)
    wanted = {(topic, p): end for p, end in ends.items()}
    wait_until(lambda: positions(pachd, repo) == wanted or process.process.poll() is not None,
               90, f"{repo} to hold every message", interval=0.2)
    assert process.stop() == 0, process.log
    assert positions(pachd, repo) == wanted, process.log


def craft(pachd, repo: str, batches) -> list[str]:
    """Commits with kafka-spout descriptions through the SDK: batches of (ranges, positions)
    or (ranges, positions, {path: bytes})."""
    from pachyderm_sdk.api import pfs
    pachd.create_repo(repo)
    client = pach_client(pachd)
    branch = pfs.Branch(repo=pfs.Repo(name=repo, type="user",
                                      project=pfs.Project(name="default")), name="master")
    ids = []
    for ranges, resume, *files in batches:
        topics = sorted({topic for topic, _ in resume})
        description = spout.describe_commit(
            ranges, sum(end - first for first, end in ranges.values()), topics, resume)
        commit = client.pfs.start_commit(branch=branch, description=description)
        for path, data in (files[0] if files else {}).items():
            client.pfs.put_file_from_bytes(commit=commit, path=path, data=data)
        client.pfs.finish_commit(commit=commit)
        ids.append(commit.id)
    return ids


def test_verify_a_repo_a_spout_filled(broker, pachd, tmp_path, spouts):
    topic = create_topic(broker, 3)
    produce(broker, topic, [(i % 3, None, b"v%d" % i) for i in range(45)])
    fill(broker, pachd, tmp_path, spouts, topic, PACH_REPO, {0: 15, 1: 15, 2: 15})
    result = tool(pachd, tmp_path, "verify", PACH_REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PARTITION", "OFFSETS", "REPO", "COMMITS"]
    for partition in range(3):
        row = next(line for line in lines if line.startswith(f"{topic}/{partition} "))
        assert row.split()[1:3] == ["0-14", f"default/{PACH_REPO}@master"]
    assert "0 gap(s), 0 overlap(s)" in lines[-1]
    assert not any(line.startswith(("gap ", "overlap ")) for line in lines)

    result = tool(pachd, tmp_path, "verify", "--json", f"default/{PACH_REPO}@master")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["gaps"] == [] and report["overlaps"] == []
    assert sorted((run["partition"], run["first"], run["end"]) for run in report["held"]) == \
        [(0, 0, 15), (1, 0, 15), (2, 0, 15)]
    made = [c for c in pachd.commits(PACH_REPO) if c.description.startswith("kafka-spout: ")]
    held_by = {commit for run in report["held"] for commit in run["commits"]}
    assert held_by == {c.id for c in made}
    repo = report["repos"][f"default/{PACH_REPO}@master"]
    assert repo["spout_commits"] == len(made) and repo["commits"] == len(made) + 1


def test_two_spouts_on_one_topic_overlap(broker, pachd, tmp_path, spouts):
    topic = create_topic(broker, 2)
    produce(broker, topic, [(i % 2, None, b"v%d" % i) for i in range(20)])
    pachd.create_pipeline_repo("other")
    fill(broker, pachd, tmp_path, spouts, topic, PACH_REPO, {0: 10, 1: 10})
    fill(broker, pachd, tmp_path, spouts, topic, "other", {0: 10, 1: 10})
    result = tool(pachd, tmp_path, "verify", PACH_REPO, "other")
    assert result.returncode == 1, result.stdout + result.stderr
    overlaps = [line for line in result.stdout.splitlines() if line.startswith("overlap ")]
    assert overlaps
    ids = {repo: {c.id for c in pachd.commits(repo)} for repo in (PACH_REPO, "other")}
    first = next(line for line in overlaps if line.startswith(f"overlap {topic}/0 0-"))
    assert f"default/{PACH_REPO}@master commit " in first and "default/other@master commit " \
        in first
    named = set(first.replace("(", " ").split())
    assert named & ids[PACH_REPO] and named & ids["other"]
    report = json.loads(tool(pachd, tmp_path, "verify", "--json", PACH_REPO, "other").stdout)
    assert report["ok"] is False
    covered = {}
    for overlap in report["overlaps"]:
        repos = {holder["repo"] for holder in overlap["holders"]}
        assert repos == {f"default/{PACH_REPO}@master", "default/other@master"}
        for offset in range(overlap["first"], overlap["end"]):
            covered.setdefault(overlap["partition"], set()).add(offset)
    assert covered == {0: set(range(10)), 1: set(range(10))}  # every offset, twice held


def test_a_crafted_gap_is_named_and_read_back_from_kafka(broker, pachd, tmp_path):
    topic = create_topic(broker, 1)
    produce(broker, topic, [(0, None, b"v%d" % i) for i in range(30)])
    ids = craft(pachd, "crafted", [
        ({(topic, 0): (0, 10)}, {(topic, 0): 10}),
        ({(topic, 0): (20, 30)}, {(topic, 0): 30}),   # 10-19: nobody's
    ])
    result = tool(pachd, tmp_path, "verify", "crafted")
    assert result.returncode == 1, result.stdout + result.stderr
    gap = [line for line in result.stdout.splitlines() if line.startswith("gap ")]
    assert gap == [f"gap {topic}/0 10-19: no commit holds it; default/crafted@master commit "
                   f"{ids[1]} resumes past it after commit {ids[0]}"]
    assert "1 gap(s), 0 overlap(s)" in result.stdout

    result = tool(pachd, tmp_path, "verify", "crafted", BOOTSTRAP_SERVERS=broker)
    assert result.returncode == 1, result.stdout + result.stderr
    gap = next(line for line in result.stdout.splitlines() if line.startswith("gap "))
    assert gap.endswith("Kafka holds 10 record(s) there (first 10): missing from Pachyderm")
    report = json.loads(tool(pachd, tmp_path, "verify", "crafted", "--json",
                             BOOTSTRAP_SERVERS=broker).stdout)
    assert [(g["first"], g["last"], g["kafka"]["records"]) for g in report["gaps"]] == \
        [(10, 19, 10)]


def locate(pachd, tmp_path, *args, **env):
    return tool(pachd, tmp_path, "locate", *args, **env)


def test_locate_in_raw_jsonl_and_parquet_repos(broker, pachd, tmp_path, spouts):
    topic = create_topic(broker, 2)
    produce(broker, topic, [(i % 2, None, b"v%d" % i) for i in range(40)])
    repos = {"raw": PACH_REPO, "jsonl": "segments-j", "parquet": "segments-p"}
    for format, repo in repos.items():
        if repo != PACH_REPO:
            pachd.create_pipeline_repo(repo)
        fill(broker, pachd, tmp_path, spouts, topic, repo, {0: 20, 1: 20}, FORMAT=format)
    commit_ids = {repo: {c.id for c in pachd.commits(repo)} for repo in repos.values()}

    result = locate(pachd, tmp_path, topic, "1", "13", PACH_REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip()
    prefix = f"{topic}/1@13: default/{PACH_REPO}@master commit "
    assert line.startswith(prefix), line
    commit, word, path = line[len(prefix):].split()
    assert commit in commit_ids[PACH_REPO] and word == "file"
    assert path == f"/{topic}/1/{13:020d}"
    assert pachd.head(PACH_REPO).files[path] == b"v27"  # message 27 is partition 1's 13th

    for format in ("jsonl", "parquet"):
        repo = repos[format]
        result = locate(pachd, tmp_path, topic, "1", "13", repo, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        [place] = json.loads(result.stdout)["found"]
        assert place["repo"] == f"default/{repo}@master"
        assert place["commit"] in commit_ids[repo]
        directory, name = place["file"].rsplit("/", 1)
        assert directory == f"/{topic}/1" and name.endswith("." + format)
        first = int(name.split(".")[0])
        assert first <= 13 and place["row"] == 13 - first  # offsets run 0-19 without holes
        assert place["file"] in pachd.head(repo).files
        text = locate(pachd, tmp_path, topic, "1", "13", repo).stdout.strip()
        assert text == f"{topic}/1@13: default/{repo}@master commit {place['commit']} file " \
                       f"{place['file']} row {place['row']}"

    result = locate(pachd, tmp_path, topic, "1", "20", *repos.values())
    assert result.returncode == 1
    assert result.stdout.strip().startswith(f"{topic}/1@20: no commit of ")
    assert json.loads(locate(pachd, tmp_path, topic, "0", "99", PACH_REPO,
                             "--json").stdout)["found"] == []


def jsonl(topic: str, partition: int, offsets) -> bytes:
    return "".join(json.dumps({"topic": topic, "partition": partition, "offset": o}) + "\n"
                   for o in offsets).encode()


def test_locate_with_a_custom_name_template(pachd, tmp_path):
    """NAME_TEMPLATE given: the name it renders, or else the segment whose first offset is
    the largest at or below the one sought, among the names it could render."""
    ids = craft(pachd, "custom", [
        ({("t", 0): (0, 5)}, {("t", 0): 5},
         {"/data/2024-01-01/t-0-0.jsonl": jsonl("t", 0, range(5))}),
        ({("t", 0): (5, 9)}, {("t", 0): 9},
         {"/data/2024-01-02/t-0-5.jsonl": jsonl("t", 0, range(5, 9)),
          "/data/2024-01-02/t-1-5.jsonl": jsonl("t", 1, range(5, 9))}),
        ({("t", 0): (9, 10)}, {("t", 0): 10}, {"/msgs/t-0-9": b"nine"}),
    ])
    segments = "data/{date}/{topic}-{partition}-{offset}.jsonl"
    result = locate(pachd, tmp_path, "t", "0", "7", "custom", "--name-template", segments)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == (f"t/0@7: default/custom@master commit {ids[1]} file "
                                     "/data/2024-01-02/t-0-5.jsonl row 2")
    result = locate(pachd, tmp_path, "t", "0", "9", "custom",
                    NAME_TEMPLATE="msgs/{topic}-{partition}-{offset}")
    assert result.stdout.strip() == (f"t/0@9: default/custom@master commit {ids[2]} file "
                                     "/msgs/t-0-9")
    # Held by a commit, but under no name the template gives.
    result = locate(pachd, tmp_path, "t", "0", "2", "custom", NAME_TEMPLATE="x/{offset}")
    assert result.returncode == 0
    assert result.stdout.strip() == (f"t/0@2: default/custom@master commit {ids[0]} file not "
                                     "found (no name the template gives holds it)")


@pytest.mark.parametrize("args, says", [
    ([], "the following arguments are required"),
    (["verify"], "the following arguments are required: REPO"),
    (["verify", "a/b/c"], "REPO: 'a/b/c' is not project/repo@branch"),
    (["locate", "t", "x", "1", "r"], "argument partition: invalid int value"),
    (["locate", "t", "0", "-1", "r"], "PARTITION and OFFSET are whole numbers"),
    (["verify", "nope"], "REPO: default/nope@master: not found on pachd"),
    (["verify", "out", "--pach-config", "/nonexistent.json"],
     "--pach-config: /nonexistent.json does not exist"),
    (["verify", "out", "--host", "h"], "--host: set HOST and PORT together"),
])
def test_usage_and_connection_problems_exit_2_in_one_line(pachd, tmp_path, args, says):
    if not args:
        result = subprocess.run([sys.executable, str(SPOUT), "locate"], capture_output=True,
                                text=True, timeout=60)
    else:
        result = tool(pachd, tmp_path, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("spout.py: error: ") and says in line, line


def test_unreachable_pachd_exits_2(tmp_path):
    from conftest import free_port
    result = subprocess.run(
        [sys.executable, str(SPOUT), "verify", "out",
         "--pachd-address", f"grpc://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PACH")})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("spout.py: error: PACHD_ADDRESS: cannot read default/out@master "
                           "from pachd at grpc://127.0.0.1:") and "UNAVAILABLE" in line


@pytest.mark.parametrize("command", ["verify", "locate"])
def test_help(command):
    result = subprocess.run([sys.executable, str(SPOUT), command, "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: spout.py {command} ")
    assert "--json" in result.stdout and "--pachd-address" in result.stdout
    spout_help = subprocess.run([sys.executable, str(SPOUT), "--help"], capture_output=True,
                                text=True, timeout=60)
    assert spout_help.returncode == 0 and "--bootstrap-servers" in spout_help.stdout


# -- the arithmetic, without pachd
def commit(repo, id, held, resume, closed=False):
    description = spout.describe_commit(held, 1, sorted({t for t, _ in resume}), resume,
                                        closed=closed)
    return spout.SpoutCommit(repo, id, spout.record_from_description(description),
                             spout.held_ranges(description), "")


def test_a_replay_in_one_repo_is_an_overlap_and_a_closing_commit_holds_nothing():
    commits = [commit("r", "a", {("t", 0): (0, 10)}, {("t", 0): 10}),
               commit("r", "b", {("t", 0): (5, 12)}, {("t", 0): 12}),   # replays 5-9
               commit("r", "c", {}, {("t", 0): 12}, closed=True)]
    holdings, spans = spout.find_holdings(commits)
    assert [(h.commit, h.first, h.end) for h in holdings] == [("a", 0, 10), ("b", 5, 12)]
    assert spout.find_gaps(holdings, spans) == []
    [overlap] = spout.find_overlaps(holdings)
    assert (overlap.first, overlap.end) == (5, 10)
    assert [h.commit for h in overlap.holders] == ["a", "b"]


def test_a_gap_one_repo_leaves_another_fills_is_none_and_markers_leave_gaps():
    commits = [commit("a", "a1", {("t", 0): (0, 10)}, {("t", 0): 10}),
               commit("a", "a2", {("t", 0): (20, 30)}, {("t", 0): 31}),
               commit("b", "b1", {("t", 0): (10, 20)}, {("t", 0): 20})]
    holdings, spans = spout.find_holdings(commits)
    gaps = spout.find_gaps(holdings, spans)
    # 30: past the last message, where a transaction marker would be
    assert [(g.repo, g.first, g.end, g.after, g.commit) for g in gaps] == \
        [("a", 30, 31, "a1", "a2")]
    assert spout.find_overlaps(holdings) == []


def test_an_unreachable_broker_for_gaps_exits_2(pachd, tmp_path):
    from conftest import free_port
    craft(pachd, "holey", [({("t", 0): (0, 10)}, {("t", 0): 10}),
                           ({("t", 0): (20, 30)}, {("t", 0): 30})])
    result = tool(pachd, tmp_path, "verify", "holey",
                  BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("spout.py: error: BOOTSTRAP_SERVERS: ")
