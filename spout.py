#!/usr/bin/env python3
"""kafka-spout: stream Kafka topics into a Pachyderm spout's output repo.

Each batch of messages becomes one commit: on Pachyderm 2.x one made through pachd's API, its
description recording where every partition resumes; on 1.x one tar archive written to the
named pipe /pfs/out. The layers below build on each other from the top of the file:

  configuration  Config (frozen; every setting and its validation), parse_*, check_*
  naming         NameTemplate: a file's name from {topic} {partition} {offset} ...
  decoding       DECODE: Confluent-framed values (Avro, Protobuf, JSON Schema) to documents
                 through a Schema Registry; bad records and the registry's outages
  encoding       no I/O: tar archives, the marker and commit record, ModifyFile requests,
                 the message shapes of FORMAT (json, raw+meta)
  delivery       Delivery, one per Pachyderm generation: PipeDelivery (1.x, the pipe),
                 PfsDelivery (2.x, commits through pachd); the loop never knows which
  batching       records in, files out: Batch, Rotation (when a batch closes), and a Batcher
                 per kind of file: MessageFiles (one file per message), Segments (one per
                 partition per batch, through JsonLinesWriter or ParquetWriter in encoding)
  the loop       Spout: the Kafka session (assign or subscribe, rebalances, offset
                 commits) and the loop polling, decoding, batching, delivering, then committing
  metrics        MetricsMonitor: /metrics and /healthz
  tools          `spout.py verify` and `spout.py locate`: read-only checks of 2.x repos
                 from the commits' records (gaps, overlaps; where a message is)
  main()         logging, signals, exit statuses
"""

from __future__ import annotations

import argparse
import dataclasses
import base64
import datetime
import decimal
import errno
import fcntl
import functools
import hashlib
import io
import itertools
import json
import logging
import operator
import os
import re
import select
import signal
import stat
import string
import struct
import sys
import tarfile
import termios
import threading
import time
import uuid
import zlib
from collections import deque
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence
from urllib.parse import quote

log = logging.getLogger("kafka-spout")
__version__ = "0.1.0"

# --------------------------------------------------------------------------- configuration


class ConfigError(Exception):
    """A setting is missing or malformed. str() is the single line shown to the user."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
          "k": 1024, "m": 1024**2, "g": 1024**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([a-zA-Z]*)\s*")
# Kafka's own rule for topic names.
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOST_PORT_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d+)")
# Kubernetes injects <SERVICE>_SERVICE_HOST, <SERVICE>_SERVICE_PORT[_<PORT NAME>],
# <SERVICE>_PORT[_<N>_<PROTO>[_ADDR|_PORT|_PROTO]] for every Service in the namespace, the
# name upper-cased with '-' as '_': Services called "kafka", "kafka-ui" or "kafka-0" beside
# the spout must not make it refuse to start. No KafkaConsumer option has this shape.
_K8S_SERVICE_ENV_RE = re.compile(
    r"KAFKA(_[A-Z0-9_]+?)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|"
    r"PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")


def parse_whole_number(text: str) -> int:
    """int() with the user's words: '1.5' is not a whole number, 'soon' is not a number."""
    try:
        return int(text.strip())
    except ValueError:
        try:
            float(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        raise ValueError(f"{text!r} is not a whole number") from None


def parse_positive_int(text: str) -> int:
    value = parse_whole_number(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def parse_size(text: str) -> int:
    """Bytes as a whole number with an optional unit: 1048576, 64KiB, 16MiB, 10MB."""
    match = _SIZE_RE.fullmatch(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError("must be a byte count such as 1048576, 512KiB or 16MiB")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError("must be positive")
    return value


def parse_seconds(text: str) -> float:
    value = float(text.strip())
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def parse_port(text: str) -> int:
    port = parse_whole_number(text)
    if not 0 < port < 65536:
        raise ValueError("must be a port number from 1 to 65535")
    return port


def parse_bootstrap_servers(text: str) -> tuple[str, ...]:
    servers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not servers:
        raise ValueError("must list at least one host:port")
    for server in servers:
        match = _HOST_PORT_RE.fullmatch(server)
        if not match:
            raise ValueError(f"{server!r} is not host:port")
        parse_port(match.group(2))
    return servers


def parse_topics(text: str) -> tuple[str, ...]:
    topics = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not topics:
        raise ValueError("must name at least one topic")
    for topic in topics:
        if not _TOPIC_RE.fullmatch(topic) or topic in (".", ".."):
            raise ValueError(f"{topic!r} is not a valid Kafka topic name "
                             "(letters, digits, '.', '_', '-'; at most 249)")
    return topics


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        raise ValueError(f"must be one of {', '.join(choices)}")
    return parse


def parse_topic_pattern(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise ValueError(f"{text!r} is not a regular expression ({error})") from None
    return text


def parse_marker_name(text: str) -> str:
    name = text.strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,99}", name):
        raise ValueError(f"{name!r} is not a marker name (a letter, then letters, digits, "
                         "'.', '_' or '-')")
    return name


def parse_nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def parse_decode(text: str) -> tuple[str, ...]:
    """DECODE: none, value, or key,value (either order): the parts to decode."""
    parts = {part.strip().lower() for part in text.split(",") if part.strip()}
    if parts == {"none"}:
        return ()
    if not parts or not parts <= {"key", "value"} or "value" not in parts:
        raise ValueError("must be none, value, or key,value")
    return tuple(part for part in ("key", "value") if part in parts)


def parse_registry_urls(text: str) -> tuple[str, ...]:
    """One or more http(s)://host[:port][/path], comma-separated, as the Confluent client takes
    them."""
    from urllib.parse import urlsplit
    urls = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
    if not urls:
        raise ValueError("must list at least one http:// or https:// URL")
    for url in urls:
        shown = mask_url(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(f"{shown!r} is not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{shown!r} is not an http:// or https:// URL")
        if port == 0 or parts.query or parts.fragment:
            raise ValueError(f"{shown!r} is not a Schema Registry URL (http[s]://host[:port]"
                             "[/path])")
    return urls


def parse_user_info(text: str) -> str:
    """user:password; never echoed back, it is a secret."""
    value = text.strip()
    user, sep, _password = value.partition(":")
    if not sep or not user:
        raise ValueError("must be user:password")
    return value


def mask_url(url: str) -> str:
    """A URL with the password of any user:password@ in it replaced by ***. The host starts
    after the last @ before the path, as urlsplit reads it: a password may hold an unencoded
    @ of its own."""
    scheme, sep, rest = url.partition("//")
    if not sep:
        return url
    end = min((index for index in map(rest.find, "/?#") if index >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not at or not colon:
        return url
    return f"{scheme}//{user}:***@{host}{rest[end:]}"


# Pachyderm mounts this into every 2.x spout's container (worker_rc.go).
DEFAULT_PACH_CONFIG = "/pachctl/config.json"
# pachd's rule for project, repo and branch names (ValidateName in Pachyderm's source).
_PFS_NAME = r"[A-Za-z0-9_-]+"
_OUTPUT_REPO_RE = re.compile(rf"(?:({_PFS_NAME})/)?({_PFS_NAME})(?:@({_PFS_NAME}))?")


def parse_pachd_address(text: str) -> tuple[str, bool]:
    """'grpc://host:port', 'grpcs://host:port' (TLS) or 'host:port': (host:port, tls)."""
    address = text.strip()
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "grpc", address
    if scheme not in ("grpc", "grpcs", "http", "https"):
        raise ValueError(f"{address!r}: scheme {scheme!r} is not grpc, grpcs, http or https")
    match = _HOST_PORT_RE.fullmatch(rest)
    if not match:
        raise ValueError(f"{address!r} is not [grpc://|grpcs://|http://|https://]host:port")
    parse_port(match.group(2))
    return f"{scheme}://{rest}", scheme in ("grpcs", "https")


class RepoBranch(NamedTuple):
    project: str
    repo: str
    branch: str

    def __str__(self) -> str:
        return f"{self.project}/{self.repo}@{self.branch}"


class ReadBound(NamedTuple):
    """START_AT or STOP_AT: earliest, latest or end; a time (ms since the epoch), taken
    through the broker's offsets-for-times; or explicit offsets by (topic, partition)."""
    kind: str                        # earliest | latest | end | time | offsets
    time_ms: int | None = None
    offsets: Mapping | None = None   # (topic, partition) -> offset

    def __str__(self) -> str:
        if self.kind == "time":
            return datetime.datetime.fromtimestamp(self.time_ms / 1000, datetime.timezone.utc
                                                   ).isoformat().replace("+00:00", "Z")
        if self.kind == "offsets":
            return ",".join(f"{topic}/{partition}={offset}"
                            for (topic, partition), offset in sorted(self.offsets.items()))
        return self.kind


def parse_read_bound(*words: str) -> Callable[[str], ReadBound]:
    """One of `words`, an ISO-8601 time with its zone, or topic/partition=offset,..."""
    def parse(text: str) -> ReadBound:
        text = text.strip()
        if text.lower() in words:
            return ReadBound(text.lower())
        if "=" in text:
            offsets: dict = {}
            for item in filter(None, (part.strip() for part in text.split(","))):
                where, _, offset = item.partition("=")
                topic, slash, partition = where.strip().rpartition("/")
                if not slash or not topic or not partition.strip().isdigit() or \
                        not offset.strip().isdigit():
                    raise ValueError(f"{item!r} is not topic/partition=offset")
                key = (topic, int(partition))
                if key in offsets:
                    raise ValueError(f"{topic}/{int(partition)} is named twice")
                offsets[key] = int(offset)
            if not offsets:
                raise ValueError(f"{text!r} names no partition")
            return ReadBound("offsets", offsets=MappingProxyType(offsets))
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {', '.join(words)}, an ISO-8601 time or "
                             "topic/partition=offset,...") from None
        if moment.tzinfo is None:
            raise ValueError(f"{text!r} has no time zone: add Z (UTC) or an offset such as "
                             "+02:00")
        return ReadBound("time", time_ms=int(moment.timestamp() * 1000))
    return parse


def check_partition_split(values: dict, sources: Mapping[str, str]) -> None:
    """PARTITIONS belongs to exactly-once, RESUME_FROM to the 2.x delivery."""
    if "partitions" in values and values["mode"] != "exactly-once":
        raise ConfigError(sources["partitions"], "partition sets are for exactly-once mode: "
                          "in group mode the consumer group shares the partitions")
    if "resume_from" in values and values["delivery"] != "pfs":
        raise ConfigError(sources["resume_from"], "reads other repos' records through pachd: "
                          "Pachyderm 2.x (DELIVERY=pfs) only")


def check_read_bounds(values: dict, sources: Mapping[str, str], defaulted: set) -> None:
    """START_AT against AUTO_OFFSET_RESET, STOP_AT against the mode and START_AT."""
    start, stop = values.get("start_at"), values.get("stop_at")
    if start is not None and start.kind in ("earliest", "latest"):
        if "auto_offset_reset" not in defaulted and values["auto_offset_reset"] != start.kind:
            raise ConfigError(sources["start_at"], f"{start.kind} disagrees with "
                              f"{sources['auto_offset_reset']}={values['auto_offset_reset']} "
                              "(the same setting under Kafka's name): set one")
        values["auto_offset_reset"] = start.kind
    if stop is None:
        return
    if values["mode"] != "exactly-once":
        raise ConfigError(sources["stop_at"], "a bounded read needs MODE=exactly-once: in "
                          "group mode no spout knows when every partition is done")
    if start is None or start.kind != stop.kind:
        return
    if start.kind == "time" and stop.time_ms < start.time_ms:
        raise ConfigError(sources["stop_at"], f"{stop} is before {sources['start_at']}={start}")
    if start.kind == "offsets":
        for key, offset in stop.offsets.items():
            if key in start.offsets and offset < start.offsets[key]:
                raise ConfigError(sources["stop_at"], f"{key[0]}/{key[1]}={offset} is before "
                                  f"{sources['start_at']}'s {start.offsets[key]}")


def parse_output_repo(text: str) -> RepoBranch:
    match = _OUTPUT_REPO_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text.strip()!r} is not project/repo@branch (letters, digits, "
                         "'_' and '-' in each name)")
    project, repo, branch = match.groups()
    return RepoBranch(project or "default", repo, branch or "master")


def parse_partition_set(text: str) -> frozenset:
    """PARTITIONS: numbers and ranges, e.g. 0-3,8."""
    numbers: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        first, dash, last = item.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise ValueError(f"{item!r} is not a partition number or a range such as 0-3")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{item!r} ends before it starts")
        numbers.update(range(low, high + 1))
    if not numbers:
        raise ValueError(f"{text!r} names no partition")
    return frozenset(numbers)


def parse_repo_list(text: str) -> tuple[RepoBranch, ...]:
    """RESUME_FROM: project/repo@branch,..."""
    repos = tuple(parse_output_repo(item) for item in text.split(",") if item.strip())
    if not repos:
        raise ValueError(f"{text!r} names no repo")
    return repos


def describe_partition_set(partitions: frozenset) -> str:
    runs, numbers = [], sorted(partitions)
    start = previous = numbers[0]
    for number in numbers[1:] + [None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ",".join(runs)


def describe_value_error(error: ValueError, text: str) -> str:
    """Our parsers' messages as they are; int()'s and float()'s in the user's terms."""
    message = str(error)
    if message.startswith(("invalid literal", "could not convert")):
        return f"{text!r} is not a number"
    return message


class Setting(NamedTuple):
    env: str
    field: str
    parse: Callable[[str], object]
    default: str | None
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("HOST", "host", parse_nonempty, None, "broker host, used with PORT"),
    Setting("PORT", "port", parse_port, None, "broker port, used with HOST"),
    Setting("BOOTSTRAP_SERVERS", "bootstrap_servers", parse_bootstrap_servers, None,
            "comma-separated host:port list; wins over HOST/PORT"),
    Setting("TOPIC", "topics", parse_topics, None,
            "topic, or comma-separated topics (this or TOPIC_PATTERN is required)"),
    Setting("TOPIC_PATTERN", "topic_pattern", lambda text: parse_topic_pattern(text), None,
            "regular expression over whole topic names; new matches are picked up"),
    Setting("FORMAT", "format", parse_choice("raw", "json", "raw+meta", "jsonl", "parquet"),
            "raw", "a file per message: raw (the value), json (value and metadata), raw+meta "
            "(value + .meta.json); a file per partition per batch: jsonl, parquet"),
    Setting("PARQUET_COMPRESSION", "parquet_compression",
            parse_choice("zstd", "snappy", "gzip", "none"), "zstd",
            "FORMAT=parquet: the column chunks' codec"),
    Setting("TOMBSTONES", "tombstones", parse_choice("skip", "keep"), "skip",
            "null values: skip, or keep as records with value null (all but raw)"),
    Setting("DELIVERY", "delivery", parse_choice("auto", "pipe", "pfs"), "auto",
            "pipe (Pachyderm 1.x), pfs (2.x: commits through pachd) or auto"),
    Setting("OUTPUT_PIPE", "output_pipe", parse_nonempty, "/pfs/out",
            "pipe delivery: the named pipe Pachyderm reads"),
    Setting("PACH_CONFIG", "pach_config", parse_nonempty, None,
            f"pfs delivery: a pachctl config file (default: {DEFAULT_PACH_CONFIG})"),
    Setting("PACHD_ADDRESS", "pachd_address", lambda text: parse_pachd_address(text)[0], None,
            "pfs delivery: pachd's address instead of a config file, e.g. grpc://pachd:30650"),
    Setting("PACH_TOKEN", "pach_token", parse_nonempty, None,
            "pfs delivery, with PACHD_ADDRESS: the auth token (or PACH_TOKEN_FILE)"),
    Setting("PACH_TOKEN_FILE", "pach_token_file", parse_nonempty, None,
            "pfs delivery: a file holding the auth token"),
    Setting("OUTPUT_REPO", "output_repo", lambda text: parse_output_repo(text), None,
            "pfs delivery: project/repo@branch "
            "(default: $PPS_PROJECT_NAME/$PPS_PIPELINE_NAME@master)"),
    Setting("MODE", "mode", parse_choice("exactly-once", "group"), None,
            "exactly-once (one spout takes every partition; default with MARKER or pfs) "
            "or group (partitions shared by GROUP_ID)"),
    Setting("GROUP_ID", "group_id", parse_nonempty, None,
            "consumer group (default: $PPS_PIPELINE_NAME, else kafka-spout)"),
    Setting("AUTO_OFFSET_RESET", "auto_offset_reset", parse_choice("earliest", "latest"),
            "earliest", "where partitions without a committed offset start"),
    Setting("PARTITIONS", "partitions", parse_partition_set, None,
            "exactly-once: the partitions this spout owns, the same numbers in every topic, "
            "e.g. 0-3,8; several spouts, each its own pipeline and repo, split a topic "
            "between them (partitions added later are taken only if named)"),
    Setting("RESUME_FROM", "resume_from", parse_repo_list, None,
            "2.x: project/repo@branch,... of the spouts a new split replaces: a partition with "
            "no record in this spout's repo starts where the newest records of those repos "
            "leave it (the largest offset)"),
    Setting("START_AT", "start_at", parse_read_bound("earliest", "latest"), None,
            "where a partition with no record (group mode: and no committed offset) starts: "
            "earliest, latest, an ISO-8601 time with its zone (the first offset at or after "
            "it), or topic/partition=offset,..."),
    Setting("STOP_AT", "stop_at", parse_read_bound("end"), None,
            "a bounded read: end (each partition's end as the read began), an ISO-8601 time "
            "with its zone (messages at or after it are not taken), or "
            "topic/partition=offset,... for every partition; once all are delivered the "
            "spout closes the range and exits 0 (in a pipeline: idles)"),
    Setting("BATCH_MAX_MESSAGES", "batch_max_messages", parse_positive_int, "1000",
            "close a batch (one archive or commit) at this many messages (jsonl and parquet: "
            "100000)"),
    Setting("BATCH_MAX_BYTES", "batch_max_bytes", parse_size, "16MiB",
            "close a batch at this many bytes of message data (jsonl and parquet: 64MiB)"),
    Setting("BATCH_MAX_SECONDS", "batch_max_seconds", parse_seconds, "1.0",
            "close a batch this long after its first message (jsonl and parquet: 60)"),
    Setting("NAME_TEMPLATE", "name_template", lambda text: NameTemplate(text).template,
            None, "file name per message; tokens {topic} {partition} {offset} {key} "
            "{timestamp} {date} {hour} {key_hash} (default: {topic}/{partition}/{offset:020d}"
            "; jsonl and parquet: one per file, of {topic} {partition} {offset} {date} {hour}, "
            "default {topic}/{partition}/{offset:020d}.jsonl or .parquet)"),
    Setting("MARKER", "marker", lambda text: parse_marker_name(text), None,
            "marker mode: the spec's spout.marker name; resume exactly from it"),
    Setting("GROUP_INSTANCE_ID", "group_instance_id", parse_nonempty, None,
            "group mode: static membership, a restarted spout gets its partitions back"),
    Setting("DECODE", "decode", parse_decode, "none",
            "none, value or key,value: decode Confluent-framed Avro, Protobuf and JSON "
            "Schema through SCHEMA_REGISTRY_URL"),
    Setting("SCHEMA_REGISTRY_URL", "schema_registry_url", parse_registry_urls, None,
            "with DECODE: the Schema Registry, one or more comma-separated URLs"),
    Setting("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "schema_registry_user_info",
            parse_user_info, None, "user:password for the registry (or ..._FILE)"),
    Setting("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE", "schema_registry_user_info_file",
            parse_nonempty, None, "a file holding the registry's user:password"),
    Setting("SCHEMA_REGISTRY_BEARER_TOKEN", "schema_registry_bearer_token", parse_nonempty,
            None, "a bearer token for the registry (or ..._FILE)"),
    Setting("SCHEMA_REGISTRY_BEARER_TOKEN_FILE", "schema_registry_bearer_token_file",
            parse_nonempty, None, "a file holding the registry's bearer token"),
    Setting("SCHEMA_REGISTRY_SSL_CA_LOCATION", "schema_registry_ssl_ca_location",
            parse_nonempty, None, "CA certificates (file or directory) the registry's "
            "certificate is checked against"),
    Setting("SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
            "schema_registry_ssl_certificate_location", parse_nonempty, None,
            "a client certificate for the registry (PEM)"),
    Setting("SCHEMA_REGISTRY_SSL_KEY_LOCATION", "schema_registry_ssl_key_location",
            parse_nonempty, None, "the client certificate's key (PEM)"),
    Setting("ON_BAD_RECORD", "on_bad_record", parse_choice("dead-letter", "skip", "fail"),
            "dead-letter", "with DECODE, a message that cannot be decoded: dead-letter "
            "(its bytes to _errors/), skip (count and log) or fail (stop)"),
    Setting("LOG_LEVEL", "log_level", parse_choice("DEBUG", "INFO", "WARNING", "ERROR"),
            "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Setting("LOG_FORMAT", "log_format", parse_choice("text", "json"), "text",
            "text, or json: one JSON object per line for log platforms"),
    Setting("METRICS_PORT", "metrics_port", parse_port, None,
            "serve Prometheus /metrics and /healthz on this port (unset: no server)"),
    Setting("METRICS_ADDRESS", "metrics_address", parse_nonempty, "0.0.0.0",
            "with METRICS_PORT: the address the server listens on"),
    Setting("HEALTH_MAX_DELIVERY_SECONDS", "health_max_delivery_seconds", parse_seconds,
            "300", "/healthz fails when messages wait and no commit was held this long"),
)

# BATCH_MAX_* when unset and FORMAT is jsonl or parquet. Segments are meant to be few and
# large, as Kafka Connect's sinks flush at thousands of records or minutes; 64 MiB bounds
# Parquet's peak memory (3x the batch + the interpreter, measured in make bench).
SEGMENT_BATCH_DEFAULTS = {"batch_max_messages": 100_000, "batch_max_bytes": 64 * 1024 * 1024,
                          "batch_max_seconds": 60.0}

# Options the spout sets itself; a KAFKA_ variable may not override them.
_OWNED_KAFKA_OPTIONS = {
    "bootstrap_servers": "BOOTSTRAP_SERVERS", "group_id": "GROUP_ID",
    "group_instance_id": "GROUP_INSTANCE_ID",
    "auto_offset_reset": "AUTO_OFFSET_RESET",
    "enable_auto_commit": "nothing: offsets are committed only after delivery",
    "key_deserializer": "nothing", "value_deserializer": "nothing",
    "consumer_timeout_ms": "nothing",
}
_SECRET_WORDS = ("password", "secret", "token", "sasl_plain_username")


def _kafka_option_defaults() -> dict[str, object]:
    from kafka import KafkaConsumer
    return dict(KafkaConsumer.DEFAULT_CONFIG)


def parse_kafka_option(name: str, text: str, defaults: Mapping[str, object]) -> object:
    """Converts text to the type of the option's default value."""
    default = defaults[name]
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be true or false")
    if isinstance(default, int):
        return parse_whole_number(text)
    if isinstance(default, float):
        return float(text.strip())
    if name == "api_version":
        try:
            return tuple(int(part) for part in text.strip().split("."))
        except ValueError:
            raise ValueError("must be a version such as 2.8.0") from None
    if default is None and name.endswith(("_ms", "_bytes")):
        return parse_whole_number(text)
    if default is None or isinstance(default, str):
        return text
    raise ValueError("cannot be set from text")


def is_secret_option(name: str) -> bool:
    return any(word in name for word in _SECRET_WORDS)


@dataclasses.dataclass(frozen=True)
class Config:
    bootstrap_servers: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    topic_pattern: str | None = None
    format: str = "raw"
    parquet_compression: str = "zstd"
    tombstones: str = "skip"
    delivery: str = "pipe"
    output_pipe: str = "/pfs/out"
    pachd_address: str | None = None
    pach_token: str | None = dataclasses.field(default=None, repr=False)
    pach_token_source: str = "PACH_TOKEN"
    pach_root_certs: bytes | None = dataclasses.field(default=None, repr=False)
    output_repo: RepoBranch | None = None
    mode: str = "group"
    group_id: str = "kafka-spout"
    auto_offset_reset: str = "earliest"
    partitions: frozenset | None = None
    resume_from: tuple[RepoBranch, ...] = ()
    start_at: ReadBound | None = None
    stop_at: ReadBound | None = None
    in_pipeline: bool = False   # PPS_PIPELINE_NAME is set: Pachyderm restarts a spout that exits
    batch_max_messages: int = 1000
    batch_max_bytes: int = 16 * 1024 * 1024
    batch_max_seconds: float = 1.0
    name_template: str = "{topic}/{partition}/{offset:020d}"
    marker: str | None = None
    group_instance_id: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_address: str = "0.0.0.0"
    health_max_delivery_seconds: float = 300.0
    decode: tuple[str, ...] = ()
    schema_registry_url: tuple[str, ...] = ()
    schema_registry_user_info: str | None = dataclasses.field(default=None, repr=False)
    schema_registry_bearer_token: str | None = dataclasses.field(default=None, repr=False)
    # The setting a 401 or 403 answer from the registry points at.
    schema_registry_credentials_source: str = "SCHEMA_REGISTRY_URL"
    schema_registry_ssl_ca_location: str | None = None
    schema_registry_ssl_certificate_location: str | None = None
    schema_registry_ssl_key_location: str | None = None
    on_bad_record: str = "dead-letter"
    kafka_options: Mapping[str, object] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_sources(cls, environ: Mapping[str, str], argv: Sequence[str] = ()) -> Config:
        """Builds the configuration from flags, then the environment, then defaults.

        Raises ConfigError for the first problem found; reads nothing but the pipe's inode
        and, for pfs delivery, the pachctl config or token file.
        """
        args = build_arg_parser().parse_args(list(argv))
        values: dict[str, object] = {}
        sources: dict[str, str] = {}
        defaulted = set()
        for setting in SETTINGS:
            from_flag = getattr(args, setting.field)
            source = setting.flag if from_flag is not None else setting.env
            sources[setting.field] = source
            raw = from_flag if from_flag is not None else environ.get(setting.env)
            if raw is None:
                raw = setting.default
                defaulted.add(setting.field)
            if raw is None:
                continue
            try:
                values[setting.field] = setting.parse(raw)
            except ValueError as error:
                raise ConfigError(source, describe_value_error(error, raw)) from None

        host, port = values.pop("host", None), values.pop("port", None)
        check_required(values, sources, host, port)
        if "bootstrap_servers" not in values:
            address = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
            values["bootstrap_servers"] = (address,)
        if "topics" in values and "topic_pattern" in values:
            raise ConfigError("TOPIC_PATTERN", "set TOPIC or TOPIC_PATTERN, not both")
        if values.get("tombstones") == "keep" and values.get("format", "raw") == "raw":
            raise ConfigError("TOMBSTONES", "keep needs FORMAT=json, raw+meta, jsonl or "
                              "parquet: a raw file cannot tell a null value from an empty one")
        values.update(registry_settings(values, sources))
        segments = values["format"] in SEGMENT_FORMATS
        if segments:
            values["name_template"] = segment_template(
                values.get("name_template"), values["format"], sources["name_template"],
                "topic_pattern" in values or len(values.get("topics", ())) > 1)
            for field, default in SEGMENT_BATCH_DEFAULTS.items():
                if field in defaulted:
                    values[field] = default
        if "group_id" not in values:
            values["group_id"] = environ.get("PPS_PIPELINE_NAME") or "kafka-spout"
        values["delivery"] = choose_delivery(values, sources)
        pachd = pachd_settings(values, sources, environ) if values["delivery"] == "pfs" else {}
        for field in ("pach_config", "pachd_address", "pach_token", "pach_token_file",
                      "output_repo"):
            values.pop(field, None)
        values.update(pachd)
        values["mode"] = choose_mode(values, sources)
        check_read_bounds(values, sources, defaulted)
        check_partition_split(values, sources)
        values["in_pipeline"] = bool(environ.get("PPS_PIPELINE_NAME"))
        values["kafka_options"] = MappingProxyType(
            collect_kafka_options(environ, args.kafka or ()))
        config = cls(**values)
        if config.marker:
            check_marker_is_apart(config)
        return config

    @property
    def exactly_once(self) -> bool:
        return self.mode == "exactly-once"

    @property
    def marker_path(self) -> str | None:
        """Where Pachyderm puts the marker it kept: beside the pipe, as /pfs/<name>."""
        if not self.marker:
            return None
        return os.path.join(os.path.dirname(self.output_pipe), self.marker)

    @property
    def broker_address(self) -> str:
        return ",".join(self.bootstrap_servers)

    def wants_topic(self, topic: str) -> bool:
        if self.topic_pattern is not None:
            if re.fullmatch(self.topic_pattern, topic) is None:
                return False
            clash = self.marker and marker_clash(self.name_template, self.marker, topic,
                                                 NAME_SUFFIXES.get(self.format, ""))
            if clash and topic not in _SKIPPED_TOPICS:
                _SKIPPED_TOPICS.add(topic)
                log.warning("skipping topic %s, which TOPIC_PATTERN matches: %s", topic, clash)
            return not clash
        return topic in self.topics

    def describe(self) -> str:
        """The effective configuration for the start-up log line, secrets masked."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("pach_token", "pach_root_certs"):
            fields[name] = "***" if fields[name] else None
        fields["output_repo"] = str(self.output_repo) if self.output_repo else None
        for name in ("start_at", "stop_at"):
            fields[name] = None if fields[name] is None else str(fields[name])
        if self.partitions is not None:
            fields["partitions"] = describe_partition_set(self.partitions)
        fields["resume_from"] = tuple(map(str, self.resume_from))
        for name in ("schema_registry_user_info", "schema_registry_bearer_token"):
            fields[name] = "***" if fields[name] else None
        fields["schema_registry_url"] = tuple(map(mask_url, self.schema_registry_url))
        fields["kafka_options"] = {
            name: ("***" if is_secret_option(name) else value)
            for name, value in self.kafka_options.items()}
        return " ".join(f"{name}={value!r}" for name, value in fields.items())


def check_required(values: Mapping[str, object], sources: Mapping[str, str],
                   host: object, port: object) -> None:
    """Every required setting that is missing, in one line: the broker, the topics, and where
    a DELIVERY=auto spout would deliver, so that a first run is not a game of one at a time."""
    missing: list[str] = []
    alternatives: list[str] = []
    if "bootstrap_servers" not in values and (host is None or port is None):
        absent = [name for name, value in (("HOST", host), ("PORT", port)) if value is None]
        missing += absent
        alternatives.append(" and ".join(absent) + ", or BOOTSTRAP_SERVERS")
    if "topics" not in values and "topic_pattern" not in values:
        missing.append("TOPIC")
        alternatives.append("TOPIC, or TOPIC_PATTERN")
    if not missing:
        return
    if len(missing) == 1 or missing == ["HOST", "PORT"]:
        problem = f"required (or set {alternatives[0].split(', or ')[1]})"
    else:
        problem = f"required ({'; '.join(alternatives)})"
    try:
        choose_delivery(values, sources)
    except ConfigError as delivery_problem:
        problem += f"; {delivery_problem}"
    raise ConfigError(", ".join(missing), problem)


def is_kubernetes_variable(env_name: str, defaults: Mapping[str, object]) -> bool:
    # An option's own name wins over the shape, so that no real setting is ever dropped.
    return env_name[len("KAFKA_"):].lower() not in defaults and \
        _K8S_SERVICE_ENV_RE.fullmatch(env_name) is not None


def collect_kafka_options(environ: Mapping[str, str], flags: Iterable[str]) -> dict:
    defaults = _kafka_option_defaults()
    raw: dict[str, tuple[str, str]] = {}
    for env_name, text in environ.items():
        if not env_name.startswith("KAFKA_"):
            continue
        if is_kubernetes_variable(env_name, defaults):
            continue
        raw[env_name[len("KAFKA_"):].lower()] = (env_name, text)
    for flag in flags:
        name, sep, text = flag.partition("=")
        if not sep:
            raise ConfigError("--kafka", f"{flag!r} is not OPTION=VALUE")
        raw[name.strip().lower().replace("-", "_")] = (f"--kafka {name.strip()}", text)
    for name in [n for n in raw if n.endswith("_file") and n[:-5] in defaults]:
        # KAFKA_<OPTION>_FILE: the value is in a file, as Pachyderm mounts secrets.
        source, path = raw.pop(name)
        if name[:-5] in raw:
            raise ConfigError(source, f"set {raw[name[:-5]][0]} or {source}, not both")
        try:
            with open(path, encoding="utf-8") as secret:
                raw[name[:-5]] = (source, secret.read().rstrip("\r\n"))
        except OSError as error:
            raise ConfigError(source, f"cannot read {path}: {error.strerror}") from None
    options: dict[str, object] = {}
    for name, (source, text) in sorted(raw.items()):
        if name in _OWNED_KAFKA_OPTIONS:
            raise ConfigError(source, f"not allowed; set {_OWNED_KAFKA_OPTIONS[name]} instead")
        if name not in defaults:
            raise ConfigError(source, f"unknown KafkaConsumer option {name!r}")
        try:
            options[name] = parse_kafka_option(name, text, defaults)
            if name in _KAFKA_CHOICES:  # case-insensitive, as every choice of the spout's own
                options[name] = parse_choice(*_KAFKA_CHOICES[name])(text)
        except ValueError as error:
            raise ConfigError(source, describe_value_error(error, text)) from None
        if name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile") and \
                not os.path.isfile(text):
            raise ConfigError(source, f"{text} is not a readable file")
    check_security(options)
    return options


_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")
# KafkaConsumer options whose values are names: accepted in any case, given in kafka-python's.
_KAFKA_CHOICES = {
    "security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "sasl_mechanism": _SASL_MECHANISMS,
    "isolation_level": ("read_committed", "read_uncommitted"),
}


def check_security(options: Mapping[str, object]) -> None:
    """What kafka-python would only find out at its first connection."""
    protocol = options.get("security_protocol", "PLAINTEXT")
    if not str(protocol).startswith("SASL"):
        return
    mechanism = options.get("sasl_mechanism")
    if mechanism is None:
        raise ConfigError("KAFKA_SASL_MECHANISM", f"required with {protocol}: one of "
                          f"{', '.join(_SASL_MECHANISMS)}")
    if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        for option in ("sasl_plain_username", "sasl_plain_password"):
            if not options.get(option):
                raise ConfigError(f"KAFKA_{option.upper()}", f"required with {mechanism} "
                                  f"(or KAFKA_{option.upper()}_FILE)")


def check_marker_is_apart(config: Config) -> None:
    """Pachyderm 1.x diverts every member whose path starts with the marker's name to the
    marker branch: the file is lost and the marker overwritten. Dead letters (_errors/) never
    clash, as a marker name starts with a letter."""
    for topic in config.topics or (None,):
        clash = marker_clash(config.name_template, config.marker, topic,
                             NAME_SUFFIXES.get(config.format, ""))
        # With TOPIC_PATTERN, a clash that depends on the topic skips that topic (wants_topic).
        if clash and not (topic is None and clash.startswith("{topic}")):
            raise ConfigError("MARKER", f"{clash}; Pachyderm would take them for the marker")


_SKIPPED_TOPICS: set = set()  # logged once each
# What a format appends to a message's name for a second file.
NAME_SUFFIXES = {"raw+meta": ".meta.json"}


@functools.lru_cache(maxsize=4096)
def marker_clash(template: str, marker: str, topic: str | None, suffix: str) -> str | None:
    return NameTemplate(template).marker_clash(marker, topic, suffix)


def output_pipe_problem(path: str) -> str | None:
    """Why path is not a named pipe the spout can write to, or None."""
    try:
        mode = os.stat(path).st_mode  # follows links: Pachyderm links /pfs/out to the FIFO
    except FileNotFoundError:
        return f"{path} is {'a dangling link' if os.path.islink(path) else 'missing'}"
    except OSError as error:
        return f"{path}: {error.strerror}"
    if stat.S_ISFIFO(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" \
        if stat.S_ISREG(mode) else "not a FIFO"
    return f"{path} is {kind}"


def choose_delivery(values: Mapping[str, object], sources: Mapping[str, str]) -> str:
    """DELIVERY=auto: the pipe where /pfs/out is one (1.x), pachd where one is configured."""
    delivery = values.get("delivery", "auto")
    if delivery == "pfs":
        return "pfs"
    problem = output_pipe_problem(str(values.get("output_pipe", "/pfs/out")))
    if problem is None:
        return "pipe"
    if delivery == "auto" and ("pach_config" in values or "pachd_address" in values
                               or os.path.exists(DEFAULT_PACH_CONFIG)):
        return "pfs"
    hint = "" if delivery == "pipe" else (
        " for Pachyderm 1.x; for 2.x set PACH_CONFIG or PACHD_ADDRESS (DELIVERY=pfs)")
    raise ConfigError(sources["output_pipe"], f"{problem}; it must be a named pipe (FIFO)"
                      f"{hint}")


def pachd_settings(values: Mapping[str, object], sources: Mapping[str, str],
                   environ: Mapping[str, str]) -> dict[str, object]:
    """Where pachd is, who the spout is to it, and which branch it commits to."""
    if values.get("marker"):
        raise ConfigError(sources["marker"], "a Pachyderm 1.x setting; with DELIVERY=pfs "
                          "every commit's description records the offsets it holds")
    settings: dict[str, object] = {}
    token = values.get("pach_token")
    token_source = sources["pach_token"]
    if "pach_token_file" in values:
        if token is not None:
            raise ConfigError(sources["pach_token_file"], "set PACH_TOKEN or PACH_TOKEN_FILE, "
                              "not both")
        path = str(values["pach_token_file"])
        token_source = sources["pach_token_file"]
        try:
            with open(path, encoding="utf-8") as secret:
                token = secret.read().strip() or None
        except OSError as error:
            raise ConfigError(token_source, f"cannot read {path}: {error.strerror}") from None
    if "pachd_address" in values:
        settings["pachd_address"] = values["pachd_address"]
    else:
        path = str(values.get("pach_config", DEFAULT_PACH_CONFIG))
        address, session_token, root_certs = read_pach_config(path, sources["pach_config"])
        settings["pachd_address"], settings["pach_root_certs"] = address, root_certs
        if token is None and session_token:
            token, token_source = session_token, f"{sources['pach_config']} {path}"
    settings["pach_token"], settings["pach_token_source"] = token, token_source
    if "output_repo" in values:
        settings["output_repo"] = values["output_repo"]
    elif environ.get("PPS_PIPELINE_NAME"):
        settings["output_repo"] = parse_output_repo(
            f"{environ.get('PPS_PROJECT_NAME') or 'default'}/{environ['PPS_PIPELINE_NAME']}")
    else:
        raise ConfigError(sources["output_repo"], "required outside a Pachyderm pipeline "
                          "(PPS_PIPELINE_NAME is not set), e.g. default/kafka@master")
    return settings


def read_secret_file(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as secret:
            return secret.read().strip()
    except OSError as error:
        raise ConfigError(source, f"cannot read {path}: {error.strerror}") from None


def registry_settings(values: dict, sources: Mapping[str, str]) -> dict[str, object]:
    """DECODE's registry: where it is, who the spout is to it, the TLS files. Takes the
    SCHEMA_REGISTRY_* values out of values and gives them back checked, secrets read."""
    found = {field: values.pop(field) for field in list(values)
             if field.startswith("schema_registry_")}
    decode = values.get("decode", ())
    if not decode:
        if found:
            first = sorted(found, key=lambda field: sources[field])[0]
            raise ConfigError(sources[first], "set, but DECODE is none; set DECODE=value or "
                              "key,value to decode through the Schema Registry")
        return {}
    if "schema_registry_url" not in found:
        raise ConfigError(sources["schema_registry_url"], "required with DECODE="
                          f"{','.join(decode)}")
    if "key" in decode and values.get("format", "raw") == "raw":
        raise ConfigError(sources["decode"], "key,value needs FORMAT=json, raw+meta, jsonl "
                          "or parquet: a raw file holds the value only")
    settings: dict[str, object] = {"schema_registry_url": found["schema_registry_url"]}
    credentials: dict[str, tuple[str, str]] = {}
    for field in ("schema_registry_user_info", "schema_registry_bearer_token"):
        if field in found and f"{field}_file" in found:
            raise ConfigError(sources[f"{field}_file"], f"set {sources[field]} or "
                              f"{sources[field + '_file']}, not both")
        if f"{field}_file" in found:
            source = sources[f"{field}_file"]
            secret = read_secret_file(str(found[f"{field}_file"]), source)
            if not secret:
                raise ConfigError(source, f"{found[f'{field}_file']} is empty")
            if field == "schema_registry_user_info":
                try:
                    secret = parse_user_info(secret)
                except ValueError as error:
                    raise ConfigError(source, f"{found[f'{field}_file']}: {error}") from None
            credentials[field] = (secret, source)
        elif field in found:
            credentials[field] = (str(found[field]), sources[field])
    if len(credentials) == 2:
        raise ConfigError(credentials["schema_registry_bearer_token"][1], "set basic auth or "
                          "a bearer token for the Schema Registry, not both")
    if "schema_registry_user_info" in credentials and any(
            "@" in url.split("//", 1)[-1].split("/", 1)[0]
            for url in settings["schema_registry_url"]):
        raise ConfigError(sources["schema_registry_url"], "holds user:password@ and "
                          f"{credentials['schema_registry_user_info'][1]} is set too; use one")
    for field, (secret, source) in credentials.items():
        settings[field] = secret
        settings["schema_registry_credentials_source"] = source
    for field in ("schema_registry_ssl_ca_location", "schema_registry_ssl_certificate_location",
                  "schema_registry_ssl_key_location"):
        if field in found:
            path = str(found[field])
            is_ca_directory = field.endswith("ca_location") and os.path.isdir(path)
            if not is_ca_directory and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ConfigError(sources[field], f"{path} is not a readable file")
            settings[field] = path
    if "schema_registry_ssl_key_location" in settings and \
            "schema_registry_ssl_certificate_location" not in settings:
        raise ConfigError(sources["schema_registry_ssl_key_location"], "needs "
                          "SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION, the certificate it is for")
    return settings


def read_pach_config(path: str, source: str) -> tuple[str, str | None, bytes | None]:
    """pachd's address, the session token and the CA certificates of a pachctl config's active
    context. Read by hand: the SDK's ConfigFile refuses contexts with fields it does not know,
    which newer pachctl versions write."""
    try:
        with open(path, "rb") as config_file:
            document = json.loads(config_file.read())
    except FileNotFoundError:
        raise ConfigError(source, f"{path} does not exist") from None
    except OSError as error:
        raise ConfigError(source, f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(source, f"{path} is not JSON ({error})") from None
    try:
        name = document["v2"]["active_context"]
        context = document["v2"]["contexts"][name]
    except (KeyError, TypeError):
        raise ConfigError(source, f"{path} has no active context (v2.active_context naming "
                          "one of v2.contexts)") from None
    if not isinstance(context, dict) or not context.get("pachd_address"):
        raise ConfigError(source, f"{path}: context {name!r} has no pachd_address")
    try:
        address = parse_pachd_address(str(context["pachd_address"]))[0]
        root_certs = base64.b64decode(context["server_cas"], validate=True) \
            if context.get("server_cas") else None
    except ValueError as error:
        raise ConfigError(source, f"{path}: context {name!r}: {error}") from None
    return address, context.get("session_token") or None, root_certs


def choose_mode(values: Mapping[str, object], sources: Mapping[str, str]) -> str:
    """exactly-once needs a record of what Pachyderm holds: the marker (1.x) or the commits'
    descriptions (2.x). Group mode shares partitions and resumes from the group's offsets."""
    marker = values.get("marker")
    mode = values.get("mode") or ("exactly-once" if marker or values["delivery"] == "pfs"
                                  else "group")
    if mode == "exactly-once" and values["delivery"] == "pipe" and not marker:
        raise ConfigError(sources["mode"], "exactly-once through the pipe needs MARKER (the "
                          "spec's spout.marker), where Pachyderm keeps the offsets")
    if mode == "group" and marker:
        raise ConfigError(sources["mode"], "group mode resumes from the consumer group; "
                          "remove MARKER or set MODE=exactly-once")
    return mode


# What each optional feature imports, and the requirements file (and the Dockerfile's EXTRAS
# word) that installs it: an image built without one refuses the setting at start.
OPTIONAL_LIBRARIES = {
    "parquet": ("FORMAT", ("pyarrow", "pyarrow.parquet")),
    "decode": ("DECODE", ("confluent_kafka.schema_registry", "fastavro", "google.protobuf",
                          "grpc_tools")),
}


def check_optional_libraries(config: Config) -> None:
    """FORMAT=parquet and DECODE need libraries an image built with a smaller EXTRAS lacks:
    say so at start, in one line, rather than at the first batch with a traceback."""
    import importlib
    wanted = [extra for extra, used in (("parquet", config.format == "parquet"),
                                        ("decode", bool(config.decode))) if used]
    for extra in wanted:
        setting, modules = OPTIONAL_LIBRARIES[extra]
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ConfigError(setting, f"needs {module.split('.')[0]}, which is not "
                                  f"installed ({error}): pip install -r requirements-{extra}.txt"
                                  f", or build the image with EXTRAS including {extra}") from None


class _OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError("command line", message)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _OneLineArgumentParser(
        prog="spout.py",
        description="Stream Kafka topics into a Pachyderm spout's output repo: commits "
                    "through pachd (2.x) or archives through the named pipe (1.x). Every "
                    "setting comes from the environment variable in capitals; the flag wins.",
        epilog="Scaling out: one spout (exactly-once) takes every partition, one core's "
               "worth. PARTITIONS splits a topic between several exactly-once spouts, each "
               "its own pipeline and repo: every message still lands once, and changing the "
               "split is a planned step (RESUME_FROM). MODE=group lets Kafka share the "
               "partitions and hand a dead spout's to the others, at the price of a batch "
               "landing twice across a rebalance. docs/scaling.md has the details.")
    for setting in SETTINGS:
        default = f" [{setting.default}]" if setting.default is not None else ""
        parser.add_argument(setting.flag, dest=setting.field, metavar=setting.env,
                            help=f"{setting.help}{default} (env {setting.env})")
    parser.add_argument("--kafka", action="append", metavar="OPTION=VALUE",
                        help="any KafkaConsumer option, e.g. session_timeout_ms=6000 "
                             "(env KAFKA_<OPTION>, e.g. KAFKA_SESSION_TIMEOUT_MS)")
    parser.add_argument("--version", action="store_true",
                        help="print the spout's version and kafka-python's, then exit")
    return parser


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        kafka_python = version("kafka-python")
    except PackageNotFoundError:
        kafka_python = "not installed"
    return (f"spout.py {__version__} (kafka-python {kafka_python}, Python "
            f"{'.'.join(map(str, sys.version_info[:3]))})")


# --------------------------------------------------------------------------- naming

NAME_TOKENS = ("topic", "partition", "offset", "key", "timestamp", "date", "hour",
               "key_hash")
DEFAULT_NAME_TEMPLATE = "{topic}/{partition}/{offset:020d}"
PFS_FORBIDDEN = frozenset("*?[]{}!()@+^")
# Keys longer than this (once encoded) are cut and suffixed with a hash: downstream pipelines
# materialise files on local disks whose names stop at 255 bytes.
MAX_COMPONENT = 200
_UNRESERVED = "-._~"
NULL_KEY = "%null"    # '%' not followed by two hex digits: no encoded key looks like this
EMPTY_KEY = "%empty"


def encode_component(raw: bytes | str | None) -> str:
    """Makes one path component valid in PFS, reversibly, so different inputs never collide.

    Percent-encoding of everything but letters, digits and '-._~', and of a leading '.'; a
    component of dots only is encoded whole so it cannot climb out of its folder. Null and
    empty keys, and the hashed
    tail of very long keys, use '%' sequences that percent-encoding never produces.
    """
    if raw is None:
        return NULL_KEY
    if not raw:
        return EMPTY_KEY
    encoded = quote(raw, safe=_UNRESERVED)
    if encoded[0] == ".":
        # No leading dot, so that even a prefix cut by a format spec ({key:.2} of '..x') is
        # never '.' or '..'; quote() never writes %2E, so names stay distinct and reversible.
        encoded = "%2E" + encoded[1:] if encoded.strip(".") else "%2E" * len(encoded)
    if len(encoded) > MAX_COMPONENT:
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        digest = hashlib.sha256(data).hexdigest()[:32]
        encoded = encoded[:MAX_COMPONENT - 34] + "%~" + digest
    return encoded


def pfs_path_problem(path: str) -> str | None:
    """Why Pachyderm would reject this path, or None if it is valid."""
    for char in path:
        if not " " <= char <= "~":
            return f"character {char!r} is not printable ASCII"
        if char in PFS_FORBIDDEN:
            return f"character {char!r} is not allowed in PFS paths"
    parts = path.lstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "path has an empty, '.' or '..' component"
    return None


# Tokens rendered from text (the rest are integers), and the characters each can start with.
_TEXT_TOKENS = frozenset(("topic", "key", "key_hash", "date", "hour"))
_ENCODED_FIRST = frozenset(string.ascii_letters + string.digits + "-_~%")  # encode_component
_FIRST_CHARS = {"topic": _ENCODED_FIRST, "key": _ENCODED_FIRST,
                "key_hash": frozenset("0123456789abcdefn"), "date": frozenset(string.digits),
                "hour": frozenset(string.digits), "partition": frozenset(string.digits),
                "offset": frozenset(string.digits), "timestamp": frozenset(string.digits + "-")}
_HEX_FIRST = {"x": frozenset("abcdef"), "X": frozenset("ABCDEF")}
_FORMAT_SPEC = re.compile(r"(?:(?P<fill>.)?(?P<align>[<>=^]))?(?P<sign>[-+ ])?z?#?(?P<zero>0)?"
                          r"(?P<width>\d+)?[_,]?(?:\.(?P<precision>\d+))?(?P<type>[a-zA-Z%])?",
                          re.DOTALL)


def spec_problem(field: str, spec: str) -> str | None:
    """Why a format spec could make a token render a bad path piece, or None.

    Held for every accepted spec, whatever the message: a token renders at least one
    character that is not '.', and never '/' (its value's characters, a fill, a sign): so
    every path component holding a token is valid, and one of literal text alone is checked
    once by rendering it.
    """
    match = _FORMAT_SPEC.fullmatch(spec)
    if match is None:
        return None  # format() refuses it when the template is tried
    fill = match["fill"]
    if fill is not None and (fill == "/" or fill in PFS_FORBIDDEN or not " " <= fill <= "~"):
        return f"fill {fill!r} in {{{field}:{spec}}} is not allowed in PFS paths"
    if field in _TEXT_TOKENS and match["precision"] is not None and int(match["precision"]) == 0:
        return f"{{{field}:{spec}}} renders nothing"
    if field not in _TEXT_TOKENS and match["type"] == "c":
        return f"{{{field}:{spec}}} renders a character ('.', '/', ...), not a number"
    return None


def spec_first_chars(field: str, spec: str) -> frozenset:
    """Every character the token can start with under spec (a superset)."""
    chars = set(_FIRST_CHARS[field])
    match = _FORMAT_SPEC.fullmatch(spec or "")
    if match is None:
        return chars
    if match["width"] is not None or match["zero"]:
        chars |= {match["fill"] or " ", "0"}
    if match["sign"] in ("+", " "):
        chars.add(match["sign"])
    chars |= _HEX_FIRST.get(match["type"], frozenset())
    return frozenset(chars)


class NameTemplate:
    """Renders a message's file name from a str.format template over NAME_TOKENS."""

    def __init__(self, template: str | None = None):
        self.template = template or DEFAULT_NAME_TEMPLATE
        try:
            fields = list(string.Formatter().parse(self.template))
        except ValueError as error:
            raise ValueError(f"{self.template!r}: {error}") from None
        used = set()
        positional = []  # the template again, with tokens by position: faster to format
        for literal, field, spec, conversion in fields:
            positional.append(literal.replace("{", "{{").replace("}", "}}"))
            if field is None:
                continue
            if field not in NAME_TOKENS:
                raise ValueError(f"unknown token {{{field}}}; use {', '.join(NAME_TOKENS)}")
            if conversion:
                raise ValueError(f"conversion !{conversion} is not supported")
            if "{" in (spec or ""):
                raise ValueError("nested fields in format specs are not supported")
            problem = spec_problem(field, spec or "")
            if problem:
                raise ValueError(problem)
            used.add(field)
            positional.append("{%d%s}" % (NAME_TOKENS.index(field), f":{spec}" if spec else ""))
        if not used:
            raise ValueError("must use at least one token, e.g. {offset}")
        self.used = frozenset(used)
        self.uses_key = "key" in used
        self.uses_time = bool(used & {"date", "hour"})
        self.uses_key_hash = "key_hash" in used
        self._format = "".join(positional).format
        self._topic_cache: dict[str, str] = {}
        self._fields = fields
        # Templates of topic, partition and offset only: per partition, a printf-style format
        # of the offset (faster than str.format), or None where a spec has no such twin.
        self._by_offset = "offset" in used and used <= {"topic", "partition", "offset"}
        self._offset_formats: dict[tuple[str, int], str | None] = {}
        for sample in ((0, 0, b"k", 0), (2**31 - 1, 2**63 - 1, b"k" * 300, 2**41)):
            try:
                name = self.render("t", *sample)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{self.template!r}: {error}") from None
            problem = pfs_path_problem(name)
            if problem:
                raise ValueError(f"renders invalid names such as {name!r}: {problem}")

    def render(self, topic: str, partition: int, offset: int, key: bytes | None,
               timestamp: int) -> str:
        encoded_topic = self._topic_cache.get(topic)
        if encoded_topic is None:
            encoded_topic = self._topic_cache[topic] = encode_component(topic)
        if not (self.uses_key or self.uses_time or self.uses_key_hash):
            return self._format(encoded_topic, partition, offset, "", timestamp)
        date = hour = ""
        if self.uses_time:
            day = time.gmtime(max(timestamp, 0) // 1000)
            date = "%04d-%02d-%02d" % (day.tm_year, day.tm_mon, day.tm_mday)
            hour = "%02d" % day.tm_hour
        return self._format(encoded_topic, partition, offset,
                            encode_component(key) if self.uses_key else "", timestamp, date,
                            hour, key_hash(key) if self.uses_key_hash else "")

    def render_list(self, topic: str, partition: int, records: Sequence) -> list[str]:
        """render() for each record of one partition's polled list: names per list, not per
        message, with what is the same for the whole partition formatted once."""
        if self._by_offset:
            offset_format = self._offset_formats.get((topic, partition), False)
            if offset_format is False:
                offset_format = self._offset_formats[(topic, partition)] = \
                    self._offset_format(topic, partition)
            if offset_format is not None:
                return [offset_format % offset for offset in map(_OFFSET, records)]
        render = self.render
        return [render(topic, partition, record.offset, record.key, record.timestamp)
                for record in records]

    def marker_clash(self, marker: str, topic: str | None, suffix: str = "") -> str | None:
        """Why some name (plus suffix) rendered for topic (None: a topic not known yet) could
        start with marker, as Pachyderm 1.x compares them; None if none ever can.

        Complete, as tokens never render '/' nor an empty string: literal text and a known
        topic are compared as they are; at the first other token, its possible first
        characters decide (a superset, so a clash is never missed).
        """
        text, first = "", True
        for literal, field, spec, _ in self._fields + [(suffix, None, None, None)]:
            text += literal
            if first:
                text = text.lstrip("/")  # Pachyderm cleans the path to one leading '/'
            shared = min(len(text), len(marker))
            if text[:shared] != marker[:shared]:
                return None
            if len(text) >= len(marker):
                return (f"names such as {self.render(topic or 't', 0, 0, b'k', 0) + suffix!r} "
                        f"start with the marker name {marker!r}")
            if field is None:
                continue
            first = False
            if field == "topic" and topic is not None:
                text += format(encode_component(topic), spec or "")
                continue
            if field == "topic" or marker[len(text)] in spec_first_chars(field, spec):
                return (f"{{{field}}}{' after ' + repr(text) if text else ''} can render names "
                        f"that start with the marker name {marker!r}")
            return None
        return None

    def _offset_format(self, topic: str, partition: int) -> str | None:
        """The template as a %-format of the offset alone, the topic and partition filled in;
        None when the offset's spec is not one that % formats the same way."""
        if sum(field == "offset" for _, field, _, _ in self._fields) > 1:
            return None  # one % argument per name
        pieces = []
        values = {"topic": encode_component(topic), "partition": partition}
        for literal, field, spec, _ in self._fields:
            pieces.append(literal.replace("%", "%%"))
            if field is None:
                continue
            if field == "offset":
                match = _PRINTF_INT_SPEC.fullmatch(spec or "")
                if not match:
                    return None
                pieces.append("%" + match.group(1) + (match.group(2) or "d"))
            else:
                pieces.append(format(values[field], spec or "").replace("%", "%%"))
        return "".join(pieces)


# FORMATs that write one file (a segment) per partition per batch, and its name's extension.
SEGMENT_FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet"}
# A segment holds many messages: its name can only use what they share.
SEGMENT_TOKENS = ("topic", "partition", "offset", "date", "hour")


def segment_template(template: str | None, format: str, source: str,
                     several_topics: bool) -> str:
    """NAME_TEMPLATE for a segment format: the default with the format's extension, or the
    user's template if it uses only SEGMENT_TOKENS ({offset} is then the file's first) and
    tells apart the files of one batch and of successive batches."""
    if template is None:
        return DEFAULT_NAME_TEMPLATE + SEGMENT_FORMATS[format]
    used = NameTemplate(template).used
    per_message = sorted(used - set(SEGMENT_TOKENS))
    if per_message:
        raise ConfigError(source, f"{{{per_message[0]}}} differs from message to message, "
                          f"and FORMAT={format} writes many messages to one file; use "
                          f"{', '.join('{%s}' % token for token in SEGMENT_TOKENS)}")
    needed = ("partition", "offset") + (("topic",) if several_topics else ())
    missing = [token for token in needed if token not in used]
    if missing:
        raise ConfigError(source, f"needs {{{missing[0]}}} with FORMAT={format}: without it "
                          "two segments (of two partitions, topics or batches) could get "
                          "the same name")
    return template


# Integer specs that str.format and % render alike: zero padding, width, base.
_PRINTF_INT_SPEC = re.compile(r"(0?[0-9]*)([dxXo]?)")
_OFFSET = operator.attrgetter("offset")
_VALUE = operator.attrgetter("value")
_TIMESTAMP = operator.attrgetter("timestamp")


def key_hash(key: bytes | None) -> str:
    """16 hex digits of the key's SHA-256; "null" for no key (never hex)."""
    return "null" if key is None else hashlib.sha256(key).hexdigest()[:16]


# --------------------------------------------------------------------------- decoding
# DECODE: the Confluent wire format (a zero byte, a 4-byte big-endian schema id, then Avro,
# Protobuf or JSON) in, a plain JSON-ready document out. Writer schemas come from a Schema
# Registry behind a small interface and are parsed once per id. fastavro, protobuf and
# confluent-kafka are imported only here, and only when DECODE is set.

MAGIC_BYTE = 0
_SCHEMA_ID = struct.Struct(">I")
# Protobuf schemas registered as .proto text are compiled this way; the base64 form (a
# serialized FileDescriptorProto) needs no compiler.
_BASE64_RE = re.compile(r"[A-Za-z0-9+/=\s]+")
_WELL_KNOWN_PROTOS = ("any", "api", "duration", "empty", "field_mask", "source_context",
                      "struct", "timestamp", "type", "wrappers", "descriptor")


class BadRecord(Exception):
    """A value or key that decoding cannot handle; ON_BAD_RECORD says what becomes of it.
    reason is a short label (the metric's), detail one line for people."""

    def __init__(self, reason: str, detail: str, schema_id: int | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.schema_id = reason, detail, schema_id


class BadRecordFailure(Exception):
    """ON_BAD_RECORD=fail met a bad record. str() is the single line shown to the user."""


class RegistryUnreachable(Exception):
    """The registry did not answer, or answered with a server error: try again later."""


class UnknownSchema(Exception):
    """The registry has no schema by that id (or subject and version)."""


class RegistrySchema(NamedTuple):
    """A schema as the registry holds it."""
    schema_type: str                          # AVRO, PROTOBUF or JSON
    text: str
    references: tuple[tuple[str, str, int], ...]  # (name, subject, version)


class SchemaRegistry:
    """Where writer schemas come from. Raises UnknownSchema, RegistryUnreachable, or
    ConfigError when the registry refuses the spout (401, 403)."""

    where = ""

    def by_id(self, schema_id: int) -> RegistrySchema:
        raise NotImplementedError

    def by_version(self, subject: str, version: int) -> RegistrySchema:
        raise NotImplementedError


class ConfluentSchemaRegistry(SchemaRegistry):
    """confluent-kafka's SchemaRegistryClient: auth, TLS, several URLs. Its own retries are
    off: the spout's back-off waits instead, so that /healthz and a stop are heard."""

    def __init__(self, config: Config):
        from confluent_kafka.schema_registry import SchemaRegistryClient
        settings: dict[str, object] = {"url": ",".join(config.schema_registry_url),
                                       "max.retries": 0, "timeout": 10}
        if config.schema_registry_user_info:
            settings["basic.auth.user.info"] = config.schema_registry_user_info
        if config.schema_registry_bearer_token:
            # The static token is sent as "Authorization: Bearer"; the client also wants a
            # logical cluster, which only Confluent Cloud reads (an empty one otherwise).
            settings.update({"bearer.auth.credentials.source": "STATIC_TOKEN",
                             "bearer.auth.token": config.schema_registry_bearer_token,
                             "bearer.auth.logical.cluster": ""})
        for field, option in (("schema_registry_ssl_ca_location", "ssl.ca.location"),
                              ("schema_registry_ssl_certificate_location",
                               "ssl.certificate.location"),
                              ("schema_registry_ssl_key_location", "ssl.key.location")):
            if getattr(config, field):
                settings[option] = getattr(config, field)
        self.where = f"the Schema Registry at {','.join(map(mask_url, config.schema_registry_url))}"
        self.credentials_source = config.schema_registry_credentials_source
        try:
            self.client = SchemaRegistryClient(settings)
        except (ValueError, OSError) as error:
            raise ConfigError("SCHEMA_REGISTRY_URL", f"{error}") from None

    def _ask(self, call, *args):
        from confluent_kafka.schema_registry.error import SchemaRegistryError
        try:
            return call(*args)
        except SchemaRegistryError as error:
            status = error.http_status_code
            if status in (401, 403):
                raise ConfigError(self.credentials_source, f"{self.where} answered {status} "
                                  f"({error.error_message}): the spout is not allowed to read "
                                  "schemas") from None
            if status == 404:
                raise UnknownSchema(error.error_message) from None
            raise RegistryUnreachable(f"{self.where} answered {status} "
                                      f"({error.error_message})") from None
        except ConfigError:
            raise
        except Exception as error:  # httpx's transport errors: refused, reset, timed out
            raise RegistryUnreachable(f"{self.where} is unreachable "
                                      f"({type(error).__name__}: {error})") from None

    @staticmethod
    def _schema(schema) -> RegistrySchema:
        return RegistrySchema(schema.schema_type or "AVRO", schema.schema_str,
                              tuple((ref.name, ref.subject, ref.version)
                                    for ref in schema.references or ()))

    def by_id(self, schema_id: int) -> RegistrySchema:
        return self._schema(self._ask(self.client.get_schema, schema_id))

    def by_version(self, subject: str, version: int) -> RegistrySchema:
        return self._schema(self._ask(self.client.get_version, subject, version).schema)


def check_registry_tls_files(config: Config) -> None:
    """Loads the SCHEMA_REGISTRY_SSL_* files as SchemaRegistryClient will, so that one that
    does not load is refused naming its own setting (the client's error names none)."""
    import ssl
    ca = config.schema_registry_ssl_ca_location
    certificate = config.schema_registry_ssl_certificate_location
    key = config.schema_registry_ssl_key_location
    if ca:
        try:
            ssl.create_default_context(**{"capath" if os.path.isdir(ca) else "cafile": ca})
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ConfigError("SCHEMA_REGISTRY_SSL_CA_LOCATION", f"{ca} does not load as "
                              f"PEM CA certificates ({error})") from None
    if not certificate:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=certificate)   # holds a certificate at all?
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ConfigError("SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION", f"{certificate} does "
                          f"not load as a PEM certificate ({error})") from None

    def no_password():
        # The client would ask for one on a terminal, or fail later; there is no setting.
        raise ValueError("the key is encrypted; give it unencrypted")
    try:
        context.load_cert_chain(certificate, key, password=no_password)
    except (ssl.SSLError, OSError, ValueError) as error:
        if key:
            raise ConfigError("SCHEMA_REGISTRY_SSL_KEY_LOCATION", f"{key} does not load as "
                              f"the PEM private key of {certificate} ({error})") from None
        raise ConfigError("SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION", f"{certificate} holds "
                          f"no private key of its certificate ({error}); set "
                          "SCHEMA_REGISTRY_SSL_KEY_LOCATION") from None


class WriterSchema:
    """A writer schema, parsed once per id. decode() takes the message's bytes (framing
    included) and gives a document of plain Python values; `parsed` is the schema in its
    library's form (fastavro's parsed schema, a protobuf file descriptor, a JSON Schema
    document), for whoever needs the types."""

    schema_type = ""

    def __init__(self, schema_id: int, schema: RegistrySchema, parsed):
        self.schema_id, self.schema, self.parsed = schema_id, schema, parsed

    def decode(self, data: bytes):
        raise NotImplementedError


class AvroSchema(WriterSchema):
    schema_type = "AVRO"

    def __init__(self, schema_id: int, schema: RegistrySchema, parsed, named: dict):
        super().__init__(schema_id, schema, parsed)
        self.named = named   # every named type by full name, a top-level union's too
        if avro_is_recursive(parsed, named):
            # fastavro's compiled reader recurses in C without a limit: a value nested
            # 100,000 deep crashes the process (SIGSEGV). Its pure-Python twin stops at the
            # recursion limit instead.
            from fastavro._read_py import schemaless_reader
        else:
            from fastavro import schemaless_reader
        self._read = schemaless_reader

    def decode(self, data: bytes):
        stream = io.BytesIO(data)
        stream.seek(5)
        try:
            document = self._read(stream, self.parsed, None)
        except RecursionError:
            raise too_deep(self.schema_id, "the recursion limit") from None
        except Exception as error:
            raise BadRecord("corrupt-payload", f"not Avro of schema {self.schema_id} "
                            f"({type(error).__name__}: {error})", self.schema_id) from None
        if stream.tell() != len(data):
            raise BadRecord("corrupt-payload", f"{len(data) - stream.tell()} byte(s) left over "
                            f"after a record of schema {self.schema_id}", self.schema_id)
        return document


class ProtobufSchema(WriterSchema):
    schema_type = "PROTOBUF"

    def __init__(self, schema_id: int, schema: RegistrySchema, parsed):
        super().__init__(schema_id, schema, parsed)
        self.classes: dict[bytes, type] = {}   # the message-index bytes -> message class

    def decode(self, data: bytes):
        indexes, start = read_message_indexes(data, 5, self.schema_id)
        framing = data[5:start]
        message_class = self.classes.get(framing)
        if message_class is None:
            message_class = self.classes[framing] = self._message_class(indexes)
        try:
            # protobuf_document too: a Timestamp out of datetime's range, a Struct holding
            # NaN, fail only there.
            return protobuf_document(message_class.FromString(data[start:]))
        except Exception as error:
            raise BadRecord("corrupt-payload", f"not Protobuf of schema {self.schema_id} "
                            f"({type(error).__name__}: {error})", self.schema_id) from None

    def _message_class(self, indexes: list[int]) -> type:
        from google.protobuf.message_factory import GetMessageClass
        messages = self.parsed.message_types_by_name
        descriptors = list(messages.values())
        descriptor = None
        for index in indexes:
            if not 0 <= index < len(descriptors):
                raise BadRecord("corrupt-payload", f"message index {indexes} is not in schema "
                                f"{self.schema_id}", self.schema_id)
            descriptor = descriptors[index]
            descriptors = list(descriptor.nested_types)
        return GetMessageClass(descriptor)


class JsonSchema(WriterSchema):
    schema_type = "JSON"

    def decode(self, data: bytes):
        try:
            document = json.loads(data[5:])
        except RecursionError:
            raise too_deep(self.schema_id, "the recursion limit") from None
        except ValueError as error:
            raise BadRecord("corrupt-payload", f"not JSON ({error})", self.schema_id) from None
        # Fewer brackets than the limit cannot nest deeper: most documents need no walk.
        if data.count(b"[") + data.count(b"{") > MAX_DOCUMENT_DEPTH and \
                document_depth(document) > MAX_DOCUMENT_DEPTH:
            raise too_deep(self.schema_id)
        return document


# Deeper documents are bad records (too-deep): json.loads reads about 990 levels, but writing
# them out again (FORMAT=json, jsonl, Parquet's JSON text) recurses once per level too, from
# further down the stack, and would fail there, past ON_BAD_RECORD.
MAX_DOCUMENT_DEPTH = 500


def too_deep(schema_id: int, limit: str = f"the {MAX_DOCUMENT_DEPTH} levels") -> BadRecord:
    return BadRecord("too-deep", f"nested deeper than {limit} the spout decodes and writes "
                     f"(schema {schema_id})", schema_id)


def document_depth(document) -> int:
    """How deep lists and dicts nest in a decoded document, counted without recursion."""
    deepest = 0
    pending = [(document, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > deepest:
            deepest = depth
        for item in node.values() if isinstance(node, dict) else node:
            if isinstance(item, (dict, list)):
                pending.append((item, depth + 1))
    return deepest if isinstance(document, (dict, list)) else 0


def avro_is_recursive(node, named: Mapping, within: tuple = (), done: set | None = None) -> bool:
    """Whether a fastavro-parsed schema holds a named type within itself: only then can a
    value nest deeper than the schema does."""
    done = set() if done is None else done
    if isinstance(node, str):
        if node in within:
            return True
        if node in done or node not in named:
            return False
        node = named[node]
    if isinstance(node, list):
        return any(avro_is_recursive(branch, named, within, done) for branch in node)
    if not isinstance(node, dict):
        return False
    kind = node.get("type")
    if kind in ("record", "error"):
        name = node["name"]
        if name in within:
            return True
        if name in done:
            return False
        found = any(avro_is_recursive(field["type"], named, within + (name,), done)
                    for field in node["fields"])
        done.add(name)
        return found
    if kind == "array":
        return avro_is_recursive(node["items"], named, within, done)
    if kind == "map":
        return avro_is_recursive(node["values"], named, within, done)
    return isinstance(kind, (dict, list)) and avro_is_recursive(kind, named, within, done)


def read_message_indexes(data: bytes, start: int, schema_id: int) -> tuple[list[int], int]:
    """Confluent's Protobuf framing: a zigzag varint count, then that many zigzag varint
    indexes into the file's messages and their nested ones; a lone 0 means [0]."""
    numbers: list[int] = []
    position = start
    wanted = None
    while wanted is None or len(numbers) < wanted:
        value = shift = 0
        while True:
            if position >= len(data) or shift > 63:
                raise BadRecord("corrupt-payload", "message indexes cut short", schema_id)
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        value = (value >> 1) ^ -(value & 1)
        if wanted is None:
            if value == 0:
                return [0], position
            if not 0 < value <= 100:
                raise BadRecord("corrupt-payload", f"{value} message indexes", schema_id)
            wanted = value
        else:
            numbers.append(value)
    return numbers, position


def protobuf_document(message) -> dict:
    """Every field of the message, by its .proto name: unset fields with presence as None,
    others at their (default) value, so each message of a type has the same keys."""
    document: dict = {}
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if field.has_presence and not message.HasField(name):
            document[name] = None
            continue
        value = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            document[name] = {key: _protobuf_value(value_field, item)
                              for key, item in value.items()}
        elif field.is_repeated:
            document[name] = [_protobuf_value(field, item) for item in value]
        else:
            document[name] = _protobuf_value(field, value)
    return document


def _protobuf_value(field, value):
    if field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.message_type is None:
        return value
    name = field.message_type.full_name
    if name == "google.protobuf.Timestamp":
        return value.ToDatetime(tzinfo=datetime.timezone.utc)
    if name.startswith("google.protobuf.") and name.endswith("Value") and \
            "value" in field.message_type.fields_by_name and \
            name not in ("google.protobuf.Value", "google.protobuf.ListValue"):
        return value.value   # the wrappers: Int64Value, StringValue, ...
    if name in ("google.protobuf.Struct", "google.protobuf.Value",
                "google.protobuf.ListValue", "google.protobuf.Duration",
                "google.protobuf.FieldMask", "google.protobuf.Any"):
        from google.protobuf import json_format
        return json_format.MessageToDict(value)
    return protobuf_document(value)


def json_document_default(value):
    """json.dumps' fallback for what decoders give beyond JSON's types: one stable form each
    (docs/schema-registry.md)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            return value.isoformat(timespec="microseconds")
        if value.utcoffset():
            value = value.astimezone(datetime.timezone.utc)
        return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


# Made once: json.dumps with options builds an encoder per call, about a microsecond.
# allow_nan=False: Python would write NaN and Infinity bare, which no JSON parser reads.
_DOCUMENT_ENCODER = json.JSONEncoder(ensure_ascii=False, default=json_document_default,
                                     allow_nan=False)
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def document_json_text(document) -> str:
    """A decoded document as JSON text. A float that is NaN or infinite (an Avro or Protobuf
    float or double, or the NaN a JSON Schema payload spelled bare) is the string "NaN",
    "Infinity" or "-Infinity", as protobuf's JSON mapping and Kafka Connect write them."""
    try:
        return _DOCUMENT_ENCODER.encode(document)
    except ValueError:   # rare: only then is the document walked
        return _DOCUMENT_ENCODER.encode(finite_floats(document))


def finite_floats(node):
    """The document with non-finite floats as their strings. One frame per level, no
    comprehensions (a frame each in 3.11): documents nest up to MAX_DOCUMENT_DEPTH."""
    if isinstance(node, float):
        return node if node - node == 0 else _NON_FINITE[repr(node)]
    if isinstance(node, dict):
        copy = {}
        for key, value in node.items():
            copy[finite_floats(key) if isinstance(key, float) else key] = finite_floats(value)
        return copy
    if isinstance(node, (list, tuple)):
        items = []
        for value in node:
            items.append(finite_floats(value))
        return items
    return node


def document_json(document) -> bytes:
    return document_json_text(document).encode()


# Unknown and unusable ids remembered, the most recently met: a topic of random ids (four
# billion possible) would otherwise grow the cache without end. Past this, an id not met for
# a while is asked for again, once.
UNKNOWN_SCHEMAS_MAX = 1000


class SchemaCache:
    """Writer schemas by id, each fetched and parsed once (an unknown id too: it is
    remembered as unknown, the last UNKNOWN_SCHEMAS_MAX of them)."""

    def __init__(self, registry: SchemaRegistry):
        self.registry = registry
        self.schemas: dict[int, WriterSchema] = {}
        self.unknown: dict[int, tuple[str, str]] = {}   # id -> (reason, detail), oldest first

    def _remember(self, schema_id: int, reason: str, detail: str) -> BadRecord:
        self.unknown[schema_id] = (reason, detail)
        if len(self.unknown) > UNKNOWN_SCHEMAS_MAX:
            del self.unknown[next(iter(self.unknown))]
        return BadRecord(reason, detail, schema_id)

    def writer_schema(self, schema_id: int) -> WriterSchema:
        """Raises BadRecord for an unknown or unusable schema, RegistryUnreachable."""
        found = self.schemas.get(schema_id)
        if found is not None:
            return found
        known_bad = self.unknown.pop(schema_id, None)
        if known_bad is not None:
            self.unknown[schema_id] = known_bad   # the most recently met again
            raise BadRecord(*known_bad, schema_id)
        try:
            schema = self.registry.by_id(schema_id)
        except UnknownSchema as error:
            raise self._remember(schema_id, "unknown-schema-id", f"schema {schema_id} is not "
                                 f"in the registry ({error})") from None
        try:
            parsed = self._parse(schema_id, schema)
        except (RegistryUnreachable, ConfigError):
            raise
        except Exception as error:
            problem = self._remember(schema_id, "unusable-schema", f"schema {schema_id} "
                                     f"({schema.schema_type}) cannot be used: "
                                     f"{type(error).__name__}: {error}")
            log.warning("%s", problem.detail)
            raise problem from None
        self.schemas[schema_id] = parsed
        log.info("schema %d: %s", schema_id, schema.schema_type)
        return parsed

    def _parse(self, schema_id: int, schema: RegistrySchema) -> WriterSchema:
        if schema.schema_type == "AVRO":
            named: dict = {}
            return AvroSchema(schema_id, schema, self._avro(schema, named), named)
        if schema.schema_type == "PROTOBUF":
            return ProtobufSchema(schema_id, schema, self._protobuf(schema_id, schema))
        if schema.schema_type == "JSON":
            return JsonSchema(schema_id, schema, json.loads(schema.text))
        raise ValueError(f"schema type {schema.schema_type!r} is not AVRO, PROTOBUF or JSON")

    def _avro(self, schema: RegistrySchema, named: dict):
        """Referenced schemas first (named types that live in other subjects), then this one
        against them."""
        from fastavro import parse_schema
        for _name, subject, version in schema.references:
            self._avro(self.registry.by_version(subject, version), named)
        return parse_schema(json.loads(schema.text), named)

    def _protobuf(self, schema_id: int, schema: RegistrySchema):
        """A descriptor pool of its own per id (two versions of one file share its name): the
        references' files, the well-known ones they import, then this one's."""
        from google.protobuf import descriptor_pool
        pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()
        main = self._file_protos(schema, f"schema-{schema_id}.proto", pool, added)
        return pool.FindFileByName(main)

    def _file_protos(self, schema: RegistrySchema, name: str, pool, added: set) -> str:
        """Adds schema's file (and all it imports) to pool; returns the name it has there."""
        from google.protobuf import descriptor_pb2
        for ref_name, subject, version in schema.references:
            if ref_name not in added:
                self._file_protos(self.registry.by_version(subject, version), ref_name, pool,
                                  added)
        if _BASE64_RE.fullmatch(schema.text):
            files = [descriptor_pb2.FileDescriptorProto.FromString(
                base64.b64decode(schema.text, validate=False))]
        else:
            files = compile_proto_text(schema.text, name, self._proto_texts(schema))
        for proto in files:
            if proto.name in added:
                continue
            for dependency in proto.dependency:
                if dependency not in added:
                    well_known = well_known_file(dependency)
                    if well_known is not None:
                        pool.Add(well_known)
                        added.add(dependency)
            pool.Add(proto)
            added.add(proto.name)
        return files[-1].name

    def _proto_texts(self, schema: RegistrySchema) -> dict[str, str]:
        """The .proto texts a text schema imports, by import path, for the compiler."""
        texts: dict[str, str] = {}
        for ref_name, subject, version in schema.references:
            referenced = self.registry.by_version(subject, version)
            texts.update(self._proto_texts(referenced))
            texts[ref_name] = referenced.text
        return texts


def well_known_file(name: str):
    """The FileDescriptorProto of an import that is no subject of the registry's: protobuf's
    well-known types, Confluent's meta.proto and decimal types. None if it is neither."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    import importlib
    for module in _WELL_KNOWN_PROTOS:
        importlib.import_module(f"google.protobuf.{module}_pb2")
    try:
        importlib.import_module("confluent_kafka.schema_registry.confluent.meta_pb2")
        importlib.import_module("confluent_kafka.schema_registry.confluent.types.decimal_pb2")
    except ImportError:
        pass
    try:
        found = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        return None
    proto = descriptor_pb2.FileDescriptorProto()
    found.CopyToProto(proto)
    return proto


def compile_proto_text(text: str, name: str, imports: Mapping[str, str]) -> list:
    """.proto text (as Java clients register it, and as Apicurio gives back whatever the
    format asked for) to FileDescriptorProtos, imports first, through the protoc that
    grpcio-tools carries. Only schemas registered as text come here, once per id."""
    import importlib.resources
    import tempfile
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc
    with tempfile.TemporaryDirectory(prefix="kafka-spout-proto-") as directory:
        for path, source in {**imports, name: text}.items():
            target = os.path.join(directory, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as proto_file:
                proto_file.write(source)
        output = os.path.join(directory, "descriptors.pb")
        includes = str(importlib.resources.files("grpc_tools") / "_proto")
        status = protoc.main(["protoc", f"-I{directory}", f"-I{includes}", "--include_imports",
                              f"--descriptor_set_out={output}", os.path.join(directory, name)])
        if status != 0:
            raise ValueError(f"protoc could not compile it (status {status})")
        with open(output, "rb") as descriptors:
            return list(descriptor_pb2.FileDescriptorSet.FromString(descriptors.read()).file)


class DecodedRecord(NamedTuple):
    """A polled record with what decoding made of it. key and value stay the message's bytes
    (names, sizes and dead letters use them); the documents are beside them."""
    topic: str
    partition: int
    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: list
    document: object = None            # the decoded value; None for a tombstone
    schema_id: int | None = None
    key_document: object = None        # DECODE=key,value: the decoded key
    key_schema_id: int | None = None
    problem: BadRecord | None = None   # set aside by ON_BAD_RECORD instead


REGISTRY_BACKOFF_MAX = 30.0


class Decoding:
    """DECODE in the loop: a poll's records in, DecodedRecords out, in order. A registry that
    cannot be reached is waited out with back-off, the poll held back whole: nothing is
    written undecoded. Bad records are marked (dead-letter, skip) or stop the spout (fail)."""

    def __init__(self, config: Config, stop: threading.Event,
                 registry: SchemaRegistry | None = None):
        self.config = config
        self.stop = stop
        self.registry = registry or ConfluentSchemaRegistry(config)
        self.schemas = SchemaCache(self.registry)
        self.keys = "key" in config.decode
        self.columns = ParquetValues(self.schemas) if config.format == "parquet" else None
        self.bad_records: dict[tuple[str, str], int] = {}   # (topic, reason) -> count
        # Read by the metrics server's thread; set by the loop's.
        self.down_since: float | None = None
        self.down_reason = ""

    def unreachable(self) -> tuple[float, str] | None:
        """As Delivery.unreachable(): since when, and what, while a poll waits for it."""
        since = self.down_since
        return None if since is None else (since, self.down_reason)

    def decode_bytes(self, data: bytes) -> tuple[object, int]:
        """(document, schema id) of one framed value or key. Raises BadRecord,
        RegistryUnreachable, ConfigError."""
        if len(data) < 5 or data[0] != MAGIC_BYTE:
            raise BadRecord("no-magic-byte", "not in the Confluent wire format (a zero byte "
                            "and a 4-byte schema id first)")
        schema_id = _SCHEMA_ID.unpack_from(data, 1)[0]
        schema = self.schemas.writer_schema(schema_id)
        try:
            return schema.decode(data), schema_id
        except BadRecord:
            raise
        except Exception as error:
            # Whatever else a decoder meets in hostile bytes is this record's problem, not
            # the spout's: ON_BAD_RECORD decides, as for the failures foreseen.
            raise BadRecord("corrupt-payload", f"schema {schema_id} ({schema.schema_type}) "
                            f"cannot decode it ({type(error).__name__}: {error})",
                            schema_id) from None

    def decode(self, records: Mapping) -> dict:
        """The hot path: values of schemas already parsed are decoded inline; everything else
        (keys, tombstones, new ids, bad records, an outage) takes _decode_record."""
        schemas = self.schemas.schemas
        unpack = _SCHEMA_ID.unpack_from
        inline = not self.keys
        decoded = {}
        for tp, messages in records.items():
            out = []
            append = out.append
            for record in messages:
                value = record.value
                if inline and value is not None and len(value) >= 5 and value[0] == MAGIC_BYTE:
                    schema = schemas.get(unpack(value, 1)[0])
                    if schema is not None:
                        try:
                            append(DecodedRecord(
                                record.topic, record.partition, record.offset,
                                record.timestamp, record.timestamp_type, record.key, value,
                                record.headers, schema.decode(value), schema.schema_id))
                            continue
                        except Exception:  # _decode_record makes it a bad record
                            pass
                append(self._decode_record(record))
            decoded[tp] = out
        if self.columns is not None:
            self.columns.check(decoded, self.bad)
        return decoded

    def _decode_record(self, record) -> DecodedRecord:
        backoff = Backoff(self.stop, 0.5, REGISTRY_BACKOFF_MAX)
        while True:
            try:
                result = self._try_decode(record)
            except RegistryUnreachable as error:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("%s; decoding waits, nothing is written undecoded (retrying "
                                "with back-off)", error)
                self.down_reason = str(error)
                backoff.wait()
                continue
            if self.down_since is not None:
                log.info("%s answers again after %.0fs", self.registry.where,
                         time.monotonic() - self.down_since)
                self.down_since = None
            return result

    def _try_decode(self, record) -> DecodedRecord:
        value, key = record.value, record.key
        document = schema_id = key_document = key_schema_id = None
        try:
            part = "value"
            if value is not None:
                document, schema_id = self.decode_bytes(value)
            if self.keys and key is not None:
                part = "key"
                key_document, key_schema_id = self.decode_bytes(key)
        except BadRecord as problem:
            if part == "key":
                problem = BadRecord(f"key-{problem.reason}", f"key: {problem.detail}",
                                    problem.schema_id)
            return self.bad(record, problem)
        return DecodedRecord(record.topic, record.partition, record.offset, record.timestamp,
                             record.timestamp_type, key, value, record.headers, document,
                             schema_id, key_document, key_schema_id)

    def bad(self, record, problem: BadRecord) -> DecodedRecord:
        """The record set aside, as ON_BAD_RECORD says (fail: BadRecordFailure)."""
        where = f"{record.topic}/{record.partition} offset {record.offset}"
        if self.config.on_bad_record == "fail":
            raise BadRecordFailure(f"{where}: {problem} (ON_BAD_RECORD=fail: nothing from "
                                   "this offset on is committed)")
        counted = (record.topic, problem.reason)
        self.bad_records[counted] = self.bad_records.get(counted, 0) + 1
        log.warning("%s: %s; %s", where, problem, "dead-lettered to _errors/" if
                    self.config.on_bad_record == "dead-letter" else "skipped (ON_BAD_RECORD=skip)")
        return DecodedRecord(record.topic, record.partition, record.offset, record.timestamp,
                             record.timestamp_type, record.key, record.value, record.headers,
                             schema_id=problem.schema_id, problem=problem)


# --------------------------------------------------------------------------- encoding

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
_MAX_USTAR_SIZE = 8**11 - 1
# The fixed parts of a ustar header for a regular file, byte for byte as tarfile writes them.
_HEAD_MODE = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"
_HEAD_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
_CHECKSUM_BASE = sum(_HEAD_MODE) + sum(_HEAD_TAIL) + 8 * ord(" ")  # chksum counts as spaces


# Values up to this size are copied into the archive's one buffer with the headers around
# them: fewer, larger writes. Larger ones are written from where they are, never copied.
COPY_MAX = 4096
# Tar pads every member to a whole block: the padding for each remainder, made once.
_PADDING = tuple(bytes(n) for n in range(BLOCK))
# Checksum fields as made so far: ustar checksums of short names stay below 16,000, so this
# holds a few thousand small bytes at most.
_CHECKSUM_FIELDS: dict[int, bytes] = {}


def _fixed_fields(size: int, mtime: int) -> tuple[bytes, int] | None:
    """The header bytes from mode to mtime for a member of this size and mtime, and the
    checksum of the header without its name; None when ustar cannot hold them (PAX then)."""
    if not (0 <= size <= _MAX_USTAR_SIZE and 0 <= mtime <= _MAX_USTAR_SIZE):
        return None
    fixed = _HEAD_MODE + b"%011o\x00" % size + b"%011o\x00" % mtime
    return fixed, _CHECKSUM_BASE - sum(_HEAD_MODE) + sum(fixed)


def member_header(name: str, size: int, mtime: int = 0) -> bytes:
    """A tar header for a regular file; PAX records when the name or size needs them."""
    fixed = _fixed_fields(size, mtime)
    if fixed is not None and name.isascii() and 0 < len(name) <= 100:
        name_bytes = name.encode("ascii")
        return b"".join((name_bytes.ljust(100, b"\x00"), fixed[0],
                         b"%06o\x00 " % (fixed[1] + sum(name_bytes)), _HEAD_TAIL))
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, max(mtime, 0), 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class Archive(NamedTuple):
    """Archive bytes as a list of buffers, ready for scatter/gather writes."""
    parts: list
    size: int
    members: int


def encode_archive(members: Iterable[tuple[str, bytes, int]]) -> Archive:
    """(name, data, mtime) triples in, one tar archive out, ending with exactly two zero blocks.

    No 10,240-byte record padding: Pachyderm 1.8-1.11.2 readers take trailing zero blocks for
    further archives. Headers, small values and padding go into as few buffers as possible:
    the per-message cost of the spout's own path is mostly here. Messages of a batch mostly
    share their size and second, so the header fields after the name are made once per run.
    """
    parts: list = []
    run: list = []    # joined into one buffer before each large value and at the end
    extend = run.extend
    count = 0
    last_size = last_mtime = -1
    fixed, fixed_sum, fast, padding = b"", 0, False, b""
    tail, paddings, nul, adler32 = _HEAD_TAIL, _PADDING, b"\x00", zlib.adler32  # hot loop
    checksum_fields = _CHECKSUM_FIELDS
    for name, data, mtime in members:
        length = len(data)
        count += 1
        if length != last_size or mtime != last_mtime:
            last_size, last_mtime = length, mtime
            fields = _fixed_fields(length, mtime)
            fast = fields is not None and length <= COPY_MAX
            if fast:
                fixed, fixed_sum = fields
                fixed_sum -= 1  # adler32's low half is 1 + the sum of the bytes, below
                padding = paddings[-length % BLOCK]
        if fast and name.isascii() and 0 < len(name) <= 100:
            name_bytes = name.encode("ascii")
            # The sum of the name's bytes, at most 100 x 127, so below adler32's modulus:
            # zlib adds them up three times faster than sum().
            checksum = fixed_sum + (adler32(name_bytes) & 0xFFFF)
            checksum_field = checksum_fields.get(checksum)
            if checksum_field is None:
                checksum_field = checksum_fields[checksum] = b"%06o\x00 " % checksum
            extend((name_bytes.ljust(100, nul), fixed, checksum_field, tail, data, padding))
            continue
        run.append(member_header(name, length, mtime))
        if length > COPY_MAX:
            parts.append(b"".join(run))
            parts.append(data)
            run = []
            extend = run.extend
        else:
            run.append(data)
        run.append(paddings[-length % BLOCK])
    run.append(END_OF_ARCHIVE)
    parts.append(b"".join(run))
    return Archive(parts, sum(map(len, parts)), count)


MARKER_FORMAT = "kafka-spout/1"


class MarkerError(Exception):
    """The marker Pachyderm kept cannot be read; str() names the file."""


class Record(tuple):
    """What a marker or commit description says: (topics, positions), as callers unpack it,
    and for a bounded read (STOP_AT) its stop offsets and whether it closed the range."""

    def __new__(cls, topics: list, positions: dict, stops: dict | None = None,
                closed: bool = False):
        record = super().__new__(cls, (topics, positions))
        record.stops, record.closed = stops, closed
        return record


def _offsets_by_topic(positions: Mapping[tuple, int]) -> dict[str, dict[str, int]]:
    offsets: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(positions.items()):
        offsets.setdefault(topic, {})[str(partition)] = offset
    return offsets


def _offsets_by_partition(document: Mapping) -> dict[tuple[str, int], int]:
    positions = {}
    for topic, partitions in document.items():
        for partition, offset in partitions.items():
            if not isinstance(offset, int) or offset < 0:
                raise ValueError(f"offset {offset!r} of {topic}/{partition}")
            positions[(topic, int(partition))] = offset
    return positions


def encode_marker(topics: Iterable[str], positions: Mapping[tuple, int],
                  stops: Mapping[tuple, int] | None = None, closed: bool = False) -> bytes:
    """The next offset of every partition, by topic, with the topic set it was written for;
    in a bounded read, its stops too, and once every partition reached them, closed."""
    document: dict = {"format": MARKER_FORMAT, "topics": sorted(topics),
                      "offsets": _offsets_by_topic(positions)}
    if stops is not None:
        document["stops"] = _offsets_by_topic(stops)
    if closed:
        document["closed"] = True
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def decode_marker(data: bytes) -> Record:
    try:
        document = json.loads(data)
        if document.get("format") != MARKER_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, not {MARKER_FORMAT!r}")
        stops = document.get("stops")
        return Record(list(document["topics"]), _offsets_by_partition(document["offsets"]),
                      None if stops is None else _offsets_by_partition(stops),
                      document.get("closed") is True)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a kafka-spout marker ({type(error).__name__}: {error})") from None


def read_marker(path: str) -> Record | None:
    """The marker Pachyderm exposes beside the pipe; None when there is none yet."""
    try:
        with open(path, "rb") as marker:
            data = marker.read()
    except FileNotFoundError:  # never written: Pachyderm's link dangles, or there is none
        return None
    except OSError as error:
        raise MarkerError(f"{path}: {error.strerror}") from None
    try:
        return decode_marker(data)
    except ValueError as error:
        raise MarkerError(f"{path}: {error}; remove it (pachctl update pipeline "
                          "--reprocess resets it) only if starting over is intended") from None


DESCRIPTION_TITLE = "kafka-spout: "
RECORD_PREFIX = "record: "


def describe_commit(ranges: Mapping[tuple, tuple[int, int]], messages: int,
                    topics: Iterable[str], positions: Mapping[tuple, int],
                    stops: Mapping[tuple, int] | None = None, closed: bool = False) -> str:
    """A 2.x commit's description: what it holds for a person (pachctl list commit shows the
    first line), then where every partition resumes after it, for the spout itself.

    ranges: (topic, partition) -> (first offset, next offset) of this commit's messages.
    """
    held = ", ".join(f"{topic}/{partition} {first}-{end - 1}"
                     for (topic, partition), (first, end) in sorted(ranges.items()))
    resume = " ".join(f"{topic}/{partition}={offset}"
                      for (topic, partition), offset in sorted(positions.items()))
    title = f"{messages} message(s) from {held}" if not closed else \
        "range closed: every partition reached STOP_AT"
    return (f"{DESCRIPTION_TITLE}{title}\n"
            f"next offsets: {resume}\n"
            f"{RECORD_PREFIX}{encode_marker(topics, positions, stops, closed).decode()}")


def record_from_description(description: str) -> Record | None:
    """The record a kafka-spout commit carries; None for any other commit's description.
    Raises ValueError for a kafka-spout description whose record is damaged."""
    if not description.startswith(DESCRIPTION_TITLE):
        return None
    for line in description.splitlines():
        if line.startswith(RECORD_PREFIX):
            return decode_marker(line[len(RECORD_PREFIX):].encode())
    raise ValueError("a kafka-spout description without its record line")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def modify_file_requests(members: Iterable[tuple[str, bytes, int]],
                         chunk: int) -> Iterable[bytes]:
    """pfs_v2.ModifyFileRequest messages, protobuf-encoded, that replace each member's file:
    delete_file {path}, then add_file {path, raw} in pieces of at most `chunk` bytes.

    Encoded here rather than by the SDK's betterproto classes, which take about 130 us to
    build and serialise one such message: 300 times the cost of the rest of the spout's work
    per message. tests/test_pfs_delivery.py checks the bytes against betterproto's.
    """
    for name, data, _ in members:
        path = _length_delimited(1, name.encode())          # DeleteFile.path, AddFile.path
        yield _length_delimited(3, path)                     # ModifyFileRequest.delete_file
        for start in range(0, len(data), chunk) if data else (0,):
            piece = data[start:start + chunk]
            raw = _length_delimited(3, _length_delimited(1, piece) if piece else b"")
            yield _length_delimited(2, path + raw)           # ModifyFileRequest.add_file


TIMESTAMP_TYPES = {0: "CreateTime", 1: "LogAppendTime"}


def json_bytes(data: bytes | None) -> str | dict | None:
    """Bytes for a JSON document: text if they are UTF-8, else {"base64": "..."}."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def header_name(name: str | bytes):
    """A header key for a JSON document: the text it is, or, not being UTF-8 (HeaderKeyBytes),
    {"base64": "..."} as any bytes that are not UTF-8."""
    return name if isinstance(name, str) else json_bytes(name)


def record_metadata(record) -> dict:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset,
            "timestamp": record.timestamp,
            "timestamp_type": TIMESTAMP_TYPES.get(record.timestamp_type),
            "key": json_bytes(record.key),
            "headers": [[header_name(name), json_bytes(value)]
                        for name, value in record.headers or ()]}


def as_json_file(name: str, record, mtime: int) -> list[tuple[str, bytes, int]]:
    """FORMAT=json: one file holding the metadata and the value."""
    document = record_metadata(record)
    document["value"] = json_bytes(record.value)
    return [(name, json.dumps(document, ensure_ascii=False).encode(), mtime)]


def as_raw_and_sidecar(name: str, record, mtime: int) -> list[tuple[str, bytes, int]]:
    """FORMAT=raw+meta: the value's bytes, and <name>.meta.json beside them."""
    metadata = record_metadata(record)
    if record.value is None:
        metadata["value"] = None  # a kept tombstone: the file itself is empty
    return [(name, record.value or b"", mtime),
            (name + ".meta.json", json.dumps(metadata, ensure_ascii=False).encode(), mtime)]


FORMATS: dict[str, Callable | None] = {"raw": None, "json": as_json_file,
                                       "raw+meta": as_raw_and_sidecar}


def dead_letter_files(record, mtime: int) -> list[tuple[str, bytes, int]]:
    """ON_BAD_RECORD=dead-letter: the message's bytes as they came, and why, under _errors/."""
    name = f"_errors/{encode_component(record.topic)}/{record.partition}/{record.offset:020d}"
    problem = record.problem
    sidecar = record_metadata(record)
    sidecar.update(reason=problem.reason, detail=problem.detail, schema_id=problem.schema_id)
    return [(name, record.value or b"", mtime),
            (name + ".json", json.dumps(sidecar, ensure_ascii=False).encode(), mtime)]


def decoded_metadata(record, keys: bool) -> dict:
    """A decoded record's metadata: FORMAT=json's, with the decoded key and key_schema_id
    when keys are decoded."""
    document = record_metadata(record)
    if keys:
        document["key"] = record.key_document if record.key_document is not None \
            else document["key"]
        document["key_schema_id"] = record.key_schema_id
    return document


def decoded_document(record, keys: bool) -> dict:
    """FORMAT=json's document of a decoded record (FORMAT=jsonl's line): the metadata, the
    decoded value and value_schema_id."""
    document = decoded_metadata(record, keys)
    document["value"] = record.document
    document["value_schema_id"] = record.schema_id
    return document


def decoded_shape(format: str, keys: bool, on_bad_record: str) -> Callable:
    """DECODE's counterpart of FORMATS: (name, DecodedRecord, mtime) -> files. raw: the value
    as a JSON document; json: the metadata with the decoded value and value_schema_id;
    raw+meta: the JSON document, and the sidecar with value_schema_id."""

    def shape(name: str, record, mtime: int) -> list[tuple[str, bytes, int]]:
        if record.problem is not None:
            return dead_letter_files(record, mtime) if on_bad_record == "dead-letter" else []
        if format == "raw":
            return [(name, document_json(record.document), mtime)]
        document = decoded_document(record, keys)
        if format == "json":
            return [(name, document_json(document), mtime)]
        del document["value"]
        if record.value is None:
            document["value"] = None  # a kept tombstone: the file itself is empty
        return [(name, b"" if record.value is None else document_json(record.document), mtime),
                (name + ".meta.json", document_json(document), mtime)]

    return shape


# JSON strings as json.dumps(..., ensure_ascii=False) writes them (the C encoder, where built).
_json_string = json.encoder.encode_basestring
_KEY = operator.attrgetter("key")
_TIMESTAMP_TYPE_TEXT = {number: '"%s"' % name for number, name in TIMESTAMP_TYPES.items()}


def _json_bytes_text(data: bytes | None) -> str:
    """json_bytes(data) as JSON text."""
    if data is None:
        return "null"
    if data.isascii():  # most text: no exception to risk
        return _json_string(data.decode("ascii"))
    try:
        return _json_string(data.decode("utf-8"))
    except UnicodeDecodeError:
        return '{"base64": "%s"}' % base64.b64encode(data).decode("ascii")


def json_lines(records: Iterable) -> str:
    """FORMAT=jsonl: the FORMAT=json document of each message, one a line, each ending in
    '\n': the same text as json.dumps(document, ensure_ascii=False), made directly at a
    fraction of its cost (tests/test_segments.py compares the two)."""
    lines = []
    append, text, types = lines.append, _json_bytes_text, _TIMESTAMP_TYPE_TEXT
    head = ""
    topic_partition = None
    for record in records:
        if (record.topic, record.partition) != topic_partition:
            topic_partition = record.topic, record.partition
            head = '{"topic": %s, "partition": %d, "offset": ' % (
                _json_string(record.topic), record.partition)
        headers = record.headers
        append('%s%d, "timestamp": %s, "timestamp_type": %s, "key": %s, "headers": [%s], '
               '"value": %s}\n' % (
                   head, record.offset,
                   "null" if record.timestamp is None else "%d" % record.timestamp,
                   types.get(record.timestamp_type, "null"), text(record.key),
                   ", ".join("[%s, %s]" % (_json_string(name) if isinstance(name, str)
                                           else text(name), text(value))
                             for name, value in headers) if headers else "",
                   text(record.value)))
    return "".join(lines)


class JsonLinesWriter:
    """FORMAT=jsonl: a segment's records, one FORMAT=json document a line, in their order.
    With DECODE, DecodedRecords, each line FORMAT=json's decoded document."""

    def __init__(self, config: Config):
        self.decoded_keys = "key" in config.decode if config.decode else None

    def encode(self, records: Sequence) -> bytes:
        if self.decoded_keys is None:
            return json_lines(records).encode()
        keys = self.decoded_keys
        return b"".join(document_json(decoded_document(record, keys)) + b"\n"
                        for record in records)


class ParquetWriter:
    """FORMAT=parquet: a segment's records as one row each, in their order, with pyarrow
    (imported only for this format). value_column() alone decides how a value is stored:
    raw bytes here; a schema-aware writer can return a typed struct column instead."""

    def __init__(self, config: Config):
        import pyarrow
        import pyarrow.parquet
        self.pa, self.parquet = pyarrow, pyarrow.parquet
        fix_malloc_mmap_threshold()
        self.compression = config.parquet_compression
        pa = pyarrow
        self.header_fields = [pa.field("key", pa.string(), nullable=False),
                              pa.field("value", pa.binary())]
        self.headers_type = pa.list_(pa.struct(self.header_fields))
        self.timestamp_type = pa.timestamp("ms", tz="UTC")

    def value_column(self, records: Sequence) -> tuple:
        """The value column's field and array."""
        pa = self.pa
        return pa.field("value", pa.binary()), pa.array(list(map(_VALUE, records)), pa.binary())

    def key_column(self, records: Sequence) -> tuple:
        """The key column's field and array."""
        pa = self.pa
        return pa.field("key", pa.binary()), pa.array(list(map(_KEY, records)), pa.binary())

    def extra_columns(self, records: Sequence) -> list[tuple]:
        """Columns after headers, as (field, array): none here."""
        return []

    def headers_column(self, records: Sequence):
        pa = self.pa
        ends, keys, values = [0], [], []
        for record in records:
            for name, value in record.headers or ():
                # A string column: a key that is not UTF-8 goes in as the JSON text that
                # FORMAT=json gives it, {"base64": "..."} (docs/formats.md).
                keys.append(name if isinstance(name, str) else _json_bytes_text(name))
                values.append(value)
            ends.append(len(keys))
        entries = pa.StructArray.from_arrays(
            [pa.array(keys, pa.string()), pa.array(values, pa.binary())],
            fields=self.header_fields)
        return pa.ListArray.from_arrays(pa.array(ends, pa.int32()), entries,
                                        type=self.headers_type)

    def table(self, records: Sequence):
        """One row group's records as a table."""
        pa = self.pa
        count = len(records)
        first = records[0]
        timestamps = list(map(_TIMESTAMP, records))
        if min(timestamps) < 0:  # -1: Kafka has no timestamp for the message
            timestamps = [None if timestamp < 0 else timestamp for timestamp in timestamps]
        value_field, values = self.value_column(records)
        key_field, keys = self.key_column(records)
        extra = self.extra_columns(records)
        fields = [pa.field("topic", pa.string(), nullable=False),
                  pa.field("partition", pa.int32(), nullable=False),
                  pa.field("offset", pa.int64(), nullable=False),
                  pa.field("timestamp", self.timestamp_type),
                  pa.field("timestamp_type", pa.string()),
                  key_field, value_field,
                  pa.field("headers", self.headers_type, nullable=False)] + \
            [field for field, _ in extra]
        columns = [pa.array([first.topic] * count, pa.string()),
                   pa.array([first.partition] * count, pa.int32()),
                   pa.array(list(map(_OFFSET, records)), pa.int64()),
                   pa.array(timestamps, self.timestamp_type),
                   pa.array([TIMESTAMP_TYPES.get(record.timestamp_type) for record in records],
                            pa.string()),
                   keys, values, self.headers_column(records)] + [array for _, array in extra]
        return pa.Table.from_arrays(columns, schema=pa.schema(fields))

    def encode(self, records: Sequence) -> bytes:
        """The Parquet file, in row groups of about PARQUET_ROW_GROUP_BYTES of values: what
        building a row group takes (several copies of it) stays that small, whatever the
        batch size."""
        sink = io.BytesIO()
        writer = None
        start = 0
        while start < len(records):
            end, size = start, 0
            while end < len(records) and (size < PARQUET_ROW_GROUP_BYTES or end == start):
                size += len(records[end].value or b"")
                end += 1
            table = self.table(records[start:end])
            if writer is None:
                # Dictionaries only where values repeat: for keys and values they cost
                # time, and a copy of the column, before Parquet falls back to plain.
                writer = self.parquet.ParquetWriter(
                    sink, table.schema, compression=self.compression,
                    use_dictionary=["topic", "partition", "timestamp_type"])
            writer.write_table(table)
            del table
            start = end
        writer.close()
        return sink.getvalue()


def fix_malloc_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """Keeps glibc's malloc serving blocks of this size and up with mmap, so that freeing
    them returns them to the system. glibc raises the threshold by itself each time such a
    block is freed; a batch of large values then lands in the heap, which keeps the pages:
    make bench measured a Parquet spout's peak at 369 MiB with 64 MiB batches of 1 MiB
    messages, and 276 MiB with the threshold fixed. Elsewhere (musl, macOS): nothing."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, threshold)   # M_MMAP_THRESHOLD in glibc's malloc.h


class DecodedParquetWriter(ParquetWriter):
    """FORMAT=parquet with DECODE: the value a typed column built from the writer schema
    (Avro and Protobuf: a struct of the record's or message's fields; JSON Schema: the
    document as JSON text), value_schema_id beside it; decoded keys as JSON text with
    key_schema_id. Every file holds one writer schema (and Protobuf message type):
    Segments starts a new file where schema_key() changes."""

    def __init__(self, config: Config, schemas: SchemaCache):
        super().__init__(config)
        self.schemas = schemas
        self.keys = "key" in config.decode
        self.value_types: dict = {}   # schema_key -> (Arrow type, converter or None)
        self.file_key = None

    def schema_key(self, record):
        """What decides the value column's type: the schema id, and for Protobuf the message
        type's indexes; None for a kept tombstone, which goes with any."""
        return parquet_schema_key(self.schemas, record)

    def value_type(self, key) -> tuple:
        found = self.value_types.get(key)
        if found is None:
            found = self.value_types[key] = parquet_value_type(self.pa, self.schemas, key)
        return found

    def encode(self, records: Sequence) -> bytes:
        # The file's one schema: a row group of tombstones alone has the same columns.
        self.file_key = next((key for key in map(self.schema_key, records) if key is not None),
                             None)
        return super().encode(records)

    def value_column(self, records: Sequence) -> tuple:
        pa = self.pa
        arrow_type, convert = self.value_type(self.file_key)
        documents = [record.document for record in records]
        if convert is not None:
            documents = [None if document is None else convert(document)
                         for document in documents]
        return pa.field("value", arrow_type), pa.array(documents, arrow_type)

    def key_column(self, records: Sequence) -> tuple:
        if not self.keys:
            return super().key_column(records)
        pa = self.pa
        return pa.field("key", pa.string()), pa.array(
            [None if record.key is None else _json_text(record.key_document)
             for record in records], pa.string())

    def extra_columns(self, records: Sequence) -> list[tuple]:
        pa = self.pa
        columns = [(pa.field("value_schema_id", pa.int32()),
                    pa.array([record.schema_id for record in records], pa.int32()))]
        if self.keys:
            columns.append((pa.field("key_schema_id", pa.int32()),
                            pa.array([record.key_schema_id for record in records], pa.int32())))
        return columns


def parquet_schema_key(schemas: SchemaCache, record):
    """DecodedParquetWriter.schema_key."""
    schema_id = record.schema_id
    if schema_id is None or record.value is None:
        return None
    schema = schemas.schemas[schema_id]
    if schema.schema_type == "PROTOBUF":
        return schema_id, tuple(read_message_indexes(record.value, 5, schema_id)[0])
    return schema_id, ()


def parquet_value_type(pa, schemas: SchemaCache, key) -> tuple:
    """(Arrow type, converter or None) of the value column for a schema_key. Any Avro schema
    has one, not only a record: a "string", a union, an array or a map is that type's column
    (docs/schema-registry.md)."""
    if key is None:
        return pa.null(), None
    schema = schemas.schemas[key[0]]
    if schema.schema_type == "AVRO":
        return avro_arrow_type(pa, schema.parsed, schema.named, ())
    if schema.schema_type == "PROTOBUF":
        return protobuf_arrow_type(pa, schema._message_class(list(key[1])).DESCRIPTOR, ())
    return pa.string(), _json_text


class ParquetValues:
    """FORMAT=parquet with DECODE: Avro values that fastavro decodes but that do not fit their
    column (hostile bytes: an int beyond 32 bits, a decimal beyond its precision) are bad
    records here. Found only when Segments.take writes the file, they would fail the whole
    batch past ON_BAD_RECORD, again at every start. Protobuf's parser keeps its values in
    range, and JSON Schema values are JSON text."""

    def __init__(self, schemas: SchemaCache):
        self.schemas = schemas
        self.checks: dict[int, Callable | None] = {}   # schema id -> avro_fits() or None

    def check(self, decoded: Mapping, bad: Callable) -> None:
        checks, schemas = self.checks, self.schemas.schemas
        for records in decoded.values():
            for index, record in enumerate(records):
                schema_id = record.schema_id
                if record.problem is not None or record.document is None:
                    continue
                if schema_id in checks:
                    fits = checks[schema_id]
                else:
                    schema = schemas[schema_id]
                    fits = checks[schema_id] = avro_fits(schema.parsed, schema.named, ()) \
                        if schema.schema_type == "AVRO" else None
                if fits is not None and not fits(record.document):
                    records[index] = bad(record, BadRecord(
                        "corrupt-payload", "a value beyond its Avro type's range (an int of "
                        "more than 32 bits, a decimal of more digits than its precision)",
                        schema_id))


def avro_fits(node, named: Mapping, within: tuple) -> Callable | None:
    """A test that a decoded value fits the column avro_arrow_type gives the node; None
    where every value does. Follows avro_arrow_type: a recursive record and a union of
    several types are JSON text there, which holds anything."""
    if isinstance(node, str):
        if node == "int":
            return _int32_fits
        if node in _AVRO_PRIMITIVES or node in within or node not in named:
            return None
        return avro_fits(named[node], named, within)
    if isinstance(node, list):
        branches = [branch for branch in node if branch != "null"]
        return avro_fits(branches[0], named, within) if len(branches) == 1 else None
    logical, kind = node.get("logicalType"), node["type"]
    if logical == "decimal" and kind in ("bytes", "fixed"):
        # The unscaled integer's digits, however the Decimal's exponent came out.
        most = node["precision"] - node.get("scale", 0) - 1
        return lambda value: not value or value.adjusted() <= most
    if logical is not None and kind in ("int", "long"):
        return None   # dates and times: fastavro refuses those out of range itself
    if kind in ("record", "error"):
        within = within + (node["name"],)
        fields = [(field["name"], avro_fits(field["type"], named, within))
                  for field in node["fields"]]
        fields = [(name, fits) for name, fits in fields if fits is not None]
        if not fields:
            return None
        return lambda value: all(value[name] is None or fits(value[name])
                                 for name, fits in fields)
    if kind == "array":
        item = avro_fits(node["items"], named, within)
        return None if item is None else \
            (lambda values: all(value is None or item(value) for value in values))
    if kind == "map":
        item = avro_fits(node["values"], named, within)
        return None if item is None else \
            (lambda values: all(value is None or item(value) for value in values.values()))
    if kind in ("enum", "fixed"):
        return None
    return avro_fits(kind, named, within)


def _int32_fits(value) -> bool:
    return -0x80000000 <= value <= 0x7FFFFFFF


def _json_text(document) -> str:
    return document_json_text(document)


def _record_converter(converters: dict) -> Callable | None:
    """A converter for a dict whose named members need one; None if none does."""
    if not converters:
        return None
    items = list(converters.items())

    def convert(document):
        if document is None:
            return None
        document = dict(document)
        for name, member in items:
            value = document.get(name)
            if value is not None:
                document[name] = member(value)
        return document
    return convert


def _list_converter(member: Callable | None) -> Callable | None:
    return None if member is None else (lambda values: [None if value is None else
                                                        member(value) for value in values])


def _map_converter(member: Callable | None) -> Callable | None:
    return None if member is None else (lambda values: {key: None if value is None else
                                                        member(value)
                                                        for key, value in values.items()})


_AVRO_PRIMITIVES = {"null": "null", "boolean": "bool_", "int": "int32", "long": "int64",
                    "float": "float32", "double": "float64", "bytes": "binary",
                    "string": "string"}


def avro_arrow_type(pa, node, named: Mapping, within: tuple) -> tuple:
    """(Arrow type, converter or None) for a node of a fastavro-parsed schema: records as
    structs, arrays as lists, maps as maps, enums as strings, fixed as fixed-size binary,
    logical types as Arrow's timestamp, date, time, decimal, uuid as a string. A union of
    one type and null is that type; of several, and a record within itself, JSON text.
    within: the record names being expanded (a recursive record ends there)."""
    if isinstance(node, str):
        if node in _AVRO_PRIMITIVES:
            return getattr(pa, _AVRO_PRIMITIVES[node])(), None
        if node in within:
            return pa.string(), _json_text
        return avro_arrow_type(pa, named[node], named, within)
    if isinstance(node, list):
        branches = [branch for branch in node if branch != "null"]
        if len(branches) == 1:
            return avro_arrow_type(pa, branches[0], named, within)
        if not branches:
            return pa.null(), None
        return pa.string(), _json_text
    logical, kind = node.get("logicalType"), node["type"]
    if logical in ("timestamp-millis", "timestamp-micros", "local-timestamp-millis",
                   "local-timestamp-micros") and kind == "long":
        return pa.timestamp("ms" if logical.endswith("millis") else "us",
                            None if logical.startswith("local") else "UTC"), None
    if logical == "date" and kind == "int":
        return pa.date32(), None
    if logical == "time-millis" and kind == "int":
        return pa.time32("ms"), None
    if logical == "time-micros" and kind == "long":
        return pa.time64("us"), None
    if logical == "decimal" and kind in ("bytes", "fixed"):
        precision, scale = node["precision"], node.get("scale", 0)
        return (pa.decimal128 if precision <= 38 else pa.decimal256)(precision, scale), None
    if logical == "uuid" and kind == "string":
        return pa.string(), str
    if kind in ("record", "error"):
        if not node["fields"]:   # Parquet has no struct without fields
            return pa.string(), _json_text
        within = within + (node["name"],)
        fields, converters = [], {}
        for field in node["fields"]:
            arrow_type, convert = avro_arrow_type(pa, field["type"], named, within)
            fields.append(pa.field(field["name"], arrow_type))
            if convert is not None:
                converters[field["name"]] = convert
        return pa.struct(fields), _record_converter(converters)
    if kind == "enum":
        return pa.string(), None
    if kind == "fixed":
        return pa.binary(node["size"]), None
    if kind == "array":
        item, convert = avro_arrow_type(pa, node["items"], named, within)
        return pa.list_(item), _list_converter(convert)
    if kind == "map":
        item, convert = avro_arrow_type(pa, node["values"], named, within)
        return pa.map_(pa.string(), item), _map_converter(convert)
    return avro_arrow_type(pa, kind, named, within)   # {"type": "long"}, a logical unknown


# FieldDescriptor.TYPE_* to Arrow; 14 (enum) and 10/11 (group, message) apart.
_PROTOBUF_SCALARS = {1: "float64", 2: "float32", 3: "int64", 4: "uint64", 5: "int32",
                     6: "uint64", 7: "uint32", 8: "bool_", 9: "string", 12: "binary",
                     13: "uint32", 15: "int32", 16: "int64", 17: "int32", 18: "int64"}
# Well-known messages protobuf_document() gives as JSON-like values: JSON text here.
_PROTOBUF_AS_JSON = ("google.protobuf.Struct", "google.protobuf.Value",
                     "google.protobuf.ListValue", "google.protobuf.Duration",
                     "google.protobuf.FieldMask", "google.protobuf.Any")


def protobuf_arrow_type(pa, message, within: tuple) -> tuple:
    """(Arrow type, converter or None) for a message descriptor, as protobuf_document()
    gives its values: a struct of its fields by .proto name."""
    if not message.fields:   # Parquet has no struct without fields
        return pa.string(), _json_text
    within = within + (message.full_name,)
    fields, converters = [], {}
    for field in message.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_type, _ = _protobuf_field_type(pa, field.message_type.fields_by_name["key"],
                                               within)
            value_type, convert = _protobuf_field_type(
                pa, field.message_type.fields_by_name["value"], within)
            arrow_type, convert = pa.map_(key_type, value_type), _map_converter(convert)
        else:
            arrow_type, convert = _protobuf_field_type(pa, field, within)
            if field.is_repeated:
                arrow_type, convert = pa.list_(arrow_type), _list_converter(convert)
        fields.append(pa.field(field.name, arrow_type))
        if convert is not None:
            converters[field.name] = convert
    return pa.struct(fields), _record_converter(converters)


def _protobuf_field_type(pa, field, within: tuple) -> tuple:
    if field.enum_type is not None:   # names; a number the schema does not know as text
        return pa.string(), str
    message = field.message_type
    if message is None:
        return getattr(pa, _PROTOBUF_SCALARS[field.type])(), None
    name = message.full_name
    if name == "google.protobuf.Timestamp":
        return pa.timestamp("us", "UTC"), None
    if name in _PROTOBUF_AS_JSON or name in within:
        return pa.string(), _json_text
    if name.startswith("google.protobuf.") and name.endswith("Value") and \
            "value" in message.fields_by_name:
        return _protobuf_field_type(pa, message.fields_by_name["value"], within)
    return protobuf_arrow_type(pa, message, within)


SEGMENT_WRITERS = {"jsonl": JsonLinesWriter, "parquet": ParquetWriter}
PARQUET_ROW_GROUP_BYTES = 8 * 1024 * 1024


# --------------------------------------------------------------------------- delivery

class Stopped(Exception):
    """Raised when the spout was told to stop while it waited for the pipe."""


_IOV_MAX = 1024
PIPE_TARGET_SIZE = 1024 * 1024
READER_GONE_SECONDS = 1.0
# Pipe buffers are pages; partly filled ones waste some of the capacity.
PIPE_SLACK = 8192


class Backoff:
    """The waits between tries, doubling from `first` up to `most`. Without a deadline a stop
    request ends a wait (Stopped); with one (the shutdown's own writes) only the deadline
    does. `delay` is the next wait, for the log line that announces it."""
    __slots__ = ("stop", "delay", "most", "deadline")

    def __init__(self, stop: threading.Event, first: float, most: float,
                 deadline: float | None = None):
        self.stop = stop
        self.delay = first
        self.most = most
        self.deadline = deadline

    def wait(self) -> None:
        if self.deadline is None:
            if self.stop.wait(self.delay):
                raise Stopped("stopping")
        elif time.monotonic() + self.delay >= self.deadline:
            raise Stopped("out of time")
        else:
            time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.most)


_FIONREAD = getattr(termios, "FIONREAD", None)


class PipeWriter:
    """The write end of the FIFO: opens when a reader is there, writes whole buffers.

    The fd is non-blocking so that waiting for the reader can end at a deadline (shutdown)
    instead of hanging in open() or write().
    """

    def __init__(self, path: str, stop: threading.Event):
        self.path = path
        self.stop = stop
        self.fd: int | None = None
        self.written = 0          # bytes written since this fd was opened
        # How far the reader had read when last seen there: where it can have closed the
        # pipe at the earliest.
        self.read_mark = 0
        self.torn = False         # an archive was abandoned half-written: write nothing more
        self.capacity = 0
        self.unread_supported = _FIONREAD is not None
        self.waiting_since: float | None = None   # open() waits for a reader since then

    def open(self, deadline: float | None = None) -> None:
        """Waits for a reader, polling: a blocking open cannot be given up at a deadline."""
        backoff = Backoff(self.stop, 0.001, 0.05, deadline)
        while True:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self.written = self.read_mark = 0
                self.capacity = self._grow_pipe()
                self.waiting_since = None
                return
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: no reader has the pipe open yet
                    raise
            if self.waiting_since is None:
                self.waiting_since = time.monotonic()
            backoff.wait()

    def _grow_pipe(self) -> int:
        """A larger pipe buffer holds whole archives: fewer wake-ups, and atomic writes."""
        try:
            with open("/proc/sys/fs/pipe-max-size") as limit:
                target = min(int(limit.read()), PIPE_TARGET_SIZE)
            if fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ) < target:
                fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, target)
            return fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ)
        except (OSError, ValueError, AttributeError):
            return 0

    def _wait_for_room(self, size: int, deadline: float | None) -> bool:
        """Waits until the pipe has room for size bytes at once; False if it never can."""
        if not self.unread_supported or size > self.capacity - PIPE_SLACK:
            return False
        backoff = Backoff(self.stop, 0.0005, 0.01, deadline)
        while self.capacity - self.unread() - PIPE_SLACK < size:
            # A reader that left frees no room, and without a write nothing fails: only
            # POLLERR tells that it is gone.
            if self.reader_gone():
                raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe")
            self._mark_read()
            backoff.deadline = self._finish_by(backoff.deadline)
            backoff.wait()
        return True

    def _finish_by(self, deadline: float | None) -> float | None:
        """A stop request during a write gives the archive under way the shutdown's time."""
        if deadline is None and self.stop.is_set():
            return time.monotonic() + SHUTDOWN_BUDGET
        return deadline

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        # Positions count from the next fd's first byte: a requeued archive's start is taken
        # before its write opens that fd.
        self.written = self.read_mark = 0

    def reader_gone(self) -> bool:
        """No process has the pipe open for reading (a write would fail with EPIPE)."""
        if self.fd is None:
            return False
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))

    def _mark_read(self) -> None:
        if self.unread_supported and self.fd is not None:
            self.read_mark = self.written - self.unread()

    def unread(self) -> int:
        """Bytes written that the reader has not read yet (Linux: FIONREAD on the write end)."""
        if self.fd is None or not self.unread_supported:
            return 0
        buf = fcntl.ioctl(self.fd, _FIONREAD, b"\x00\x00\x00\x00")
        return struct.unpack("i", buf)[0]

    def write(self, parts: Sequence, deadline: float | None = None, skip: int = 0) -> None:
        """Writes the buffers in full, leaving out their first `skip` bytes (already written
        to this pipe), or raises: BrokenPipeError if the reader went away, Stopped if the
        deadline passed first (the half-written archive then ends the stream).
        """
        if self.torn:
            raise Stopped("the pipe holds a half-written archive")
        if self.fd is None:
            self.open(deadline)
        total = sum(map(len, parts)) - skip
        if not skip and self._wait_for_room(total, deadline):
            # One write that fits the pipe lands whole or not at all: a crash cannot leave
            # half an archive for the next spout's bytes to continue.
            if len(parts) > _IOV_MAX:
                parts = [b"".join(parts)]
            sent = os.writev(self.fd, parts)
            self.written += sent
            self._mark_read()
            if sent == total:
                return
            parts, skip = [b"".join(parts)], sent
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        while skip:
            if skip >= len(views[0]):
                skip -= len(views.pop(0))
            else:
                views[0], skip = views[0][skip:], 0
        index = 0
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while index < len(views):
            try:
                sent = os.writev(self.fd, views[index:index + _IOV_MAX])
            except BlockingIOError:
                deadline = self._finish_by(deadline)
                wait_ms = 1000
                if deadline is not None:
                    wait_ms = int((deadline - time.monotonic()) * 1000)
                    if wait_ms <= 0:
                        self.torn = True
                        self.close()
                        raise Stopped("the reader did not take the archive in time") from None
                if any(event & select.POLLERR for _, event in poller.poll(min(wait_ms, 1000))):
                    raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe")
                continue
            self.written += sent
            self._mark_read()
            while sent:
                length = len(views[index])
                if sent >= length:
                    sent -= length
                    index += 1
                else:
                    views[index] = views[index][sent:]
                    sent = 0


class Pending:
    """An archive handed to the pipe, with what the caller wants back once it is taken."""
    __slots__ = ("archive", "token", "start", "end")

    def __init__(self, archive: Archive, token):
        self.archive = archive
        self.token = token
        self.start: int | None = None     # where it starts on the current fd
        self.end: int | None = None       # where it ends on the current fd, once fully written


class PipeArchives:
    """Sends archives down the pipe and tells which of them Pachyderm has taken.

    A write only puts bytes in the pipe's buffer. An archive counts as delivered once the
    reader has read past its last byte (FIONREAD tells how far it got): Pachyderm's readers
    finish an archive's commit before they read the next one.

    When the reader goes away: if it stopped exactly between two archives and opens the same
    pipe again soon (the 1.8-1.10 readers do so after every archive), the pipe still holds
    what follows, whole, so writing simply goes on. Otherwise the pipe is closed, which drops
    any partial archive in it, and every archive the reader had not read past is written
    again, whole and in order, to the next reader.
    """

    def __init__(self, pipe: PipeWriter, retry_max_seconds: float = 2.0):
        self.pipe = pipe
        self.retry_max_seconds = retry_max_seconds
        self.in_flight: deque[Pending] = deque()
        self.delivered: list = []
        self.broken_pipes = 0
        self.rewritten = 0    # archives written again for another reader
        self._reader_gone_since: float | None = None
        # Unlike _reader_gone_since, not reset when the archives are written again: since
        # when the reader has been missing while archives wait.
        self.reader_missing_since: float | None = None

    def send(self, archive: Archive, token, deadline: float | None = None) -> None:
        self.in_flight.append(Pending(archive, token))
        self._write(deadline)

    def _write(self, deadline: float | None) -> None:
        """Writes, oldest first, every archive in flight that the pipe does not hold whole.

        Archives that a requeue left to write again (its wait for a reader may have been
        ended by a stop) go before the new one: an archive, and the marker in it, must never
        reach the reader ahead of one before it."""
        backoff = Backoff(self.pipe.stop, 0.05, self.retry_max_seconds, deadline)
        while True:
            entry = next((e for e in self.in_flight if e.end is None), None)
            if entry is None:
                if self.pipe.fd is not None and not self.pipe.reader_gone():
                    self.reader_missing_since = None
                return
            try:
                if entry.start is None:
                    entry.start = self.pipe.written
                # An archive without members (only tombstones) is not written at all: an
                # empty archive is an empty commit, or breaks the next one, on old readers.
                if entry.archive.members:
                    self.pipe.write(entry.archive.parts, deadline,
                                    skip=self.pipe.written - entry.start)
                entry.end = self.pipe.written
            except BrokenPipeError:
                if self.reader_missing_since is None:
                    self.reader_missing_since = time.monotonic()
                if self._reader_back_between_archives(entry, deadline):
                    continue
                entries = self._requeue()
                log.warning("pipe %s broken (reader gone); writing %d archive(s) again "
                            "in %.2fs", self.pipe.path, len(entries), backoff.delay)
                backoff.wait()

    def _consumed(self) -> int:
        return self.pipe.written - self.pipe.unread()

    def _reader_back_between_archives(self, current: Pending, deadline: float | None) -> bool:
        """True if the reader had stopped exactly at an archive's end and has the same pipe
        open again: what is in the pipe then starts with a whole archive."""
        consumed = self._consumed()
        # Starts too: the end of an archive already released is where the next one starts.
        boundaries = {0} | {e.start for e in self.in_flight if e.start is not None} | \
            {e.end for e in self.in_flight if e.end is not None}
        if consumed not in boundaries:
            # A reader that reopens at once (1.8-1.10 do so after every archive) can be back,
            # and reading the next archive, before the failed write is even noticed. But
            # 1.8-1.10 also reopen the same pipe after an error mid-archive: such a reader
            # never saw the beginning of what follows. Only one that can have closed at an
            # archive's end (at or after where it was last seen) is trusted with the rest.
            if not any(self.pipe.read_mark <= end <= consumed for end in boundaries):
                return False
            return not self.pipe.reader_gone()
        waited_until = time.monotonic() + READER_GONE_SECONDS
        backoff = Backoff(self.pipe.stop, 0.001, 0.05, deadline)
        while self.pipe.reader_gone():
            if time.monotonic() >= waited_until:
                return False
            backoff.wait()
        return True

    def _requeue(self) -> list[Pending]:
        """Closes the pipe (dropping what the reader left in it) and returns, in order, the
        archives to write again: all that the reader had not read past."""
        consumed = self._consumed()
        self.pipe.close()
        self.broken_pipes += 1
        self._release(lambda entry: entry.end < consumed)
        for entry in self.in_flight:
            entry.start = entry.end = None
            if entry.archive.members:
                self.rewritten += 1
        return list(self.in_flight)

    def check_reader(self) -> None:
        """Archives wait in the pipe for a reader that may be gone for good (a restarted
        worker makes a fresh FIFO): once it stays gone, write them again to whatever reader
        opens the path next. A short absence is a 1.8-1.10 reader between two archives."""
        if not self.in_flight or not self.pipe.reader_gone():
            self._reader_gone_since = self.reader_missing_since = None
            return
        now = time.monotonic()
        if self.reader_missing_since is None:
            self.reader_missing_since = now
        if self._reader_gone_since is None:
            self._reader_gone_since = now
        elif now - self._reader_gone_since >= READER_GONE_SECONDS:
            self._reader_gone_since = None
            entries = self._requeue()
            log.warning("pipe %s has had no reader for %.1fs; writing %d archive(s) again",
                        self.pipe.path, READER_GONE_SECONDS, len(entries))
            self._write(None)

    def _release(self, taken: Callable[[Pending], bool]) -> None:
        while self.in_flight and self.in_flight[0].end is not None and taken(self.in_flight[0]):
            self.delivered.append(self.in_flight.popleft().token)

    def poll(self, final: bool = False) -> list:
        """Tokens of the archives delivered since the last call, oldest first.

        final: nothing follows, so an archive read to its last byte counts as taken.
        """
        if self.in_flight:
            if not self.pipe.unread_supported:
                self._release(lambda entry: True)
            else:
                consumed = self._consumed()
                # An archive without members has no bytes to read past: once all before it
                # were taken, so is it.
                self._release(lambda entry: entry.end < consumed or (
                    entry.end <= consumed and (final or not entry.archive.members)))
        delivered, self.delivered = self.delivered, []
        return delivered

    def drain(self, deadline: float) -> list:
        """Writes what a requeue left to write again, then waits until the reader has read
        all that was written; both up to the deadline."""
        try:
            self._write(deadline)
        except Stopped:
            log.warning("no reader took the %d archive(s) waiting to be written again; their "
                        "messages stay undelivered", sum(e.end is None for e in self.in_flight))
            return self.poll(final=True)
        delay = 0.001
        while self.in_flight and self.pipe.unread() > 0 and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.poll(final=True)


class Outgoing(NamedTuple):
    """A closed batch on its way to Pachyderm, or (closed) the end of a bounded read."""
    batch: Batch
    topics: tuple[str, ...]
    positions: dict   # (topic, partition) -> next offset of every partition consumed, after it
    stops: dict | None = None   # a bounded read's stop of every partition
    closed: bool = False        # every partition reached its stop: the range is complete


class Delivery:
    """Where closed batches go; one implementation per Pachyderm generation.

    The loop calls start() once, send() for every batch, held() to learn which batches
    Pachyderm now holds, check() between polls, drain() and close() at the end. It never
    knows which generation it talks to.
    """

    name = ""
    # Whether every delivery records where each partition resumes (2.x: the commit's
    # description). Group mode then resumes a partition at the larger of that record and the
    # group's offset.
    records_positions = False

    def start(self) -> Record | None:
        """Waits until Pachyderm can be reached; returns the topics and positions it recorded
        last, or None. Raises ConfigError when Pachyderm refuses the spout, Stopped on stop."""
        return None

    def send(self, outgoing: Outgoing, deadline: float | None = None) -> None:
        """Delivers one batch whole, retrying as needed; raises Stopped if told to stop (or
        out of time) first, leaving nothing half-delivered behind."""
        raise NotImplementedError

    def records_of(self, repos: Sequence[RepoBranch]) -> list[Record]:
        """The newest record of each of these other repos (RESUME_FROM), read only."""
        return []

    def held(self, final: bool = False) -> list[Outgoing]:
        """The batches Pachyderm holds since the last call, oldest first."""
        raise NotImplementedError

    def check(self) -> None:
        """Housekeeping between polls."""

    def drain(self, deadline: float) -> list[Outgoing]:
        """Waits, up to the deadline, until Pachyderm holds all that was sent."""
        return self.held(final=True)

    def close(self, deadline: float) -> None:
        """Leaves nothing open behind, as far as the deadline allows."""

    # Read by the metrics server's thread while the loop may be inside send(): they only
    # read attributes that the loop's thread sets.
    def unreachable(self) -> tuple[float, str] | None:
        """(since when, on time.monotonic(), and what) Pachyderm has been out of reach while
        batches wait for it; None while it takes them."""
        return None

    def redelivered(self) -> int:
        """Archives or commits written again so far, after a lost reader or a failed commit."""
        return 0

    def in_transit(self) -> bool:
        """Whether Pachyderm has yet to read part of what was sent to it (the loop's thread)."""
        return False


class PipeDelivery(Delivery):
    """Pachyderm 1.x: tar archives through the named pipe, the marker in every one."""

    name = "pipe"

    def __init__(self, config: Config, stop: threading.Event):
        self.marker = config.marker
        self.marker_path = config.marker_path
        self.archives = PipeArchives(PipeWriter(config.output_pipe, stop))

    def start(self) -> Record | None:
        if not self.marker:
            return None
        try:
            return read_marker(self.marker_path)
        except MarkerError as error:
            raise ConfigError("MARKER", str(error)) from None

    def send(self, outgoing: Outgoing, deadline: float | None = None) -> None:
        members = outgoing.batch.members
        if self.marker and (members or outgoing.closed):
            # Last in the archive: a reader that streams puts (1.8-1.10) stores the marker
            # only after every file before it.
            members = members + [(self.marker, encode_marker(
                outgoing.topics, outgoing.positions, outgoing.stops, outgoing.closed), 0)]
        self.archives.send(encode_archive(members), outgoing, deadline)

    def held(self, final: bool = False) -> list[Outgoing]:
        return self.archives.poll(final)

    def check(self) -> None:
        self.archives.check_reader()

    def drain(self, deadline: float) -> list[Outgoing]:
        return self.archives.drain(deadline)

    def close(self, deadline: float) -> None:
        self.archives.pipe.close()

    def unreachable(self) -> tuple[float, str] | None:
        times = [since for since in (self.archives.reader_missing_since,
                                     self.archives.pipe.waiting_since) if since is not None]
        if not times:
            return None
        return min(times), f"no reader has the pipe {self.archives.pipe.path} open"

    def redelivered(self) -> int:
        return self.archives.rewritten

    def in_transit(self) -> bool:
        # The newest archive stays in flight after the reader has read it all (nothing tells
        # when its commit ends): bytes still unread are what waits.
        return bool(self.archives.in_flight) and self.archives.pipe.unread() > 0


# A value is sent in pieces well under the 20 MB that pachd and the SDK accept per message.
MODIFY_FILE_CHUNK = 4 * 1024 * 1024
PACHD_CALL_SECONDS = 30.0
PACHD_BACKOFF_MAX = 30.0
# How far back from the branch head the spout looks for the last commit it made.
RECORD_SEARCH_COMMITS = 100


class PachdClient:
    """The few pfs_v2.API calls the spout makes, each with a deadline, which the SDK's stubs
    do not take: the SDK's messages over a channel set up as the SDK sets up its own."""

    def __init__(self, address: str, token: str | None, root_certs: bytes | None,
                 repo: RepoBranch, stop: threading.Event):
        import grpc
        self.grpc = grpc
        self.stop = stop
        import betterproto.lib.google.protobuf as protobuf
        from pachyderm_sdk.api import pfs
        from pachyderm_sdk.constants import GRPC_CHANNEL_OPTIONS
        self.pfs = pfs
        target, tls = parse_pachd_address(address)
        host_port = target.split("://", 1)[1]
        if tls:
            self.channel = grpc.secure_channel(
                host_port, grpc.ssl_channel_credentials(root_certs), GRPC_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(host_port, GRPC_CHANNEL_OPTIONS)
        self.metadata = (("authn-token", token),) if token else None
        self.repo = pfs.Repo(name=repo.repo, type="user", project=pfs.Project(name=repo.project))
        self.branch = pfs.Branch(repo=self.repo, name=repo.branch)

        def method(name, request, response, kind="unary_unary"):
            return getattr(self.channel, kind)(
                f"/pfs_v2.API/{name}", request_serializer=request.SerializeToString,
                response_deserializer=response.FromString)
        self._inspect_repo = method("InspectRepo", pfs.InspectRepoRequest, pfs.RepoInfo)
        self._inspect_branch = method("InspectBranch", pfs.InspectBranchRequest, pfs.BranchInfo)
        self._inspect_commit = method("InspectCommit", pfs.InspectCommitRequest, pfs.CommitInfo)
        self._start_commit = method("StartCommit", pfs.StartCommitRequest, pfs.Commit)
        self._finish_commit = method("FinishCommit", pfs.FinishCommitRequest, protobuf.Empty)
        self._drop_commit_set = method("DropCommitSet", pfs.DropCommitSetRequest,
                                       protobuf.Empty)
        self._modify_file = self.channel.stream_unary(  # requests come encoded
            "/pfs_v2.API/ModifyFile", response_deserializer=protobuf.Empty.FromString)

    def call(self, method, request, deadline: float | None,
             seconds: float = PACHD_CALL_SECONDS):
        """One call, given up (Stopped) when a stop request's shutdown time runs out: a stop
        gives the call under way the shutdown's time, as the pipe does a write."""
        if deadline is not None and deadline - time.monotonic() <= 0:
            raise Stopped("out of time")
        timeout = seconds if deadline is None else min(seconds, deadline - time.monotonic())
        future = method.future(request, timeout=timeout, metadata=self.metadata)
        while True:
            if deadline is None and self.stop.is_set():
                deadline = time.monotonic() + SHUTDOWN_BUDGET
            wait = 0.1 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                future.cancel()
                raise Stopped("pachd did not answer in time")
            try:
                return future.result(timeout=min(wait, 0.1))
            except self.grpc.FutureTimeoutError:
                continue

    def branch_of(self, repo: RepoBranch):
        return self.pfs.Branch(repo=self.pfs.Repo(name=repo.repo, type="user", project=(
            self.pfs.Project(name=repo.project))), name=repo.branch)

    def head(self, deadline: float | None, branch=None):
        """The branch head (this spout's, unless another is given), or None while the branch
        does not exist: pachd's CreateRepo makes no branch, and the first StartCommit creates
        it. A missing repo stays NOT_FOUND."""
        branch = branch or self.branch
        request = self.pfs.InspectBranchRequest(branch=branch)
        try:
            return self.call(self._inspect_branch, request, deadline).head
        except self.grpc.RpcError as error:
            if error.code() != self.grpc.StatusCode.NOT_FOUND:
                raise
        # NOT_FOUND names the repo or the branch alike; the repo's own answer tells them apart.
        self.call(self._inspect_repo, self.pfs.InspectRepoRequest(repo=branch.repo), deadline)
        return None

    def inspect_commit(self, commit, deadline: float | None):
        request = self.pfs.InspectCommitRequest(commit=commit)
        return self.call(self._inspect_commit, request, deadline)

    def start_commit(self, description: str, deadline: float | None):
        request = self.pfs.StartCommitRequest(branch=self.branch, description=description)
        return self.call(self._start_commit, request, deadline)

    def put_files(self, commit, members: Sequence[tuple[str, bytes, int]], size: int,
                  deadline: float | None) -> None:
        """All files of a batch in one ModifyFile stream, each replacing any file of its name:
        pachd applies the stream only once it completes."""
        def requests():
            yield bytes(self.pfs.ModifyFileRequest(set_commit=commit))
            yield from modify_file_requests(members, MODIFY_FILE_CHUNK)
        # Generous for big batches on slow links, yet bounded: a stuck stream is retried.
        self.call(self._modify_file, requests(), deadline, PACHD_CALL_SECONDS + size / 1e6)

    def finish_commit(self, commit, description: str, deadline: float | None) -> None:
        request = self.pfs.FinishCommitRequest(commit=commit, description=description)
        self.call(self._finish_commit, request, deadline)

    def drop_commit(self, commit, deadline: float | None) -> None:
        request = self.pfs.DropCommitSetRequest(commit_set=self.pfs.CommitSet(id=commit.id))
        self.call(self._drop_commit_set, request, deadline)

    def close(self) -> None:
        self.channel.close()


def commit_is_open(info) -> bool:
    """pachd refuses a child while its parent has no 'finishing' time. betterproto reads an
    unset Timestamp as the epoch, not None."""
    return not any(stamp is not None and stamp.timestamp() > 0
                   for stamp in (info.finishing, info.finished))


def describe_rpc_error(error) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else type(error).__name__}: {details}"


class PfsDelivery(Delivery):
    """Pachyderm 2.x: one commit per batch through pachd, its description recording the next
    offset of every partition, so that a restarted spout resumes exactly after it."""

    name = "pfs"
    records_positions = True

    def __init__(self, config: Config, stop: threading.Event):
        self.config = config
        self.stop = stop
        self.address = config.pachd_address
        self.repo = config.output_repo
        self.client: PachdClient | None = None
        self.delivered: list[Outgoing] = []
        self.unsettled = None   # a commit that an attempt started and may have left open
        self.redeliveries = 0
        self.unreachable_since: float | None = None

    # -- errors
    _FATAL = ("UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "INVALID_ARGUMENT")

    def refused(self, error) -> ConfigError | None:
        """The error as the one line to stop with, if trying again cannot help."""
        code = error.code().name if hasattr(error, "code") else ""
        if code not in self._FATAL:
            return None
        details = error.details()
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return ConfigError(self.config.pach_token_source,
                               f"pachd at {self.address} refused the spout ({details})")
        if code == "NOT_FOUND":
            repo = self.repo
            return ConfigError("OUTPUT_REPO", f"repo {repo.project}/{repo.repo} does not exist "
                               f"on pachd at {self.address} ({details}); create it with "
                               f"pachctl create repo {repo.repo} --project {repo.project}")
        return ConfigError("OUTPUT_REPO", f"pachd at {self.address} refused a commit to "
                           f"{self.repo} ({details})")

    # -- start
    def start(self) -> Record:
        self.client = PachdClient(self.address, self.config.pach_token,
                                  self.config.pach_root_certs, self.repo, self.stop)
        return self._reachable(self._read_record)

    def records_of(self, repos: Sequence[RepoBranch]) -> list[Record]:
        return self._reachable(lambda: [self._newest_record(repo) for repo in repos])

    def _reachable(self, read: Callable):
        """read(), retried with back-off while pachd cannot be reached."""
        import grpc
        backoff = Backoff(self.stop, 1.0, PACHD_BACKOFF_MAX)
        while True:
            try:
                result = read()
                self.unreachable_since = None
                return result
            except grpc.RpcError as error:
                refused = self.refused(error)
                if refused:
                    raise refused from None
                if self.unreachable_since is None:
                    self.unreachable_since = time.monotonic()
                log.warning("cannot reach pachd at %s (%s); retrying in %.0fs", self.address,
                            describe_rpc_error(error), backoff.delay)
            except _ForeignOpenCommit as error:
                log.warning("%s; waiting for it to be finished", error)
            backoff.wait()

    def _read_record(self) -> Record:
        """The record of the newest commit the spout made on the branch. An open head that a
        spout left behind (it died mid-commit) is dropped: its messages are in Kafka still."""
        commit = self.client.head(None)
        if commit is None:
            log.info("repo %s/%s has no branch %s yet: the spout's first commit creates it",
                     self.repo.project, self.repo.repo, self.repo.branch)
        for _ in range(RECORD_SEARCH_COMMITS):
            if commit is None or not commit.id:
                break
            info = self.client.inspect_commit(commit, None)
            description = info.description or ""
            if commit_is_open(info):
                if not description.startswith(DESCRIPTION_TITLE):
                    raise _ForeignOpenCommit(f"the head of {self.repo}, commit {commit.id}, "
                                             "is open and was not started by kafka-spout")
                self.client.drop_commit(commit, None)
                log.warning("dropped commit %s of %s, left open by a spout that stopped "
                            "mid-commit; its messages are read again from Kafka", commit.id,
                            self.repo)
                commit = self.client.head(None)
                continue
            try:
                record = record_from_description(description)
            except ValueError as error:
                raise ConfigError("OUTPUT_REPO", f"commit {commit.id} of {self.repo}: "
                                  f"{error}") from None
            if record is not None:
                log.info("resuming after commit %s of %s: %s", commit.id, self.repo,
                         description.splitlines()[1] if "\n" in description else "")
                return record
            commit = info.parent_commit
        else:
            log.warning("no kafka-spout commit among the newest %d of %s: partitions start "
                        "from the group's offsets, else AUTO_OFFSET_RESET",
                        RECORD_SEARCH_COMMITS, self.repo)
            return Record([], {})
        log.info("no kafka-spout commit on %s yet: partitions start from the group's "
                 "offsets, else AUTO_OFFSET_RESET", self.repo)
        return Record([], {})

    def _newest_record(self, repo: RepoBranch) -> Record:
        """Another repo's newest kafka-spout record, read only: an open commit there (its
        spout killed mid-commit, or not stopped) holds nothing yet and is passed over,
        never dropped."""
        import grpc
        try:
            commit = self.client.head(None, self.client.branch_of(repo))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            raise ConfigError("RESUME_FROM", f"repo {repo.project}/{repo.repo} does not exist "
                              f"on pachd at {self.address} ({error.details()})") from None
        for _ in range(RECORD_SEARCH_COMMITS):
            if commit is None or not commit.id:
                break
            info = self.client.inspect_commit(commit, None)
            if not commit_is_open(info):
                try:
                    record = record_from_description(info.description or "")
                except ValueError as error:
                    raise ConfigError("RESUME_FROM", f"commit {commit.id} of {repo}: "
                                      f"{error}") from None
                if record is not None:
                    return record
            commit = info.parent_commit
        log.warning("RESUME_FROM: no kafka-spout record among the newest %d commits of %s",
                    RECORD_SEARCH_COMMITS, repo)
        return Record([], {})

    # -- delivery
    def send(self, outgoing: Outgoing, deadline: float | None = None) -> None:
        import grpc
        batch = outgoing.batch
        if not batch.members and not outgoing.closed:  # only tombstones: nothing to commit
            self.delivered.append(outgoing)
            return
        ranges = {(tp.topic, tp.partition): (batch.first_offsets[tp], end)
                  for tp, end in batch.offsets.items()}
        description = describe_commit(ranges, batch.records, outgoing.topics,
                                      outgoing.positions, outgoing.stops, outgoing.closed)
        backoff = Backoff(self.stop, 0.1, PACHD_BACKOFF_MAX, deadline)
        while True:
            try:
                self._commit(batch.members, batch.data_bytes, description, deadline)
                self.unreachable_since = None
                break
            except grpc.RpcError as error:
                refused = self.refused(error)
                if refused:
                    raise refused from None
                self.redeliveries += 1
                if self.unreachable_since is None:
                    self.unreachable_since = time.monotonic()
                log.warning("commit to %s at %s failed (%s); writing the batch again, whole, "
                            "in %.1fs", self.repo, self.address, describe_rpc_error(error),
                            backoff.delay)
            backoff.wait()
        self.delivered.append(outgoing)

    def _commit(self, members, size: int, description: str, deadline: float | None) -> None:
        if self.unsettled is not None and self._settle(deadline):
            return  # the last attempt's FinishCommit reached pachd; only its answer was lost
        self.unsettled = _STARTING  # pachd may start the commit and its answer be lost
        commit = self.unsettled = self.client.start_commit(description, deadline)
        if members:
            self.client.put_files(commit, members, size, deadline)
        self.client.finish_commit(commit, description, deadline)
        self.unsettled = None
        log.debug("commit %s: %d file(s)", commit.id, len(members))

    def _settle(self, deadline: float | None) -> bool:
        """After a failed attempt: True if pachd finished its commit after all, else the
        commit is dropped (if it exists) and False."""
        import grpc
        starting = self.unsettled is _STARTING
        # If StartCommit's answer was lost, its commit can only be the branch head, if that
        # is a commit of ours still open.
        commit = self.client.head(deadline) if starting else self.unsettled
        info = None
        if commit is not None and commit.id:
            try:
                info = self.client.inspect_commit(commit, deadline)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        held = info is not None and not starting and not commit_is_open(info)
        if info is not None and commit_is_open(info) and (
                not starting or (info.description or "").startswith(DESCRIPTION_TITLE)):
            self.client.drop_commit(commit, deadline)
            log.info("dropped the unfinished commit %s of %s", commit.id, self.repo)
        self.unsettled = None
        return held

    def held(self, final: bool = False) -> list[Outgoing]:
        delivered, self.delivered = self.delivered, []
        return delivered

    def unreachable(self) -> tuple[float, str] | None:
        since = self.unreachable_since
        return None if since is None else (since, f"pachd at {self.address} is unreachable")

    def redelivered(self) -> int:
        return self.redeliveries

    def close(self, deadline: float) -> None:
        if self.client is None:
            return
        if self.unsettled is not None:
            try:
                self._settle(deadline)
            except Exception as error:  # pachd unreachable: the next start drops it
                log.warning("a commit to %s may be left open (%s); the next start drops it",
                            self.repo, describe_rpc_error(error))
        self.client.close()


_STARTING = object()   # PfsDelivery.unsettled while StartCommit has not answered


class _ForeignOpenCommit(Exception):
    """The branch head is open, and not by a kafka-spout: someone else is writing."""


def make_delivery(config: Config, stop: threading.Event) -> Delivery:
    return PfsDelivery(config, stop) if config.delivery == "pfs" else PipeDelivery(config, stop)


# --------------------------------------------------------------------------- batching
# Records in, files out. The loop hands every polled list to a Batcher and gets each closed
# batch back through ship(); a Batcher decides what a file is (one per message here, one per
# partition and batch for segments) and, through its Rotation, when a batch closes. Kafka
# Connect keeps TopicPartitionWriter (grouping, rotation), the format's RecordWriter and the
# offset commit apart in the same way; the offset commit stays with the loop.

class Batch:
    """Messages waiting to become one archive or commit.

    Per partition it keeps the range and count of messages taken and the bytes they
    weigh, whatever became of them (a file each, a segment's rows, a dead letter, a skipped
    tombstone): take() is the only way in, drop() the only way out, so a rebalance takes
    out exactly what was put in.
    """

    def __init__(self):
        self.members: list[tuple[str, bytes, int]] = []
        self.partitions: list = []     # TopicPartition of each member, for rebalances
        self.offsets: dict = {}        # TopicPartition -> the next offset after its last
        self.first_offsets: dict = {}
        self.counts: dict = {}         # TopicPartition -> messages taken
        self.sizes: dict = {}          # TopicPartition -> their bytes, counted as taken
        self.data_bytes = 0
        self.records = 0
        self.started = 0.0
        # Segments: messages written per topic, once the files are made (a file holds many).
        self.written: dict | None = None

    def take(self, tp, first: int, end: int, count: int, size: int) -> None:
        """Counts `count` messages of tp, offsets first..end-1, weighing `size` bytes."""
        if not self.records:
            self.started = time.monotonic()
        if tp in self.offsets:
            self.counts[tp] += count
            self.sizes[tp] += size
        else:
            self.first_offsets[tp] = first
            self.counts[tp] = count
            self.sizes[tp] = size
        self.offsets[tp] = end
        self.records += count
        self.data_bytes += size

    def drop(self, partitions: set) -> dict:
        """Forgets the messages of these partitions; returns where each one's began."""
        dropped = {}
        for tp in partitions:
            if tp in self.offsets:
                dropped[tp] = self.first_offsets.pop(tp)
                del self.offsets[tp]
                self.records -= self.counts.pop(tp)
                self.data_bytes -= self.sizes.pop(tp)
        if dropped:
            keep = [i for i, tp in enumerate(self.partitions) if tp not in dropped]
            self.members = [self.members[i] for i in keep]
            self.partitions = [self.partitions[i] for i in keep]
        return dropped


class Rotation(NamedTuple):
    """When a batch closes: at this many messages, bytes of message data, or seconds after
    its first message, whichever comes first."""
    max_messages: int
    max_bytes: int
    max_seconds: float

    def due_in(self, batch: Batch) -> float:
        if not batch.records:
            return self.max_seconds
        return batch.started + self.max_seconds - time.monotonic()


class Batcher:
    """Turns polled records into closed batches of files, handing each to ship()."""

    def __init__(self, config: Config, stats: Stats, ship: Callable[[], None]):
        self.rotation = Rotation(config.batch_max_messages, config.batch_max_bytes,
                                 config.batch_max_seconds)
        self.names = NameTemplate(config.name_template)
        self.keep_tombstones = config.tombstones == "keep"
        self.stats = stats
        self.ship = ship
        self.batch = Batch()

    def add(self, records: Mapping) -> None:
        """Batches one poll's records, shipping a batch whenever the rotation closes one."""
        raise NotImplementedError

    def pieces(self, records: Mapping):
        """(partition, records): each partition's polled list whole, or in as few pieces as
        the message limit makes. Lazily: a piece's room is what the batch has left once the
        piece before it is in (and the batch perhaps shipped)."""
        limit_messages = self.rotation.max_messages
        for tp, messages in records.items():
            start, total = 0, len(messages)
            while start < total:
                room = max(limit_messages - self.batch.records, 1)
                piece = messages if start == 0 and total <= room else \
                    messages[start:start + room]
                start += len(piece)
                yield tp, piece

    def piece_size(self, piece: Sequence) -> tuple[list, int]:
        """The piece's values and their bytes; the byte limit itself if a tombstone (None)
        is among them, so that it goes message by message."""
        values = list(map(_VALUE, piece))
        try:
            return values, sum(map(len, values))
        except TypeError:
            return values, self.rotation.max_bytes

    def ship_if_full(self) -> None:
        batch = self.batch
        if batch.records >= self.rotation.max_messages or \
                batch.data_bytes >= self.rotation.max_bytes:
            self.ship()

    def take(self) -> Batch:
        """The open batch, closed, its files made; a new one opens."""
        batch, self.batch = self.batch, Batch()
        return batch

    def drop(self, partitions: set) -> dict:
        """Forgets the open batch's messages of these partitions (a rebalance took them);
        returns where each one's began."""
        return self.batch.drop(partitions)

    def due_in(self) -> float:
        return self.rotation.due_in(self.batch)


class MessageFiles(Batcher):
    """One file per message (FORMAT raw, json, raw+meta), named by NAME_TEMPLATE."""

    def __init__(self, config: Config, stats: Stats, ship: Callable[[], None]):
        super().__init__(config, stats, ship)
        self.shape = decoded_shape(config.format, "key" in config.decode,
                                   config.on_bad_record) if config.decode \
            else FORMATS[config.format]

    def add(self, records: Mapping) -> None:
        """The hot path. A partition's polled list goes in whole, or in as few pieces as the
        message limit makes, with names, sizes and offsets handled per piece; message by
        message only where a piece would reach the byte limit, holds a tombstone, or the
        format is not raw.
        """
        limit_bytes = self.rotation.max_bytes
        raw = self.shape is None
        for tp, piece in self.pieces(records):
            if raw:
                values, size = self.piece_size(piece)
                if self.batch.data_bytes + size < limit_bytes:
                    self._add_piece(tp, piece, values, size)
                    continue
            self._add_each(tp, piece)

    def _add_piece(self, tp, piece: Sequence, values: list, size: int) -> None:
        """Raw values that fit the batch whole, with no tombstone among them."""
        batch = self.batch
        count = len(piece)
        batch.take(tp, piece[0].offset, piece[-1].offset + 1, count, size)
        names = self.names.render_list(tp.topic, tp.partition, piece)
        timestamps = list(map(_TIMESTAMP, piece))
        if min(timestamps) >= 0:
            mtimes = map(operator.floordiv, timestamps, itertools.repeat(1000))
        else:  # -1: the message has no timestamp
            mtimes = (max(timestamp, 0) // 1000 for timestamp in timestamps)
        batch.members.extend(zip(names, values, mtimes))
        batch.partitions.extend(itertools.repeat(tp, count))
        self.ship_if_full()

    def _add_each(self, tp, messages: Sequence) -> None:
        """One message at a time: the byte limit may fall inside, tombstones, other formats."""
        render = self.names.render
        limit_bytes = self.rotation.max_bytes
        limit_messages = self.rotation.max_messages
        shape = self.shape
        keep_tombstones = self.keep_tombstones
        topic, partition = tp.topic, tp.partition
        batch = self.batch
        for record in messages:
            value, offset = record.value, record.offset
            if value is not None and batch.members and \
                    batch.data_bytes + len(value) > limit_bytes:
                self.ship()  # a message over the limit travels alone
                batch = self.batch
            size = 0
            if value is None:
                self.stats.tombstones += 1
            if shape is None:
                if value is not None:
                    timestamp = record.timestamp
                    batch.members.append((render(topic, partition, offset, record.key,
                                                 timestamp), value,
                                          max(timestamp, 0) // 1000))
                    batch.partitions.append(tp)
                    size = len(value)
            elif value is not None or keep_tombstones:
                timestamp = record.timestamp
                name = render(topic, partition, offset, record.key, timestamp)
                for member in shape(name, record, max(timestamp, 0) // 1000):
                    batch.members.append(member)
                    batch.partitions.append(tp)
                    size += len(member[1])
            batch.take(tp, offset, offset + 1, 1, size)
            if batch.records >= limit_messages or batch.data_bytes >= limit_bytes:
                self.ship()
                batch = self.batch


class Segments(Batcher):
    """One file per partition per batch (FORMAT jsonl, parquet), its messages in offset
    order, named by the template with {offset} the file's first. With {date} or {hour} in
    the template, one file per partition and hour of the messages' own timestamps, so that
    no file mixes two hours (Kafka Connect's TimeBasedPartitioner)."""

    def __init__(self, config: Config, stats: Stats, ship: Callable[[], None],
                 decoding: Decoding | None = None):
        super().__init__(config, stats, ship)
        self.writer = DecodedParquetWriter(config, decoding and decoding.schemas) \
            if config.decode and config.format == "parquet" \
            else SEGMENT_WRITERS[config.format](config)
        self.decoding = decoding
        self.format = config.format
        self.rows: dict = {}   # TopicPartition -> the open batch's records to write
        # DECODE: bad records are no rows; ON_BAD_RECORD=dead-letter gives them files of
        # their own under _errors/, in the same batch.
        self.decoded = bool(config.decode)
        self.dead_letters = config.on_bad_record == "dead-letter"

    def add(self, records: Mapping) -> None:
        limit_bytes = self.rotation.max_bytes
        for tp, piece in self.pieces(records):
            size = self.piece_size(piece)[1]
            if self.batch.data_bytes + size < limit_bytes:
                self._add_piece(tp, piece, size)
                continue
            for record in piece:  # the byte limit falls inside, or tombstones
                value = record.value
                size = 0 if value is None else len(value)
                if size and self.batch.records and \
                        self.batch.data_bytes + size > limit_bytes:
                    self.ship()  # a message over the limit travels alone
                self._add_piece(tp, (record,), size)

    def _add_piece(self, tp, piece: Sequence, size: int) -> None:
        self.batch.take(tp, piece[0].offset, piece[-1].offset + 1, len(piece), size)
        if len(piece) == 1 and piece[0].value is None:  # tombstones come one at a time
            self.stats.tombstones += 1
            if not self.keep_tombstones:
                piece = ()
        if self.decoded and any(record.problem is not None for record in piece):
            piece = self._set_aside(self.batch, tp, piece)
        rows = self.rows.get(tp)
        if rows is None:
            rows = self.rows[tp] = []
        rows.extend(piece)
        self.ship_if_full()

    def _set_aside(self, batch: Batch, tp, piece: Sequence) -> list:
        """The piece's good records; its bad ones' dead letters (if any) join the batch."""
        good = []
        for record in piece:
            if record.problem is None:
                good.append(record)
            elif self.dead_letters:
                for member in dead_letter_files(record, max(record.timestamp, 0) // 1000):
                    batch.members.append(member)
                    batch.partitions.append(tp)
        return good

    def take(self) -> Batch:
        """Writes the open batch's segments: one partition at a time, each partition's
        records let go as soon as its files are made (peak memory)."""
        batch = super().take()
        rows, self.rows = self.rows, {}
        written: dict = {}
        render = self.names.render
        for tp in list(rows):
            for segment in self.segments(rows.pop(tp)):
                data, segment = self.encode(tp, segment, batch)
                if not segment:
                    continue
                first = segment[0]
                batch.members.append((render(tp.topic, tp.partition, first.offset, None,
                                             first.timestamp),
                                      data, max(first.timestamp, 0) // 1000))
                batch.partitions.append(tp)
                written[tp.topic] = written.get(tp.topic, 0) + len(segment)
        batch.data_bytes = sum(len(member[1]) for member in batch.members)
        batch.written = written
        return batch

    def encode(self, tp, segment: list, batch: Batch) -> tuple[bytes, list]:
        """The segment's file, and the records in it. With DECODE, records the writer
        cannot take, whatever the reason, are found one by one and set aside as bad records
        (ON_BAD_RECORD), so that one of them never stops the spout."""
        try:
            return self.writer.encode(segment), segment
        except Exception as error:
            if self.decoding is None:
                raise
            failure = error
        good = []
        for record in segment:
            try:
                self.writer.encode([record])
                good.append(record)
            except Exception as error:
                problem = BadRecord("unwritable", f"FORMAT={self.format} cannot hold it "
                                    f"({type(error).__name__}: {error})", record.schema_id)
                self._set_aside(batch, tp, [self.decoding.bad(record, problem)])
        if len(good) == len(segment):
            raise failure   # no one record is the cause
        return (self.writer.encode(good) if good else b""), good

    def segments(self, records: list) -> Iterable[list]:
        """A partition's records in files: all in one, or one per hour of their timestamps,
        each in offset order."""
        if not records:
            return ()
        if not self.names.uses_time:
            groups: Iterable[list] = (records,)
        else:
            hours: dict[int, list] = {}
            for record in records:
                hour = max(record.timestamp, 0) // 3_600_000
                group = hours.get(hour)
                if group is None:
                    group = hours[hour] = []
                group.append(record)
            groups = hours.values()
        schema_key = getattr(self.writer, "schema_key", None)
        if schema_key is None:
            return groups
        return [run for group in groups for run in schema_runs(group, schema_key)]

    def drop(self, partitions: set) -> dict:
        for tp in partitions:
            self.rows.pop(tp, None)
        return self.batch.drop(partitions)


def schema_runs(records: list, schema_key: Callable) -> list[list]:
    """Records in runs of one schema_key, in their order: a file per writer schema, named by
    its first offset. A record whose key is None (a kept tombstone) joins the run it is in."""
    runs: list[list] = []
    current = None
    for record in records:
        key = schema_key(record)
        if runs and (key is None or key == current or current is None):
            runs[-1].append(record)
            if current is None:
                current = key
        else:
            runs.append([record])
            current = key
    return runs


def make_batcher(config: Config, stats: Stats, ship: Callable[[], None],
                 decoding: Decoding | None = None) -> Batcher:
    if config.format in SEGMENT_FORMATS:
        return Segments(config, stats, ship, decoding)
    return MessageFiles(config, stats, ship)


# --------------------------------------------------------------------------- the loop

class Stats:
    def __init__(self):
        self.started = time.monotonic()
        self.messages = self.bytes = self.archives = self.tombstones = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (f"messages={self.messages} bytes={self.bytes} archives={self.archives} "
                f"tombstones={self.tombstones} rate={self.messages / elapsed:.1f} msg/s "
                f"({self.bytes / elapsed / 1e6:.2f} MB/s) since start")

    def fields(self) -> dict:
        """The line's numbers, for LOG_FORMAT=json."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {"messages": self.messages, "bytes": self.bytes, "archives": self.archives,
                "tombstones": self.tombstones,
                "rate_messages_per_second": round(self.messages / elapsed, 1),
                "rate_megabytes_per_second": round(self.bytes / elapsed / 1e6, 2)}


# --------------------------------------------------------------------------- kafka-python fixes

# The kafka-python whose internals the two fixes below replace (requirements.txt pins it).
# Under any other version they are skipped with a warning: a record with a header key that is
# not UTF-8 may then stall its partition again (see tests/test_hostile_records.py).
PATCHED_KAFKA_PYTHON = "3.0.12"


class HeaderKeyBytes(bytes):
    """A record header key that is not UTF-8, kept as its bytes. Kafka's protocol says header
    keys are UTF-8 strings, but no broker checks (Java clients decode them with U+FFFD, losing
    the bytes). kafka-python's fetcher sizes every key with .encode("utf-8"): this answers."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return bytes(self)


def _read_record_keeping_header_keys(batch, decode_varint):
    """kafka-python 3.0.12's DefaultRecordBatch._read_msg (kafka/record/default_records.py),
    line for line, but for a header key that is not UTF-8: kept as HeaderKeyBytes where the
    original raises UnicodeDecodeError. Only records the original refused come here."""
    from kafka.errors import CorruptRecordError
    from kafka.record.default_records import ControlRecord, DefaultRecord
    buffer = batch._buffer
    pos = batch._pos
    length, pos = decode_varint(buffer, pos)
    start_pos = pos
    _, pos = decode_varint(buffer, pos)
    ts_delta, pos = decode_varint(buffer, pos)
    if batch.timestamp_type == batch.LOG_APPEND_TIME:
        timestamp = batch.max_timestamp
    else:
        timestamp = batch.first_timestamp + ts_delta
    offset_delta, pos = decode_varint(buffer, pos)
    offset = batch.base_offset + offset_delta
    fields = []
    for _field in ("key", "value"):
        size, pos = decode_varint(buffer, pos)
        fields.append(bytes(buffer[pos: pos + size]) if size >= 0 else None)
        pos += max(size, 0)
    key, value = fields
    header_count, pos = decode_varint(buffer, pos)
    if header_count < 0:
        raise CorruptRecordError(f"Found invalid number of record headers {header_count}")
    headers = []
    for _header in range(header_count):
        h_key_len, pos = decode_varint(buffer, pos)
        if h_key_len < 0:
            raise CorruptRecordError(f"Invalid negative header key size {h_key_len}")
        raw = bytes(buffer[pos: pos + h_key_len])
        pos += h_key_len
        try:
            h_key = raw.decode("utf-8")
        except UnicodeDecodeError:
            h_key = HeaderKeyBytes(raw)
        h_value_len, pos = decode_varint(buffer, pos)
        if h_value_len >= 0:
            h_value = bytes(buffer[pos: pos + h_value_len])
            pos += h_value_len
        else:
            h_value = None
        headers.append((h_key, h_value))
    if pos - start_pos != length:
        raise CorruptRecordError(
            f"Invalid record size: expected to read {length} bytes in record payload, but "
            f"instead read {pos - start_pos}")
    batch._pos = pos
    record_class = ControlRecord if batch.is_control_batch else DefaultRecord
    return record_class(length, offset, timestamp, batch.timestamp_type, key, value, headers)


def _source_has(function, *lines: str) -> bool:
    import inspect
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return all(line in source for line in lines)


def patch_kafka_python() -> None:
    """Three fixes of kafka-python 3.0.12, applied once, before the first consumer:

    1. A header key that is not UTF-8 (kafka/record/default_records.py,
       DefaultRecordBatch._read_msg decodes it strictly) made the record unreadable: its
       UnicodeDecodeError became a CorruptRecordError. Such a record now reads, the key kept
       as HeaderKeyBytes (docs/formats.md).
    2. Any record that cannot be read hung poll() at 100% CPU, deaf to SIGTERM
       (kafka/consumer/fetcher.py): the PartitionRecords whose generator raised stays
       undrained, its take() then returns [] forever, and Fetcher.fetched_records loops while
       records_remaining > 0. It is now drained once its error is raised, as the Java consumer
       does: the partition is fetched again at the same offset, and poll() raises again, each
       time, until someone seeks past it. Upstream-compatible: nothing else changes.
    3. A TLS handshake with a peer that never answers (KAFKA_SECURITY_PROTOCOL=SSL aimed at a
       plaintext port) waited forever (kafka/net/transport.py, KafkaSSLTransport.handshake
       waits for the socket without a deadline): the consumer's constructor never returned
       and SIGTERM went unheard. The wait now ends after TLS_HANDSHAKE_SECONDS, as a failed
       handshake, which the spout reports and retries with back-off.
    """
    import kafka
    from kafka.consumer.fetcher import Fetcher
    from kafka.errors import KafkaError
    from kafka.record.default_records import DefaultRecordBatch
    if getattr(Fetcher, "_spout_patched", False):
        return
    Fetcher._spout_patched = True
    if kafka.__version__ != PATCHED_KAFKA_PYTHON:
        log.warning("kafka-python %s, not %s: its fixes for header keys that are not UTF-8 "
                    "and for unreadable records hanging poll() are not applied",
                    kafka.__version__, PATCHED_KAFKA_PYTHON)
        return
    read_msg = DefaultRecordBatch._read_msg
    if _source_has(read_msg, 'h_key = buffer[pos: pos + h_key_len].decode("utf-8")',
                   "self._pos = pos"):
        from kafka.record.util import decode_varint

        # Called per record: a plain call, as the original's own signature (a wrapper taking
        # *args and **kwargs cost 0.2 us a record, 2% of the spout's CPU at 200 B).
        def _read_msg(self, decode_varint=decode_varint):
            try:
                return read_msg(self, decode_varint)
            except UnicodeDecodeError:  # self._pos moves only after a whole record
                return _read_record_keeping_header_keys(self, decode_varint)
        DefaultRecordBatch._read_msg = _read_msg
    else:
        log.warning("kafka-python's DefaultRecordBatch._read_msg is not 3.0.12's: header "
                    "keys that are not UTF-8 stay unreadable")
    from kafka.net.transport import KafkaSSLTransport
    if _source_has(KafkaSSLTransport.handshake, "await self._net.wait_read(self._sock)",
                   "await self._net.wait_write(self._sock)"):
        import ssl

        async def handshake(self):
            timeout_at = time.monotonic() + TLS_HANDSHAKE_SECONDS
            while True:
                try:
                    self._sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    await self._net.wait_read(self._sock, timeout_at)
                except ssl.SSLWantWriteError:
                    await self._net.wait_write(self._sock, timeout_at)
        KafkaSSLTransport.handshake = handshake
    else:
        log.warning("kafka-python's KafkaSSLTransport.handshake is not 3.0.12's: a broker "
                    "that never answers the TLS handshake may hang the spout")
    partition_records = Fetcher.PartitionRecords
    take = partition_records.take
    if _source_has(take, "self._next_inline_exception = e") and \
            _source_has(partition_records.drain, "self.record_iterator = None"):
        def take_or_drain(self, n=None):
            try:
                return take(self, n)
            except Exception as error:
                self.drain()
                if isinstance(error, KafkaError):  # say which record: none of its errors do
                    tp = self.topic_partition
                    detail = error.args[0] if error.args else type(error).__name__
                    raise type(error)(f"{tp.topic}/{tp.partition} at offset "
                                      f"{self.next_fetch_offset}: {detail}") from error
                raise
        partition_records.take = take_or_drain
    else:
        log.warning("kafka-python's Fetcher.PartitionRecords is not 3.0.12's: a record that "
                    "cannot be read may hang poll()")


STATS_INTERVAL = 30.0
# SIGTERM to exit within 10 s: a poll (0.5 s) + a commit in progress (2 s) + this + close (1 s).
SHUTDOWN_BUDGET = 6.0
COMMIT_RETRY_SECONDS = 2.0
# A newly assigned partition's committed offset: a broker that takes longer is out of reach,
# and the loop must keep answering a stop.
RESOLVE_TIMEOUT_MS = 5000
# A TLS handshake with a broker takes milliseconds; one that no answer comes to is a port
# without TLS, or no broker at all.
TLS_HANDSHAKE_SECONDS = 5.0
# START_AT and STOP_AT's offsets from the broker (ListOffsets), once per partition assigned.
BOUND_TIMEOUT_MS = 10_000
# Group commits are for restarts and lag, not for delivery: once a second is plenty, and a
# synchronous commit per archive would halve the rate on small messages.
COMMIT_INTERVAL = 1.0
HEALTH_CHECK_INTERVAL = 5.0
PARTITION_CHECK_INTERVAL = 30.0
CONNECT_BACKOFF_MAX = 30.0


class OffsetLedgerError(RuntimeError):
    """An offset was about to pass a message that Pachyderm does not hold: a bug, stopped
    before Kafka or Pachyderm is told anything wrong."""


class Progress:
    """Where one partition stands, each as the next offset after what it covers.

    held <= handed, and polled follows the consumer. Messages in [handed, polled) wait in
    decoding or the open batch; those in [held, handed), in batches sent and not yet held.
    None: not known yet (a partition that starts wherever the consumer's reset puts it).
    """
    __slots__ = ("polled", "handed", "held", "committed", "owned", "resolved", "stop",
                 "reached")

    def __init__(self, offset: int | None = None):
        self.polled = self.handed = self.held = offset
        self.committed: int | None = None   # what this spout last told the group
        self.owned = False
        self.resolved = True   # group mode: False from assignment until its start is known
        self.stop: int | None = None   # STOP_AT: nothing at or past it is taken
        self.reached = False           # a record at or past the stop was polled

    def done(self, position: int | None) -> bool:
        """STOP_AT: nothing before the stop is left to read."""
        return self.stop is not None and (
            self.reached or (self.held is not None and self.held >= self.stop) or
            (position is not None and position >= self.stop))

    def waiting(self) -> bool:
        """Polled messages that Pachyderm does not hold yet."""
        return self.polled is not None and (self.held is None or self.polled > self.held)

    def __repr__(self) -> str:
        return (f"Progress(polled={self.polled}, handed={self.handed}, held={self.held}, "
                f"committed={self.committed}, owned={self.owned}, resolved={self.resolved}, "
                f"stop={self.stop}, reached={self.reached})")


class Ledger:
    """Each partition's progress, owned here alone: what was polled, what waits in decoding
    or a batch, what Pachyderm was handed and what it holds, and what the group was told.
    Every change is one of the methods below, and each keeps the one invariant:

        neither the group's offset nor a record ever passes a message that Pachyderm
        does not hold

    so a group offset is only ever `held`, and a record (the commit description, the
    marker) only ever `handed` at the moment its own batch is handed over: Pachyderm holds
    the batches in the order they were handed (held() refuses any other order), so by the
    time it holds the record it holds all that the record passes; check() verifies it.
    """

    def __init__(self):
        self.partitions: dict = {}        # TopicPartition -> Progress
        self.in_flight: deque = deque()   # Outgoing handed over, not yet held, oldest first
        self.given_up = False             # a batch was given up: nothing may follow it
        self.unresolved: set = set()      # group mode: assigned, start not yet known
        self.bounded = False              # some partition has a stop (STOP_AT)
        # The record Pachyderm held at start: a bounded read's stops, if it closed them.
        self.recorded_stops: dict = {}
        self.closed_stops: dict | None = None

    def __getitem__(self, tp) -> Progress:
        return self.partitions[tp]

    def get(self, tp) -> Progress | None:
        return self.partitions.get(tp)

    # -- where partitions start
    def recorded(self, positions: Mapping, stops: Mapping | None = None,
                 closed: bool = False) -> None:
        """Pachyderm's record (the marker, or the last commit's description): it holds all
        before these offsets; a bounded read's record has its stops, and says whether it
        closed the range."""
        from kafka import TopicPartition
        for key, offset in positions.items():
            self.partitions[TopicPartition(*key)] = Progress(offset)
        self.recorded_stops = {TopicPartition(*key): offset
                               for key, offset in (stops or {}).items()}
        self.closed_stops = dict(self.recorded_stops) if closed else None

    def resumed(self, positions: Mapping, stops: Mapping) -> dict:
        """RESUME_FROM: where other repos' records leave partitions this record lacks; those
        repos hold all before. Returns what was taken."""
        from kafka import TopicPartition
        taken = {}
        for key, offset in positions.items():
            tp = TopicPartition(*key)
            if tp not in self.partitions:
                self.partitions[tp] = Progress(offset)
                taken[tp] = offset
                if key in stops and tp not in self.recorded_stops:
                    self.recorded_stops[tp] = stops[key]
        return taken

    def started(self, tp, offset: int) -> None:
        """Exactly-once: tp is this spout's from offset on (its record, else the group's
        offset or the reset): all before it is held, or was never to be taken."""
        progress = self.partitions.get(tp)
        if progress is None or progress.held != offset:
            progress = self.partitions[tp] = Progress(offset)
        progress.owned = True

    def assigned(self, partitions: Iterable) -> None:
        """Group mode: the group gave these; each starts once resolve() knows where."""
        for tp in partitions:
            progress = self.partitions.get(tp)
            if progress is None:
                progress = self.partitions[tp] = Progress()
            progress.owned, progress.resolved = True, False
            self.unresolved.add(tp)

    def resume_at(self, tp, committed: int | None) -> int | None:
        """Where an assigned partition resumes: past what Pachyderm holds of it (this spout
        handed it over, or its record says so) and past the group's offset (another spout
        delivered that far since). None: nothing known, the consumer's reset decides."""
        held = self.partitions[tp].held
        if held is None:
            return committed
        return held if committed is None else max(held, committed)

    def resolve(self, tp, offset: int | None, committed: int | None) -> None:
        progress = self.partitions[tp]
        if offset is not None:
            if progress.held is not None and offset < progress.held:
                raise OffsetLedgerError(f"{tp.topic}/{tp.partition} would resume at {offset}, "
                                        f"before {progress.held} that Pachyderm holds")
            progress.polled = progress.held = offset
            progress.handed = offset if progress.handed is None else max(progress.handed,
                                                                         offset)
        progress.committed = committed
        progress.resolved = True
        self.unresolved.discard(tp)

    def revoked(self, partitions: Iterable) -> None:
        """The open batch's messages of these were dropped: the next owner reads them again.
        What was handed over stays, to be held (and committed only if they come back)."""
        for tp in partitions:
            progress = self.partitions.get(tp)
            if progress is not None:
                progress.owned, progress.resolved = False, True
                progress.polled = progress.handed
            self.unresolved.discard(tp)

    def forget(self, partitions: Iterable) -> None:
        """Partitions gone from Kafka (their topic deleted): out of records and commits."""
        for tp in partitions:
            progress = self.partitions.pop(tp, None)
            if progress is not None and progress.waiting():
                log.warning("%s/%d is gone from Kafka with offsets %s..%d unheld", tp.topic,
                            tp.partition, progress.held, progress.polled - 1)

    # -- the loop's transitions
    def polled(self, records: Mapping) -> None:
        """A poll's records, before decoding: from now on they wait until Pachyderm holds
        them."""
        partitions = self.partitions
        for tp, messages in records.items():
            if messages:
                progress = partitions.get(tp)
                if progress is None:
                    progress = partitions[tp] = Progress()
                    progress.owned = True
                if progress.held is None:   # started at the consumer's reset
                    progress.held = progress.handed = messages[0].offset
                progress.polled = messages[-1].offset + 1

    def hand_over(self, batch: Batch, topics: tuple, closed: bool = False) -> Outgoing:
        """A closed batch becomes an Outgoing: its record is every partition's `handed`
        once this batch is counted in. closed: the empty batch that ends a bounded read,
        once Pachyderm holds every partition up to its stop."""
        if self.given_up:
            raise Stopped("an earlier batch was given up")
        partitions = self.partitions
        for tp, end in batch.offsets.items():
            progress = partitions.get(tp)
            if progress is None:
                raise OffsetLedgerError(f"a batch holds {tp.topic}/{tp.partition}, which "
                                        "was never polled")
            progress.handed = end if progress.handed is None else max(progress.handed, end)
        positions = {tp: progress.handed for tp, progress in partitions.items()
                     if progress.handed is not None}
        if closed and any(progress.held is None or progress.held < progress.stop
                          for progress in partitions.values() if progress.stop is not None):
            raise OffsetLedgerError("a range closed before Pachyderm holds it to its stops")
        outgoing = Outgoing(batch, topics, positions, self.stops(), closed)
        self.in_flight.append(outgoing)
        return outgoing

    def give_up(self, outgoing: Outgoing) -> None:
        """Delivery stopped half way: the batch stays unheld, and no later one may go."""
        self.given_up = True

    def held(self, outgoing: Outgoing) -> None:
        """Pachyderm holds this batch (the oldest handed over: deliveries keep order)."""
        if not self.in_flight or self.in_flight[0] is not outgoing:
            raise OffsetLedgerError("Pachyderm reports a batch held before the one handed "
                                    "over ahead of it")
        self.in_flight.popleft()
        partitions = self.partitions
        for tp, end in outgoing.batch.offsets.items():
            progress = partitions.get(tp)
            if progress is not None and (progress.held is None or end > progress.held):
                progress.held = end

    def caught_up(self, tp, position: int) -> bool:
        """The consumer's position once Pachyderm holds all polled of tp: past transaction
        markers and aborted records, which no batch carries. True if it moved. Never past
        a stop: what lies beyond is not taken."""
        progress = self.partitions.get(tp)
        if progress is not None and progress.stop is not None:
            position = progress.stop if progress.reached else min(position, progress.stop)
        if progress is None or not progress.owned or not progress.resolved or \
                progress.waiting() or (progress.polled is not None and
                                       position < progress.polled):
            return False
        if progress.held is not None and position <= progress.held:
            return False
        progress.polled = progress.held = position
        progress.handed = position if progress.handed is None else max(progress.handed,
                                                                        position)
        return True

    # -- bounded reads (STOP_AT)
    def set_stop(self, tp, offset: int) -> None:
        self.partitions[tp].stop = offset
        self.bounded = True

    def stops(self) -> dict | None:
        if not self.bounded:
            return None
        return {tp: progress.stop for tp, progress in self.partitions.items()
                if progress.stop is not None}

    def clip(self, records: dict) -> tuple[dict, list]:
        """A poll's records less those at or past their partition's stop; and the partitions
        that got there (to pause: nothing more of them is taken)."""
        reached = []
        for tp, messages in list(records.items()):
            progress = self.partitions.get(tp)
            if progress is None or progress.stop is None or not messages or \
                    messages[-1].offset < progress.stop:
                continue
            progress.reached = True
            reached.append(tp)
            kept = [record for record in messages if record.offset < progress.stop]
            if kept:
                records[tp] = kept
            else:
                del records[tp]
        return records, reached

    def range_closed(self) -> bool:
        """Whether the record Pachyderm holds closed exactly this read's range."""
        stops = self.stops()
        return self.closed_stops is not None and stops == self.closed_stops and all(
            progress.held is not None and progress.held >= progress.stop
            for progress in self.partitions.values() if progress.stop is not None)

    # -- the group's offsets
    def to_commit(self, owned: set | None = None) -> dict:
        """{partition: offset} the group may move to: what Pachyderm holds, where that is
        past what it was last told. Only partitions this spout owns."""
        offsets = {}
        for tp, progress in self.partitions.items():
            held = progress.held
            if held is None or not progress.owned or not progress.resolved or \
                    (owned is not None and tp not in owned):
                continue
            if progress.committed is None or held > progress.committed:
                offsets[tp] = held
        return offsets

    def committed(self, offsets: Mapping) -> None:
        for tp, offset in offsets.items():
            progress = self.partitions.get(tp)
            if progress is not None:
                progress.committed = offset

    # -- questions
    def owned(self) -> set:
        return {tp for tp, progress in self.partitions.items() if progress.owned}

    def owns_any(self) -> bool:
        return any(progress.owned for progress in self.partitions.values())

    def unhanded(self) -> bool:
        """Whether messages wait in decoding or the open batch."""
        return any(progress.polled is not None and progress.handed is not None and
                   progress.polled > progress.handed for progress in self.partitions.values())

    def check(self) -> None:
        """The invariant, partition by partition: raises OffsetLedgerError if broken."""
        reach: dict = {}   # how far the batches in flight reach, per partition
        for outgoing in self.in_flight:
            for tp, end in outgoing.batch.offsets.items():
                reach[tp] = max(reach.get(tp, end), end)
        for tp, progress in self.partitions.items():
            where = f"{tp.topic}/{tp.partition} {progress!r}"
            if progress.held is None:
                continue
            if progress.committed is not None and progress.owned and progress.resolved and \
                    progress.committed > progress.held:
                raise OffsetLedgerError(f"{where}: the group was told more than is held")
            if progress.handed is not None and progress.handed > progress.held and \
                    progress.handed > reach.get(tp, progress.held):
                raise OffsetLedgerError(f"{where}: the record passes messages in no batch")


class Spout:
    """Consumes, batches, delivers, then commits: offsets move only after delivery."""

    def __init__(self, config: Config, stop: threading.Event,
                 delivery: Delivery | None = None):
        self.config = config
        # Every partition's offsets: polled, handed over, held, committed to the group.
        self.ledger = Ledger()
        self.topics = config.topics  # those consumed now: TOPIC, or TOPIC_PATTERN's matches
        self.stop = stop
        self.delivery = delivery or make_delivery(config, stop)
        # DECODE: polls pass through decoding before they are batched; the batcher shapes
        # files from what it made of them.
        self.decoding = Decoding(config, stop) if config.decode else None
        self.stats = Stats()
        self.batcher = make_batcher(config, self.stats, self.flush, self.decoding)
        self.next_commit = 0.0
        self.connected = True
        self.consumer = None
        self.monitor = Monitor()   # main() puts a MetricsMonitor here when METRICS_PORT is set
        self.out_of_range: deque = deque()  # (partition, from, to) reset by kafka-python
        self.missing_reported: set = set()  # PARTITIONS named, absent from their topic
        self.refused_in_authentication = False

    # -- Kafka
    def consumer_options(self) -> dict:
        # read_committed: records of aborted transactions never reach Pachyderm.
        # metadata_max_age_ms: new partitions and TOPIC_PATTERN's new topics appear in
        # kafka-python's metadata only when it is refreshed; 5 minutes by default.
        # reconnect_backoff_max_ms: kafka-python's 30 s (Java's is 1 s) left the spout idle
        # for up to 17 s after a restarted broker was back; with 1 s, 1-2 s.
        # allow_auto_create_topics: a reader creates no topic, and a deleted topic's
        # partitions, still fetched until the next metadata refresh, must not bring it back
        # (brokers create topics on request by default: Apache Kafka, Tansu).
        options = {"bootstrap_timeout_ms": 3000, "max_poll_records": 1000,
                   "max_partition_fetch_bytes": 4 * 1024 * 1024,
                   "isolation_level": "read_committed", "metadata_max_age_ms": 30_000,
                   "reconnect_backoff_max_ms": 1000, "allow_auto_create_topics": False}
        options.update(self.config.kafka_options)
        if self.config.group_instance_id and not self.config.exactly_once:
            options["group_instance_id"] = self.config.group_instance_id
        options.update(bootstrap_servers=list(self.config.bootstrap_servers),
                       group_id=self.config.group_id,
                       auto_offset_reset=self.config.auto_offset_reset,
                       enable_auto_commit=False)
        return options

    def watch_kafka_python(self) -> None:
        """Learns two things kafka-python tells only in INFO log records, which stay hidden:

        - a partition whose fetch offset is out of range (retention deleted it) is reset to
          AUTO_OFFSET_RESET; the fetcher's record is the only place the old offset is known;
        - a broker that refuses SASL credentials answers and closes the connection, and
          kafka-python 3.0.12 drops that answer with the close: a connection lost after its
          ApiVersions exchange and before "Connected" was lost in SASL authentication.
        """
        lost_at: dict = {}  # partition: the offset found out of range, until its reset
        authenticating: set = set()
        sasl = str(self.config.kafka_options.get("security_protocol", "")).startswith("SASL")

        def fetcher(record: logging.LogRecord) -> bool:
            if record.msg == "Fetch offset %s is out of range for topic-partition %s":
                lost_at[record.args[1]] = record.args[0]
            elif record.msg == "Resetting offset for partition %s to offset %s." and \
                    record.args[0] in lost_at:
                partition, offset = record.args
                self.out_of_range.append((partition, lost_at.pop(partition), offset))
            return record.levelno >= logging.WARNING

        def connection(record: logging.LogRecord) -> bool:
            conn = id(record.args[0]) if isinstance(record.args, tuple) and record.args \
                else None
            if str(record.msg).startswith("%s: Broker version identified") and sasl:
                authenticating.add(conn)
            elif record.msg == "%s: Connected":
                authenticating.discard(conn)
                self.refused_in_authentication = False
            elif record.msg == "%s: Connection lost: %s" and conn in authenticating:
                authenticating.discard(conn)
                self.refused_in_authentication = True
            return record.levelno >= logging.WARNING

        for name, capture in (("kafka.consumer.fetcher", fetcher),
                              ("kafka.net.connection", connection)):
            logger = logging.getLogger(name)
            logger.addFilter(capture)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)

    def report_offset_resets(self) -> None:
        while self.out_of_range:
            tp, lost_at, now_at = self.out_of_range.popleft()
            if now_at >= lost_at:
                gap = f"offsets {lost_at}..{now_at - 1} ({now_at - lost_at}) are skipped"
            else:
                gap = "the log ends before it; the broker lost or truncated records"
            log.warning("%s/%d: offset %d is out of range on %s (deleted by retention?); "
                        "AUTO_OFFSET_RESET=%s restarts it at offset %s: %s", tp.topic,
                        tp.partition, lost_at, self.config.broker_address,
                        self.config.auto_offset_reset, now_at, gap)

    def lag(self) -> int | None:
        """Messages still to read, from the high watermark that fetches carry (ListOffsets
        may be wrong on Kafka-protocol brokers such as Tansu). Includes open transactions."""
        if self.consumer is None:
            return None
        total, known = 0, False
        try:
            for tp in self.consumer.assignment():
                highwater = self.consumer.highwater(tp)
                position = self.fetch_position(tp)
                if highwater is not None and position is not None:
                    total += max(highwater - position, 0)
                    known = True
        except Exception:  # the assignment changed under us: no figure this time
            return None
        return total if known else None

    def fetch_position(self, tp, fetchable: bool = False) -> int | None:
        """The next offset the consumer reads of a partition: past every record poll() has
        returned and every one read_committed skipped (transaction markers, aborted
        transactions), never past one still to return. None while unknown, or, if fetchable,
        while paused, awaiting a reset, validation or revocation.

        position() may ask the coordinator or reset; kafka-python's local state does not.
        """
        state = self.consumer._subscription.assignment.get(tp)
        if state is None or state.position is None or (fetchable and not state.is_fetchable()):
            return None
        return state.position.offset

    def connect(self) -> bool:
        """Creates the consumer, retrying with back-off while the broker is unreachable."""
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError, SaslAuthenticationFailedError
        patch_kafka_python()
        backoff = Backoff(self.stop, 1.0, CONNECT_BACKOFF_MAX)
        while True:
            self.refused_in_authentication = False
            kafka_failures.cause = None
            try:
                self.consumer = KafkaConsumer(**self.consumer_options())
                self.monitor.kafka_reachable(True)
                return True
            except KafkaError as error:
                self.monitor.kafka_reachable(False)
                if self.stop.is_set():
                    return False
                if self.refused_in_authentication or isinstance(
                        error, SaslAuthenticationFailedError):
                    log.warning("Kafka at %s refused this spout in SASL authentication "
                                "(%s): the username or password is probably wrong (%s); "
                                "retrying in %.0fs", self.config.broker_address,
                                self.config.kafka_options.get("sasl_mechanism"), error,
                                backoff.delay)
                else:
                    log.warning("cannot reach Kafka at %s: %s; retrying in %.0fs",
                                self.config.broker_address,
                                kafka_failures.cause or describe_kafka_failure(error),
                                backoff.delay)
            try:
                backoff.wait()
            except Stopped:
                return False

    def subscribe(self) -> None:
        from kafka import ConsumerRebalanceListener
        spout = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                spout.on_revoked(set(revoked))

            def on_partitions_assigned(self, assigned):
                spout.on_assigned(set(assigned))

        if self.config.topic_pattern is not None:
            # kafka-python matches from the start of the name; \Z makes it the whole name.
            self.consumer.subscribe(pattern=f"(?:{self.config.topic_pattern})\\Z",
                                    listener=Listener())
        else:
            self.consumer.subscribe(list(self.config.topics), listener=Listener())
            # The topics' partitions in kafka-python's metadata before the first join. Else
            # the leader assigns from metadata without them, rejoins when they arrive, and
            # kafka-python 3.0.12 can drop that rejoin's result when the poll that awaited
            # it times out first: no partitions and no heartbeats, for good (seen against
            # Apache Kafka 4.1). After subscribe(), so that the group's snapshot has them.
            from kafka.errors import KafkaError
            try:
                for topic in self.config.topics:
                    self.consumer.partitions_for_topic(topic)
            except KafkaError as error:
                log.debug("metadata before joining failed (%s); joining anyway", error)

    def adopt_record(self, record: Record | None) -> None:
        """Where Pachyderm's record says each partition resumes."""
        if record is None:
            return
        topics, positions = record
        if topics and self.config.topics and sorted(topics) != sorted(self.config.topics):
            log.info("the record was written for topics %s; resuming those still configured",
                     ",".join(topics))
        stops = getattr(record, "stops", None)
        if self.config.partitions is not None:  # its record holds its partitions only
            positions = self.owned_only(positions)
            stops = stops and self.owned_only(stops)
        self.ledger.recorded(positions, stops, getattr(record, "closed", False))

    def owned_only(self, offsets: Mapping) -> dict:
        return {key: offset for key, offset in offsets.items()
                if key[1] in self.config.partitions}

    def adopt_resume_records(self, records: list[Record]) -> None:
        """RESUME_FROM: a partition this spout's record lacks starts where the spouts it
        replaces left it, the largest offset their newest records give; their stops go too."""
        resume, stops = {}, {}
        for record in records:
            for key, offset in record[1].items():
                resume[key] = max(offset, resume.get(key, offset))
            for key, offset in (getattr(record, "stops", None) or {}).items():
                stops[key] = max(offset, stops.get(key, offset))
        if self.config.partitions is not None:
            resume, stops = self.owned_only(resume), self.owned_only(stops)
        taken = self.ledger.resumed(resume, stops)
        if taken:
            log.info("RESUME_FROM %s: %s", ",".join(map(str, self.config.resume_from)),
                     ", ".join(f"{topic}/{partition}@{offset}"
                               for (topic, partition), offset in sorted(taken.items())))

    def bound_offsets(self, bound: ReadBound, partitions: list) -> dict:
        """Each partition's offset for START_AT or STOP_AT; None where explicit offsets do not
        name it. Under read_committed the end is the last stable offset."""
        if bound.kind == "offsets":
            return {tp: bound.offsets.get((tp.topic, tp.partition)) for tp in partitions}
        if bound.kind == "earliest":
            return self.consumer.beginning_offsets(partitions, timeout_ms=BOUND_TIMEOUT_MS)
        ends = self.consumer.end_offsets(partitions, timeout_ms=BOUND_TIMEOUT_MS)
        if bound.kind != "time":
            return ends
        found = self.consumer.offsets_for_times({tp: bound.time_ms for tp in partitions},
                                                timeout_ms=BOUND_TIMEOUT_MS)
        return {tp: ends[tp] if found.get(tp) is None else found[tp].offset
                for tp in partitions}

    def check_named_partitions(self, partitions: set) -> None:
        """Explicit START_AT or STOP_AT offsets name only partitions this spout reads."""
        for name, bound in (("START_AT", self.config.start_at),
                            ("STOP_AT", self.config.stop_at)):
            if bound is None or bound.kind != "offsets":
                continue
            for topic, partition in sorted(bound.offsets):
                if (topic, partition) not in partitions:
                    raise ConfigError(name, f"{topic}/{partition} is no partition this spout "
                                      f"reads (topics: {', '.join(self.topics) or 'none'})")

    def set_stops(self, partitions: list, first: bool) -> None:
        """STOP_AT for newly assigned partitions. `end` is the end as the read began: a
        restart keeps the stops its record names."""
        bound = self.config.stop_at
        recorded = self.ledger.recorded_stops if bound.kind == "end" else {}
        stops = {tp: recorded[tp] for tp in partitions if tp in recorded}
        todo = [tp for tp in partitions if tp not in stops]
        if todo:
            stops.update(self.bound_offsets(bound, todo))
        for tp in partitions:
            stop = stops.get(tp)
            if stop is None:
                if first:
                    raise ConfigError("STOP_AT", f"names no stop for {tp.topic}/{tp.partition}:"
                                      " name every partition, or use end or a time")
                stop = self.ledger[tp].held
                log.warning("%s/%d appeared after the read began and STOP_AT names it not: "
                            "nothing of it is taken", tp.topic, tp.partition)
            self.ledger.set_stop(tp, stop)
        log.info("STOP_AT=%s: %s", bound, ", ".join(
            f"{tp.topic}/{tp.partition} up to {self.ledger[tp].stop}" for tp in partitions))

    def assign(self) -> None:
        """Exactly-once mode: every partition of the topics, resumed where the record says.

        A spout runs as one worker, so there is no group to share partitions with; called
        again now and then, this picks up partitions added to the topics later.
        """
        from kafka import TopicPartition
        if self.config.topic_pattern is not None:
            self.topics = tuple(sorted(t for t in self.consumer.topics()
                                       if self.config.wants_topic(t)))
        wanted = {TopicPartition(topic, partition) for topic in self.topics
                  for partition in self.consumer.partitions_for_topic(topic) or ()}
        if self.config.partitions is not None:
            wanted = {tp for tp in wanted if tp.partition in self.config.partitions}
            self.report_missing_partitions(wanted)
        owned = self.ledger.owned()
        gone = owned - wanted
        if gone:  # deleted, or only missing from metadata for now: ask afresh
            existing = self.consumer.topics()
            wanted |= {tp for tp in gone if tp.topic in existing}
            gone = owned - wanted
        new = wanted - owned
        if not new and not gone:
            return
        self.consumer.assign(sorted(wanted))
        if gone:
            # Deleted topics: their offsets can no longer be committed, and a commit naming
            # them fails for every partition.
            log.warning("no longer in Kafka: %s", ", ".join(
                f"{tp.topic}/{tp.partition}" for tp in sorted(gone)))
            self.batcher.drop(gone)
            self.ledger.forget(gone)
        first = not owned
        if first:
            self.check_named_partitions(wanted)
        fresh = [tp for tp in sorted(new)
                 if self.ledger.get(tp) is None or self.ledger[tp].held is None]
        starts = self.bound_offsets(self.config.start_at, fresh) \
            if self.config.start_at is not None and fresh else {}
        for tp in sorted(new):
            progress = self.ledger.get(tp)
            if progress is not None and progress.held is not None:
                self.consumer.seek(tp, progress.held)
            elif starts.get(tp) is not None:
                self.consumer.seek(tp, starts[tp])   # START_AT, before the group's offset
            # Else the group's committed offset, else AUTO_OFFSET_RESET.
            self.ledger.started(tp, self.consumer.position(tp, timeout_ms=10_000))
        if new:
            log.info("assigned %s", ", ".join(f"{tp.topic}/{tp.partition}@"
                                              f"{self.ledger[tp].held}" for tp in sorted(new)))
            if self.config.stop_at is not None:
                self.set_stops(sorted(new), first)

    def report_missing_partitions(self, found: set) -> None:
        """PARTITIONS names partitions a topic does not have (yet): said once, waited for."""
        for topic in self.topics:
            for partition in sorted(self.config.partitions):
                tp = (topic, partition)
                if tp in found:
                    continue
                if tp in self.missing_reported:
                    log.debug("PARTITIONS: %s/%d still absent", topic, partition)
                else:
                    self.missing_reported.add(tp)
                    log.warning("PARTITIONS names %s/%d, which the topic does not have: "
                                "taken once it appears", topic, partition)

    def on_revoked(self, revoked: set) -> None:
        """Drops the batched messages of revoked partitions: not written yet, so whoever owns
        a partition next reads them again from the committed offset.

        No commits here (kafka-python forbids blocking calls in rebalance callbacks), and
        a partition may come straight back to this spout with its position kept: so the
        position goes back to the first dropped message, and batches already handed over
        stay, held in time, committed only if the partition is ours again by then.
        """
        if revoked:
            log.info("revoked %s", sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))
        for tp, offset in self.batcher.drop(revoked).items():
            self.consumer.seek(tp, offset)
        self.ledger.revoked(revoked)

    def on_assigned(self, assigned: set) -> None:
        """Group mode. A partition must not start before Pachyderm's hold of it is weighed
        against the group's offset, which takes a blocking call that kafka-python forbids
        here: pause it until resolve_assigned()."""
        log.info("assigned %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        if assigned:
            self.consumer.pause(*assigned)
            self.ledger.assigned(assigned)

    def resolve_assigned(self) -> None:
        """A newly assigned partition resumes at the larger of the group's committed offset
        and what Pachyderm holds of it (this spout's record, or its batches held): a larger
        group offset means another spout delivered those messages since; a larger hold, that
        this one did and the group commit did not follow (it crashed, or lost the partition,
        in between). Knowing the group's offset also keeps a batch held late from moving it
        back. A broker that does not answer leaves the partition paused until next time."""
        from kafka.errors import KafkaError
        self.take_held()
        owned = self.consumer.assignment()
        for tp in sorted(self.ledger.unresolved & owned):
            try:
                committed = self.consumer.committed(tp, timeout_ms=RESOLVE_TIMEOUT_MS)
            except KafkaError as error:
                log.warning("cannot learn the group's offset of %s/%d from %s (%s: %s); "
                            "it stays paused, retrying", tp.topic, tp.partition,
                            self.config.broker_address, type(error).__name__, error)
                return
            resume_at = self.ledger.resume_at(tp, committed)
            if resume_at is None and self.config.start_at is not None:
                resume_at = self.bound_offsets(self.config.start_at, [tp])[tp]
            if resume_at is not None and resume_at != committed:
                self.consumer.seek(tp, resume_at)
            self.ledger.resolve(tp, resume_at, committed)
            self.consumer.resume(tp)
            log.info("%s/%d resumes at %s (held %s, group %s)", tp.topic, tp.partition,
                     "the reset" if resume_at is None else resume_at,
                     self.ledger[tp].held, committed)

    def adopt_consumer_positions(self) -> None:
        """Once Pachyderm holds everything polled of a partition, the consumer's position is
        its delivered point: past transaction markers and aborted records, which no batch
        carries. So the group's offsets, the lag and the next commit's record reach the end
        of an idle transactional topic, and nothing is written to Pachyderm for it: its
        record may trail by markers until the next batch.

        Only partitions this spout owns and can fetch: one paused until resolve_assigned(),
        or awaiting its committed offset after an assignment, has a stale position or none.
        """
        moved = {}
        ledger = self.ledger
        try:
            for tp in self.consumer.assignment():
                progress = ledger.get(tp)
                if progress is None or progress.waiting():
                    continue
                # Paused at its stop: all before the stop was read.
                position = progress.stop if progress.reached else \
                    self.fetch_position(tp, True)
                if position is not None and ledger.caught_up(tp, position):
                    moved[tp] = position
        except Exception:  # the assignment changed under us: next time
            return
        if moved:
            self.monitor.caught_up(moved)

    def take_held(self, batches: Iterable[Outgoing] | None = None) -> None:
        """What Pachyderm now holds, into the ledger."""
        for outgoing in self.delivery.held() if batches is None else batches:
            self.ledger.held(outgoing)
            self.monitor.held(outgoing)

    def commit(self, timeout_ms: int = 2000, final: bool = False) -> None:
        self.take_held()
        self.adopt_consumer_positions()
        if time.monotonic() < self.next_commit and not final:
            return
        self.next_commit = time.monotonic() + COMMIT_INTERVAL
        offsets = self.ledger.to_commit(None if self.config.exactly_once
                                        else self.consumer.assignment())
        if not offsets:
            return
        self.ledger.check()
        from kafka.structs import OffsetAndMetadata
        try:
            self.consumer.commit({tp: OffsetAndMetadata(offset, "", -1)
                                  for tp, offset in offsets.items()}, timeout_ms=timeout_ms)
            log.debug("committed %s", {f"{tp.topic}/{tp.partition}": offset
                                       for tp, offset in offsets.items()})
            self.ledger.committed(offsets)
        except Exception as error:  # kept, and tried again with the next commit
            self.next_commit = time.monotonic() + COMMIT_RETRY_SECONDS
            log.warning("offset commit to %s failed (%s: %s); will retry",
                        self.config.broker_address, type(error).__name__, error)

    def check_connection(self) -> None:
        """Says once when every broker connection is gone, and once when one is back.

        kafka-python reconnects by itself; its own messages do not name the address.
        """
        metrics = self.consumer.metrics().get("consumer-metrics", {})
        connected = metrics.get("connection-count", 1) > 0
        self.monitor.kafka_reachable(connected)
        if connected != self.connected:
            self.connected = connected
            if connected:
                kafka_failures.cause = None
                log.info("connected to Kafka at %s again", self.config.broker_address)
            else:
                log.warning("lost contact with Kafka at %s%s; reconnecting with back-off",
                            self.config.broker_address,
                            f" ({kafka_failures.cause})" if kafka_failures.cause else "")

    # -- batching
    @property
    def batch(self) -> Batch:
        """The open batch."""
        return self.batcher.batch

    def add(self, records: Mapping) -> None:
        self.batcher.add(records)

    def flush(self, deadline: float | None = None) -> None:
        batch = self.batcher.take()
        if not batch.records:
            return
        outgoing = self.ledger.hand_over(batch, self.topics)
        try:
            self.delivery.send(outgoing, deadline)
        except Stopped:
            # Whatever follows would record positions past this batch's messages.
            self.ledger.give_up(outgoing)
            raise
        if batch.members:
            self.stats.archives += 1
            self.stats.messages += batch.records
            self.stats.bytes += batch.data_bytes
            log.debug("batch of %d file(s), %d bytes, offsets %s", len(batch.members),
                      batch.data_bytes, {f"{tp.topic}/{tp.partition}": offset
                                         for tp, offset in batch.offsets.items()})

    def batch_due_in(self) -> float:
        return self.batcher.due_in()

    # -- the loop
    def run(self) -> int:
        self.watch_kafka_python()
        try:
            self.adopt_record(self.delivery.start())
            if self.config.resume_from:
                self.adopt_resume_records(self.delivery.records_of(self.config.resume_from))
        except Stopped:
            log.info("stopped before Pachyderm was reachable")
            return 0
        if not self.connect():
            log.info("stopped before Kafka was reachable")
            self.delivery.close(time.monotonic() + 1.0)
            return 0
        try:
            return self.consume()
        except (ConfigError, BadRecordFailure):
            # Pachyderm or the registry refused the spout, or ON_BAD_RECORD=fail met a bad
            # record: stop without committing anything more.
            self.delivery.close(time.monotonic() + 1.0)
            self.consumer.close(autocommit=False, timeout_ms=1000)
            raise

    def consume(self) -> int:
        if self.config.exactly_once:
            self.assign()
        else:
            self.subscribe()
        next_stats = time.monotonic() + STATS_INTERVAL
        # New partitions show up in kafka-python's metadata, refreshed this often.
        partition_check_interval = min(PARTITION_CHECK_INTERVAL, self.consumer.config.get(
            "metadata_max_age_ms", 300_000) / 1000)
        next_partition_check = time.monotonic() + partition_check_interval
        next_health_check = time.monotonic() + HEALTH_CHECK_INTERVAL
        from kafka.errors import CorruptRecordError, KafkaError
        next_unreadable_warning = 0.0
        try:
            while not self.stop.is_set():
                timeout = min(max(self.batch_due_in(), 0.0), 0.5)
                try:
                    if self.config.exactly_once and (not self.ledger.owns_any() or
                                               time.monotonic() >= next_partition_check):
                        next_partition_check = time.monotonic() + partition_check_interval
                        self.assign()
                    if self.config.exactly_once and not self.ledger.owns_any():
                        log.warning("topics %s have no partitions yet; waiting",
                                    ",".join(self.topics) or self.config.topic_pattern)
                        self.stop.wait(min(partition_check_interval, 5.0))
                        continue
                    records = self.consumer.poll(timeout_ms=int(timeout * 1000))
                except CorruptRecordError as error:
                    # A record kafka-python cannot read: its partition waits there (fetched
                    # and raised again each poll), the others go on. Kafka answers: no outage.
                    if time.monotonic() >= next_unreadable_warning:
                        next_unreadable_warning = time.monotonic() + STATS_INTERVAL
                        log.warning("cannot read a record from %s (%s: %s); its partition "
                                    "waits there, the others go on",
                                    self.config.broker_address, type(error).__name__, error)
                    records = None
                    self.stop.wait(0.1)
                except KafkaError as error:
                    log.warning("polling %s failed (%s: %s); retrying",
                                self.config.broker_address, type(error).__name__, error)
                    self.monitor.kafka_reachable(False)
                    records = None
                    self.stop.wait(1.0)
                if self.out_of_range:
                    self.report_offset_resets()
                if records:
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("polled %d record(s)", sum(map(len, records.values())))
                    if self.ledger.bounded:
                        records, reached = self.ledger.clip(records)
                        if reached:
                            self.consumer.pause(*reached)
                            log.info("reached STOP_AT: %s", ", ".join(
                                f"{tp.topic}/{tp.partition}" for tp in reached))
                if records:
                    self.ledger.polled(records)
                    self.monitor.polled(records)
                    if self.decoding is not None:
                        records = self.decoding.decode(records)  # waits out the registry
                    tombstones = self.stats.tombstones
                    self.add(records)
                    if self.stats.tombstones != tombstones:
                        self.monitor.tombstones_seen(records, self.stats.tombstones - tombstones)
                if self.ledger.unresolved:
                    self.resolve_assigned()
                if self.batch.records and self.batch_due_in() <= 0:
                    self.flush()
                self.delivery.check()
                self.commit()
                if self.ledger.bounded and self.read_to_stops():
                    return self.finish()
                self.monitor.refresh()
                if time.monotonic() >= next_health_check:
                    self.check_connection()
                    next_health_check += HEALTH_CHECK_INTERVAL
                if time.monotonic() >= next_stats:
                    lag = self.lag()
                    log.info("%s lag=%s", self.stats.line(), lag,
                             extra={"fields": {**self.stats.fields(), "lag": lag}})
                    next_stats += STATS_INTERVAL
        except Stopped:
            pass
        return self.shutdown()

    def read_to_stops(self) -> bool:
        """STOP_AT: every partition read up to its stop (nothing before it left in Kafka)."""
        return all(progress.done(self.fetch_position(tp))
                   for tp, progress in self.ledger.partitions.items() if progress.owned)

    def await_held(self) -> None:
        """Until Pachyderm holds every batch sent (1.x: the reader has read it all)."""
        while self.ledger.in_flight:
            self.delivery.check()
            self.take_held(self.delivery.held(final=True))
            if self.ledger.in_flight and self.stop.wait(0.05):
                raise Stopped("stopping")

    def finish(self) -> int:
        """The end of a bounded read: the last batch, and once Pachyderm holds every
        partition up to its stop, a commit (1.x: an archive of the marker alone) whose record
        says the range is closed, then the group's offsets. Exits, or idles in a pipeline,
        which would only restart a spout that exits."""
        log.info("every partition reached STOP_AT=%s: delivering the last batch",
                 self.config.stop_at)
        self.flush()
        self.await_held()
        self.adopt_consumer_positions()
        if self.ledger.range_closed():
            log.info("the range was closed already: nothing to do")
        else:
            outgoing = self.ledger.hand_over(Batch(), self.topics, closed=True)
            try:
                self.delivery.send(outgoing)
            except Stopped:
                self.ledger.give_up(outgoing)
                raise
            self.await_held()
        self.commit(final=True)
        self.delivery.close(time.monotonic() + 1.0)
        lag = self.lag()
        self.consumer.close(autocommit=False, timeout_ms=1000)
        self.monitor.finished()
        log.info("range closed at %s; %s", ", ".join(
            f"{tp.topic}/{tp.partition}={offset}"
            for tp, offset in sorted(self.ledger.stops().items())), self.stats.line(),
            extra={"fields": {**self.stats.fields(), "lag": lag}})
        if self.config.in_pipeline:
            log.info("in a pipeline (PPS_PIPELINE_NAME is set), which restarts a spout that "
                     "exits: idling until stopped")
            self.stop.wait()
        return 0

    def shutdown(self) -> int:
        deadline = time.monotonic() + SHUTDOWN_BUDGET
        log.info("stopping: delivering the pending batch")
        try:
            self.flush(deadline)
            self.take_held(self.delivery.drain(deadline))
        except Stopped:
            log.warning("Pachyderm did not take the last batch in time; its messages stay "
                        "uncommitted and will be read again")
        remaining_ms = int(min(max(deadline - time.monotonic(), 0.5), 3.0) * 1000)
        self.commit(timeout_ms=remaining_ms, final=True)
        self.delivery.close(deadline + 1.0)
        lag = self.lag()
        self.consumer.close(autocommit=False, timeout_ms=1000)
        log.info("stopped; %s lag=%s", self.stats.line(), lag,
                 extra={"fields": {**self.stats.fields(), "lag": lag}})
        return 0


# --------------------------------------------------------------------------- metrics and health

# Kafka or Pachyderm out of reach this long fails /healthz; shorter absences are routine (a
# 1.8-1.10 reader reopens the pipe for every archive, kafka-python reconnects by itself).
HEALTH_GRACE_SECONDS = 5.0
# The metrics server's bounds: a thread per connection, so a cap on connections; a timeout on
# each socket operation; a cap on a request's line and headers (a GET has no body).
METRICS_MAX_CONNECTIONS = 32
METRICS_CONNECTION_SECONDS = 5.0
METRICS_REQUEST_HEAD_BYTES = 16 * 1024
# Lag and offsets are refreshed this often, between polls: per partition, not per message.
METRICS_REFRESH_SECONDS = 0.5
_FILES_PER_MESSAGE = {"raw": 1, "json": 1, "raw+meta": 2, "jsonl": 1, "parquet": 1}  # 1: unused
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
BATCH_MESSAGES_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000)
BATCH_BYTES_BUCKETS = tuple(1024 * 4**n for n in range(10))   # 1 KiB .. 256 MiB


class Monitor:
    """What the loop tells as it goes, in its own thread. This one ignores it: no
    METRICS_PORT, no server, no thread."""

    def polled(self, records: Mapping) -> None:
        """A non-empty poll, about to go into the batch (which may be delivered on the way)."""

    def tombstones_seen(self, records: Mapping, count: int) -> None:
        """That poll held this many null values."""

    def held(self, outgoing: Outgoing) -> None:
        """Pachyderm holds this batch now."""

    def caught_up(self, offsets: dict) -> None:
        """Pachyderm holds all that precedes these offsets that Kafka gives (what lies
        between is transaction markers and aborted records)."""

    def kafka_reachable(self, reachable: bool) -> None:
        """Whether the consumer could reach a broker, as last found out."""

    def refresh(self) -> None:
        """Between polls."""

    def finished(self) -> None:
        """A bounded read is complete: nothing waits any more."""

    def close(self) -> None:
        """At exit."""


class MetricsMonitor(Monitor):
    """Prometheus metrics and the health rule, served over HTTP from a thread of its own.

    Counters move when Pachyderm holds a batch (Delivery.held), never per message. The
    server's thread reads plain attributes that the loop's thread sets: the loop may be
    stuck in a delivery, and that is exactly when /healthz must answer.
    """

    def __init__(self, config: Config, spout: Spout):
        import prometheus_client as prometheus
        prometheus.disable_created_metrics()  # a _created series beside each counter: noise
        self.prometheus = prometheus
        self.config = config
        self.spout = spout
        self.registry = registry = prometheus.CollectorRegistry()
        prometheus.ProcessCollector(registry=registry)

        def metric(kind, name, text, labels=(), **options):
            return kind(name, text, labels, namespace="kafka_spout", registry=registry,
                        **options)
        counter, gauge, histogram = prometheus.Counter, prometheus.Gauge, prometheus.Histogram
        self.messages = metric(counter, "messages", "Messages in commits Pachyderm holds",
                               ["topic"])
        self.bytes = metric(counter, "bytes", "Bytes of the files in commits Pachyderm holds "
                            "(the values' bytes with FORMAT=raw)", ["topic"])
        self.commits = metric(counter, "commits", "Commits Pachyderm holds (1.x: archives "
                              "its reader took)")
        self.redeliveries = metric(counter, "redeliveries", "Archives or commits written "
                                   "again after a lost reader or a failed commit")
        self.tombstones = metric(counter, "tombstones", "Null values seen", ["topic"])
        self.lag = metric(gauge, "consumer_lag", "High watermark minus the next offset "
                          "Pachyderm holds", ["topic", "partition"])
        self.delivered_offset = metric(gauge, "delivered_offset", "The next offset "
                                       "Pachyderm holds: where a restart resumes",
                                       ["topic", "partition"])
        self.last_delivery = metric(gauge, "last_delivery_timestamp_seconds", "When "
                                    "Pachyderm last took a commit (Unix time)")
        self.latency = metric(histogram, "delivery_latency_seconds", "From a batch's first "
                              "message polled to its commit held", buckets=LATENCY_BUCKETS)
        self.batch_messages = metric(histogram, "batch_messages", "Messages per commit",
                                     buckets=BATCH_MESSAGES_BUCKETS)
        self.batch_bytes = metric(histogram, "batch_bytes", "Bytes per commit",
                                  buckets=BATCH_BYTES_BUCKETS)
        self.bad_records = metric(counter, "bad_records", "Messages DECODE could not handle "
                                  "(dead-lettered or skipped, by ON_BAD_RECORD)",
                                  ["topic", "reason"])
        self.counted_bad_records: dict = {}
        prometheus.Info("kafka_spout", "The spout's version and settings",
                        registry=registry).info({
                            "version": __version__, "delivery": config.delivery,
                            "mode": config.mode,
                            "topics": ",".join(config.topics) or str(config.topic_pattern)})
        for topic in config.topics:  # series from the start: rate() needs a first sample
            for family in (self.messages, self.bytes, self.tombstones):
                family.labels(topic)
        self.files_per_message = _FILES_PER_MESSAGE[config.format]
        self.exported: set = set()   # partitions with lag and offset series
        self.counted_redeliveries = 0
        self.redelivery_lock = threading.Lock()
        self.next_refresh = 0.0
        # The health rule's inputs, on time.monotonic(); set by the loop's thread only.
        self.progress_at = time.monotonic()     # a batch was held (or the spout started)
        self.waiting_since: float | None = None  # messages not yet held wait since then
        self.kafka_down_since: float | None = None
        self.last_commit_at: float | None = None
        self.server = None

    # -- what the loop tells
    def polled(self, records: Mapping) -> None:
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def tombstones_seen(self, records: Mapping, count: int) -> None:
        topics = {tp.topic for tp in records}
        if len(topics) == 1:
            self.tombstones.labels(topics.pop()).inc(count)
            return
        for tp, messages in records.items():  # several topics: rare enough to look closer
            nulls = sum(1 for record in messages if record.value is None)
            if nulls:
                self.tombstones.labels(tp.topic).inc(nulls)

    def held(self, outgoing: Outgoing) -> None:
        now = time.monotonic()
        self.progress_at = now
        self.next_refresh = 0.0  # lag and offsets follow at once, not up to a refresh later
        batch = outgoing.batch
        if not batch.members:  # only skipped tombstones: no commit
            return
        self.last_commit_at = now
        self.last_delivery.set(time.time())
        self.commits.inc()
        self.latency.observe(max(now - batch.started, 0.0))
        topics = {tp.topic for tp in batch.offsets}
        if len(topics) == 1:
            per_topic = {topics.pop(): (len(batch.members), batch.data_bytes)}
        else:
            per_topic = {}
            for tp, (_, data, _) in zip(batch.partitions, batch.members):
                files, size = per_topic.get(tp.topic, (0, 0))
                per_topic[tp.topic] = (files + 1, size + len(data))
        messages = 0
        for topic, (files, size) in per_topic.items():
            written = files // self.files_per_message if batch.written is None \
                else batch.written.get(topic, 0)
            self.messages.labels(topic).inc(written)
            self.bytes.labels(topic).inc(size)
            messages += written
        self.batch_messages.observe(messages)
        self.batch_bytes.observe(batch.data_bytes)
        self.count_redeliveries()

    def caught_up(self, offsets: dict) -> None:
        self.next_refresh = 0.0

    def kafka_reachable(self, reachable: bool) -> None:
        if reachable:
            self.kafka_down_since = None
        elif self.kafka_down_since is None:
            self.kafka_down_since = time.monotonic()

    def refresh(self) -> None:
        """Lag and delivered offsets of every partition owned, and whether messages wait:
        in Kafka still (the high watermark past the consumer's position), in the batch, or
        sent and not yet read. Not the newest 1.x archive once read: it is held only when the
        next one is read, and an idle topic is no stall. Nor are a transactional topic's
        trailing markers and aborted records, which the position passes. An open transaction
        is: kafka-python keeps no last stable offset, so its records count as waiting."""
        now = time.monotonic()
        if now < self.next_refresh:
            return
        self.next_refresh = now + METRICS_REFRESH_SECONDS
        self.count_redeliveries()
        spout, consumer, ledger = self.spout, self.spout.consumer, self.spout.ledger
        waiting = ledger.unhanded() or spout.delivery.in_transit()
        owned = consumer.assignment()
        for tp in owned:
            # What fetches carried: end_offsets() asks the broker, and some answer wrongly.
            highwater = consumer.highwater(tp)
            progress = ledger.get(tp)
            if progress is None or progress.held is None or not progress.resolved:
                continue  # not started yet: its lag shows once it is
            delivered = progress.held
            labels = (tp.topic, str(tp.partition))
            self.delivered_offset.labels(*labels).set(delivered)
            if highwater is not None:
                self.lag.labels(*labels).set(max(highwater - delivered, 0))
                # The consumer's position, not the last record polled: what lies between
                # (transaction markers, aborted records) is nothing to wait for.
                read_to = spout.fetch_position(tp)
                if read_to is None:
                    read_to = progress.polled if progress.polled is not None else delivered
                waiting = waiting or highwater > read_to
            self.exported.add(tp)
        for tp in self.exported - owned:
            self.exported.discard(tp)
            for family in (self.lag, self.delivered_offset):
                try:
                    family.remove(tp.topic, str(tp.partition))
                except KeyError:
                    pass
        if not waiting:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now

    def finished(self) -> None:
        self.waiting_since = self.kafka_down_since = None

    def count_redeliveries(self) -> None:
        with self.redelivery_lock:
            total = self.spout.delivery.redelivered()
            if total > self.counted_redeliveries:
                self.redeliveries.inc(total - self.counted_redeliveries)
                self.counted_redeliveries = total
            decoding = self.spout.decoding
            if decoding is not None:   # counted as they are met: a skipped one has no commit
                for (topic, reason), seen in list(decoding.bad_records.items()):
                    counted = self.counted_bad_records.get((topic, reason), 0)
                    if seen > counted:
                        self.bad_records.labels(topic, reason).inc(seen - counted)
                        self.counted_bad_records[(topic, reason)] = seen

    # -- what the server's thread asks
    def health(self) -> tuple[bool, dict]:
        """The health rule: Kafka and Pachyderm within reach, and commits going through."""
        now = time.monotonic()
        problems = []
        down = self.kafka_down_since
        if down is not None and now - down > HEALTH_GRACE_SECONDS:
            problems.append(f"Kafka at {self.config.broker_address} has been unreachable "
                            f"for {now - down:.0f}s")
        for source in (self.spout.delivery, self.spout.decoding):
            unreachable = source.unreachable() if source is not None else None
            if unreachable is not None and now - unreachable[0] > HEALTH_GRACE_SECONDS:
                problems.append(f"{unreachable[1]} for {now - unreachable[0]:.0f}s while "
                                "batches wait")
        waiting = self.waiting_since
        if waiting is not None:
            stalled = now - max(waiting, self.progress_at)
            if stalled > self.config.health_max_delivery_seconds:
                problems.append(f"no commit held for {stalled:.0f}s while messages wait "
                                f"(HEALTH_MAX_DELIVERY_SECONDS="
                                f"{self.config.health_max_delivery_seconds:g})")
        last = self.last_commit_at
        body = {"status": "unhealthy" if problems else "ok", "delivery": self.config.delivery,
                "waiting": waiting is not None,
                "last_commit_seconds_ago": None if last is None else round(now - last, 1)}
        if problems:
            body["reasons"] = problems
        return not problems, body

    def exposition(self) -> tuple[bytes, str]:
        self.count_redeliveries()  # live even while the loop waits inside a delivery
        return (self.prometheus.generate_latest(self.registry),
                self.prometheus.CONTENT_TYPE_LATEST)

    # -- the server
    def serve(self) -> None:
        """Listens on METRICS_ADDRESS:METRICS_PORT, or raises ConfigError."""
        import http.server
        import socket
        monitor = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = METRICS_CONNECTION_SECONDS  # an idle client lets go of its thread

            def setup(self):
                super().setup()
                self.rfile = _HeadReader(self.rfile, METRICS_REQUEST_HEAD_BYTES)

            def do_GET(self):
                self.server.answering(self.request)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, (body, content_type) = 200, monitor.exposition()
                elif path == "/healthz":
                    healthy, document = monitor.health()
                    status, content_type = (200 if healthy else 503), "application/json"
                    body = json.dumps(document).encode() + b"\n"
                else:
                    status, content_type = 404, "text/plain; charset=utf-8"
                    body = b"kafka-spout serves /metrics and /healthz\n"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass  # a scrape every few seconds is no news

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in self.config.metrics_address \
                else socket.AF_INET
            # socketserver's backlog of 5 drops the SYNs of a burst: a probe's retried 1 s on.
            request_queue_size = 128
            lock = threading.Lock()
            connections: set = set()      # each holds a thread
            reading: dict = {}            # those still sending their request, oldest first

            def process_request(self, request, client_address):
                # A thread per connection, so a bounded number: at the cap the oldest client
                # still sending its request is cut off (a probe sends at once, so it is the
                # flood that goes), and without one the newcomer is refused.
                with self.lock:
                    admit = len(self.connections) < METRICS_MAX_CONNECTIONS
                    if not admit and self.reading:
                        oldest = next(iter(self.reading))
                        del self.reading[oldest]
                        try:
                            oldest.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        # Cut-off ones hold their thread a moment longer: bounded too.
                        admit = len(self.connections) < 2 * METRICS_MAX_CONNECTIONS
                    if admit:
                        self.connections.add(request)
                        self.reading[request] = True
                if not admit:
                    super().shutdown_request(request)
                    return
                super().process_request(request, client_address)

            def answering(self, request):
                with self.lock:
                    self.reading.pop(request, None)

            def shutdown_request(self, request):
                with self.lock:
                    self.connections.discard(request)
                    self.reading.pop(request, None)
                super().shutdown_request(request)

            def handle_error(self, request, client_address):
                log.debug("metrics client %s: %s", client_address, sys.exc_info()[1])

        address, port = self.config.metrics_address, self.config.metrics_port
        shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        try:
            self.server = Server((address, port), Handler)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError("METRICS_PORT", f"{shown} is already in use") from None
            raise ConfigError("METRICS_ADDRESS", f"cannot listen on {shown} "
                              f"({error.strerror or error})") from None
        threading.Thread(target=self.server.serve_forever, name="metrics",
                         daemon=True).start()
        log.info("serving /metrics and /healthz on http://%s", shown)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _HeadReader:
    """The request's line and headers, at most limit bytes in all: http.server reads up to 100
    header lines of 64 KiB each, 6.5 MB per connection. Past the limit it reads as the end of
    the headers, and the request is answered or refused as it stands."""

    def __init__(self, stream, limit: int):
        self.stream, self.left = stream, limit

    def readline(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        line = self.stream.readline(size) if size > 0 else b""
        self.left -= len(line)
        return line

    def close(self) -> None:
        self.stream.close()


class JsonLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: one object per line, with the stats line's numbers as fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        document = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname,
                    "logger": record.name, "message": record.getMessage()}
        document.update(getattr(record, "fields", None) or {})
        if record.exc_info:  # kafka-python logs tracebacks: the error alone, as text does
            document["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(document, ensure_ascii=False, default=str)


# ----------------------------------------------------------------- tools: verify and locate
# `spout.py verify REPO...` and `spout.py locate TOPIC PARTITION OFFSET REPO...`: read-only
# checks of 2.x output repos. They read the commits' records (ListCommit: descriptions only,
# never files), work out which offsets each commit holds, and report gaps and overlaps; locate
# then opens the one commit that holds a message to find its file (and row). docs/verify.md.

TOOLS = ("verify", "locate")
# The settings the tools take, as the spout takes them (env, flag, parsing).
TOOL_SETTINGS = ("PACH_CONFIG", "PACHD_ADDRESS", "PACH_TOKEN", "PACH_TOKEN_FILE",
                 "BOOTSTRAP_SERVERS", "HOST", "PORT", "NAME_TEMPLATE")
LIST_COMMIT_SECONDS = 600.0   # one stream for a whole branch: generous, yet bounded
GAP_READ_SECONDS = 15.0       # per gap, reading it back from Kafka
GAP_IDLE_SECONDS = 3.0        # ... given up once the position stands still this long
_HELD_RANGE_RE = re.compile(r"([^\s,]+)/(\d+) (\d+)-(\d+)")


class ToolSettings(NamedTuple):
    pachd_address: str
    token: str | None
    root_certs: bytes | None
    bootstrap_servers: tuple[str, ...]
    kafka_options: Mapping[str, object]
    name_template: str | None


def build_tool_parser(command: str) -> argparse.ArgumentParser:
    if command == "verify":
        parser = _OneLineArgumentParser(
            prog="spout.py verify",
            description="Check that the kafka-spout commits of the repos hold every offset "
                        "once: print the ranges each holds, every gap and every overlap. "
                        "Exit 0: neither; 1: some; 2: a usage or connection problem.")
        parser.add_argument("repos", nargs="+", metavar="REPO",
                            help="project/repo@branch (default project default, branch master)")
    else:
        parser = _OneLineArgumentParser(
            prog="spout.py locate",
            description="Name the repo, commit and file (and row of a segment) holding one "
                        "message. Exit 0: found; 1: no commit holds it; 2: a usage or "
                        "connection problem.")
        parser.add_argument("topic")
        parser.add_argument("partition", type=int)
        parser.add_argument("offset", type=int)
        parser.add_argument("repos", nargs="+", metavar="REPO",
                            help="project/repo@branch (default project default, branch master)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    by_env = {setting.env: setting for setting in SETTINGS}
    for env in TOOL_SETTINGS:
        setting = by_env[env]
        parser.add_argument(setting.flag, dest=setting.field, metavar=env,
                            help=f"{setting.help} (env {env})")
    parser.add_argument("--kafka", action="append", metavar="OPTION=VALUE",
                        help="a KafkaConsumer option for reading gaps back (env KAFKA_<OPTION>)")
    return parser


def parse_tool_args(command: str, argv: Sequence[str],
                    environ: Mapping[str, str]) -> tuple[argparse.Namespace, list[RepoBranch],
                                                         ToolSettings]:
    """The command line and the settings it shares with the spout; raises ConfigError."""
    args = build_tool_parser(command).parse_args(list(argv))
    repos = []
    for text in args.repos:
        try:
            repos.append(parse_output_repo(text))
        except ValueError as error:
            raise ConfigError("REPO", str(error)) from None
    if command == "locate" and (args.partition < 0 or args.offset < 0):
        raise ConfigError("command line", "PARTITION and OFFSET are whole numbers")
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        if setting.env not in TOOL_SETTINGS:
            sources[setting.field] = setting.env
            continue
        from_flag = getattr(args, setting.field)
        sources[setting.field] = setting.flag if from_flag is not None else setting.env
        raw = from_flag if from_flag is not None else environ.get(setting.env)
        if raw is None:
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as error:
            raise ConfigError(sources[setting.field], describe_value_error(error, raw)) from None
    values["output_repo"] = repos[0]  # pachd_settings' own check; the tools take REPOs
    pachd = pachd_settings(values, sources, environ)
    host, port = values.get("host"), values.get("port")
    bootstrap: tuple[str, ...] = tuple(values.get("bootstrap_servers", ()))
    if not bootstrap and (host is None) != (port is None):
        raise ConfigError(sources["host" if port is None else "port"],
                          "set HOST and PORT together (or BOOTSTRAP_SERVERS)")
    if not bootstrap and host is not None:
        bootstrap = (f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}",)
    kafka_options = collect_kafka_options(environ, args.kafka or ()) if bootstrap else {}
    return args, repos, ToolSettings(pachd["pachd_address"], pachd["pach_token"],
                                     pachd.get("pach_root_certs"), bootstrap, kafka_options,
                                     values.get("name_template"))


# -- reading commits: ListCommit's answers decoded by hand. betterproto takes 0.8 ms per
# CommitInfo, 8 s for a branch of 10,000 commits; these few fields take a fraction of that.
def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def proto_fields(data: bytes) -> dict[int, list]:
    """A protobuf message's fields by number: ints (varint, fixed) or bytes (the rest)."""
    fields: dict[int, list] = {}
    pos, size = 0, len(data)
    while pos < size:
        key, pos = _read_varint(data, pos)
        kind = key & 7
        if kind == 0:
            value, pos = _read_varint(data, pos)
        elif kind == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif kind == 1:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif kind == 5:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"protobuf wire type {kind} in a CommitInfo")
        fields.setdefault(key >> 3, []).append(value)
    return fields


class CommitSummary(NamedTuple):
    """What the tools need of a CommitInfo."""
    id: str
    parent_id: str | None
    description: str
    open: bool


def _commit_id(data: bytes) -> str:
    return proto_fields(data).get(2, [b""])[0].decode()   # Commit.id


def _timestamp_set(data: bytes | None) -> bool:
    """An unset Timestamp reads as the epoch (see commit_is_open)."""
    if not data:
        return False
    fields = proto_fields(data)
    return bool(fields.get(1, [0])[0] or fields.get(2, [0])[0])


def commit_summary(data: bytes) -> CommitSummary:
    """A serialized pfs_v2.CommitInfo: commit (1), description (3), parent_commit (4),
    finishing (7), finished (8)."""
    fields = proto_fields(data)
    parent = fields.get(4)
    finished = _timestamp_set(fields.get(7, [None])[0]) or \
        _timestamp_set(fields.get(8, [None])[0])
    return CommitSummary(_commit_id(fields.get(1, [b""])[0]),
                         _commit_id(parent[0]) or None if parent else None,
                         fields.get(3, [b""])[0].decode(errors="replace"), not finished)


class RepoReader(PachdClient):
    """Read-only calls on one repo's branch: its commits, oldest first, and their files."""

    def __init__(self, settings: ToolSettings, repo: RepoBranch):
        super().__init__(settings.pachd_address, settings.token, settings.root_certs, repo,
                         threading.Event())
        self.name = repo
        pfs = self.pfs
        self._list_commit = self.channel.unary_stream(
            "/pfs_v2.API/ListCommit", request_serializer=pfs.ListCommitRequest.SerializeToString,
            response_deserializer=None)   # bytes: commit_summary reads them
        self._list_file = self.channel.unary_stream(
            "/pfs_v2.API/ListFile", request_serializer=pfs.ListFileRequest.SerializeToString,
            response_deserializer=pfs.FileInfo.FromString)
        self._get_file = self.channel.unary_stream(
            "/pfs_v2.API/GetFile", request_serializer=pfs.GetFileRequest.SerializeToString,
            response_deserializer=self._bytes_value)

    @staticmethod
    def _bytes_value(data: bytes) -> bytes:
        return proto_fields(data).get(1, [b""])[0]   # google.protobuf.BytesValue.value

    def commits(self) -> list[CommitSummary]:
        """The branch's commits from its first to its head (ListCommit with `to`: pachd walks
        the head's ancestry, newest first); none while the branch does not exist."""
        for attempt in range(5):
            head = self.head(None)
            if head is None:
                return []
            request = self.pfs.ListCommitRequest(
                repo=self.repo, to=self.pfs.Commit(repo=self.repo, id=head.id), all=True)
            try:
                stream = self._list_commit(request, timeout=LIST_COMMIT_SECONDS,
                                           metadata=self.metadata)
                summaries = [commit_summary(data) for data in stream]
            except self.grpc.RpcError as error:
                # The head was dropped while the list was walked (a spout drops an open head
                # a stopped spout left): list again from the new head.
                if error.code() != self.grpc.StatusCode.NOT_FOUND or attempt == 4:
                    raise
                continue
            summaries.reverse()
            return summaries
        return []

    def _file(self, commit_id: str, path: str):
        return self.pfs.File(commit=self.pfs.Commit(repo=self.repo, id=commit_id), path=path)

    def list_files(self, commit_id: str, path: str) -> list:
        """ListFile: the file at path, or a directory's entries (directories end in '/');
        nothing where there is neither."""
        request = self.pfs.ListFileRequest(file=self._file(commit_id, path))
        return list(self._list_file(request, timeout=LIST_COMMIT_SECONDS,
                                    metadata=self.metadata))

    def read_file(self, commit_id: str, path: str) -> bytes:
        request = self.pfs.GetFileRequest(file=self._file(commit_id, path))
        return b"".join(self._get_file(request, timeout=LIST_COMMIT_SECONDS,
                                       metadata=self.metadata))


# -- what the commits hold
class SpoutCommit(NamedTuple):
    repo: str               # project/repo@branch
    id: str
    record: Record
    held: dict              # (topic, partition) -> (first, end) of the messages in it
    title: str


class Holding(NamedTuple):
    topic: str
    partition: int
    first: int
    end: int                # exclusive
    repo: str
    commit: str


class Gap(NamedTuple):
    topic: str
    partition: int
    first: int
    end: int
    repo: str
    after: str              # the commit whose record the range follows
    commit: str             # the commit whose record moved past it


class Overlap(NamedTuple):
    topic: str
    partition: int
    first: int
    end: int
    holders: tuple[Holding, Holding]


def held_ranges(description: str) -> dict[tuple[str, int], tuple[int, int]]:
    """The first line's 'topic/partition first-last' ranges as (first, end)."""
    title = description.split("\n", 1)[0]
    _, sep, held = title.partition(" from ")
    if not sep:
        return {}   # range closed: nothing new
    return {(topic, int(partition)): (int(first), int(last) + 1)
            for topic, partition, first, last in _HELD_RANGE_RE.findall(held)}


def spout_commits(repo: RepoBranch, commits: Iterable[CommitSummary],
                  notes: list[str]) -> list[SpoutCommit]:
    """The finished kafka-spout commits of a branch, oldest first. Others are passed over;
    an open one is noted (its files are not all in yet); a damaged record raises ValueError."""
    found = []
    for commit in commits:
        record = record_from_description(commit.description)   # ValueError: damaged
        if record is None:
            continue
        if commit.open:
            notes.append(f"{repo} commit {commit.id} is still open: not counted")
            continue
        found.append(SpoutCommit(str(repo), commit.id, record,
                                 held_ranges(commit.description),
                                 commit.description.split("\n", 1)[0]))
    return found


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for first, end in sorted(intervals):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([first, end])
    return [(first, end) for first, end in merged]


def _subtract(first: int, end: int, held: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, end) less the merged intervals held."""
    pieces, start = [], first
    for a, b in held:
        if b <= start:
            continue
        if a >= end:
            break
        if a > start:
            pieces.append((start, a))
        start = max(start, b)
    if start < end:
        pieces.append((start, end))
    return pieces


def find_holdings(commits: Iterable[SpoutCommit]) -> tuple[list[Holding], list[Gap]]:
    """Every commit's messages per partition, and each repo's spans between consecutive
    records less what its commits hold: the candidate gaps (find_gaps subtracts what other
    repos hold). Commits of one repo must come in order, oldest first."""
    holdings: list[Holding] = []
    spans: list[Gap] = []
    last: dict[tuple[str, tuple], tuple[int, str]] = {}
    for commit in commits:
        for (topic, partition), (first, end) in sorted(commit.held.items()):
            holdings.append(Holding(topic, partition, first, end, commit.repo, commit.id))
        for (topic, partition), end in sorted(commit.record[1].items()):
            key = (commit.repo, (topic, partition))
            before = last.get(key)
            if before is not None and end > before[0]:
                spans.append(Gap(topic, partition, before[0], end, commit.repo, before[1],
                                 commit.id))
            last[key] = (end, commit.id)
    return holdings, spans


def find_gaps(holdings: list[Holding], spans: list[Gap]) -> list[Gap]:
    """Offsets between two consecutive records of a repo that no commit (of any repo) holds."""
    held: dict[tuple[str, int], list] = {}
    for holding in holdings:
        held.setdefault((holding.topic, holding.partition), []).append(
            (holding.first, holding.end))
    merged = {key: _merge(intervals) for key, intervals in held.items()}
    gaps = []
    for span in spans:
        for first, end in _subtract(span.first, span.end,
                                    merged.get((span.topic, span.partition), [])):
            gaps.append(span._replace(first=first, end=end))
    return gaps


def find_overlaps(holdings: list[Holding]) -> list[Overlap]:
    """Offsets held by two commits: a replay in one repo, or two repos on one partition."""
    by_partition: dict[tuple[str, int], list[Holding]] = {}
    for holding in holdings:
        by_partition.setdefault((holding.topic, holding.partition), []).append(holding)
    overlaps = []
    for (topic, partition), group in sorted(by_partition.items()):
        active: list[Holding] = []
        for holding in sorted(group, key=lambda h: (h.first, h.end)):
            active = [other for other in active if other.end > holding.first]
            for other in active:
                overlaps.append(Overlap(topic, partition, holding.first,
                                        min(other.end, holding.end), (other, holding)))
            active.append(holding)
    return overlaps


def held_runs(holdings: list[Holding]) -> list[dict]:
    """Per partition and repo, the contiguous ranges held and the commits holding them."""
    by_key: dict[tuple, list[Holding]] = {}
    for holding in holdings:
        by_key.setdefault((holding.topic, holding.partition, holding.repo), []).append(holding)
    runs = []
    for (topic, partition, repo), group in sorted(by_key.items()):
        run: dict | None = None
        for holding in sorted(group, key=lambda h: (h.first, h.end)):
            if run is not None and holding.first <= run["end"]:
                run["end"] = max(run["end"], holding.end)
                run["commits"].append(holding.commit)
                continue
            run = {"topic": topic, "partition": partition, "repo": repo,
                   "first": holding.first, "end": holding.end, "commits": [holding.commit]}
            runs.append(run)
    return runs


# -- reading a gap back from Kafka
def kafka_gap_reader(settings: ToolSettings):
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError
    try:
        # A broker that cannot be reached is a one-line answer in seconds, as for the spout
        # itself (kafka-python's own bootstrap wait is 30 s).
        return KafkaConsumer(bootstrap_servers=list(settings.bootstrap_servers),
                             enable_auto_commit=False, group_id=None,
                             **{"bootstrap_timeout_ms": 5000, **settings.kafka_options,
                                "isolation_level": "read_committed"})
    except KafkaError as error:
        raise ConfigError("BOOTSTRAP_SERVERS", f"cannot reach Kafka at "
                          f"{','.join(settings.bootstrap_servers)} "
                          f"({describe_kafka_failure(error)})") from None


def read_gap(consumer, gap: Gap) -> dict:
    """Whether Kafka has committed records at the gap's offsets (read_committed, assign
    mode): none means transaction markers, aborted records or compaction left it empty.
    Read until the position passes the gap: the end ListOffsets gives is not relied on
    (some brokers, Tansu among them, answer it wrongly)."""
    from kafka import TopicPartition
    tp = TopicPartition(gap.topic, gap.partition)
    consumer.assign([tp])
    start = consumer.beginning_offsets([tp])[tp]
    if gap.end <= start:
        return {"checked": False, "records": None, "says": f"deleted: before the log start "
                f"offset {start} (retention); cannot tell what it held"}
    consumer.seek(tp, max(gap.first, start))
    found = []
    deadline = time.monotonic() + GAP_READ_SECONDS
    still_since, last_position = time.monotonic(), consumer.position(tp)
    while last_position < gap.end and time.monotonic() < deadline and \
            time.monotonic() - still_since < GAP_IDLE_SECONDS:
        for record in consumer.poll(timeout_ms=200).get(tp, ()):
            if gap.first <= record.offset < gap.end:
                found.append(record.offset)
        position = consumer.position(tp)
        if position != last_position:
            still_since, last_position = time.monotonic(), position
    partly = f"; offsets before {start} deleted (retention)" if gap.first < start else ""
    if last_position < gap.end:
        return {"checked": False, "records": len(found) or None,
                "says": f"Kafka gave nothing past offset {last_position}"
                        f"{f' ({len(found)} record(s) before it)' if found else ''}: the "
                        "log's end, or an open transaction; cannot tell the rest"}
    if found:
        return {"checked": True, "records": len(found),
                "says": f"Kafka holds {len(found)} record(s) there (first {found[0]}): "
                        f"missing from Pachyderm{partly}"}
    return {"checked": True, "records": 0,
            "says": f"Kafka holds no record there (transaction markers, aborted or compacted "
                    f"records){partly}"}


# -- verify
def gather(settings: ToolSettings, repos: Sequence[RepoBranch],
           notes: list[str]) -> tuple[list[SpoutCommit], dict[str, int]]:
    """Every kafka-spout commit of the repos (each repo's oldest first), and how many commits
    each branch has in all. Raises ConfigError (exit 2) for what stops the reading."""
    import grpc
    commits: list[SpoutCommit] = []
    counts: dict[str, int] = {}
    for repo in repos:
        reader = RepoReader(settings, repo)
        try:
            summaries = reader.commits()
        except grpc.RpcError as error:
            raise tool_rpc_error(error, settings, repo) from None
        finally:
            reader.close()
        if not summaries:
            notes.append(f"{repo} has no commit (no branch {repo.branch} yet)")
        counts[str(repo)] = len(summaries)
        try:
            commits.extend(spout_commits(repo, summaries, notes))
        except ValueError as error:
            raise ConfigError("REPO", f"{repo}: a kafka-spout commit with a damaged record "
                              f"({error})") from None
    return commits, counts


def tool_rpc_error(error, settings: ToolSettings, repo: RepoBranch) -> ConfigError:
    code = error.code().name if hasattr(error, "code") else ""
    details = error.details() if hasattr(error, "details") else str(error)
    if code == "NOT_FOUND":
        return ConfigError("REPO", f"{repo}: not found on pachd at {settings.pachd_address} "
                           f"({details})")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return ConfigError("PACH_TOKEN", f"pachd at {settings.pachd_address} refused to "
                           f"read {repo} ({details})")
    return ConfigError("PACHD_ADDRESS", f"cannot read {repo} from pachd at "
                       f"{settings.pachd_address} ({describe_rpc_error(error)})")


def verify_report(commits: list[SpoutCommit], counts: Mapping[str, int],
                  notes: list[str]) -> dict:
    holdings, spans = find_holdings(commits)
    gaps = find_gaps(holdings, spans)
    overlaps = find_overlaps(holdings)
    return {"repos": {repo: {"commits": count,
                             "spout_commits": sum(c.repo == repo for c in commits)}
                      for repo, count in counts.items()},
            "held": held_runs(holdings),
            "gaps": [dict(gap._asdict(), last=gap.end - 1) for gap in gaps],
            "overlaps": [{"topic": o.topic, "partition": o.partition, "first": o.first,
                          "end": o.end, "last": o.end - 1,
                          "holders": [{"repo": h.repo, "commit": h.commit, "first": h.first,
                                       "last": h.end - 1} for h in o.holders]}
                         for o in overlaps],
            "notes": notes}


def check_gaps_in_kafka(report: dict, settings: ToolSettings) -> None:
    """Reads each gap back; a gap Kafka holds nothing in is no longer a problem."""
    if not report["gaps"]:
        return
    from kafka.errors import KafkaError
    consumer = kafka_gap_reader(settings)
    try:
        for gap in report["gaps"]:
            gap["kafka"] = read_gap(consumer, Gap(**{field: gap[field]
                                                      for field in Gap._fields}))
    except KafkaError as error:
        raise ConfigError("BOOTSTRAP_SERVERS", f"reading gaps back from Kafka at "
                          f"{','.join(settings.bootstrap_servers)} failed "
                          f"({describe_kafka_failure(error)})") from None
    finally:
        consumer.close()


def problems(report: dict) -> tuple[list[dict], list[dict]]:
    """The gaps that count (all but those Kafka holds nothing in), and the overlaps."""
    gaps = [gap for gap in report["gaps"] if gap.get("kafka", {}).get("records") != 0]
    return gaps, report["overlaps"]


def _offsets(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def print_verify(report: dict) -> None:
    rows = [("PARTITION", "OFFSETS", "REPO", "COMMITS")]
    for run in report["held"]:
        commits = run["commits"]
        shown = commits[0] if len(commits) == 1 else \
            f"{len(commits)}: {commits[0]} .. {commits[-1]}"
        rows.append((f"{run['topic']}/{run['partition']}",
                     _offsets(run["first"], run["end"] - 1), run["repo"], shown))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) +
                  "  " + row[3])
    else:
        print("no kafka-spout commit holds any message")
    for gap in report["gaps"]:
        kafka = gap.get("kafka")
        print(f"gap {gap['topic']}/{gap['partition']} {_offsets(gap['first'], gap['last'])}: "
              f"no commit holds it; {gap['repo']} commit {gap['commit']} resumes past it after "
              f"commit {gap['after']}" + (f"; {kafka['says']}" if kafka else ""))
    for overlap in report["overlaps"]:
        a, b = overlap["holders"]
        print(f"overlap {overlap['topic']}/{overlap['partition']} "
              f"{_offsets(overlap['first'], overlap['last'])}: in {a['repo']} commit "
              f"{a['commit']} ({_offsets(a['first'], a['last'])}) and in {b['repo']} commit "
              f"{b['commit']} ({_offsets(b['first'], b['last'])})")
    for note in report["notes"]:
        print(f"note: {note}")
    gaps, overlaps = problems(report)
    commits = sum(repo["commits"] for repo in report["repos"].values())
    spout_made = sum(repo["spout_commits"] for repo in report["repos"].values())
    print(f"{len(report['repos'])} repo(s), {commits} commit(s), {spout_made} by kafka-spout: "
          f"{len(gaps)} gap(s), {len(overlaps)} overlap(s)"
          + ("" if len(gaps) == len(report["gaps"]) else
             f" ({len(report['gaps']) - len(gaps)} empty gap(s) in Kafka not counted)"))


def run_verify(args, repos: list[RepoBranch], settings: ToolSettings) -> int:
    notes: list[str] = []
    commits, counts = gather(settings, repos, notes)
    report = verify_report(commits, counts, notes)
    if settings.bootstrap_servers:
        check_gaps_in_kafka(report, settings)
    gaps, overlaps = problems(report)
    report["ok"] = not gaps and not overlaps
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_verify(report)
    return 0 if report["ok"] else 1


# -- locate
def template_pattern(template: str, topic: str, partition: int) -> tuple[re.Pattern, str]:
    """A regex over the paths a NAME_TEMPLATE gives topic/partition (group 'offset': the
    first {offset} as rendered), and the directory all of them lie under."""
    parts, captured = [], False
    known = {"topic": encode_component(topic), "partition": partition}
    for literal, field, spec, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field in known:
            parts.append(re.escape(format(known[field], spec or "")))
        elif field == "offset" and not captured:
            parts.append(r"(?P<offset>[0-9a-fA-F]+)")
            captured = True
        else:
            parts.append(r"[^/]+")
    # The directory: the literal text and topic/partition up to the first other token.
    prefix = ""
    for literal, field, spec, _ in string.Formatter().parse(template):
        prefix += literal
        if field is None:
            continue
        if field not in known:
            break
        prefix += format(known[field], spec or "")
    directory = "/" + prefix.lstrip("/").rsplit("/", 1)[0] + "/" if "/" in prefix.lstrip("/") \
        else "/"
    return re.compile("/" + "".join(parts).lstrip("/")), directory


def _offset_of(match: re.Match, template: str) -> int | None:
    text = match.groupdict().get("offset")
    if text is None:
        return None
    spec = next((spec for _, field, spec, _ in string.Formatter().parse(template)
                 if field == "offset"), "") or ""
    base = 16 if spec.endswith(("x", "X")) else 8 if spec.endswith("o") else 10
    try:
        return int(text, base)
    except ValueError:
        return None


def walk_files(reader: RepoReader, commit_id: str, directory: str, depth: int) -> list[str]:
    """The files under directory, depth levels of directories down at most."""
    paths = []
    for info in reader.list_files(commit_id, directory):
        path = info.file.path
        if path.endswith("/"):
            if depth > 0:
                paths.extend(walk_files(reader, commit_id, path, depth - 1))
        else:
            paths.append(path if path.startswith("/") else "/" + path)
    return paths


def segment_row(data: bytes, path: str, offset: int) -> int | None:
    """The row of a JSON Lines or Parquet segment holding the offset (0 the first)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        # use_threads=False: pyarrow's pool torn down beside gRPC's threads can abort the exit
        offsets = pq.read_table(io.BytesIO(data), columns=["offset"],
                                use_threads=False).column(0).to_pylist()
        return offsets.index(offset) if offset in offsets else None
    for row, line in enumerate(data.splitlines()):
        try:
            if json.loads(line).get("offset") == offset:
                return row
        except (ValueError, AttributeError):
            continue
    return None


def find_file(reader: RepoReader, commit_id: str, topic: str, partition: int, offset: int,
              name_template: str | None) -> dict:
    """The file (and row) of the commit holding the message: by the name NAME_TEMPLATE (or
    the default, then the default segments') gives it, else by listing the names it could."""
    templates = [name_template] if name_template else \
        [DEFAULT_NAME_TEMPLATE] + [DEFAULT_NAME_TEMPLATE + ext for ext in
                                   SEGMENT_FORMATS.values()]
    for template in templates:
        try:
            names = NameTemplate(template)
        except ValueError as error:
            raise ConfigError("NAME_TEMPLATE", str(error)) from None
        if names.used <= {"topic", "partition", "offset"}:
            path = "/" + names.render(topic, partition, offset, None, 0).lstrip("/")
            if any(not info.file.path.endswith("/")
                   for info in reader.list_files(commit_id, path)):
                return with_row(reader, commit_id, path, offset)
        if "offset" not in names.used:
            continue
        pattern, directory = template_pattern(template, topic, partition)
        candidates = []
        for path in walk_files(reader, commit_id, directory, template.count("/")):
            match = pattern.fullmatch(path)
            first = _offset_of(match, template) if match else None
            if first is None or first > offset:
                continue
            if first == offset or path.endswith(tuple(SEGMENT_FORMATS.values())):
                candidates.append((first, path))
        if candidates:
            return with_row(reader, commit_id, max(candidates)[1], offset)
    return {"file": None}


def with_row(reader: RepoReader, commit_id: str, path: str, offset: int) -> dict:
    if not path.endswith(tuple(SEGMENT_FORMATS.values())):
        return {"file": path}
    return {"file": path, "row": segment_row(reader.read_file(commit_id, path), path, offset)}


def run_locate(args, repos: list[RepoBranch], settings: ToolSettings) -> int:
    import grpc
    notes: list[str] = []
    commits, _ = gather(settings, repos, notes)
    holdings, _ = find_holdings(commits)
    found = []
    for holding in holdings:
        if (holding.topic, holding.partition) == (args.topic, args.partition) and \
                holding.first <= args.offset < holding.end:
            repo = parse_output_repo(holding.repo)
            reader = RepoReader(settings, repo)
            try:
                where = find_file(reader, holding.commit, args.topic, args.partition,
                                  args.offset, settings.name_template)
            except grpc.RpcError as error:
                raise tool_rpc_error(error, settings, repo) from None
            finally:
                reader.close()
            found.append({"repo": holding.repo, "commit": holding.commit, **where})
    message = f"{args.topic}/{args.partition}@{args.offset}"
    if args.json:
        print(json.dumps({"topic": args.topic, "partition": args.partition,
                          "offset": args.offset, "found": found, "notes": notes}, indent=1))
    elif not found:
        print(f"{message}: no commit of {', '.join(map(str, repos))} holds it")
    for place in [] if args.json else found:
        where = f" file {place['file']}" if place["file"] else \
            " file not found (no name the template gives holds it)"
        if place.get("row") is not None:
            where += f" row {place['row']}"
        elif "row" in place:
            where += " row not found"
        print(f"{message}: {place['repo']} commit {place['commit']}{where}")
    return 0 if found else 1


def tool_main(command: str, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`spout.py verify ...` and `spout.py locate ...`: 0 fine, 1 found wanting, 2 usage or
    connection problems, each told in one line."""
    if "-h" in argv or "--help" in argv:
        build_tool_parser(command).print_help()
        return 0
    try:
        args, repos, settings = parse_tool_args(command, argv, environ)
        return (run_verify if command == "verify" else run_locate)(args, repos, settings)
    except ConfigError as error:
        print(f"spout.py: error: {error}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- main

class OneLineFormatter(logging.Formatter):
    """kafka-python logs connection errors with their tracebacks: keep one line each."""

    def formatException(self, exc_info) -> str:
        return f"  ({exc_info[0].__name__}: {exc_info[1]})"

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " ")


class KafkaFailures(logging.Filter):
    """kafka-python logs every failed try to reach a broker, one to four WARNING and ERROR
    lines each, several a second (105 lines in 30 s against a closed port), and then raises
    a bare KafkaTimeoutError that does not say why. This filter, on the loggers that say it,
    keeps the latest cause for the spout's own line (Spout.connect, check_connection), and
    lets those lines through only at LOG_LEVEL=DEBUG: the spout says it once per back-off.
    It filters the handler, not the loggers, so that the loggers' own filters
    (Spout.watch_kafka_python) still see every record."""

    LOGGERS = ("kafka.net.manager", "kafka.net.connection", "kafka.net.inet",
               "kafka.net.transport", "kafka.cluster", "kafka.coordinator")
    NOISE = ("Connection failed: ", "Bootstrap ", "%s: Connection lost: ",
             "%s: SaslHandshake failed: ", "DNS lookup failed for ", "%s: Abort (",
             "%s: socket disconnected", "No node available for metadata refresh",
             "Metadata refresh: failed ", "Error sending %s to node %s [%s]")
    # Said of any failure, not only of a lost connection: noise only for a connection's.
    IF_CONNECTION = ("Metadata refresh: failed ", "Error sending %s to node %s [%s]")
    _DNS = re.compile(r"DNS lookup failed for (.*):\d+, \w+\(-?\d+, '(.*)'\)")

    def __init__(self):
        super().__init__()
        self.quiet = True
        self.cause: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name not in self.LOGGERS or not message.startswith(self.NOISE):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if message.startswith(self.IF_CONNECTION) and not (
                args and type(args[-1]).__name__ in ("KafkaConnectionError",
                                                     "NodeNotReadyError")):
            return True
        if message.startswith("DNS lookup failed for "):
            found = self._DNS.match(message)
            self.cause = f"name {found.group(1)} not resolved ({found.group(2)})" if found \
                else "name not resolved"
        elif message.startswith(("Connection failed: ", "%s: Connection lost: ",
                                 "%s: Abort (")) and args:
            cause = describe_kafka_failure(args[-1])
            # The lookup's own line says more than the DNS failure it then raises.
            if not (cause == "name not resolved" and str(self.cause).startswith("name ")):
                self.cause = cause
        elif message.startswith("%s: SaslHandshake failed: ") and args:
            self.cause = f"SASL handshake refused ({args[-1]})"
        return not self.quiet


def describe_kafka_failure(error) -> str:
    """Why a connection to a broker failed, in the user's words."""
    name = type(error).__name__
    args = getattr(error, "args", ())  # kafka-python's str() starts with the class's name
    text = str(args[0]) if len(args) == 1 else str(error)
    if "UnsupportedSaslMechanism" in name or "UnsupportedSaslMechanism" in text:
        return f"the broker does not offer this SASL mechanism ({text or name})"
    if "Authentication" in name or "Sasl" in name:
        return f"SASL authentication failed ({text or name})"
    if "Authorization" in name:
        return f"not authorized ({text or name})"
    if "ECONNREFUSED" in text or "Connection refused" in text:
        return "connection refused"
    if "DNS Resolution failure" in text:
        return "name not resolved"
    if text.startswith("Handshake failed: "):
        return f"TLS handshake failed ({text[len('Handshake failed: '):]})"
    if "ECONNRESET" in text or "Connection reset" in text:
        return "connection reset by the broker"
    if "EHOSTUNREACH" in text or "ENETUNREACH" in text:
        return "no route to the host"
    if "timed out" in text.lower():
        return "connection timed out"
    return f"{name}: {text}" if text else name


kafka_failures = KafkaFailures()


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else
                         OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    log.setLevel(level)
    kafka_failures.quiet = level != "DEBUG"
    handler.addFilter(kafka_failures)


CRC32C_PURE_PYTHON = "pure Python"


def crc32c_implementation() -> str:
    """What kafka-python checks each record batch's CRC32C with. It takes the crc32c package's
    C extension by itself when it can import it (kafka.record.util), else its own pure Python,
    which then costs more than all the spout's own work."""
    from kafka.record import util
    if getattr(util, "crc32c_c", None) is None:
        return CRC32C_PURE_PYTHON
    import crc32c
    kind = "hardware" if getattr(crc32c, "hardware_based", False) else "software"
    return f"crc32c C extension ({kind})"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in TOOLS:
        return tool_main(argv[0], argv[1:], environ)
    if "-h" in argv or "--help" in argv:
        build_arg_parser().print_help()
        return 0
    if "--version" in argv:
        print(version_line())
        return 0
    try:
        config = Config.from_sources(environ, argv)
        check_optional_libraries(config)
        if config.decode:
            # Here, not in Config: loading them is the test, and before the start-up line,
            # so that a refusal is the one line on stderr.
            check_registry_tls_files(config)
    except ConfigError as error:
        print(f"spout.py: error: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    defaults = _kafka_option_defaults()
    ignored = sorted(name for name in environ if name.startswith("KAFKA_") and
                     is_kubernetes_variable(name, defaults))
    if ignored:
        log.debug("not KafkaConsumer options but a Kubernetes Service's: %s", " ".join(ignored))
    stop = threading.Event()

    def request_stop(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    checksum = crc32c_implementation()
    log.info("starting: %s crc32c=%r", config.describe(), checksum)
    if checksum == CRC32C_PURE_PYTHON:
        log.warning("kafka-python checks every record batch's CRC32C in pure Python, about "
                    "100 ns per byte (1 ms per 10 KiB message): install the crc32c package "
                    "(requirements.txt pins it)")
    try:
        spout = Spout(config, stop)   # e.g. SchemaRegistryClient refusing its settings
    except ConfigError as error:
        print(f"spout.py: error: {error}", file=sys.stderr)
        return 2
    try:
        if config.metrics_port is not None:
            spout.monitor = MetricsMonitor(config, spout)
            spout.monitor.serve()
        return spout.run()
    except ConfigError as error:
        print(f"spout.py: error: {error}", file=sys.stderr)
        return 2
    except BadRecordFailure as error:
        print(f"spout.py: error: {error}", file=sys.stderr)
        return 1
    finally:
        spout.monitor.close()


if __name__ == "__main__":
    sys.exit(main())
