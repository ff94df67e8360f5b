"""Configuration: environment and flags, validated in one place; errors are one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import SPOUT

import spout


@pytest.fixture
def base(fifo):
    return {"HOST": "kafka", "PORT": "9092", "TOPIC": "events", "OUTPUT_PIPE": str(fifo)}


def run_spout(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SPOUT), *args], env={"PATH": os.environ["PATH"],
                          **env}, capture_output=True, text=True, timeout=30)


def test_defaults(base):
    config = spout.Config.from_sources(base)
    assert config.bootstrap_servers == ("kafka:9092",)
    assert config.topics == ("events",)
    assert config.group_id == "kafka-spout"
    assert (config.auto_offset_reset, config.batch_max_messages, config.batch_max_bytes,
            config.batch_max_seconds) == ("earliest", 1000, 16 * 1024 * 1024, 1.0)
    assert config.name_template == spout.DEFAULT_NAME_TEMPLATE
    assert dict(config.kafka_options) == {}


def test_flags_win_over_environment(base):
    env = {**base, "BATCH_MAX_MESSAGES": "5", "TOPIC": "a"}
    config = spout.Config.from_sources(env, ["--batch-max-messages", "7", "--topic", "b,c,b"])
    assert config.batch_max_messages == 7
    assert config.topics == ("b", "c")


def test_bootstrap_servers_win_over_host_and_port(base):
    config = spout.Config.from_sources({**base, "BOOTSTRAP_SERVERS": "a:1, b:2,[::1]:3"})
    assert config.bootstrap_servers == ("a:1", "b:2", "[::1]:3")


def test_group_defaults_to_the_pipeline_name(base):
    assert spout.Config.from_sources({**base, "PPS_PIPELINE_NAME": "land"}).group_id == "land"
    assert spout.Config.from_sources({**base, "PPS_PIPELINE_NAME": "land",
                                      "GROUP_ID": "mine"}).group_id == "mine"


def test_sizes_take_units(base):
    for text, value in [("1048576", 1 << 20), ("64KiB", 65536), ("16MiB", 16 << 20),
                        ("10MB", 10_000_000), ("2k", 2048)]:
        assert spout.Config.from_sources({**base, "BATCH_MAX_BYTES": text}).batch_max_bytes \
            == value


def test_kafka_options_are_converted_to_their_types(base):
    env = {**base, "KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_CHECK_CRCS": "false",
           "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_PLAIN_PASSWORD": "hunter2",
           "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_PLAIN_USERNAME": "spout",
           "KAFKA_API_VERSION": "2.8.0", "KAFKA_CLIENT_ID": "spout-1"}
    config = spout.Config.from_sources(env, ["--kafka", "max_poll_records=50"])
    assert dict(config.kafka_options) == {
        "session_timeout_ms": 6000, "check_crcs": False, "security_protocol": "SASL_SSL",
        "sasl_plain_password": "hunter2", "api_version": (2, 8, 0), "client_id": "spout-1",
        "sasl_mechanism": "PLAIN", "sasl_plain_username": "spout",
        "max_poll_records": 50}
    assert "hunter2" not in config.describe()


def test_kubernetes_service_variables_are_not_options(base):
    env = {**base, "KAFKA_PORT": "tcp://10.0.0.1:9092", "KAFKA_SERVICE_HOST": "10.0.0.1",
           "KAFKA_SERVICE_PORT": "9092", "KAFKA_PORT_9092_TCP_ADDR": "10.0.0.1",
           "KAFKA_PORT_9092_TCP": "tcp://10.0.0.1:9092"}
    assert dict(spout.Config.from_sources(env).kafka_options) == {}


def test_a_link_to_a_fifo_is_a_valid_pipe(base, fifo, tmp_path):
    link = tmp_path / "out-link"
    link.symlink_to(fifo)
    assert spout.Config.from_sources({**base, "OUTPUT_PIPE": str(link)}).output_pipe == str(link)


def test_help_lists_every_setting_with_its_default():
    result = run_spout({}, "--help")
    assert result.returncode == 0
    for setting in spout.SETTINGS:
        assert setting.flag in result.stdout and setting.env in result.stdout
    assert "[16MiB]" in result.stdout and "KAFKA_<OPTION>" in result.stdout


@pytest.mark.parametrize("change, args, culprit", [
    ({"TOPIC": None}, (), "TOPIC: required (or set TOPIC_PATTERN)"),
    ({"HOST": None}, (), "HOST: required"),
    ({"PORT": "http"}, (), "PORT: 'http' is not a number"),
    ({"PORT": "70000"}, (), "PORT: must be a port number"),
    ({"BOOTSTRAP_SERVERS": "kafka"}, (), "BOOTSTRAP_SERVERS: 'kafka' is not host:port"),
    ({"TOPIC": "bad topic"}, (), "TOPIC: 'bad topic' is not a valid Kafka topic name"),
    ({"AUTO_OFFSET_RESET": "smallest"}, (), "AUTO_OFFSET_RESET: must be one of"),
    ({"BATCH_MAX_MESSAGES": "0"}, (), "BATCH_MAX_MESSAGES: must be a positive"),
    ({"BATCH_MAX_MESSAGES": "-3"}, (), "BATCH_MAX_MESSAGES: must be a positive"),
    ({"BATCH_MAX_BYTES": "0"}, (), "BATCH_MAX_BYTES: must be positive"),
    ({"BATCH_MAX_BYTES": "12 parsecs"}, (), "BATCH_MAX_BYTES: must be a byte count"),
    ({"BATCH_MAX_SECONDS": "-1"}, (), "BATCH_MAX_SECONDS: must be a positive"),
    ({"BATCH_MAX_SECONDS": "soon"}, (), "BATCH_MAX_SECONDS: 'soon' is not a number"),
    ({"NAME_TEMPLATE": "{topic}/{nope}"}, (), "NAME_TEMPLATE: unknown token {nope}"),
    ({"LOG_LEVEL": "LOUD"}, (), "LOG_LEVEL: must be one of"),
    ({"KAFKA_NO_SUCH_THING": "1"}, (), "KAFKA_NO_SUCH_THING: unknown KafkaConsumer option"),
    ({"KAFKA_SESSION_TIMEOUT_MS": "soon"}, (), "KAFKA_SESSION_TIMEOUT_MS: 'soon' is not a"),
    ({"KAFKA_CHECK_CRCS": "maybe"}, (), "KAFKA_CHECK_CRCS: must be true or false"),
    ({"KAFKA_ENABLE_AUTO_COMMIT": "true"}, (), "KAFKA_ENABLE_AUTO_COMMIT: not allowed"),
    ({"KAFKA_GROUP_ID": "x"}, (), "KAFKA_GROUP_ID: not allowed; set GROUP_ID"),
    ({}, ("--batch-max-messages", "zero"), "--batch-max-messages: 'zero' is not a number"),
    ({}, ("--kafka", "session_timeout_ms"), "--kafka: 'session_timeout_ms' is not OPTION="),
    ({}, ("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
    ({"OUTPUT_PIPE": "/nonexistent/out"}, (), "OUTPUT_PIPE: /nonexistent/out is missing"),
    ({"OUTPUT_PIPE": "/etc/hostname"}, (), "OUTPUT_PIPE: /etc/hostname is a regular file"),
    ({"OUTPUT_PIPE": "/tmp"}, (), "OUTPUT_PIPE: /tmp is a directory"),
    ({}, ("--output-pipe", "/nonexistent"), "--output-pipe: /nonexistent is missing"),
    ({"BATCH_MAX_MESSAGES": "1.5"}, (), "BATCH_MAX_MESSAGES: '1.5' is not a whole number"),
    ({"PORT": "9092.0"}, (), "PORT: '9092.0' is not a whole number"),
    ({"KAFKA_SESSION_TIMEOUT_MS": "6000.5"}, (),
     "KAFKA_SESSION_TIMEOUT_MS: '6000.5' is not a whole number"),
    ({"DELIVERY": "pfs", "PACHD_ADDRESS": "ftp://pachd:30650"}, (),
     "PACHD_ADDRESS: 'ftp://pachd:30650': scheme 'ftp' is not grpc, grpcs, http or https"),
    ({"DELIVERY": "pfs", "PACHD_ADDRESS": "pachd"}, (),
     "PACHD_ADDRESS: 'pachd' is not [grpc://|grpcs://|http://|https://]host:port"),
    ({"KAFKA_ISOLATION_LEVEL": "serializable"}, (),
     "KAFKA_ISOLATION_LEVEL: must be one of read_committed, read_uncommitted"),
])
def test_bad_settings_exit_2_with_one_line_naming_the_culprit(base, change, args, culprit):
    env = {k: v for k, v in {**base, **change}.items() if v is not None}
    result = run_spout(env, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert culprit in lines[0]
    assert "Traceback" not in result.stderr


def test_a_dangling_link_is_named(base, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    result = run_spout({**base, "OUTPUT_PIPE": str(link)})
    assert result.returncode == 2
    assert f"OUTPUT_PIPE: {link} is a dangling link" in result.stderr


def test_consumer_options_keep_the_spout_in_charge_of_offsets(base):
    import threading
    config = spout.Config.from_sources({**base, "GROUP_INSTANCE_ID": "landing-1",
                                        "KAFKA_MAX_POLL_RECORDS": "50"})
    options = spout.Spout(config, threading.Event()).consumer_options()
    assert options["enable_auto_commit"] is False
    assert options["group_instance_id"] == "landing-1"
    assert options["max_poll_records"] == 50
    assert options["bootstrap_servers"] == ["kafka:9092"] and options["group_id"] == "kafka-spout"
    marker_mode = spout.Config.from_sources({**base, "GROUP_INSTANCE_ID": "x", "MARKER": "m"})
    assert "group_instance_id" not in spout.Spout(marker_mode, threading.Event()) \
        .consumer_options()


def test_committed_records_only_and_fresh_metadata_by_default(base):
    import threading

    def options(**env):
        return spout.Spout(spout.Config.from_sources({**base, **env}),
                           threading.Event()).consumer_options()
    assert options()["isolation_level"] == "read_committed"
    assert options()["metadata_max_age_ms"] == 30_000
    assert options()["reconnect_backoff_max_ms"] == 1000
    assert options()["allow_auto_create_topics"] is False   # a reader creates no topic
    changed = options(KAFKA_ISOLATION_LEVEL="read_uncommitted", KAFKA_METADATA_MAX_AGE_MS="500",
                      KAFKA_ALLOW_AUTO_CREATE_TOPICS="true")
    assert changed["isolation_level"] == "read_uncommitted"
    assert changed["metadata_max_age_ms"] == 500
    assert changed["allow_auto_create_topics"] is True


def test_logged_errors_stay_on_one_line_without_tracebacks():
    import io
    import logging
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(spout.OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("kafka.test-one-line")
    logger.addHandler(handler)
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        logger.error("Error receiving data", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == ("ERROR kafka.test-one-line: Error receiving data   "
                                 "(ConnectionResetError: [Errno 104] Connection reset by peer)\n")


def test_every_missing_required_setting_is_named_at_once(tmp_path):
    result = run_spout({"OUTPUT_PIPE": str(tmp_path / "none")})
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        "spout.py: error: HOST, PORT, TOPIC: required (HOST and PORT, or BOOTSTRAP_SERVERS; "
        "TOPIC, or TOPIC_PATTERN); OUTPUT_PIPE: ")
    assert "is missing; it must be a named pipe" in result.stderr
    result = run_spout({"PORT": "9092", "OUTPUT_PIPE": str(tmp_path / "none")})
    assert result.stderr.startswith("spout.py: error: HOST, TOPIC: required (HOST, or "
                                    "BOOTSTRAP_SERVERS; TOPIC, or TOPIC_PATTERN)")


@pytest.mark.parametrize("env, field, value", [
    ({"FORMAT": "JSON"}, "format", "json"),
    ({"FORMAT": "Raw+Meta"}, "format", "raw+meta"),
    ({"LOG_LEVEL": "error"}, "log_level", "ERROR"),
    ({"LOG_LEVEL": "debug"}, "log_level", "DEBUG"),
    ({"AUTO_OFFSET_RESET": "LATEST"}, "auto_offset_reset", "latest"),
    ({"MODE": "Group"}, "mode", "group"),
    ({"DECODE": "NONE"}, "decode", ()),
    ({"LOG_FORMAT": "JSON"}, "log_format", "json"),
])
def test_choices_are_taken_in_any_case_and_given_in_the_canonical_one(base, env, field, value):
    assert getattr(spout.Config.from_sources({**base, **env}), field) == value


def test_kafka_option_names_are_taken_in_any_case(base):
    config = spout.Config.from_sources({
        **base, "KAFKA_SECURITY_PROTOCOL": "sasl_plaintext", "KAFKA_SASL_MECHANISM": "plain",
        "KAFKA_SASL_PLAIN_USERNAME": "u", "KAFKA_SASL_PLAIN_PASSWORD": "p",
        "KAFKA_ISOLATION_LEVEL": "READ_UNCOMMITTED"})
    assert config.kafka_options["security_protocol"] == "SASL_PLAINTEXT"
    assert config.kafka_options["sasl_mechanism"] == "PLAIN"
    assert config.kafka_options["isolation_level"] == "read_uncommitted"


def test_log_level_error_shows_errors_only(base):
    assert spout.Config.from_sources({**base, "LOG_LEVEL": "ERROR"}).log_level == "ERROR"


def test_version_prints_one_line_and_exits_0():
    result = run_spout({}, "--version")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == spout.version_line() + "\n"
    assert result.stdout.startswith(f"spout.py {spout.__version__} (kafka-python 3.0.12, Python")
