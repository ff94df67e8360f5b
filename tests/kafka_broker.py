"""Apache Kafka itself as a test broker: a single KRaft node run from the project's own jars.

The jars (tests/kafka/pom.xml: a pinned Apache Kafka 4.x and its log4j binding) are fetched
once by Maven into .cache/kafka-lib, which later runs reuse. Every broker gets a fresh data
directory under a temporary folder and two loopback listeners: PLAINTEXT for most tests and
SASL_SSL (SCRAM-SHA-512 over TLS, with a CA the harness makes) for the security tests.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POM = ROOT / "tests" / "kafka" / "pom.xml"
LIB = ROOT / ".cache" / "kafka-lib"
STAMP = LIB / ".fetched"

SCRAM_USER = "spout"
SCRAM_MECHANISM = "SCRAM-SHA-512"
START_TIMEOUT = 60.0


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills the broker when the test process
    dies, even by SIGKILL, so no JVM outlives a killed test run (Linux; elsewhere a no-op)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def fetch_jars() -> Path:
    """Runs Maven once; the stamp is newer than the pom only after a complete copy."""
    if STAMP.exists() and STAMP.stat().st_mtime >= POM.stat().st_mtime:
        return LIB
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise BrokerError("Apache Kafka needs java (17+) and mvn on PATH")
    shutil.rmtree(LIB, ignore_errors=True)
    LIB.mkdir(parents=True)
    result = subprocess.run(
        ["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(POM), "dependency:copy-dependencies",
         f"-DoutputDirectory={LIB}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise BrokerError(f"mvn could not fetch Apache Kafka's jars:\n{result.stdout[-3000:]}"
                          f"{result.stderr[-3000:]}")
    STAMP.touch()
    return LIB


class TestCA:
    """A CA and a server certificate for 127.0.0.1, made with the cryptography package."""

    def __init__(self, folder: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kafka-spout test CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost")]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(pem))
        # Kafka's PEM key store: an unencrypted PKCS#8 key followed by the certificate chain.
        self.keystore = folder / "broker-keystore.pem"
        self.keystore.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
            + cert.public_bytes(pem) + ca_cert.public_bytes(pem))


class ApacheKafka:
    """One combined broker+controller KRaft node on loopback ports.

    stop() and start() again keep the data directory, as a broker restart does.
    """

    def __init__(self, name: str = "kafka", extra: dict | None = None):
        self.lib = fetch_jars()
        self.home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.data = self.home / "data"
        self.port, self.sasl_port, self.controller_port = free_port(), free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.sasl_bootstrap = f"127.0.0.1:{self.sasl_port}"
        self.log_path = self.home / "broker.log"
        self.scram_password = uuid.uuid4().hex
        self.ca = TestCA(self.home)
        self.process: subprocess.Popen | None = None
        self.startup_seconds: list[float] = []  # each start() until it answered
        self.format_seconds = 0.0
        self._write_config(extra or {})
        self._format()
        self.start()

    def _write_config(self, extra: dict) -> None:
        settings = {
            "process.roles": "broker,controller", "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                         f"SASL_SSL://127.0.0.1:{self.sasl_port},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                                    f"SASL_SSL://127.0.0.1:{self.sasl_port}",
            "listener.security.protocol.map":
                "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM", "ssl.keystore.location": str(self.ca.keystore),
            "log.dirs": str(self.data), "num.partitions": "1",
            "offsets.topic.replication.factor": "1", "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1", "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            # A node restarted after SIGKILL waits out its old registration's session.
            "broker.heartbeat.interval.ms": "500", "broker.session.timeout.ms": "2000",
            # The suite sends messages up to 8 MiB (the spout's large-message tests).
            "message.max.bytes": str(16 << 20),
            # Compaction within seconds, for the compacted-topic test.
            "log.cleaner.backoff.ms": "200",
            "log.retention.check.interval.ms": "1000", "log.initial.task.delay.ms": "0",
            # No retention by time: the suite sends messages stamped in 2024, which 7-day
            # retention (by CreateTime) would delete within a second.
            "log.retention.ms": "-1",
            # A second SASL attempt after a wrong password is answered at once.
            "sasl.login.retry.backoff.ms": "100",
        }
        settings.update(extra)
        self.config = self.home / "server.properties"
        self.config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.home / "log4j2.properties").write_text(
            "rootLogger.level=INFO\nrootLogger.appenderRef.file.ref=file\n"
            "appender.file.type=File\nappender.file.name=file\nappender.file.append=true\n"
            f"appender.file.fileName={self.log_path}\n"
            "appender.file.layout.type=PatternLayout\n"
            "appender.file.layout.pattern=[%d] %p %m (%c)%n\n"
            "logger.kafka.name=kafka\nlogger.kafka.level=INFO\n"
            "logger.noisy.name=org.apache.kafka.storage.internals.log\n"
            "logger.noisy.level=WARN\n")

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        return ["java", f"-Xmx{heap}", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Xshare:auto", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "-cp", f"{self.lib}/*", main, *args]

    def _format(self) -> None:
        started = time.monotonic()
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Attached with '=': an id starting with '-' (1 in 64) is otherwise read as an option.
        result = subprocess.run(self._java(
            "kafka.tools.StorageTool", "format", "--standalone", f"--cluster-id={cluster_id}",
            "-c", str(self.config), "--add-scram",
            f"{SCRAM_MECHANISM}=[name={SCRAM_USER},password={self.scram_password}]"),
            capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"kafka-storage format failed: {result.stdout}{result.stderr}")
        self.format_seconds = time.monotonic() - started

    def start(self) -> float:
        """Starts the node and waits until it answers a metadata request; returns seconds."""
        started = time.monotonic()
        stdout = open(self.home / "stdout.log", "ab")
        self.process = subprocess.Popen(self._java("kafka.Kafka", str(self.config), heap="512m"),
                                        stdout=stdout, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        stdout.close()
        deadline = started + START_TIMEOUT
        while not self._answers():
            if self.process.poll() is not None:
                raise BrokerError(f"Apache Kafka exited with {self.process.returncode}; "
                                  f"see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"Apache Kafka did not answer within {START_TIMEOUT}s; "
                                  f"see {self.log_path}")
            time.sleep(0.1)
        seconds = time.monotonic() - started
        self.startup_seconds.append(seconds)
        return seconds

    def _answers(self) -> bool:
        if not port_open(self.port):
            return False
        from kafka import KafkaAdminClient
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap,
                                     request_timeout_ms=3000)
        except Exception:
            return False
        try:
            return bool(admin.describe_cluster().get("brokers"))
        except Exception:
            return False
        finally:
            admin.close()

    def stop(self, hard: bool = False) -> None:
        """SIGTERM (a clean shutdown) or SIGKILL (a crash); waits for the process to end."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def remove(self) -> None:
        """Stops the node and deletes its data; its log stays for a failed test to name."""
        self.stop(hard=True)
        shutil.rmtree(self.data, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
