"""The encoder: bytes in, tar bytes out, readable by Python's tarfile and by Go's rules."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pfs_reader import StreamReader, iter_archive

import spout


def archive_bytes(members) -> bytes:
    return b"".join(bytes(part) for part in spout.encode_archive(members).parts)


def go_members(data: bytes):
    """Parses with the double's Go archive/tar rules, from a real pipe-like fd."""
    import os
    read_fd, write_fd = os.pipe()
    import threading
    writer = threading.Thread(target=lambda: (os.write(write_fd, data), os.close(write_fd)))
    writer.start()
    stream = StreamReader(read_fd)
    members = [(m.name, m.data) for m in iter_archive(stream)]
    trailing = stream.read_full(1 << 20)
    writer.join()
    os.close(read_fd)
    return members, trailing


@pytest.mark.parametrize("name", ["a", "t/0/00000000000000000042", "x" * 100, "d/" + "y" * 97])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 8**11 - 1])
@pytest.mark.parametrize("mtime", [0, 1_700_000_000])
def test_fast_header_is_byte_identical_to_tarfile(name, size, mtime):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    assert spout.member_header(name, size, mtime) == info.tobuf(tarfile.PAX_FORMAT)


def test_long_names_and_huge_sizes_use_pax_headers():
    name = "topic/" + "k" * 300
    header = spout.member_header(name, 8**11, 0)
    assert len(header) % 512 == 0 and len(header) > 512
    parsed = tarfile.TarInfo.frombuf(header[-512:], "utf-8", "strict")
    assert parsed.name != name  # the ustar field alone cannot hold it: the PAX record does
    data = b"x" * 5
    raw = archive_bytes([(name, data, 0)])
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        (member,) = tar.getmembers()
        assert member.name == name and tar.extractfile(member).read() == data


def test_archive_ends_with_exactly_two_zero_blocks_and_no_record_padding():
    raw = archive_bytes([("a", b"1" * 600, 0), ("b", b"", 0)])
    assert len(raw) == 512 + 1024 + 512 + 1024
    assert raw.endswith(bytes(1024)) and raw[-1536:-1024] != bytes(512)
    assert spout.encode_archive([("a", b"1" * 600, 0)]).size == 512 + 1024 + 1024


def test_empty_archive_is_just_the_end_marker():
    assert archive_bytes([]) == bytes(1024)


def test_large_values_are_not_copied():
    value = bytes(3 * 1024 * 1024)
    archive = spout.encode_archive([("big", value, 0)])
    assert any(part is value for part in archive.parts)


members_strategy = st.lists(
    st.tuples(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                    exclude_characters="/"), min_size=1, max_size=150),
              st.binary(max_size=2000), st.integers(0, 2**33)),
    max_size=8, unique_by=lambda m: m[0])


@settings(max_examples=150, deadline=None)
@given(members_strategy)
def test_round_trip_through_python_tarfile(members):
    raw = archive_bytes(members)
    assert len(raw) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        found = [(m.name, tar.extractfile(m).read(), m.mtime, m.isreg()) for m in tar]
    assert found == [(name, data, mtime, True) for name, data, mtime in members]


@settings(max_examples=150, deadline=None)
@given(members_strategy)
def test_round_trip_through_go_rules_with_nothing_after_the_end(members):
    found, trailing = go_members(archive_bytes(members))
    assert found == [(name, data) for name, data, _ in members]
    assert trailing == b""


def test_values_around_the_copy_limit_keep_their_bytes_and_order():
    limit = spout.COPY_MAX
    members = [(f"m{i}", bytes([i]) * size, 1_700_000_000 + i % 2)
               for i, size in enumerate([1, limit - 1, limit, limit + 1, 0, 3 * limit, 7])]
    archive = spout.encode_archive(members)
    raw = b"".join(bytes(part) for part in archive.parts)
    assert archive.size == len(raw) and archive.members == len(members)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        found = [(m.name, tar.extractfile(m).read(), m.mtime) for m in tar]
    assert found == members
    assert sum(1 for part in archive.parts if len(part) > limit and
               any(part is data for _, data, _ in members)) == 2
