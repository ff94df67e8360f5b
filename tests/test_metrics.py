"""Metrics, /healthz and JSON logs (issue 12): real scrapes of a real spout process, against the
real broker, the 1.x reader double and the pachd double."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import (PACH_REPO, ROOT, create_topic, double_only, free_port, pfs_env, produce,
                      read_back, spout_commits, spout_env, wait_until)
from prometheus_client.parser import text_string_to_metric_families

REPO = PACH_REPO


# -- scraping
def scrape(port: int) -> dict:
    """{(sample name, ((label, value), ...)): value} from a real GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def by_partition(samples: dict, name: str, topic: str) -> dict:
    return {int(dict(labels)["partition"]): v for (n, labels), v in samples.items()
            if n == name and dict(labels).get("topic") == topic}


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def serving(port: int) -> bool:
    try:
        healthz(port)
        return True
    except OSError:
        return False


def metrics_env(port: int, **extra) -> dict:
    return {"METRICS_PORT": port, "METRICS_ADDRESS": "127.0.0.1", **extra}


def ends_of(truth: dict) -> dict:
    return {p: 1 + max(o for (q, o) in truth if q == p) for p in range(3)}


# -- 1.x: the pipe and the reader double
def test_pipe_run_counts_what_the_reader_took_and_lag_uses_the_high_watermark(
        broker, topic, fifo, spouts, readers):
    messages = [(i % 3, b"k", None if i % 111 == 5 else bytes([i % 251]) * (i % 700))
                for i in range(1200)]
    tombstones = sum(1 for _, _, v in messages if v is None)
    produce(broker, topic, messages)
    truth = read_back(broker, topic, len(messages))
    files = {f"/{topic}/{p}/{o:020d}": v for (p, o), v in truth.items() if v is not None}
    ends = ends_of(truth)

    reader = readers(fifo, generation="g3")
    port = free_port()
    spout = spouts(spout_env(broker, topic, fifo, BATCH_MAX_MESSAGES=100,
                             HEALTH_MAX_DELIVERY_SECONDS=1, **metrics_env(port)))
    wait_until(lambda: serving(port) or spout.process.poll() is not None, 20, "the server")

    # During the run: never more than the reader holds.
    wait_until(lambda: total(scrape(port), "kafka_spout_commits_total") >= 1, 60,
               "a first commit held")
    samples = scrape(port)
    assert value(samples, "kafka_spout_messages_total", topic=topic) <= len(files)
    assert total(samples, "kafka_spout_commits_total") <= len(reader.commits)

    wait_until(lambda: reader.snapshot() == files or spout.process.poll() is not None, 120,
               "every message in the reader's commits")

    def settled():
        samples = scrape(port)
        return samples if value(samples, "kafka_spout_tombstones_total",
                                topic=topic) == tombstones and len(by_partition(
            samples, "kafka_spout_consumer_lag", topic)) == 3 and total(
            samples, "kafka_spout_commits_total") >= len(reader.commits) - 1 and sum(
            by_partition(samples, "kafka_spout_consumer_lag", topic).values()) <= 100 \
            else None
    samples = wait_until(settled, 30, "metrics to catch up with the reader")
    # An archive is held once the reader has read past it: the newest one may still count
    # as waiting. What is counted is exactly what the reader committed first.
    commits = int(total(samples, "kafka_spout_commits_total"))
    counted = [put for commit in reader.commits[:commits] for put in commit.puts]
    assert value(samples, "kafka_spout_messages_total", topic=topic) == len(counted)
    assert value(samples, "kafka_spout_bytes_total", topic=topic) == \
        sum(len(data) for _, data in counted)
    assert value(samples, "kafka_spout_batch_messages_count") == commits
    assert value(samples, "kafka_spout_batch_messages_sum") == len(counted)
    assert value(samples, "kafka_spout_batch_bytes_sum") == sum(len(d) for _, d in counted)
    assert value(samples, "kafka_spout_delivery_latency_seconds_count") == commits
    assert value(samples, "kafka_spout_redeliveries_total") == 0
    assert time.time() - 60 < value(samples, "kafka_spout_last_delivery_timestamp_seconds") \
        <= time.time()
    # Offset plus lag is the partition's end as the fetches reported it (Tansu's ListOffsets
    # would say otherwise); what still lags is at most the newest archive.
    delivered = by_partition(samples, "kafka_spout_delivered_offset", topic)
    lag = by_partition(samples, "kafka_spout_consumer_lag", topic)
    assert {p: delivered[p] + lag[p] for p in range(3)} == ends
    assert sum(lag.values()) <= 100
    assert value(samples, "kafka_spout_info", version="0.1.0", delivery="pipe", mode="group",
                 topics=topic) == 1
    # The newest archive, read to its end, is no message waiting: an idle topic is no stall,
    # however long ago (here over HEALTH_MAX_DELIVERY_SECONDS=1) the last commit was held.
    status, body = wait_until(lambda: (lambda h: h if not h[1]["waiting"] else None)(
        healthz(port)), 10, "nothing to wait")
    assert (status, body["status"], body["delivery"]) == (200, "ok", "pipe")
    assert 0 <= body["last_commit_seconds_ago"] < 60
    spout.signal(signal.SIGTERM)
    assert spout.wait(15) == 0, spout.log


def start_reader_process(pipe: Path, out: Path) -> subprocess.Popen:
    """The reader double as its own process, so that it can die as a worker does."""
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "pfs_reader.py"), str(pipe),
                             "--generation", "g3", "--marker", "offsets",
                             "--materialize", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def materialized_files(out: Path) -> int:
    """Message files in the commits (commit-N/topic/partition/offset), the marker aside."""
    return sum(1 for path in out.glob("commit-*/*/*/*") if path.is_file())


def unhealthy(port: int, spout, because: str = "") -> dict | None:
    """/healthz's body once it answers 503 with a reason that says `because`; fails the wait
    if the spout exited."""
    assert spout.process.poll() is None, spout.log
    if not serving(port):
        return None
    status, body = healthz(port)
    if status == 503 and any(because in reason for reason in body["reasons"]):
        return body
    return None


def test_healthz_fails_while_the_reader_is_gone_with_archives_waiting(broker, topic, fifo,
                                                                        spouts, tmp_path):
    port = free_port()
    out = tmp_path / "commits"
    made = fifo.stat().st_ctime_ns
    first = start_reader_process(fifo, out)
    second = None
    try:
        # A (re)started worker makes a fresh FIFO: the spout checks the one that stays.
        wait_until(lambda: fifo.exists() and fifo.stat().st_ctime_ns != made, 10,
                   "the reader's FIFO")
        spout = spouts(spout_env(broker, topic, fifo, MARKER="offsets", **metrics_env(port)))
        produce(broker, topic, [(i % 3, None, b"before-%d" % i) for i in range(300)])
        wait_until(lambda: materialized_files(out) >= 300 or spout.process.poll() is not None,
                   60, "the reader's commits")
        assert healthz(port)[0] == 200, spout.log

        first.kill()
        first.wait()
        produce(broker, topic, [(i % 3, None, b"after-%d" % i) for i in range(300)])
        body = wait_until(lambda: unhealthy(port, spout, f"no reader has the pipe {fifo} open"),
                          30, "/healthz to fail")
        assert body["status"] == "unhealthy"

        second = start_reader_process(fifo, out)
        wait_until(lambda: healthz(port)[0] == 200, 30, "/healthz to pass again")
        wait_until(lambda: materialized_files(out) >= 600, 60, "every message committed")
        samples = scrape(port)
        assert value(samples, "kafka_spout_redeliveries_total") >= 1
        assert value(samples, "kafka_spout_info", version="0.1.0", delivery="pipe",
                     mode="exactly-once", topics=topic) == 1
        spout.signal(signal.SIGTERM)
        assert spout.wait(15) == 0, spout.log
    finally:
        for reader in (first, second):
            if reader is not None and reader.poll() is None:
                reader.kill()
                reader.wait()


# -- 2.x: pachd (fixtures in conftest)
def test_pfs_run_counts_match_pachd_lag_drains_to_zero_and_json_logs_parse(
        broker, pachd, tmp_path, spouts):
    topic = create_topic(broker, 3)
    messages = [(i % 3, b"k", None if i % 50 == 7 else b"v" * (i % 900)) for i in range(1500)]
    produce(broker, topic, messages)
    truth = read_back(broker, topic, len(messages))
    files = {f"/{topic}/{p}/{o:020d}": v for (p, o), v in truth.items() if v is not None}
    port = free_port()
    spout = spouts(pfs_env(broker, topic, pachd, tmp_path, BATCH_MAX_MESSAGES=200,
                           LOG_FORMAT="json", **metrics_env(port)))
    wait_until(lambda: pachd.head(REPO).files == files or spout.process.poll() is not None,
               120, "every message in a finished commit", interval=0.2)

    def drained():
        samples = scrape(port)
        lag = by_partition(samples, "kafka_spout_consumer_lag", topic)
        return samples if lag == {0: 0, 1: 0, 2: 0} else None
    samples = wait_until(drained, 30, "lag to reach 0")
    commits = spout_commits(pachd)
    assert value(samples, "kafka_spout_messages_total", topic=topic) == len(files)
    assert value(samples, "kafka_spout_bytes_total", topic=topic) == \
        sum(map(len, files.values()))
    assert value(samples, "kafka_spout_tombstones_total", topic=topic) == \
        len(messages) - len(files)
    assert value(samples, "kafka_spout_commits_total") == len(commits)
    assert value(samples, "kafka_spout_batch_messages_count") == len(commits)
    assert value(samples, "kafka_spout_delivery_latency_seconds_count") == len(commits)
    assert value(samples, "kafka_spout_redeliveries_total") == 0
    assert by_partition(samples, "kafka_spout_delivered_offset", topic) == ends_of(truth)
    assert value(samples, "kafka_spout_info", version="0.1.0", delivery="pfs",
                 mode="exactly-once", topics=topic) == 1
    status, body = healthz(port)
    assert (status, body["status"], body["waiting"]) == (200, "ok", False)

    spout.signal(signal.SIGTERM)
    assert spout.wait(15) == 0, spout.log
    lines = spout.log.splitlines()
    records = [json.loads(line) for line in lines]  # every line, kafka-python's too
    assert all({"time", "level", "message"} <= set(r) for r in records)
    assert all(r["time"].endswith("Z") for r in records)
    stopped = [r for r in records if r["message"].startswith("stopped; ")]
    assert len(stopped) == 1 and stopped[0]["level"] == "INFO"
    assert stopped[0]["archives"] == len(commits)
    assert stopped[0]["tombstones"] == len(messages) - len(files)
    assert {"messages", "bytes", "rate_messages_per_second"} <= set(stopped[0])


def test_healthz_fails_while_commits_stall_or_pachd_is_unreachable(broker, pachd, tmp_path,
                                                                   spouts):
    double_only(pachd, "hold_modify_streams and stop()/start() that keep its state")
    topic = create_topic(broker, 3)
    port = free_port()
    spout = spouts(pfs_env(broker, topic, pachd, tmp_path, HEALTH_MAX_DELIVERY_SECONDS=2,
                           **metrics_env(port)))
    produce(broker, topic, [(0, None, b"first")])
    # Finished, not just started: the hold below must catch the second commit's stream.
    wait_until(lambda: [c.finished for c in spout_commits(pachd)] == [True] or
               spout.process.poll() is not None, 60, "a first commit, finished")
    wait_until(lambda: healthz(port)[0] == 200, 10, "/healthz to pass")

    # pachd answers, but the commit does not go through: messages wait past the limit.
    pachd.modify_stream_held.clear()
    pachd.hold_modify_streams(True)
    produce(broker, topic, [(1, None, b"second")])
    # The stall is the held stream's, not a slow poll's: a busy machine makes both.
    wait_until(pachd.modify_stream_held.is_set, 30, "the second commit's stream, held")
    body = wait_until(lambda: unhealthy(port, spout, "no commit held"), 20,
                      "/healthz to report the stall")
    assert body["status"] == "unhealthy"
    assert any("HEALTH_MAX_DELIVERY_SECONDS=2" in reason for reason in body["reasons"]), body
    assert not any("unreachable" in reason for reason in body["reasons"]), body
    pachd.hold_modify_streams(False)
    wait_until(lambda: healthz(port)[0] == 200, 20, "/healthz to pass once it went through")
    assert len(spout_commits(pachd)) == 2

    # pachd gone while a batch waits.
    pachd.stop()
    produce(broker, topic, [(2, None, b"third")])
    wait_until(lambda: unhealthy(port, spout, f"pachd at grpc://{pachd.address} is "
                                              "unreachable"), 30,
               "/healthz to report pachd unreachable")
    pachd.start(pachd.port)
    wait_until(lambda: len(spout_commits(pachd)) == 3, 60, "the batch committed after all")
    wait_until(lambda: healthz(port)[0] == 200, 20, "/healthz to pass again")
    assert value(scrape(port), "kafka_spout_redeliveries_total") >= 1
    spout.signal(signal.SIGTERM)
    assert spout.wait(15) == 0, spout.log


# -- Kafka, and the server itself
def test_healthz_fails_while_kafka_is_unreachable(fifo, spouts):
    port = free_port()
    nobody = f"127.0.0.1:{free_port()}"
    spout = spouts(spout_env(nobody, "events", fifo, **metrics_env(port)))
    wait_until(lambda: unhealthy(port, spout, f"Kafka at {nobody} has been unreachable"), 40,
               "/healthz to report Kafka unreachable")
    spout.signal(signal.SIGTERM)
    assert spout.wait(15) == 0, spout.log


def listening_sockets(pid: int) -> set:
    """Inodes of the process's sockets that are listening (state 0A in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                listening.add(fields[9])
    return listening


def test_no_server_no_thread_no_import_when_the_port_is_unset(broker, topic, fifo, spouts,
                                                                readers):
    readers(fifo)
    spout = spouts(spout_env(broker, topic, fifo))
    produce(broker, topic, [(0, None, b"x")])
    wait_until(lambda: "batch of 1 file(s)" in spout.log or spout.process.poll() is not None,
               60, "a batch")
    assert spout.process.poll() is None, spout.log
    assert listening_sockets(spout.process.pid) == set()
    assert "serving /metrics" not in spout.log
    probe = ("import sys, threading, spout\n"
             f"config = spout.Config.from_sources({{'BOOTSTRAP_SERVERS': {broker!r}, "
             f"'TOPIC': {topic!r}, 'OUTPUT_PIPE': {str(fifo)!r}}})\n"
             "s = spout.Spout(config, threading.Event())\n"
             "print(type(s.monitor).__name__, 'prometheus_client' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split() == ["Monitor", "False"], result.stderr
    spout.signal(signal.SIGTERM)
    assert spout.wait(15) == 0


def test_a_port_in_use_is_one_line_and_exit_2(broker, topic, fifo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
        env.update({k: str(v) for k, v in spout_env(broker, topic, fifo,
                                                    **metrics_env(port)).items()})
        result = subprocess.run([sys.executable, str(ROOT / "spout.py")], env=env,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("spout.py:")]
    assert errors == [f"spout.py: error: METRICS_PORT: 127.0.0.1:{port} is already in use"]
    assert "Traceback" not in result.stderr


# -- docs/operations.md's spec example
def readme_service_example() -> dict:
    operations = (ROOT / "docs" / "operations.md").read_text()
    section = operations.split("## Exposing the port from a pipeline", 1)[1]
    return json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])


@pytest.mark.parametrize("spec", ["pipeline.json", "pipeline-v2.json"])
def test_the_readme_service_example_parses_in_the_specs_as_pachctl_parses_them(spec):
    from google.protobuf import json_format
    from pachyderm_sdk.api import pps
    from test_packaging import check_message, create_pipeline_request
    example = readme_service_example()
    raw = json.loads((ROOT / spec).read_text())
    raw["transform"]["env"].update(example["transform"]["env"])
    raw["service"] = example["service"]
    if spec == "pipeline-v2.json":
        check_message(pps.CreatePipelineRequest, raw, "")  # protojson: unknown fields fail
        request = pps.CreatePipelineRequest().from_dict(raw)
    else:
        request = json_format.Parse(json.dumps(raw), create_pipeline_request()())
    assert request.service.internal_port == int(raw["transform"]["env"]["METRICS_PORT"])
    assert 30000 <= request.service.external_port <= 32767
    assert request.service.type == "NodePort"


# -- counting, in process: several topics in one batch, two files per message
def test_counts_per_topic_in_a_batch_of_two_topics_with_sidecars_and_kept_tombstones():
    import threading
    from kafka import TopicPartition
    from kafka.consumer.fetcher import ConsumerRecord
    import spout

    def record(topic, offset, value):
        return ConsumerRecord(topic, 0, 0, offset, 1_700_000_000_000, 0, b"k", value, [], None,
                              1, -1 if value is None else len(value), 0)
    config = spout.Config(bootstrap_servers=("127.0.0.1:9",), topics=("a", "b"),
                          format="raw+meta", tombstones="keep", output_pipe="/nonexistent")
    instance = spout.Spout(config, threading.Event())
    monitor = spout.MetricsMonitor(config, instance)
    polled = {TopicPartition("a", 0): [record("a", 10, b"x" * 5), record("a", 11, None),
                                       record("a", 12, b"y" * 7)],
              TopicPartition("b", 0): [record("b", 3, b"z" * 11), record("b", 4, b"")]}
    instance.monitor = monitor
    instance.ledger.polled(polled)
    monitor.polled(polled)
    instance.add(polled)
    monitor.tombstones_seen(polled, instance.stats.tombstones)
    batch = instance.batcher.take()
    instance.take_held([instance.ledger.hand_over(batch, ("a", "b"))])

    def sample(name, **labels):
        return monitor.registry.get_sample_value(name, labels)
    sizes = {topic: sum(len(data) for tp, (_, data, _) in zip(batch.partitions, batch.members)
                        if tp.topic == topic) for topic in ("a", "b")}
    assert (sample("kafka_spout_messages_total", topic="a"),
            sample("kafka_spout_messages_total", topic="b")) == (3, 2)
    assert (sample("kafka_spout_bytes_total", topic="a"),
            sample("kafka_spout_bytes_total", topic="b")) == (sizes["a"], sizes["b"])
    assert sizes["a"] > 12 and sizes["b"] > 11  # the sidecars' bytes are in
    assert (sample("kafka_spout_tombstones_total", topic="a"),
            sample("kafka_spout_tombstones_total", topic="b")) == (1, 0)
    assert sample("kafka_spout_commits_total") == 1
    assert sample("kafka_spout_batch_messages_sum") == 5
    assert sample("kafka_spout_batch_bytes_sum") == batch.data_bytes == sum(sizes.values())
    assert {tp: progress.held for tp, progress in instance.ledger.partitions.items()} == \
        {TopicPartition("a", 0): 13, TopicPartition("b", 0): 5}
