"""A broker the spout cannot reach: one line per back-off step, naming the cause, and none of
kafka-python's per-retry lines below LOG_LEVEL=DEBUG."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import free_port, spout_env, wait_until

import spout


def attempts(log: str) -> list[str]:
    return [line for line in log.splitlines() if "cannot reach Kafka at" in line]


def kafka_python_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r" (WARNING|ERROR) kafka\.", line)]


@pytest.mark.parametrize("bootstrap, cause", [
    (f"127.0.0.1:{free_port()}", "connection refused"),
    ("nonexistent.invalid:9092", "name nonexistent.invalid not resolved"),
])
def test_an_unreachable_broker_is_one_line_per_attempt_naming_the_cause(
        fifo, spouts, bootstrap, cause):
    process = spouts(spout_env(bootstrap, "events", fifo, LOG_LEVEL="INFO"))
    wait_until(lambda: len(attempts(process.log)) >= 2, 30, "two attempts")
    assert process.stop() == 0
    log = process.log
    for line in attempts(log):
        assert f"cannot reach Kafka at {bootstrap}: {cause}" in line, line
        assert "KafkaTimeoutError" not in line
    assert kafka_python_lines(log) == [], log
    assert log.splitlines()[-1].endswith("stopped before Kafka was reachable"), log


def test_kafka_pythons_own_lines_are_there_at_debug(fifo, spouts):
    bootstrap = f"127.0.0.1:{free_port()}"
    process = spouts(spout_env(bootstrap, "events", fifo, LOG_LEVEL="DEBUG"))
    wait_until(lambda: attempts(process.log), 30, "an attempt")
    process.stop()
    assert any("ECONNREFUSED" in line for line in kafka_python_lines(process.log))
    assert "connection refused; retrying in" in attempts(process.log)[0]


def test_tls_to_a_peer_that_never_answers_is_a_failed_handshake_and_sigterm_stops_it(
        fifo, spouts, tmp_path):
    """KAFKA_SECURITY_PROTOCOL=SSL aimed at a port that never answers the handshake (a
    plaintext listener, or no Kafka): kafka-python 3.0.12 waited for it forever, and the
    spout never heard SIGTERM."""
    import socket
    import threading
    import time
    from test_decoding_hostile import certificate_and_key
    cafile, _key = certificate_and_key(tmp_path)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    bootstrap = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        process = spouts(spout_env(bootstrap, "events", fifo, LOG_LEVEL="INFO",
                                   KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=cafile))
        wait_until(lambda: attempts(process.log), 30, "a handshake given up")
        assert f"cannot reach Kafka at {bootstrap}: TLS handshake failed" in \
            attempts(process.log)[0], process.log
        started = time.monotonic()
        assert process.stop() == 0, process.log
        assert time.monotonic() - started < 10
    finally:
        silent.close()
        for connection in held:
            connection.close()


def test_no_retry_announced_after_a_stop_request(fifo, spouts):
    process = spouts(spout_env(f"127.0.0.1:{free_port()}", "events", fifo, LOG_LEVEL="INFO"))
    wait_until(lambda: "starting:" in process.log, 30, "the start-up line")
    # The first attempt takes bootstrap_timeout_ms (3 s): the stop comes in the middle of it.
    assert process.stop() == 0
    log = process.log
    after_stop = log[log.index("received SIGTERM"):]
    assert "retrying" not in after_stop, log


@pytest.mark.parametrize("error, cause", [
    ("KafkaConnectionError('111 ECONNREFUSED')", "connection refused"),
    ("KafkaConnectionError('DNS Resolution failure')", "name not resolved"),
    ("KafkaConnectionError('Handshake failed: [SSL: WRONG_VERSION_NUMBER] wrong version')",
     "TLS handshake failed ([SSL: WRONG_VERSION_NUMBER] wrong version)"),
    ("KafkaConnectionError('104 ECONNRESET')", "connection reset by the broker"),
    ("KafkaConnectionError('Connection timed out')", "connection timed out"),
    ("SaslAuthenticationFailedError('bad password')", "SASL authentication failed"),
    ("UnsupportedSaslMechanismError()", "the broker does not offer this SASL mechanism"),
])
def test_causes_in_the_users_words(error, cause):
    import kafka.errors as Errors
    assert spout.describe_kafka_failure(eval(error, vars(Errors))).startswith(cause)


def test_the_filter_keeps_the_cause_and_lets_the_loggers_own_filters_see_everything():
    import kafka.errors as Errors
    seen = []
    failures = spout.KafkaFailures()
    logger = logging.getLogger("kafka.net.manager")

    def own(record):  # as Spout.watch_kafka_python's filters
        seen.append(record.msg)
        return True

    handler = logging.Handler()
    handler.emit = lambda record: seen.append(("emitted", record.msg))
    handler.addFilter(failures)
    logger.addFilter(own)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("Connection failed: %s", Errors.KafkaConnectionError("111 ECONNREFUSED"))
        logger.warning("something else")
        failures.quiet = False
        logger.error("Connection failed: %s", Errors.KafkaConnectionError("104 ECONNRESET"))
    finally:
        logger.removeFilter(own)
        logger.removeHandler(handler)
        logger.propagate = True
    assert seen == ["Connection failed: %s", "something else", ("emitted", "something else"),
                    "Connection failed: %s", ("emitted", "Connection failed: %s")]
    assert failures.cause == "connection reset by the broker"
