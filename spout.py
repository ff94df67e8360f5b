#!/usr/bin/env python3
"""kafka-spout: stream Kafka topics into a Pachyderm 1.x spout's /pfs/out.

Each batch of messages becomes one tar archive written to the named pipe; Pachyderm turns
every archive into one commit. The layers below build on each other from the top of the file:
configuration, naming, encoding, delivery, the consume loop, and main().
"""

from __future__ import annotations

import argparse
import dataclasses
import base64
import errno
import fcntl
import hashlib
import json
import logging
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
from collections import deque
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence
from urllib.parse import quote

log = logging.getLogger("kafka-spout")

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
# Kubernetes injects <SERVICE>_PORT, <SERVICE>_SERVICE_HOST, ... for every Service in the
# namespace; a Service called "kafka" must not make the spout refuse to start.
_K8S_SERVICE_ENV_RE = re.compile(
    r"KAFKA_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")


def parse_positive_int(text: str) -> int:
    value = int(text.strip())
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
    port = int(text.strip())
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
    Setting("FORMAT", "format", parse_choice("raw", "json", "raw+meta"), "raw",
            "raw (the value), json (value and metadata), raw+meta (value + .meta.json)"),
    Setting("TOMBSTONES", "tombstones", parse_choice("skip", "keep"), "skip",
            "null values: skip, or keep as records with value null (json, raw+meta)"),
    Setting("OUTPUT_PIPE", "output_pipe", parse_nonempty, "/pfs/out",
            "the named pipe Pachyderm reads"),
    Setting("GROUP_ID", "group_id", parse_nonempty, None,
            "consumer group (default: $PPS_PIPELINE_NAME, else kafka-spout)"),
    Setting("AUTO_OFFSET_RESET", "auto_offset_reset", parse_choice("earliest", "latest"),
            "earliest", "where partitions without a committed offset start"),
    Setting("BATCH_MAX_MESSAGES", "batch_max_messages", parse_positive_int, "1000",
            "close an archive at this many messages"),
    Setting("BATCH_MAX_BYTES", "batch_max_bytes", parse_size, "16MiB",
            "close an archive at this many bytes of message data"),
    Setting("BATCH_MAX_SECONDS", "batch_max_seconds", parse_seconds, "1.0",
            "close an archive this long after its first message"),
    Setting("NAME_TEMPLATE", "name_template", lambda text: NameTemplate(text).template,
            None, "file name per message; tokens {topic} {partition} {offset} {key} "
            "{timestamp} (default: {topic}/{partition}/{offset:020d})"),
    Setting("MARKER", "marker", lambda text: parse_marker_name(text), None,
            "marker mode: the spec's spout.marker name; resume exactly from it"),
    Setting("GROUP_INSTANCE_ID", "group_instance_id", parse_nonempty, None,
            "group mode: static membership, a restarted spout gets its partitions back"),
    Setting("LOG_LEVEL", "log_level", parse_choice("DEBUG", "INFO", "WARNING"), "INFO",
            "DEBUG, INFO or WARNING"),
)

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
        return int(text.strip())
    if isinstance(default, float):
        return float(text.strip())
    if name == "api_version":
        try:
            return tuple(int(part) for part in text.strip().split("."))
        except ValueError:
            raise ValueError("must be a version such as 2.8.0") from None
    if default is None and name.endswith(("_ms", "_bytes")):
        return int(text.strip())
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
    tombstones: str = "skip"
    output_pipe: str = "/pfs/out"
    group_id: str = "kafka-spout"
    auto_offset_reset: str = "earliest"
    batch_max_messages: int = 1000
    batch_max_bytes: int = 16 * 1024 * 1024
    batch_max_seconds: float = 1.0
    name_template: str = "{topic}/{partition}/{offset:020d}"
    marker: str | None = None
    group_instance_id: str | None = None
    log_level: str = "INFO"
    kafka_options: Mapping[str, object] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_sources(cls, environ: Mapping[str, str], argv: Sequence[str] = ()) -> Config:
        """Builds the configuration from flags, then the environment, then defaults.

        Raises ConfigError for the first problem found; touches nothing but the pipe's inode.
        """
        args = build_arg_parser().parse_args(list(argv))
        values: dict[str, object] = {}
        for setting in SETTINGS:
            from_flag = getattr(args, setting.field)
            source = setting.flag if from_flag is not None else setting.env
            raw = from_flag if from_flag is not None else environ.get(setting.env)
            if raw is None:
                raw = setting.default
            if raw is None:
                continue
            try:
                values[setting.field] = setting.parse(raw)
            except ValueError as error:
                raise ConfigError(source, describe_value_error(error, raw)) from None

        host, port = values.pop("host", None), values.pop("port", None)
        if "bootstrap_servers" not in values:
            if host is None or port is None:
                missing = "HOST" if host is None else "PORT"
                raise ConfigError(missing, "required (or set BOOTSTRAP_SERVERS)")
            address = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
            values["bootstrap_servers"] = (address,)
        if "topics" in values and "topic_pattern" in values:
            raise ConfigError("TOPIC_PATTERN", "set TOPIC or TOPIC_PATTERN, not both")
        if "topics" not in values and "topic_pattern" not in values:
            raise ConfigError("TOPIC", "required (or set TOPIC_PATTERN)")
        if values.get("tombstones") == "keep" and values.get("format", "raw") == "raw":
            raise ConfigError("TOMBSTONES", "keep needs FORMAT=json or raw+meta: a raw file "
                              "cannot tell a null value from an empty one")
        if "group_id" not in values:
            values["group_id"] = environ.get("PPS_PIPELINE_NAME") or "kafka-spout"
        values["kafka_options"] = MappingProxyType(
            collect_kafka_options(environ, args.kafka or ()))
        config = cls(**values)
        if config.marker:
            check_marker_is_apart(config)
        check_output_pipe(config.output_pipe, source=(
            "--output-pipe" if args.output_pipe is not None else "OUTPUT_PIPE"))
        return config

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
            return re.fullmatch(self.topic_pattern, topic) is not None and not (
                self.marker and topic.startswith(self.marker))
        return topic in self.topics

    def describe(self) -> str:
        """The effective configuration for the start-up log line, secrets masked."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["kafka_options"] = {
            name: ("***" if is_secret_option(name) else value)
            for name, value in self.kafka_options.items()}
        return " ".join(f"{name}={value!r}" for name, value in fields.items())


def collect_kafka_options(environ: Mapping[str, str], flags: Iterable[str]) -> dict:
    defaults = _kafka_option_defaults()
    raw: dict[str, tuple[str, str]] = {}
    for env_name, text in environ.items():
        if env_name.startswith("KAFKA_") and not _K8S_SERVICE_ENV_RE.fullmatch(env_name):
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
        except ValueError as error:
            raise ConfigError(source, describe_value_error(error, text)) from None
        if name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile") and \
                not os.path.isfile(text):
            raise ConfigError(source, f"{text} is not a readable file")
    check_security(options)
    return options


_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")


def check_security(options: Mapping[str, object]) -> None:
    """What kafka-python would only find out at its first connection."""
    protocol = options.get("security_protocol", "PLAINTEXT")
    if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ConfigError("KAFKA_SECURITY_PROTOCOL", f"{protocol!r} is not PLAINTEXT, SSL, "
                          "SASL_PLAINTEXT or SASL_SSL")
    if not str(protocol).startswith("SASL"):
        return
    mechanism = options.get("sasl_mechanism")
    if mechanism not in _SASL_MECHANISMS:
        raise ConfigError("KAFKA_SASL_MECHANISM", f"{protocol} needs one of "
                          f"{', '.join(_SASL_MECHANISMS)}, not {mechanism!r}")
    if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        for option in ("sasl_plain_username", "sasl_plain_password"):
            if not options.get(option):
                raise ConfigError(f"KAFKA_{option.upper()}", f"required with {mechanism} "
                                  f"(or KAFKA_{option.upper()}_FILE)")


def check_marker_is_apart(config: Config) -> None:
    """Pachyderm diverts every member whose path starts with the marker's name."""
    template = NameTemplate(config.name_template)
    for topic in config.topics or ("t",):
        for key in (config.marker.encode(), b"k"):
            name = template.render(topic, 0, 0, key, 0)
            if name.lstrip("/").startswith(config.marker):
                raise ConfigError("MARKER", f"names such as {name!r} start with the marker "
                                  f"name {config.marker!r}; Pachyderm would take them for "
                                  "the marker")


def check_output_pipe(path: str, source: str) -> None:
    try:
        mode = os.stat(path).st_mode  # follows links: Pachyderm links /pfs/out to the FIFO
    except FileNotFoundError:
        kind = "a dangling link" if os.path.islink(path) else "missing"
        raise ConfigError(source, f"{path} is {kind}; it must be a named pipe (FIFO)") from None
    except OSError as error:
        raise ConfigError(source, f"{path}: {error.strerror}") from None
    if not stat.S_ISFIFO(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" \
            if stat.S_ISREG(mode) else "not a FIFO"
        raise ConfigError(source, f"{path} is {kind}; it must be a named pipe (FIFO)")


class _OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError("command line", message)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _OneLineArgumentParser(
        prog="spout.py",
        description="Stream Kafka topics into a Pachyderm 1.x spout's named pipe. Every "
                    "setting comes from the environment variable in capitals; the flag wins.")
    for setting in SETTINGS:
        default = f" [{setting.default}]" if setting.default is not None else ""
        parser.add_argument(setting.flag, dest=setting.field, metavar=setting.env,
                            help=f"{setting.help}{default} (env {setting.env})")
    parser.add_argument("--kafka", action="append", metavar="OPTION=VALUE",
                        help="any KafkaConsumer option, e.g. session_timeout_ms=6000 "
                             "(env KAFKA_<OPTION>, e.g. KAFKA_SESSION_TIMEOUT_MS)")
    return parser


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

    Percent-encoding of everything but letters, digits and '-._~'; a component of dots only is
    encoded whole so it cannot climb out of its folder. Null and empty keys, and the hashed
    tail of very long keys, use '%' sequences that percent-encoding never produces.
    """
    if raw is None:
        return NULL_KEY
    if not raw:
        return EMPTY_KEY
    encoded = quote(raw, safe=_UNRESERVED)
    if not encoded.strip("."):
        encoded = "".join(f"%{ord(c):02X}" for c in encoded)
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
            used.add(field)
            positional.append("{%d%s}" % (NAME_TOKENS.index(field), f":{spec}" if spec else ""))
        if not used:
            raise ValueError("must use at least one token, e.g. {offset}")
        self.uses_key = "key" in used
        self.uses_time = bool(used & {"date", "hour"})
        self.uses_key_hash = "key_hash" in used
        self._format = "".join(positional).format
        self._topic_cache: dict[str, str] = {}
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


def key_hash(key: bytes | None) -> str:
    """16 hex digits of the key's SHA-256; "null" for no key (never hex)."""
    return "null" if key is None else hashlib.sha256(key).hexdigest()[:16]


# --------------------------------------------------------------------------- encoding

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
_ZEROS = memoryview(bytes(BLOCK))
_MAX_USTAR_SIZE = 8**11 - 1
# The fixed parts of a ustar header for a regular file, byte for byte as tarfile writes them.
_HEAD_MODE = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"
_HEAD_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
_CHECKSUM_BASE = sum(_HEAD_MODE) + sum(_HEAD_TAIL) + 8 * ord(" ")  # chksum counts as spaces


def _octal_field(value: int) -> tuple[bytes, int]:
    """A 12-byte octal header field, and what it adds to the header checksum."""
    digits = b"%011o" % value
    return digits + b"\x00", sum(digits)


_mtime_field = _octal_field(0)
_mtime_field_of = 0


def member_header(name: str, size: int, mtime: int = 0) -> bytes:
    """A tar header for a regular file; PAX records when the name or size needs them."""
    global _mtime_field, _mtime_field_of
    name_bytes = name.encode("ascii") if name.isascii() else b""
    if 0 < len(name_bytes) <= 100 and size <= _MAX_USTAR_SIZE and 0 <= mtime <= _MAX_USTAR_SIZE:
        if mtime != _mtime_field_of:  # messages of a batch mostly share their second
            _mtime_field, _mtime_field_of = _octal_field(mtime), mtime
        size_field = b"%011o\x00" % size
        checksum = _CHECKSUM_BASE + sum(name_bytes) + sum(size_field) + _mtime_field[1]
        return b"".join((name_bytes.ljust(100, b"\x00"), _HEAD_MODE, size_field,
                         _mtime_field[0], b"%06o\x00 " % checksum, _HEAD_TAIL))
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
    further archives.
    """
    parts: list = []
    append = parts.append
    size = count = 0
    for name, data, mtime in members:
        length = len(data)
        header = member_header(name, length, mtime)
        append(header)
        if length:
            append(data)
            padding = -length % BLOCK
            if padding:
                append(_ZEROS[:padding])
            size += len(header) + length + padding
        else:
            size += len(header)
        count += 1
    append(END_OF_ARCHIVE)
    return Archive(parts, size + len(END_OF_ARCHIVE), count)


MARKER_FORMAT = "kafka-spout/1"


class MarkerError(Exception):
    """The marker Pachyderm kept cannot be read; str() names the file."""


def encode_marker(topics: Iterable[str], positions: Mapping[tuple, int]) -> bytes:
    """The next offset of every partition, by topic, with the topic set it was written for."""
    offsets: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(positions.items()):
        offsets.setdefault(topic, {})[str(partition)] = offset
    return json.dumps({"format": MARKER_FORMAT, "topics": sorted(topics), "offsets": offsets},
                      sort_keys=True, separators=(",", ":")).encode()


def decode_marker(data: bytes) -> tuple[list[str], dict[tuple[str, int], int]]:
    try:
        document = json.loads(data)
        if document.get("format") != MARKER_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, not {MARKER_FORMAT!r}")
        positions = {}
        for topic, partitions in document["offsets"].items():
            for partition, offset in partitions.items():
                if not isinstance(offset, int) or offset < 0:
                    raise ValueError(f"offset {offset!r} of {topic}/{partition}")
                positions[(topic, int(partition))] = offset
        return list(document["topics"]), positions
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a kafka-spout marker ({type(error).__name__}: {error})") from None


def read_marker(path: str) -> tuple[list[str], dict[tuple[str, int], int]] | None:
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


TIMESTAMP_TYPES = {0: "CreateTime", 1: "LogAppendTime"}


def json_bytes(data: bytes | None) -> str | dict | None:
    """Bytes for a JSON document: text if they are UTF-8, else {"base64": "..."}."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def record_metadata(record) -> dict:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset,
            "timestamp": record.timestamp,
            "timestamp_type": TIMESTAMP_TYPES.get(record.timestamp_type),
            "key": json_bytes(record.key),
            "headers": [[name, json_bytes(value)] for name, value in record.headers or ()]}


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


# --------------------------------------------------------------------------- delivery

class Stopped(Exception):
    """Raised when the spout was told to stop while it waited for the pipe."""


_IOV_MAX = 1024
PIPE_TARGET_SIZE = 1024 * 1024
READER_GONE_SECONDS = 1.0
# Pipe buffers are pages; partly filled ones waste some of the capacity.
PIPE_SLACK = 8192


def wait_or_stop(stop: threading.Event, delay: float, deadline: float | None) -> None:
    """Sleeps before a retry. Without a deadline a stop request ends the wait (Stopped);
    with one (the shutdown's own writes) only the deadline does."""
    if deadline is None:
        if stop.wait(delay):
            raise Stopped("stopping")
    elif time.monotonic() + delay >= deadline:
        raise Stopped("out of time")
    else:
        time.sleep(delay)


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
        self.torn = False         # an archive was abandoned half-written: write nothing more
        self.capacity = 0
        self.unread_supported = _FIONREAD is not None

    def open(self, deadline: float | None = None) -> None:
        """Waits for a reader, polling: a blocking open cannot be given up at a deadline."""
        delay = 0.001
        while True:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self.written = 0
                self.capacity = self._grow_pipe()
                return
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: no reader has the pipe open yet
                    raise
            wait_or_stop(self.stop, delay, deadline)
            delay = min(delay * 2, 0.05)

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
        delay = 0.0005
        while self.capacity - self.unread() - PIPE_SLACK < size:
            deadline = self._finish_by(deadline)
            wait_or_stop(self.stop, delay, deadline)
            delay = min(delay * 2, 0.01)
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

    def reader_gone(self) -> bool:
        """No process has the pipe open for reading (a write would fail with EPIPE)."""
        if self.fd is None:
            return False
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))

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
                poller.poll(min(wait_ms, 1000))
                continue
            self.written += sent
            while sent:
                length = len(views[index])
                if sent >= length:
                    sent -= length
                    index += 1
                else:
                    views[index] = views[index][sent:]
                    sent = 0


class Pending:
    """An archive handed to the pipe, with the offsets it completes."""
    __slots__ = ("archive", "offsets", "start", "end")

    def __init__(self, archive: Archive, offsets: dict):
        self.archive = archive
        self.offsets = offsets            # TopicPartition -> next offset to consume
        self.start: int | None = None     # where it starts on the current fd
        self.end: int | None = None       # where it ends on the current fd, once fully written


class Delivery:
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
        self.delivered: list[dict] = []
        self.broken_pipes = 0
        self._reader_gone_since: float | None = None

    def send(self, archive: Archive, offsets: dict, deadline: float | None = None) -> None:
        self.in_flight.append(Pending(archive, offsets))
        self._write([self.in_flight[-1]], deadline)

    def _write(self, entries: list[Pending], deadline: float | None) -> None:
        delay = 0.05
        entries = list(entries)
        while entries:
            entry = entries[0]
            try:
                if entry.start is None:
                    entry.start = self.pipe.written
                # An archive without members (only tombstones) is not written at all: an
                # empty archive is an empty commit, or breaks the next one, on old readers.
                if entry.archive.members:
                    self.pipe.write(entry.archive.parts, deadline,
                                    skip=self.pipe.written - entry.start)
                entry.end = self.pipe.written
                entries.pop(0)
            except BrokenPipeError:
                if self._reader_back_between_archives(entry, deadline):
                    continue
                entries = self._requeue()
                log.warning("pipe %s broken (reader gone); writing %d archive(s) again "
                            "in %.2fs", self.pipe.path, len(entries), delay)
                wait_or_stop(self.pipe.stop, delay, deadline)
                delay = min(delay * 2, self.retry_max_seconds)

    def _consumed(self) -> int:
        return self.pipe.written - self.pipe.unread()

    def _reader_back_between_archives(self, current: Pending, deadline: float | None) -> bool:
        """True if the reader had stopped exactly at an archive's end and has the same pipe
        open again: what is in the pipe then starts with a whole archive."""
        consumed = self._consumed()
        boundaries = {0, current.start} | {e.end for e in self.in_flight if e.end is not None}
        if consumed not in boundaries:
            return False
        waited_until = time.monotonic() + READER_GONE_SECONDS
        delay = 0.001
        while self.pipe.reader_gone():
            if time.monotonic() >= waited_until:
                return False
            wait_or_stop(self.pipe.stop, delay, deadline)
            delay = min(delay * 2, 0.05)
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
        return list(self.in_flight)

    def check_reader(self) -> None:
        """Archives wait in the pipe for a reader that may be gone for good (a restarted
        worker makes a fresh FIFO): once it stays gone, write them again to whatever reader
        opens the path next. A short absence is a 1.8-1.10 reader between two archives."""
        if not self.in_flight or not self.pipe.reader_gone():
            self._reader_gone_since = None
            return
        now = time.monotonic()
        if self._reader_gone_since is None:
            self._reader_gone_since = now
        elif now - self._reader_gone_since >= READER_GONE_SECONDS:
            self._reader_gone_since = None
            entries = self._requeue()
            log.warning("pipe %s has had no reader for %.1fs; writing %d archive(s) again",
                        self.pipe.path, READER_GONE_SECONDS, len(entries))
            self._write(entries, None)

    def _release(self, taken: Callable[[Pending], bool]) -> None:
        while self.in_flight and self.in_flight[0].end is not None and taken(self.in_flight[0]):
            self.delivered.append(self.in_flight.popleft().offsets)

    def poll(self, final: bool = False) -> list[dict]:
        """Offsets of the archives delivered since the last call, oldest first.

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

    def drain(self, deadline: float) -> list[dict]:
        """Waits until the reader has read all that was written, or the deadline passes."""
        delay = 0.001
        while self.in_flight and self.pipe.unread() > 0 and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.poll(final=True)


# --------------------------------------------------------------------------- the loop

class Batch:
    """Messages waiting to become one archive."""

    def __init__(self):
        self.members: list[tuple[str, bytes, int]] = []
        self.partitions: list = []     # TopicPartition of each member, for rebalances
        self.offsets: dict = {}
        self.first_offsets: dict = {}
        self.data_bytes = 0
        self.records = 0
        self.started = 0.0

    def drop(self, partitions: set) -> dict:
        """Forgets the messages of these partitions; returns where each one's began."""
        keep = [i for i, tp in enumerate(self.partitions) if tp not in partitions]
        self.members = [self.members[i] for i in keep]
        self.partitions = [self.partitions[i] for i in keep]
        self.data_bytes = sum(len(member[1]) for member in self.members)
        dropped = {}
        for tp in partitions:
            self.offsets.pop(tp, None)
            if tp in self.first_offsets:
                dropped[tp] = self.first_offsets.pop(tp)
        self.records = len(self.members) if self.offsets else 0
        return dropped


class Stats:
    def __init__(self):
        self.started = time.monotonic()
        self.messages = self.bytes = self.archives = self.tombstones = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (f"messages={self.messages} bytes={self.bytes} archives={self.archives} "
                f"tombstones={self.tombstones} rate={self.messages / elapsed:.1f} msg/s "
                f"({self.bytes / elapsed / 1e6:.2f} MB/s) since start")


STATS_INTERVAL = 30.0
# SIGTERM to exit within 10 s: a poll (0.5 s) + a commit in progress (2 s) + this + close (1 s).
SHUTDOWN_BUDGET = 6.0
COMMIT_RETRY_SECONDS = 2.0
# Group commits are for restarts and lag, not for delivery: once a second is plenty, and a
# synchronous commit per archive would halve the rate on small messages.
COMMIT_INTERVAL = 1.0
HEALTH_CHECK_INTERVAL = 5.0
PARTITION_CHECK_INTERVAL = 30.0
CONNECT_BACKOFF_MAX = 30.0


class Spout:
    """Consumes, batches, delivers, then commits: offsets move only after delivery."""

    def __init__(self, config: Config, stop: threading.Event,
                 marker: tuple[list[str], dict] | None = None):
        self.config = config
        # Marker mode: the next offset of every partition as of the last archive written,
        # seeded from the marker Pachyderm kept.
        self.positions: dict = {}
        self.marker_positions = marker[1] if marker else {}
        self.topics = config.topics  # those consumed now: TOPIC, or TOPIC_PATTERN's matches
        if marker and config.topics and sorted(marker[0]) != sorted(config.topics):
            log.info("the marker was written for topics %s; resuming those still configured",
                     ",".join(marker[0]))
        self.stop = stop
        self.names = NameTemplate(config.name_template)
        self.delivery = Delivery(PipeWriter(config.output_pipe, stop))
        self.batch = Batch()
        self.stats = Stats()
        self.uncommitted: dict = {}
        self.next_commit = 0.0
        self.connected = True
        self.assigned: set = set()
        self.consumer = None
        self.out_of_range: deque = deque()  # (partition, from, to) reset by kafka-python
        self.refused_in_authentication = False

    # -- Kafka
    def consumer_options(self) -> dict:
        # read_committed: records of aborted transactions never reach Pachyderm.
        # metadata_max_age_ms: new partitions and TOPIC_PATTERN's new topics appear in
        # kafka-python's metadata only when it is refreshed; 5 minutes by default.
        # reconnect_backoff_max_ms: kafka-python's 30 s (Java's is 1 s) left the spout idle
        # for up to 17 s after a restarted broker was back; with 1 s, 1-2 s.
        options = {"bootstrap_timeout_ms": 3000, "max_poll_records": 1000,
                   "max_partition_fetch_bytes": 4 * 1024 * 1024,
                   "isolation_level": "read_committed", "metadata_max_age_ms": 30_000,
                   "reconnect_backoff_max_ms": 1000}
        options.update(self.config.kafka_options)
        if self.config.group_instance_id and not self.config.marker:
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
                # position() may ask the coordinator or reset; the fetch position is local.
                position = self.consumer._subscription.assignment[tp].position
                if highwater is not None and position is not None:
                    total += max(highwater - position.offset, 0)
                    known = True
        except Exception:  # the assignment changed under us: no figure this time
            return None
        return total if known else None

    def connect(self) -> bool:
        """Creates the consumer, retrying with back-off while the broker is unreachable."""
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError, SaslAuthenticationFailedError
        delay = 1.0
        while not self.stop.is_set():
            self.refused_in_authentication = False
            try:
                self.consumer = KafkaConsumer(**self.consumer_options())
                return True
            except KafkaError as error:
                if self.refused_in_authentication or isinstance(
                        error, SaslAuthenticationFailedError):
                    log.warning("Kafka at %s refused this spout in SASL authentication "
                                "(%s): the username or password is probably wrong (%s); "
                                "retrying in %.0fs", self.config.broker_address,
                                self.config.kafka_options.get("sasl_mechanism"), error, delay)
                else:
                    log.warning("cannot reach Kafka at %s (%s); retrying in %.0fs",
                                self.config.broker_address, type(error).__name__, delay)
            if self.stop.wait(delay):
                break
            delay = min(delay * 2, CONNECT_BACKOFF_MAX)
        return False

    def subscribe(self) -> None:
        from kafka import ConsumerRebalanceListener
        spout = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                spout.on_revoked(set(revoked))

            def on_partitions_assigned(self, assigned):
                log.info("assigned %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))

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

    def assign(self) -> None:
        """Marker mode: every partition of the topics, resumed where the marker says.

        A spout runs as one worker, so there is no group to share partitions with; called
        again now and then, this picks up partitions added to the topics later.
        """
        from kafka import TopicPartition
        if self.config.topic_pattern is not None:
            self.topics = tuple(sorted(t for t in self.consumer.topics()
                                       if self.config.wants_topic(t)))
        wanted = {TopicPartition(topic, partition) for topic in self.topics
                  for partition in self.consumer.partitions_for_topic(topic) or ()}
        new = wanted - self.assigned
        if not new:
            return
        self.consumer.assign(sorted(wanted))
        for tp in sorted(new):
            resume_at = self.marker_positions.get((tp.topic, tp.partition))
            if resume_at is not None:
                self.consumer.seek(tp, resume_at)
            # Not in the marker: the group's committed offset, else AUTO_OFFSET_RESET.
            self.positions[tp] = self.consumer.position(tp, timeout_ms=10_000)
        self.assigned = wanted
        log.info("assigned %s", ", ".join(f"{tp.topic}/{tp.partition}@{self.positions[tp]}"
                                          for tp in sorted(new)))

    def on_revoked(self, revoked: set) -> None:
        """Drops the batched messages of revoked partitions: not written yet, so whoever owns
        a partition next reads them again from the committed offset.

        No commits here (kafka-python forbids blocking calls in rebalance callbacks), and
        a partition may come straight back to this spout with its position kept: so the
        position goes back to the first dropped message, and offsets of archives already
        written stay, to be committed if the partition is still ours then.
        """
        if revoked:
            log.info("revoked %s", sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))
        for tp, offset in self.batch.drop(revoked).items():
            self.consumer.seek(tp, offset)

    def commit(self, timeout_ms: int = 2000, final: bool = False) -> None:
        for offsets in self.delivery.poll():
            self.uncommitted.update(offsets)
        if not self.uncommitted or (time.monotonic() < self.next_commit and not final):
            return
        if not self.config.marker:
            owned = self.consumer.assignment()
            for tp in [tp for tp in self.uncommitted if tp not in owned]:
                del self.uncommitted[tp]  # moved to another spout, which commits it now
            if not self.uncommitted:
                return
        self.next_commit = time.monotonic() + COMMIT_INTERVAL
        from kafka.structs import OffsetAndMetadata
        try:
            self.consumer.commit({tp: OffsetAndMetadata(offset, "", -1)
                                  for tp, offset in self.uncommitted.items()},
                                 timeout_ms=timeout_ms)
            log.debug("committed %s", {f"{tp.topic}/{tp.partition}": offset
                                       for tp, offset in self.uncommitted.items()})
            self.uncommitted = {}
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
        if connected != self.connected:
            self.connected = connected
            if connected:
                log.info("connected to Kafka at %s again", self.config.broker_address)
            else:
                log.warning("lost contact with Kafka at %s; reconnecting with back-off",
                            self.config.broker_address)

    # -- batching
    def add(self, records: Mapping) -> None:
        """Batches polled records, closing an archive at either limit. The hot path."""
        render = self.names.render
        limit_bytes = self.config.batch_max_bytes
        limit_messages = self.config.batch_max_messages
        shape = FORMATS[self.config.format]
        keep_tombstones = self.config.tombstones == "keep"
        for tp, messages in records.items():
            topic, partition = tp.topic, tp.partition
            batch = self.batch
            for record in messages:
                value, offset = record.value, record.offset
                if value is not None and batch.members and \
                        batch.data_bytes + len(value) > limit_bytes:
                    self.flush()  # a message over the limit travels alone
                    batch = self.batch
                if not batch.records:
                    batch.started = time.monotonic()
                if tp not in batch.offsets:
                    batch.first_offsets[tp] = offset
                batch.records += 1
                batch.offsets[tp] = offset + 1
                if value is None:
                    self.stats.tombstones += 1
                if shape is None:
                    if value is not None:
                        timestamp = record.timestamp
                        batch.members.append((render(topic, partition, offset, record.key,
                                                     timestamp), value,
                                              max(timestamp, 0) // 1000))
                        batch.partitions.append(tp)
                        batch.data_bytes += len(value)
                elif value is not None or keep_tombstones:
                    timestamp = record.timestamp
                    name = render(topic, partition, offset, record.key, timestamp)
                    for member in shape(name, record, max(timestamp, 0) // 1000):
                        batch.members.append(member)
                        batch.partitions.append(tp)
                        batch.data_bytes += len(member[1])
                if batch.records >= limit_messages or batch.data_bytes >= limit_bytes:
                    self.flush()
                    batch = self.batch

    def flush(self, deadline: float | None = None) -> None:
        batch, self.batch = self.batch, Batch()
        if not batch.records:
            return
        members = batch.members
        if self.config.marker and members:
            # Last in the archive: a reader that streams puts (1.8-1.10) stores the marker
            # only after every file before it.
            self.positions.update(batch.offsets)
            members = members + [(self.config.marker,
                                  encode_marker(self.topics, self.positions), 0)]
        archive = encode_archive(members)
        # Marker mode commits the group every partition's position, idle ones too, for lag.
        offsets = dict(self.positions) if self.config.marker else batch.offsets
        self.delivery.send(archive, offsets, deadline)
        if batch.members:
            self.stats.archives += 1
            self.stats.messages += batch.records
            self.stats.bytes += batch.data_bytes
            log.debug("archive of %d file(s), %d bytes, offsets %s", len(batch.members),
                      archive.size, {f"{tp.topic}/{tp.partition}": offset
                                     for tp, offset in batch.offsets.items()})

    def batch_due_in(self) -> float:
        if not self.batch.records:
            return self.config.batch_max_seconds
        return self.batch.started + self.config.batch_max_seconds - time.monotonic()

    # -- the loop
    def run(self) -> int:
        self.watch_kafka_python()
        if not self.connect():
            log.info("stopped before Kafka was reachable")
            return 0
        if self.config.marker:
            self.assign()
        else:
            self.subscribe()
        next_stats = time.monotonic() + STATS_INTERVAL
        # New partitions show up in kafka-python's metadata, refreshed this often.
        partition_check_interval = min(PARTITION_CHECK_INTERVAL, self.consumer.config.get(
            "metadata_max_age_ms", 300_000) / 1000)
        next_partition_check = time.monotonic() + partition_check_interval
        next_health_check = time.monotonic() + HEALTH_CHECK_INTERVAL
        from kafka.errors import KafkaError
        try:
            while not self.stop.is_set():
                timeout = min(max(self.batch_due_in(), 0.0), 0.5)
                try:
                    if self.config.marker and (not self.assigned or
                                               time.monotonic() >= next_partition_check):
                        next_partition_check = time.monotonic() + partition_check_interval
                        self.assign()
                    if self.config.marker and not self.assigned:
                        log.warning("topics %s have no partitions yet; waiting",
                                    ",".join(self.topics) or self.config.topic_pattern)
                        self.stop.wait(min(partition_check_interval, 5.0))
                        continue
                    records = self.consumer.poll(timeout_ms=int(timeout * 1000))
                except KafkaError as error:
                    log.warning("polling %s failed (%s: %s); retrying",
                                self.config.broker_address, type(error).__name__, error)
                    records = None
                    self.stop.wait(1.0)
                if self.out_of_range:
                    self.report_offset_resets()
                if records:
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("polled %d record(s)", sum(map(len, records.values())))
                    self.add(records)
                if self.batch.records and self.batch_due_in() <= 0:
                    self.flush()
                self.delivery.check_reader()
                self.commit()
                if time.monotonic() >= next_health_check:
                    self.check_connection()
                    next_health_check += HEALTH_CHECK_INTERVAL
                if time.monotonic() >= next_stats:
                    log.info("%s lag=%s", self.stats.line(), self.lag())
                    next_stats += STATS_INTERVAL
        except Stopped:
            pass
        return self.shutdown()

    def shutdown(self) -> int:
        deadline = time.monotonic() + SHUTDOWN_BUDGET
        log.info("stopping: writing the pending batch")
        try:
            self.flush(deadline)
            for offsets in self.delivery.drain(deadline):
                self.uncommitted.update(offsets)
        except Stopped:
            log.warning("the reader did not take the last archive in time; its messages "
                        "stay uncommitted and will be read again")
        remaining_ms = int(min(max(deadline - time.monotonic(), 0.5), 3.0) * 1000)
        self.commit(timeout_ms=remaining_ms, final=True)
        self.delivery.pipe.close()
        lag = self.lag()
        self.consumer.close(autocommit=False, timeout_ms=1000)
        log.info("stopped; %s lag=%s", self.stats.line(), lag)
        return 0


# --------------------------------------------------------------------------- main

class OneLineFormatter(logging.Formatter):
    """kafka-python logs connection errors with their tracebacks: keep one line each."""

    def formatException(self, exc_info) -> str:
        return f"  ({exc_info[0].__name__}: {exc_info[1]})"

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " ")


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    log.setLevel(level)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    if argv is None:
        argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        build_arg_parser().print_help()
        return 0
    try:
        config = Config.from_sources(environ, argv)
    except ConfigError as error:
        print(f"spout.py: error: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        marker = read_marker(config.marker_path) if config.marker else None
    except MarkerError as error:
        print(f"spout.py: error: MARKER: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("starting: %s", config.describe())
    return Spout(config, stop, marker).run()


if __name__ == "__main__":
    sys.exit(main())
