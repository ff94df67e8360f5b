"""Names against hostile keys, topics, format specs and marker names (issue 22, cases 8 and 9):
no rendered name leaves its folder or is refused by PFS, and none starts with the marker."""

from __future__ import annotations

import itertools
import os
import signal
import string

import pytest
from conftest import create_topic, produce, spout_env, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pfs_reader import clean_path
from test_config import run_spout

import spout


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("pfs") / "out"
    os.mkfifo(path)
    return str(path)


def assert_valid(name: str, folders: int | None = None) -> None:
    assert spout.pfs_path_problem(name) is None, name
    cleaned, problem = clean_path(name)
    assert problem is None, name
    parts = name.lstrip("/").split("/")
    assert not any(part in ("", ".", "..") for part in parts), name
    if folders is not None:
        assert len(parts) == folders + 1, name


def clashes(name: str, marker: str) -> bool:
    """As Pachyderm 1.x (and the reader double) tell the marker from a data file."""
    return clean_path(name)[0].lstrip("/").startswith(marker)


# -- case 9: a '.' or '..' component, whatever the spec
@pytest.mark.parametrize("template, topic, key", [
    ("{topic}/{key:.2}/{offset}", "events", b"..x"),
    ("{topic}/{key:.1}/{offset}", "events", b".x"),
    ("{topic}/{key:.2}/{offset}", "events", b"..."),
    ("{topic:.2}/{partition}/{offset}", "..x", None),
    ("{topic:.1}/{offset}", ".x", None),
    ("{topic}/{offset}", ".", None),
    ("{topic}/{offset}", "..", None),
    ("{topic}/{key:.<3.1}/{offset}", "t", b".a"),
])
def test_no_name_leaves_its_folder(template, topic, key):
    assert_valid(spout.NameTemplate(template).render(topic, 5, 5, key, 0),
                 folders=template.count("/"))


@pytest.mark.parametrize("template, problem", [
    ("{topic}/{key:.0}x/{offset}", "renders nothing"),
    ("{topic}/{partition:c}/{offset}", "renders a character"),
    ("{topic}/{offset:/>5}", "fill '/'"),
    ("{offset:/>5}", "fill '/'"),
    ("{topic}/{key_hash:*>5}/{offset}", "fill '*'"),
])
def test_specs_that_could_break_a_name_are_refused(template, problem):
    with pytest.raises(ValueError, match=problem.replace("*", r"\*")):
        spout.NameTemplate(template)


def test_a_dead_letter_stays_under_errors():
    record = spout.DecodedRecord("..", 0, 7, 0, 0, None, b"v", [],
                                 problem=spout.BadRecord("r", "d"))
    for name, _data, _mtime in spout.dead_letter_files(record, 0):
        assert_valid(name, folders=3)
        assert name.startswith("_errors/")


TEXT_TYPES, INT_TYPES = ["", "s"], ["", "d", "x", "X", "o", "b", "c", "n", "e", "g", "%"]


@st.composite
def specs(draw, field: str) -> str:
    fill = draw(st.sampled_from(["", ".", "/", "0", "a", " ", "_", "%", "*", "1"]))
    align = draw(st.sampled_from(["", "<", ">", "^", "="]))
    spec = (fill + align if align else "") + draw(st.sampled_from(["", "", "-", " ", "+"]))
    spec += draw(st.sampled_from(["", "#"])) + draw(st.sampled_from(["", "0"]))
    spec += draw(st.sampled_from(["", "1", "3", "12", "25"]))
    spec += draw(st.sampled_from(["", "_"]))
    spec += draw(st.sampled_from(["", ".0", ".1", ".2", ".3"]))
    types = TEXT_TYPES if field in ("topic", "key", "key_hash", "date", "hour") else INT_TYPES
    return spec + draw(st.sampled_from(types))


@st.composite
def templates(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        parts.append(draw(st.text(alphabet="ab.-_/%~01", max_size=3)))
        field = draw(st.sampled_from(spout.NAME_TOKENS))
        spec = draw(st.one_of(st.just(""), st.just(""), specs(field)))
        parts.append("{%s%s}" % (field, ":" + spec if spec else ""))
    parts.append(draw(st.text(alphabet="ab.-_/%~01", max_size=3)))
    return "".join(parts)


KAFKA_TOPICS = st.text(alphabet="._-aZ09", min_size=1, max_size=8)
KEYS = st.one_of(st.none(), st.binary(max_size=12),
                 st.text(alphabet="./%a-~ 1", max_size=6).map(str.encode))


@st.composite
def messages(draw, marker: str = "") -> tuple:
    """(partition, offset, key, timestamp), often pieces of the marker's own text."""
    tail = marker[draw(st.integers(0, len(marker))):] if marker else ""
    digits = tail[:len(tail) - len(tail.lstrip(string.digits))]
    hexes = tail[:len(tail) - len(tail.lstrip(string.hexdigits))]
    numbers = [st.integers(0, 3), st.integers(0, 2**63 - 1)]
    if digits:
        numbers.append(st.just(int(digits[:18])))
    if hexes:
        numbers.append(st.just(int(hexes[:15], 16)))
    partition = draw(st.one_of(*numbers).map(lambda n: n % 2**31))
    offset = draw(st.one_of(*numbers))
    key = draw(st.one_of(KEYS, st.just(tail.encode())))
    timestamp = draw(st.one_of(st.just(-1), st.integers(0, 2**41)))
    return partition, offset, key, timestamp


@settings(max_examples=600, deadline=None)
@given(templates(), KAFKA_TOPICS, st.lists(messages(), min_size=1, max_size=5))
def test_every_name_of_an_accepted_template_is_valid(template, topic, batch):
    try:
        names = spout.NameTemplate(template)
    except (ValueError, OverflowError):
        return
    from kafka.consumer.fetcher import ConsumerRecord
    records = [ConsumerRecord(topic, p, 0, o, t, 0, k, b"v", [], None, 1, 1, 0)
               for p, o, k, t in batch]
    for record in records:
        name = names.render(topic, record.partition, record.offset, record.key,
                            record.timestamp)
        assert_valid(name)
        assert names.render_list(topic, record.partition, [record]) == [name]


# -- case 8: names that start with the marker
@pytest.mark.parametrize("marker, template, topic, format, name", [
    ("ab", "a{key}/{offset}", "events", "raw", "ab/0"),
    ("o1", "o{partition}/{offset}", "events", "raw", "o1/0"),
    ("ab", "{key_hash}/{offset}", "events", "raw", "ab0d.../0"),
    ("events.meta", "{topic}", "events", "raw+meta", "events.meta.json"),
    ("events1", "{topic}{partition}/{offset}", "events", "raw", "events1/0"),
    ("ab", "{offset:x}", "events", "raw", "ab"),
    ("a", "{offset:a>3}", "events", "raw", "aa0"),
    ("ev", "{topic}/{partition}/{offset}.jsonl", "events", "jsonl", "events/0/0.jsonl"),
])
def test_templates_whose_names_could_start_with_the_marker_are_refused(
        pipe, marker, template, topic, format, name):
    result = run_spout({"BOOTSTRAP_SERVERS": "127.0.0.1:1", "TOPIC": topic, "OUTPUT_PIPE": pipe,
                        "MARKER": marker, "NAME_TEMPLATE": template, "FORMAT": format})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spout.py: error: MARKER: ")
    assert f"start with the marker name {marker!r}" in lines[0]


@pytest.mark.parametrize("template", [
    None, "{topic}/{partition}/{offset:020d}", "{topic}/{key}", "{key_hash}/{offset}",
    "{topic}/{date}/{hour}/{partition}-{offset:020d}", "{partition}/{offset}",
    "p{partition:03d}/{offset:x}"])
def test_ordinary_templates_keep_working_with_a_marker(pipe, template):
    env = {"BOOTSTRAP_SERVERS": "127.0.0.1:1", "TOPIC": "events", "OUTPUT_PIPE": pipe,
           "MARKER": "offsets"}
    if template:
        env["NAME_TEMPLATE"] = template
    assert spout.Config.from_sources(env).marker == "offsets"


MARKERS = st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,5}", fullmatch=True)


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["raw", "json", "raw+meta"]), st.data())
def test_a_marker_never_takes_a_data_file(pipe, format, data):
    # Markers, topics and templates made of one another's text, where a clash is likeliest.
    marker = data.draw(MARKERS)
    topic = data.draw(st.one_of(KAFKA_TOPICS, st.builds(
        str.__add__, st.sampled_from([marker[:n] for n in range(1, len(marker) + 1)]),
        st.text(alphabet="ab01.-_", max_size=2))))
    template = data.draw(st.one_of(templates(), st.builds(
        str.__add__, st.sampled_from([marker[:n] for n in range(len(marker) + 1)]),
        templates())))
    try:
        names = spout.NameTemplate(template)
    except (ValueError, OverflowError):
        return
    suffix = ".meta.json" if format == "raw+meta" else ""
    env = {"BOOTSTRAP_SERVERS": "127.0.0.1:1", "OUTPUT_PIPE": pipe, "MARKER": marker,
           "NAME_TEMPLATE": template, "FORMAT": format}
    try:
        fixed = spout.Config.from_sources({**env, "TOPIC": topic})
    except spout.ConfigError:
        fixed = None
    try:
        by_pattern = spout.Config.from_sources({**env, "TOPIC_PATTERN": ".*"})
    except spout.ConfigError:
        by_pattern = None
    if not (fixed or by_pattern and by_pattern.wants_topic(topic)):
        return
    for partition, offset, key, timestamp in itertools.chain(
            witnesses(marker), data.draw(st.lists(messages(marker), max_size=4))):
        name = names.render(topic, partition, offset, key, timestamp)
        assert not clashes(name, marker) and not clashes(name + suffix, marker), \
            (marker, name)


def witnesses(marker: str):
    """Messages whose fields spell out each tail of the marker, as keys and as numbers."""
    for start in range(len(marker) + 1):
        tail = marker[start:]
        digits = tail[:len(tail) - len(tail.lstrip(string.digits))][:18]
        hexes = tail[:len(tail) - len(tail.lstrip(string.hexdigits))][:15]
        numbers = {0, int(digits or "0"), int(hexes or "0", 16)}
        for number in numbers:
            for key in (tail.encode(), None):
                yield number % 2**31, number, key, number


# -- end to end: a real spout, the 1.x reader double
def test_keys_of_dots_under_a_cutting_spec_land_in_their_folders(broker, fifo, spouts, readers):
    topic = create_topic(broker, 1)
    keys = [b"..x", b".", b"..", b".a", b"ok", b"...."]
    produce(broker, topic, [(0, key, b"v%d" % i) for i, key in enumerate(keys)])
    reader = readers(fifo, generation="g3")
    process = spouts(spout_env(broker, topic, fifo, NAME_TEMPLATE="{topic}/{key:.2}/{offset}"))
    wait_until(lambda: len(reader.snapshot()) + len(reader.invalid_paths) >= len(keys) or
               process.process.poll() is not None, 60, "every message")
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.log
    assert reader.invalid_paths == []
    files = reader.snapshot()
    assert sorted(files.values()) == sorted(b"v%d" % i for i in range(len(keys)))
    for path in files:
        assert_valid(path, folders=2)
        assert path.startswith(f"/{topic}/")


def test_a_matched_topic_whose_names_would_be_taken_for_the_marker_is_skipped(
        broker, fifo, spouts, readers):
    clashing = create_topic(broker, 2)
    other = create_topic(broker, 2, name=f"{clashing}-b")
    marker = f"{clashing}1"
    produce(broker, clashing, [(p, None, b"c%d" % p) for p in range(2)])
    produce(broker, other, [(p, None, b"o%d" % p) for p in range(2)])
    reader = readers(fifo, generation="g3", marker=marker)
    env = spout_env(broker, clashing, fifo, TOPIC_PATTERN=f"{clashing}.*", MARKER=marker,
                    NAME_TEMPLATE="{topic}{partition}/{offset}")
    del env["TOPIC"]
    process = spouts(env)
    wait_until(lambda: len(reader.snapshot()) >= 2 or process.process.poll() is not None, 60,
               "the other topic's messages")
    wait_until(lambda: "skipping topic" in process.log, 10, "the skip to be logged")
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.log
    assert reader.snapshot() == {f"/{other}0/0": b"o0", f"/{other}1/0": b"o1"}
    topics, positions = spout.decode_marker((fifo.parent / marker).read_bytes())
    assert topics == [other] and positions == {(other, 0): 1, (other, 1): 1}
