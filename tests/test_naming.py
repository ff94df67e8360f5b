"""Names: the template and the sanitiser that keeps every name valid in PFS."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pfs_reader import clean_path

import spout

NASTY_KEYS = [None, b"", b".", b"..", b"...", b"../etc/passwd", b"/abs", b"a/b", b"*?[]{}!()@+^",
              "clé".encode(), b"\x00\x01\n\x7f", b"%", b"%2E", b"%null", b"%empty", b" ",
              b"k" * 10_000, b"k" * 10_000 + b"x", b"\xff" * 300]


def render_key(key, topic="orders"):
    return spout.NameTemplate("{topic}/{key}").render(topic, 0, 0, key, 0)


@pytest.mark.parametrize("key", NASTY_KEYS)
def test_nasty_keys_give_valid_names_inside_the_topic_folder(key):
    name = render_key(key)
    assert spout.pfs_path_problem(name) is None
    cleaned, problem = clean_path(name)
    assert problem is None
    assert cleaned.startswith("/orders/") and cleaned.count("/") == 2
    assert len(name.split("/")[1]) <= spout.MAX_COMPONENT


def test_nasty_keys_never_collide():
    names = [render_key(key) for key in NASTY_KEYS]
    assert len(set(names)) == len(names)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_encoding_is_valid_and_reversible(key):
    encoded = spout.encode_component(key)
    assert spout.pfs_path_problem("t/" + encoded) is None
    assert encoded not in (".", "..")
    if "%~" not in encoded and key:
        assert unquote_to_bytes(encoded) == key


@settings(max_examples=500)
@given(st.binary(max_size=400), st.binary(max_size=400))
def test_different_keys_never_share_a_name(a, b):
    if a != b:
        assert spout.encode_component(a) != spout.encode_component(b)


def test_text_keys_stay_readable():
    assert spout.encode_component(b"user-42_a.b~c") == "user-42_a.b~c"
    assert spout.encode_component(b"a b/c") == "a%20b%2Fc"


def test_default_names_are_unique_and_sort_in_offset_order():
    template = spout.NameTemplate()
    names = [template.render("t", p, o, b"same-key", 0) for p in range(3)
             for o in (0, 1, 9, 10, 99, 100, 2**40)]
    assert len(set(names)) == len(names)
    for p in range(3):
        mine = [n for n in names if n.startswith(f"t/{p}/")]
        assert mine == sorted(mine)
    assert template.render("t", 2, 7, None, 0) == "t/2/00000000000000000007"


def test_same_message_same_name():
    template = spout.NameTemplate("{topic}/{key}/{timestamp}-{offset}")
    assert template.render("t", 1, 5, b"k", 99) == template.render("t", 1, 5, b"k", 99)


def test_format_specs_apply():
    template = spout.NameTemplate("{topic}/p{partition:03d}/{offset:x}")
    assert template.render("t", 7, 255, None, 0) == "t/p007/ff"


@pytest.mark.parametrize("template, problem", [
    ("{topic}/{nope}", "unknown token"),
    ("{key.__class__}", "unknown token"),
    ("{key[0]}", "unknown token"),
    ("{key!r}", "conversion"),
    ("{topic}/(copy)/{offset}", "not allowed"),
    ("{topic}/{offset:*>30}", "not allowed"),
    ("{topic}//{offset}", "empty"),
    ("{topic}/../{offset}", "'..'"),
    ("{topic}/é{offset}", "printable ASCII"),
    ("static-name", "at least one token"),
    ("{offset:q}", "Unknown format code"),
    ("{offset", "expected '}'"),
])
def test_bad_templates_are_refused_with_the_reason(template, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace("[", r"\[")):
        spout.NameTemplate(template)


@pytest.mark.parametrize("template", [
    None, "{topic}/p{partition:03d}/{offset:x}", "{topic}/{offset:08}.bin", "%/{offset}",
    "{topic}/{offset:0>25}", "{partition}-{offset:_}", "{topic}/{key}/{offset}",
    "{date}/{hour}/{topic}-{offset}", "{key_hash}/{timestamp}-{offset}"])
def test_names_per_polled_list_are_those_of_render(template):
    from kafka.consumer.fetcher import ConsumerRecord
    names = spout.NameTemplate(template)
    records = [ConsumerRecord("a.b-c", 4, 0, offset, 1_700_000_000_000 + offset, 0,
                              None if offset % 5 == 0 else b"k%d" % offset, b"v", [], None,
                              1, 1, 0) for offset in (0, 1, 9, 10, 4095, 2**40)]
    assert names.render_list("a.b-c", 4, records) == [
        names.render("a.b-c", 4, r.offset, r.key, r.timestamp) for r in records]
