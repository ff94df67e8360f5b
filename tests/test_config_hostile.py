"""Configuration in a hostile environment: the variables Kubernetes injects for every Service
in the namespace are not settings, and real typos still stop the spout (issue 22, case 7)."""

from __future__ import annotations

import signal

import pytest
from conftest import free_port, spout_env, wait_until
from test_config import run_spout

import spout

# What Kubernetes gives a pod for Services named kafka-zookeeper (a named port "client"),
# kafka-ui, kafka-0 and kafka-headless-1 (a UDP and an SCTP port).
SERVICE_VARIABLES = {
    "KAFKA_ZOOKEEPER_SERVICE_HOST": "10.0.0.2", "KAFKA_ZOOKEEPER_SERVICE_PORT": "2181",
    "KAFKA_ZOOKEEPER_SERVICE_PORT_CLIENT": "2181",
    "KAFKA_ZOOKEEPER_PORT": "tcp://10.0.0.2:2181",
    "KAFKA_ZOOKEEPER_PORT_2181_TCP": "tcp://10.0.0.2:2181",
    "KAFKA_ZOOKEEPER_PORT_2181_TCP_PROTO": "tcp", "KAFKA_ZOOKEEPER_PORT_2181_TCP_PORT": "2181",
    "KAFKA_ZOOKEEPER_PORT_2181_TCP_ADDR": "10.0.0.2",
    "KAFKA_UI_SERVICE_HOST": "10.0.0.3", "KAFKA_UI_SERVICE_PORT": "8080",
    "KAFKA_UI_SERVICE_PORT_HTTP_WEB": "8080", "KAFKA_UI_PORT": "tcp://10.0.0.3:8080",
    "KAFKA_UI_PORT_8080_TCP": "tcp://10.0.0.3:8080", "KAFKA_UI_PORT_8080_TCP_ADDR": "10.0.0.3",
    "KAFKA_0_SERVICE_HOST": "10.0.0.4", "KAFKA_0_SERVICE_PORT": "9092",
    "KAFKA_0_PORT": "tcp://10.0.0.4:9092", "KAFKA_0_PORT_9092_TCP_PORT": "9092",
    "KAFKA_HEADLESS_1_PORT_53_UDP_PROTO": "udp", "KAFKA_HEADLESS_1_PORT_38412_SCTP": "x",
    # and for a Service called "kafka" itself
    "KAFKA_SERVICE_HOST": "10.0.0.1", "KAFKA_SERVICE_PORT": "9092",
    "KAFKA_PORT": "tcp://10.0.0.1:9092", "KAFKA_PORT_9092_TCP_ADDR": "10.0.0.1",
}


@pytest.fixture
def base(fifo):
    return {"BOOTSTRAP_SERVERS": "127.0.0.1:9092", "TOPIC": "events", "OUTPUT_PIPE": str(fifo)}


def test_service_variables_are_no_options_and_real_options_still_are(base):
    config = spout.Config.from_sources({**base, **SERVICE_VARIABLES,
                                        "KAFKA_SESSION_TIMEOUT_MS": "6000"})
    assert dict(config.kafka_options) == {"session_timeout_ms": 6000}


@pytest.mark.parametrize("name", ["KAFKA_SESION_TIMEOUT_MS", "KAFKA_UI_HOST",
                                  "KAFKA_ZOOKEEPER_SERVICE", "KAFKA_UI_PORT_HTTP_TCP",
                                  "KAFKA_0_PORT_9092_TCP_HOST", "KAFKA_PORTS"])
def test_typos_still_stop_the_spout_among_service_variables(base, name):
    result = run_spout({**base, **SERVICE_VARIABLES, name: "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"spout.py: error: {name}: unknown KafkaConsumer option "
        f"{name[len('KAFKA_'):].lower()!r}"]


def test_a_spout_beside_kafka_services_starts_and_says_what_it_ignored(fifo, spouts):
    nobody = f"127.0.0.1:{free_port()}"
    process = spouts(spout_env(nobody, "events", fifo, **SERVICE_VARIABLES))
    wait_until(lambda: "not KafkaConsumer options" in process.log or
               process.process.poll() is not None, 30, "the spout to start")
    assert process.process.poll() is None, process.log
    line = next(line for line in process.log.splitlines()
                if "not KafkaConsumer options" in line)
    assert "DEBUG" in line
    assert line.split(": ")[-1].split() == sorted(SERVICE_VARIABLES)
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.log
