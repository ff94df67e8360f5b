"""Real pachd for `make test-pachd`: Pachyderm's own testpachd (v2.12.2, built from
tests/pachd/go.mod into .cache/testpachd) with everything it expects on loopback, started from
here as root on a clean Debian machine:

- Postgres 15 from Debian (apt-get install if absent), run as the postgres user with fsync
  off, on 127.0.0.1:30228 with the role and database `pachyderm` (password
  `correcthorsebatterystable`, CREATEDB): testpachd makes an ephemeral database per start.
- A plain TCP relay on 127.0.0.1:30229 in place of pgbouncer.
- S3 on 127.0.0.1:9002 with keys minioadmin/minioadmin: moto's server (requirements-dev.txt).
- testpachd with SKIP_DOCKER_POSTGRES_CREATE=1 SKIP_DOCKER_MINIO_CREATE=1
  DOCKER_MACHINE_NAME=127.0.0.1 (no Docker is contacted), AWS_CA_BUNDLE unset (else it fails
  with LoadCustomCABundleError), `-context=` (the pachctl config is left alone) and `-auth`
  (root token `iamroot`, testpachd's own). It prints grpc://127.0.0.1:PORT once healthy.

The ports are testpachd's own and fixed: one of these per machine at a time.

RealPachd has the helper API of the pachd double (tests/pachd_double.py) that the tests use:
address, port, token, create_repo, create_pipeline_repo, commits, head, file_count,
has_branch. Run standalone to try it: python tests/real_pachd.py
"""

from __future__ import annotations

import io
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from kafka_broker import port_open

ROOT = Path(__file__).resolve().parent.parent
TESTPACHD = ROOT / ".cache" / "testpachd"
POSTGRES_PORT = 30228       # dockertestenv.postgresPort
PGBOUNCER_PORT = 30229      # dockertestenv.PGBouncerPort
S3_PORT = 9002              # dockertestenv.minioPort
POSTGRES_USER = POSTGRES_DB = "pachyderm"
POSTGRES_PASSWORD = "correcthorsebatterystable"
ROOT_TOKEN = "iamroot"      # src/testing/testpachd/main.go rootToken
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
DEFAULT_PROJECT = "default"


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None,
             log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{what}: the process exited ({process.returncode})\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def ensure_postgres_installed() -> None:
    if (POSTGRES_BIN / "postgres").exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                    "postgresql-15"], check=True, env=env)
    # The package may start a default cluster of its own on 5432: nothing here uses it, and
    # nothing should outlive the tests.
    subprocess.run(["pg_ctlcluster", "15", "main", "stop"], check=False, env=env,
                   capture_output=True)


class Relay:
    """A TCP relay from one loopback port to another: pgbouncer's port, as far as testpachd
    needs it (it connects there with the same role and password)."""

    def __init__(self, listen: int, target: int):
        self.target = target
        self.server = socket.create_server(("127.0.0.1", listen), reuse_port=False)
        self.server.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="pgbouncer-relay", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        ends = {client: upstream, upstream: client}
        try:
            while not self.stopping.is_set():
                readable, _, _ = select.select(list(ends), [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    ends[sock].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def stop(self) -> None:
        self.stopping.set()
        self.server.close()
        self.thread.join(2)


class PachdEnvironment:
    """Postgres, the relay, moto's S3 and testpachd, started in that order, stopped in the
    reverse; nothing outlives stop()."""

    def __init__(self, auth: bool = True, workdir: Path | None = None):
        self.auth = auth
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kafka-spout-pachd-"))
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.relay: Relay | None = None
        self.address: str | None = None   # grpc://127.0.0.1:PORT
        self.startup_seconds: dict[str, float] = {}

    # -- the parts
    def _as_postgres(self) -> dict:
        if os.geteuid() != 0:
            return {}
        user = pwd.getpwnam("postgres")
        return {"user": user.pw_uid, "group": user.pw_gid}

    def start_postgres(self) -> None:
        ensure_postgres_installed()
        for port in (POSTGRES_PORT, PGBOUNCER_PORT, S3_PORT):
            if port_open(port):
                raise RuntimeError(f"127.0.0.1:{port} is taken: another testpachd setup runs")
        data = self.workdir / "postgres"
        sockets = self.workdir / "postgres-sockets"
        data.mkdir()
        sockets.mkdir()
        as_postgres = self._as_postgres()
        if as_postgres:
            os.chmod(self.workdir, 0o755)
            for path in (data, sockets):
                os.chown(path, as_postgres["user"], as_postgres["group"])
        log = self.workdir / "postgres.log"
        subprocess.run([str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"],
                       check=True, capture_output=True, cwd=self.workdir, **as_postgres)
        process = subprocess.Popen(
            [str(POSTGRES_BIN / "postgres"), "-D", str(data), "-p", str(POSTGRES_PORT),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sockets}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=500"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=self.workdir,
            start_new_session=True, **as_postgres)
        self.processes.append(("postgres", process))
        psql = [str(POSTGRES_BIN / "psql"), "-h", str(sockets), "-p", str(POSTGRES_PORT),
                "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
        if not (POSTGRES_BIN / "psql").exists():
            psql[0] = shutil.which("psql") or "psql"
        ready = [str(POSTGRES_BIN / "pg_isready"), "-q", "-h", str(sockets), "-p",
                 str(POSTGRES_PORT)]
        wait_for(lambda: subprocess.run(ready).returncode == 0, 30, "Postgres", process, log)
        subprocess.run(psql + ["-c", f"CREATE ROLE {POSTGRES_USER} LOGIN CREATEDB PASSWORD "
                               f"'{POSTGRES_PASSWORD}'",
                               "-c", f"CREATE DATABASE {POSTGRES_DB} OWNER {POSTGRES_USER}"],
                       check=True, capture_output=True, **as_postgres)

    def start_s3(self) -> None:
        log = self.workdir / "s3.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"})
        self.processes.append(("s3", process))
        wait_for(lambda: port_open(S3_PORT), 60, "moto's S3 server", process, log)

    def start_testpachd(self) -> None:
        if not os.access(TESTPACHD, os.X_OK):
            raise RuntimeError(f"{TESTPACHD} is not built: make testpachd")
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        env.update(SKIP_DOCKER_POSTGRES_CREATE="1", SKIP_DOCKER_MINIO_CREATE="1",
                   DOCKER_MACHINE_NAME="127.0.0.1", HOME=str(self.workdir),
                   TMPDIR=str(self.workdir))
        self.log = self.workdir / "testpachd.log"
        args = [str(TESTPACHD), "-context=", "-log", str(self.log)]
        if self.auth:
            args.append("-auth")
        started = time.monotonic()
        process = subprocess.Popen(args, stdout=subprocess.PIPE,
                                   stderr=open(self.workdir / "testpachd.stderr", "wb"),
                                   env=env, cwd=self.workdir, start_new_session=True, text=True)
        self.processes.append(("testpachd", process))
        line = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline()),
                                  daemon=True)
        reader.start()
        wait_for(lambda: line, 120, "testpachd to print its address", process,
                 self.workdir / "testpachd.stderr")
        if not line[0].startswith("grpc://"):
            raise RuntimeError(f"testpachd printed {line[0]!r}, not its address")
        self.address = line[0].strip()
        self.startup_seconds["testpachd"] = time.monotonic() - started

    def start(self) -> "PachdEnvironment":
        try:
            started = time.monotonic()
            self.start_postgres()
            self.startup_seconds["postgres"] = time.monotonic() - started
            self.relay = Relay(PGBOUNCER_PORT, POSTGRES_PORT)
            started = time.monotonic()
            self.start_s3()
            self.startup_seconds["s3"] = time.monotonic() - started
            self.start_testpachd()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """testpachd first, on SIGINT, so that it drops its database and bucket; then the rest."""
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT if name in ("testpachd", "postgres")
                                    else signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            if name == "testpachd" and self.relay is not None:
                self.relay.stop()
                self.relay = None
        if self.relay is not None:
            self.relay.stop()
        self.processes.clear()
        # The logs stay for a look after a failure; Postgres' files (about 40 MB) do not.
        shutil.rmtree(self.workdir / "postgres", ignore_errors=True)

    def __enter__(self) -> "PachdEnvironment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class CommitView:
    """One commit as the double's CommitView shows it, read from real pachd. `changed` is what
    DiffFile reports against the parent; `modify_streams` is not observable (None)."""

    def __init__(self, pachd: "RealPachd", info):
        self._pachd = pachd
        self.commit = info.commit
        self.id = info.commit.id
        parent = info.parent_commit
        self.parent_id = parent.id if parent is not None and parent.id else None
        self.description = info.description
        self.finished = info.finished is not None and info.finished.timestamp() > 0
        self.error = info.error
        self.modify_streams = None
        self._files = None
        self._changed = None

    @property
    def files(self) -> "Files":
        if self._files is None:
            self._files = Files(self._pachd, self.commit)
        return self._files

    @property
    def changed(self) -> set[str]:
        if self._changed is None:
            self._changed = self._pachd.changed(self.commit, self.parent_id)
        return self._changed

    def __repr__(self) -> str:
        return f"CommitView({self.id}, finished={self.finished}, {self.description[:40]!r})"


class Files(Mapping):
    """A commit's files: len() lists names only; the contents come in one GetFileTAR when
    first needed."""

    def __init__(self, pachd: "RealPachd", commit):
        self._pachd = pachd
        self._commit = commit
        self._data: dict | None = None

    def _load(self) -> dict:
        if self._data is None:
            self._data = self._pachd.read_files(self._commit)
        return self._data

    def __len__(self) -> int:
        if self._data is not None:
            return len(self._data)
        return self._pachd.count_files(self._commit)

    def __iter__(self):
        return iter(self._load())

    def __getitem__(self, path: str) -> bytes:
        return self._load()[path]

    def __eq__(self, other) -> bool:
        return self._load() == (dict(other) if isinstance(other, Mapping) else other)

    def __repr__(self) -> str:
        return f"Files({len(self)} file(s))"


class RealPachd:
    """The pachd double's helper API over a real pachd's gRPC API."""

    is_double = False

    def __init__(self, address: str, token: str | None):
        from pachyderm_sdk import Client
        self.host, port = address.split("://", 1)[-1].rsplit(":", 1)
        self.port = int(port)
        self.token = token
        self.client = Client(self.host, self.port, auth_token=token)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- repos
    def _repo(self, repo: str, project: str):
        from pachyderm_sdk.api import pfs
        return pfs.Repo(name=repo, type="user", project=pfs.Project(name=project))

    def _branch(self, repo: str, project: str, branch: str):
        from pachyderm_sdk.api import pfs
        return pfs.Branch(repo=self._repo(repo, project), name=branch)

    def delete_all_repos(self) -> None:
        self.client.pfs.delete_repos(all=True, force=True)

    def create_repo(self, repo: str, project: str = DEFAULT_PROJECT) -> None:
        """CreateRepo, as `pachctl create repo`: no branch, no commit."""
        self.client.pfs.create_repo(repo=self._repo(repo, project))

    def create_pipeline_repo(self, repo: str, project: str = DEFAULT_PROJECT,
                             branch: str = "master") -> CommitView:
        """The repo with the empty finished first commit that a spout pipeline's output branch
        gets from PPS: CreateBranch without a head makes it (makeEmptyCommit)."""
        self.create_repo(repo, project)
        self.client.pfs.create_branch(branch=self._branch(repo, project, branch))
        return self.head(repo, project, branch)

    def has_branch(self, repo: str, project: str = DEFAULT_PROJECT,
                   branch: str = "master") -> bool:
        import grpc
        try:
            self.client.pfs.inspect_branch(branch=self._branch(repo, project, branch))
            return True
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False

    # -- commits
    def commits(self, repo: str, project: str = DEFAULT_PROJECT,
                branch: str = "master") -> list[CommitView]:
        """The branch's chain, oldest first; none while the branch does not exist."""
        import grpc
        from pachyderm_sdk.api import pfs
        for attempt in range(20):
            if not self.has_branch(repo, project, branch):
                return []
            try:
                infos = list(self.client.pfs.list_commit(
                    repo=self._repo(repo, project),
                    to=pfs.Commit(branch=self._branch(repo, project, branch),
                                  repo=self._repo(repo, project))))
                return [CommitView(self, info) for info in reversed(infos)]
            except grpc.RpcError as error:
                # The head was dropped while the list was walked (a spout drops an open head
                # left by another): list again.
                if error.code() != grpc.StatusCode.NOT_FOUND or attempt == 19:
                    raise
                time.sleep(0.05)

    def head(self, repo: str, project: str = DEFAULT_PROJECT,
             branch: str = "master") -> CommitView:
        from pachyderm_sdk.api import pfs
        info = self.client.pfs.inspect_commit(commit=pfs.Commit(
            branch=self._branch(repo, project, branch), repo=self._repo(repo, project)))
        return CommitView(self, info)

    def file_count(self, repo: str, project: str = DEFAULT_PROJECT,
                   branch: str = "master") -> int:
        if not self.has_branch(repo, project, branch):
            return 0
        return len(self.head(repo, project, branch).files)

    # -- files
    def _readable(self, call):
        """Reading an open commit composes its parent's files with its own, which pachd
        refuses while the parent is finishing (ErrBaseCommitNotFinished): about 100 ms."""
        import grpc
        deadline = time.monotonic() + 10
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                details = error.details() or ""  # ErrBaseCommitNotFinished's text
                if not (details.startswith("base commit") and details.endswith("unfinished")) \
                        or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def count_files(self, commit) -> int:
        """0 for a commit dropped meanwhile (a spout drops an open head left by another), as
        for polling it is one that holds nothing yet."""
        import grpc
        from pachyderm_sdk.api import pfs
        try:
            return self._readable(lambda: sum(
                1 for info in self.client.pfs.glob_file(commit=commit, pattern="/**")
                if info.file_type == pfs.FileType.FILE))
        except grpc.RpcError as error:
            if self._dropped(error, commit):
                return 0
            raise

    @staticmethod
    def _dropped(error, commit) -> bool:
        import grpc
        return error.code() == grpc.StatusCode.NOT_FOUND and \
            f"commit {commit.repo.project.name}/{commit.repo.name}@{commit.id} not found" \
            in (error.details() or "")

    def read_files(self, commit) -> dict[str, bytes]:
        from pachyderm_sdk.api import pfs

        def read():
            import grpc
            try:
                data = b"".join(chunk.value for chunk in self.client.pfs.get_file_tar(
                    file=pfs.File(commit=commit, path="/")))
            except grpc.RpcError as error:  # an empty commit has not even "/"
                if error.code() == grpc.StatusCode.NOT_FOUND and \
                        (error.details() or "").startswith("file / not found"):
                    return {}
                raise
            files = {}
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                for member in archive:
                    if member.isfile():
                        files["/" + member.name.strip("/")] = archive.extractfile(member).read()
            return files
        import grpc
        try:
            return self._readable(read)
        except grpc.RpcError as error:  # dropped meanwhile, as in count_files()
            if self._dropped(error, commit):
                return {}
            raise

    def changed(self, commit, parent_id: str | None) -> set[str]:
        from pachyderm_sdk.api import pfs
        if parent_id is None:
            return set(self.read_files(commit))
        parent = pfs.Commit(repo=commit.repo, id=parent_id)
        paths = set()
        for diff in self._readable(lambda: list(self.client.pfs.diff_file(
                new_file=pfs.File(commit=commit, path="/"),
                old_file=pfs.File(commit=parent, path="/")))):
            for side in (diff.new_file, diff.old_file):
                if side is not None and side.file_type == pfs.FileType.FILE:
                    paths.add(side.file.path)
        return paths


def main() -> int:
    started = time.monotonic()
    stop = threading.Event()
    with PachdEnvironment() as environment:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(f"{environment.address} (token {ROOT_TOKEN}) up in "
              f"{time.monotonic() - started:.1f}s: {environment.startup_seconds}; "
              f"Ctrl-C stops it", flush=True)
        while not stop.wait(1):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
