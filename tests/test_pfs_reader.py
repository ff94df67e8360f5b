"""The Pachyderm reader double itself: it must catch what the real readers punish."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from conftest import wait_until
from pfs_reader import PfsReader

import spout


def tarfile_archive(members) -> bytes:
    """What a naive spout writes: tarfile's stream mode, padded to a 10,240-byte record."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def exact_archive(members) -> bytes:
    archive = spout.encode_archive([(name, data, 0) for name, data in members])
    return b"".join(bytes(part) for part in archive.parts)


def feed(fifo, generation: str, chunks, expect_commits: int, close_first: bool = False,
         **kwargs) -> PfsReader:
    """Writes chunks to a reader double, waits for it to take them, stops it."""
    reader = PfsReader(str(fifo), generation, **kwargs).start()
    fd = os.open(fifo, os.O_WRONLY)
    try:
        for chunk in chunks:
            os.write(fd, chunk)
        if close_first:
            os.close(fd)
            fd = None
        wait_until(lambda: len(reader.commits) + len(reader.tar_errors) >= expect_commits
                   or reader.wedged, 5, "the reader to take the archives")
    finally:
        if fd is not None:
            os.close(fd)
        reader.stop()
    return reader


def test_padded_archives_make_empty_commits_on_g1(fifo):
    reader = feed(fifo, "g1", [tarfile_archive([("a", b"1")])], expect_commits=2)
    assert reader.empty_commits >= 1
    assert reader.snapshot() == {"/a": b"1"}


def test_padded_archives_back_to_back_break_g2(fifo):
    # 3 blocks of content leave 17 zero blocks of padding: after the end-of-archive pair and
    # seven empty archives, one zero block is followed by the next archive's header.
    chunks = [tarfile_archive([("a", b"1" * 600)]), tarfile_archive([("b", b"2")])]
    reader = feed(fifo, "g2", chunks, expect_commits=2)
    assert reader.tar_errors and "/b" not in reader.snapshot()


def test_g3_skips_padding(fifo):
    chunks = [tarfile_archive([("a", b"1")]), tarfile_archive([("b", b"2")])]
    reader = feed(fifo, "g3", chunks, expect_commits=2)
    assert reader.snapshot() == {"/a": b"1", "/b": b"2"} and reader.tar_errors == []


@pytest.mark.parametrize("generation", ["g1", "g2", "g3"])
def test_exact_archives_are_clean_on_every_generation(fifo, generation):
    chunks = [exact_archive([("t/a", b"1"), ("t/b", b"")]), exact_archive([("t/a", b"3")])]
    reader = feed(fifo, generation, chunks, expect_commits=2)
    assert [len(commit.puts) for commit in reader.commits if commit.puts] == [2, 1]
    assert reader.tar_errors == []
    # g1 waits in read() between archives: the writer's close ends an empty one there.
    assert reader.empty_commits == (len(reader.commits) - 2) <= (generation == "g1")
    assert reader.snapshot() == {"/t/a": b"13", "/t/b": b""}  # append is the default


def test_overwrite_keeps_the_last_value(fifo):
    chunks = [exact_archive([("a", b"1")]), exact_archive([("a", b"2")])]
    reader = feed(fifo, "g3", chunks, expect_commits=2, overwrite=True)
    assert reader.snapshot() == {"/a": b"2"}


def test_a_torn_archive_is_a_tar_error_on_g3(fifo):
    whole = exact_archive([("a", b"x" * 2000)])
    reader = feed(fifo, "g3", [whole[:1000]], expect_commits=1, close_first=True)
    assert reader.tar_errors and reader.snapshot() == {}


def test_an_invalid_path_wedges_g3(fifo):
    reader = feed(fifo, "g3", [exact_archive([("bad(name)", b"1")])], expect_commits=1)
    assert reader.wedged and reader.invalid_paths == ["bad(name)"] and reader.commits == []


def test_a_marker_member_goes_beside_the_pipe_not_into_the_commit(fifo):
    chunks = [exact_archive([("a", b"1"), ("marker", b'{"p": 1}')])]
    reader = feed(fifo, "g3", chunks, expect_commits=1, marker="marker")
    assert reader.snapshot() == {"/a": b"1"}
    assert (fifo.parent / "marker").read_bytes() == b'{"p": 1}'
