"""A test double of the reading end of a Pachyderm 1.x spout's /pfs/out, in its three generations.

Built from the facts in shared/PACHYDERM_1X_SPOUTS.md:

- g1 (1.8.6-1.10.x): opens the pipe for each archive, starts a commit at once, reads to the end of
  the archive, finishes the commit (even empty, even after an error), closes, reopens.
- g2 (1.11.0-1.11.2): keeps the fd; a new tar parser per archive; a commit starts at the first
  header; when the stream ends before a header, waits for a writer to open again.
- g3 (1.11.3-1.13.x): keeps the fd; skips zero blocks before a header; spools the whole archive,
  then commits it; reads block by block with no read-ahead; a tar error kills the user code; an
  invalid path wedges the spout.

Archives are parsed the way Go's archive/tar does. Commits are applied to an in-memory repo with
append (default) or overwrite semantics; a marker member goes to the marker branch and is exposed
beside the pipe, as the worker does. Runs in a thread (tests) or as a script (the demo).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import posixpath
import random
import shutil
import termios
import threading
import time
from dataclasses import dataclass, field

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
FORBIDDEN = set("*?[]{}!()@+^")


class TarError(Exception):
    pass


class UnexpectedEOF(TarError):
    def __init__(self):
        super().__init__("unexpected EOF")


class InvalidHeader(TarError):
    def __init__(self, why: str = ""):
        super().__init__("invalid tar header" + (f" ({why})" if why else ""))


class EndOfStream(Exception):
    """The stream ended (no writer) exactly on a block boundary, before a header."""


@dataclass
class Member:
    name: str
    data: bytes
    typeflag: bytes


@dataclass
class Commit:
    number: int
    puts: list = field(default_factory=list)      # [(path, bytes)] in archive order
    error: str | None = None


class StreamReader:
    """Exact reads from a pipe fd: no read-ahead, so the writer's FIONREAD stays truthful."""

    def __init__(self, fd: int):
        self.fd = fd
        self.consumed = 0

    def read_full(self, size: int) -> bytes:
        chunks, missing = [], size
        while missing:
            chunk = os.read(self.fd, min(missing, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            missing -= len(chunk)
        data = b"".join(chunks)
        self.consumed += len(data)
        return data


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # base-256
        value = field_bytes[0] & 0x7F
        for byte in field_bytes[1:]:
            value = (value << 8) | byte
        return value
    text = field_bytes.split(b"\x00", 1)[0].strip(b" \x00")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidHeader("bad number") from None


def _check_checksum(block: bytes) -> None:
    stored = _octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148]) + 8 * 32 + \
        sum(b - 256 if b > 127 else b for b in block[156:])
    if stored not in (unsigned, signed):
        raise InvalidHeader("checksum")


def _parse_pax(data: bytes) -> dict:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def read_header_block(stream: StreamReader, first: bytes | None = None) -> bytes | None:
    """Go's readHeader: None at the end of the archive (two zero blocks, or a clean EOF)."""
    block = first if first is not None else stream.read_full(BLOCK)
    if not block:
        return None
    if len(block) < BLOCK:
        raise UnexpectedEOF()
    if block == ZERO_BLOCK:
        block = stream.read_full(BLOCK)
        if not block:
            return None
        if len(block) < BLOCK:
            raise UnexpectedEOF()
        if block == ZERO_BLOCK:
            return None
        raise InvalidHeader("zero block followed by a non-zero block")
    return block


def iter_archive(stream: StreamReader, first: bytes | None = None):
    """Yields the members of one archive, as Go's tar.Reader.Next would."""
    pax: dict = {}
    long_name: str | None = None
    while True:
        block = read_header_block(stream, first)
        first = None
        if block is None:
            return
        _check_checksum(block)
        typeflag = block[156:157]
        size = _octal(block[124:136])
        name = block[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:263] == b"ustar\x00":
            prefix = block[345:500].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = prefix + "/" + name
        body_size = size
        if typeflag in (b"x", b"g", b"L", b"K"):
            body = stream.read_full(size + (-size % BLOCK))
            if len(body) < size + (-size % BLOCK):
                raise UnexpectedEOF()
            body = body[:size]
            if typeflag == b"x":
                pax = _parse_pax(body)
            elif typeflag == b"L":
                long_name = body.rstrip(b"\x00").decode("utf-8", "surrogateescape")
            continue
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        if "size" in pax:
            body_size = int(pax["size"])
        pax, long_name = {}, None
        padded = body_size + (-body_size % BLOCK)
        body = stream.read_full(padded) if typeflag not in (b"5", b"2", b"1") else b""
        if len(body) < (padded if typeflag not in (b"5", b"2", b"1") else 0):
            raise UnexpectedEOF()
        yield Member(name, body[:body_size], typeflag)


def clean_path(name: str) -> tuple[str, str | None]:
    """The path PFS stores, and why it would be rejected (None if valid)."""
    if ".." in name.split("/"):
        return name, "'..' in path"
    cleaned = posixpath.normpath("/" + name)
    if cleaned.startswith("//"):
        cleaned = cleaned[1:]
    for char in cleaned:
        if not " " <= char <= "~":
            return cleaned, f"non-printable or non-ASCII character {char!r}"
        if char in FORBIDDEN:
            return cleaned, f"forbidden character {char!r}"
    return cleaned, None


class PfsReader:
    """The reading end of /pfs/out. Start with start(); inspect files, commits and counters."""

    def __init__(self, pipe: str, generation: str = "g3", overwrite: bool = False,
                 marker: str | None = None, commit_delay: float = 0.0,
                 pause: tuple[float, float] = (0.0, 0.0), seed: int | None = None,
                 materialize: str | None = None, keep_open: bool = False):
        """keep_open: hold a write end too, as the worker does, so that a spout's death is
        no end of stream: a torn archive is continued by the next spout's bytes. A tar error
        then restarts the "user code": the double swaps in a fresh FIFO and counts a restart;
        the harness kills the spout and starts another."""
        assert generation in ("g1", "g2", "g3")
        self.pipe = pipe
        self.generation = generation
        self.overwrite = overwrite
        self.marker = marker
        self.commit_delay = commit_delay
        self.pause = pause
        self.random = random.Random(seed)
        self.materialize = materialize
        if materialize:
            os.makedirs(materialize, exist_ok=True)
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.commits: list[Commit] = []
        self.empty_commits = 0
        self.tar_errors: list[str] = []
        self.invalid_paths: list[str] = []
        self.wedged = False
        self.reopens = 0
        self.restarts = 0
        self.keep_open = keep_open
        self._keeper: int | None = None
        self._committing = False  # an archive read whole, its commit not yet finished
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle
    def start(self) -> PfsReader:
        self._thread = threading.Thread(target=self.run, name=f"pfs-reader-{self.generation}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._keeper is not None:
            os.close(self._keeper)
            self._keeper = None
        # A reader blocked in open() or read() is woken by a writer that opens and closes.
        try:
            fd = os.open(self.pipe, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
        if self._thread:
            self._thread.join(timeout)

    def run(self) -> None:
        try:
            {"g1": self._run_g1, "g2": self._run_g2, "g3": self._run_g3}[self.generation]()
        except _Stopping:
            pass

    # -- counters the tests read
    @property
    def member_count(self) -> int:
        with self.lock:
            return sum(len(commit.puts) for commit in self.commits)

    def settled(self) -> bool:
        """keep_open: nothing left in the pipe and no archive read but not yet committed, as
        after the back-off (10 s or more) with which the worker restarts dead user code: a
        spout started now sees the marker of every archive its predecessor completed."""
        keeper = self._keeper
        if keeper is None:
            return not self._committing
        try:
            unread = int.from_bytes(fcntl.ioctl(keeper, termios.FIONREAD, b"\0" * 4), "little")
        except OSError:  # swapped for a fresh pipe meanwhile
            return False
        return unread == 0 and not self._committing

    def snapshot(self) -> dict[str, bytes]:
        with self.lock:
            return dict(self.files)

    # -- the three loops
    def _open(self) -> StreamReader:
        while True:
            if self._stop.is_set():
                raise _Stopping()
            if self.keep_open:
                fd = os.open(self.pipe, os.O_RDONLY | os.O_NONBLOCK)
                self._keeper = os.open(self.pipe, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(fd, True)
                self.reopens += 1
                return StreamReader(fd)
            fd = os.open(self.pipe, os.O_RDONLY)  # blocks until a writer opens
            if self._stop.is_set():
                os.close(fd)
                raise _Stopping()
            self.reopens += 1
            return StreamReader(fd)

    def _pause(self) -> None:
        low, high = self.pause
        if high > 0:
            time.sleep(self.random.uniform(low, high))

    def _run_g1(self) -> None:
        while True:
            stream = self._open()
            commit = self._start_commit()
            try:
                for member in iter_archive(stream):
                    self._put(commit, member)
            except TarError as error:
                commit.error = str(error)
                self.tar_errors.append(str(error))
            self._finish_commit(commit)
            os.close(stream.fd)
            self._pause()

    def _run_g2(self) -> None:
        stream = self._open()
        while True:
            first = stream.read_full(BLOCK)
            if not first:  # no writer: wait for one to open again
                os.close(stream.fd)
                stream = self._open()
                continue
            commit = None
            try:
                for member in iter_archive(stream, first):
                    commit = commit or self._start_commit()
                    self._put(commit, member)
            except TarError as error:
                self.tar_errors.append(str(error))
                if commit:
                    commit.error = str(error)
            if commit:
                self._finish_commit(commit)
            self._pause()

    def _run_g3(self) -> None:
        stream = self._open()
        while True:
            if self.wedged:
                self._stop.wait()
                raise _Stopping()
            first = stream.read_full(BLOCK)
            if not first:
                os.close(stream.fd)
                stream = self._open()
                continue
            if first == ZERO_BLOCK:
                continue
            try:
                members = list(iter_archive(stream, first))
            except TarError as error:
                # The worker kills the user code and starts over with a fresh pipe.
                self.tar_errors.append(str(error))
                os.close(stream.fd)
                if self._keeper is not None:
                    os.close(self._keeper)
                    self._keeper = None
                os.unlink(self.pipe)
                os.mkfifo(self.pipe)
                self.restarts += 1
                stream = self._open()
                continue
            bad = [m.name for m in members if clean_path(m.name)[1]]
            if bad:
                self.invalid_paths.extend(bad)
                self.wedged = True  # the put is retried forever
                continue
            self._committing = True
            if self.commit_delay:
                time.sleep(self.commit_delay)
            commit = self._start_commit()
            for member in members:
                self._put(commit, member)
            self._finish_commit(commit)
            self._committing = False

    # -- commits
    def _start_commit(self) -> Commit:
        return Commit(len(self.commits) + 1)

    def _put(self, commit: Commit, member: Member) -> None:
        path, problem = clean_path(member.name)
        if problem:
            self.invalid_paths.append(member.name)
            return
        data = member.data if member.typeflag in (b"0", b"\x00", b"7") else b""
        commit.puts.append((path, data))

    def _finish_commit(self, commit: Commit) -> None:
        with self.lock:
            if not commit.puts:
                self.empty_commits += 1
            for path, data in commit.puts:
                if self.marker and path.lstrip("/").startswith(self.marker):
                    self._write_marker(data)
                elif self.overwrite:
                    self.files[path] = data
                else:
                    self.files[path] = self.files.get(path, b"") + data
            self.commits.append(commit)
        if self.materialize and commit.puts:
            # Built aside, then renamed: a reader killed mid-commit leaves no half commit.
            number = len([name for name in os.listdir(self.materialize)
                          if name.startswith("commit-")]) + 1
            building = os.path.join(self.materialize, f".building-{number:04d}")
            shutil.rmtree(building, ignore_errors=True)
            for path, data in commit.puts:
                target = os.path.join(building, path.lstrip("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "ab") as out:
                    out.write(data)
            os.rename(building, os.path.join(self.materialize, f"commit-{number:04d}"))

    def _write_marker(self, data: bytes) -> None:
        target = os.path.join(os.path.dirname(self.pipe), self.marker)
        tmp = target + ".tmp"
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, target)


class _Stopping(Exception):
    pass


def load_materialized(root: str, overwrite: bool) -> dict[str, bytes]:
    """The repo's files rebuilt from materialised commits, applied in order."""
    files: dict[str, bytes] = {}
    for commit in sorted(name for name in os.listdir(root) if name.startswith("commit-")):
        base = os.path.join(root, commit)
        for folder, _, names in os.walk(base):
            for name in names:
                full = os.path.join(folder, name)
                path = "/" + os.path.relpath(full, base)
                with open(full, "rb") as data:
                    content = data.read()
                files[path] = content if overwrite else files.get(path, b"") + content
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipe")
    parser.add_argument("--generation", default="g3", choices=("g1", "g2", "g3"))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--marker")
    parser.add_argument("--commit-delay", type=float, default=0.0)
    parser.add_argument("--materialize", help="write each commit under DIR/commit-NNNN/")
    parser.add_argument("--summary", help="write a JSON summary here when stopped")
    parser.add_argument("--keep-open", action="store_true",
                        help="hold a write end too, as the worker does")
    args = parser.parse_args()
    # A (re)started worker makes a fresh FIFO before the user code starts.
    if os.path.exists(args.pipe):
        os.unlink(args.pipe)
    os.mkfifo(args.pipe)
    reader = PfsReader(args.pipe, args.generation, args.overwrite, args.marker,
                       args.commit_delay, materialize=args.materialize,
                       keep_open=args.keep_open)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: reader._stop.set())
    reader.start()
    while not reader._stop.wait(0.2):
        pass
    reader.stop()
    if args.summary:
        with open(args.summary, "w") as out:
            json.dump({"commits": len(reader.commits), "files": len(reader.files),
                       "empty_commits": reader.empty_commits, "tar_errors": reader.tar_errors,
                       "invalid_paths": reader.invalid_paths}, out)


if __name__ == "__main__":
    main()
