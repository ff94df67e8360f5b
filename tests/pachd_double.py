"""A test double of pachd (Pachyderm 2.x): the PFS calls a 2.x spout makes, over real gRPC.

It serves `pfs_v2.API` with the SDK's own generated messages (pachyderm_sdk.api.pfs), so a
client built on pachyderm_sdk cannot tell it from pachd on the calls it models: repos and
branches, StartCommit / FinishCommit / InspectCommit / ListCommit / DropCommitSet, GetFile,
ListFile, and ModifyFile applied only when its stream completes. State lives in memory and
survives stop()/start(), which is how the chaos tests take pachd away and bring it back.

As real pachd 2.12.2 (tried on loopback): CreateRepo makes no branch and no commit, the first
StartCommit on a branch creates it; only PPS gives a spout pipeline's output branch its empty
first commit (create_pipeline_repo here). Finishing takes two steps: FinishCommit sets
`finishing`, and `finished` follows FINISH_SECONDS later. StartCommit's reply carries no branch.

Status codes and texts are pachd's own (pachyderm/pachyderm 2.12); each says where it comes
from. A Go error without a GRPCStatus() method reaches the client as UNKNOWN carrying
err.Error(), wrapping prefixes included; the wrapping of pachd's transaction layer is not
modelled, so match these texts by their core, not their whole.

Run standalone for the demo:
    python tests/pachd_double.py --port 1653 --repo default/kafka-spout [--token T]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import signal
import sys
import threading
import uuid
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

import betterproto
import grpc
from betterproto.lib.google.protobuf import BytesValue, Empty
from pachyderm_sdk.api import auth as auth_pb
from pachyderm_sdk.api import pfs
from pachyderm_sdk.api import version as version_pb

# src/internal/grpcutil/stream.go: MaxMsgSize = 20 * units.MiB, set as grpc.MaxRecvMsgSize and
# grpc.MaxSendMsgSize by grpcutil.NewServer (src/internal/grpcutil/server.go).
MAX_MESSAGE_BYTES = 20 * 1024 * 1024

# src/internal/storage (ValidateFilename, used by pfs/server/paths.go in 2.12).
PRINTABLE_ASCII = re.compile(r"^[ -~]+$")
GLOB_CHARACTERS = re.compile(r"[*?\[\]{}!()@+^]")

DEFAULT_PROJECT = "default"
# Real pachd sets `finished` about 100 ms after FinishCommit has set `finishing` and returned
# (it compacts and validates the commit in between).
FINISH_SECONDS = 0.1


class PachdError(Exception):
    """An error pachd would return: a gRPC status code and pachd's text."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --- pachd's error texts --------------------------------------------------------------------
# src/auth/auth.go
def not_signed_in() -> PachdError:
    return PachdError(grpc.StatusCode.UNAUTHENTICATED, "no authentication token (try logging in)")


def bad_token() -> PachdError:
    return PachdError(grpc.StatusCode.UNAUTHENTICATED,
                      "provided auth token is corrupted or has expired (try logging in again)")


def auth_not_activated() -> PachdError:
    return PachdError(grpc.StatusCode.UNIMPLEMENTED, "the auth service is not activated")


# src/server/pfs/pfs.go: ErrRepoNotFound, ErrBranchNotFound, ErrCommitNotFound and
# ErrCommitSetNotFound have GRPCStatus() NotFound; ErrCommitFinished and ErrDropWithChildren
# have none, so UNKNOWN.
def repo_not_found(repo: str) -> PachdError:
    return PachdError(grpc.StatusCode.NOT_FOUND, f"repo {repo} not found")


def branch_not_found(repo: str, branch: str) -> PachdError:
    return PachdError(grpc.StatusCode.NOT_FOUND, f'branch "{branch}" not found in repo {repo}')


def commit_not_found(repo: str, commit_id: str) -> PachdError:
    return PachdError(grpc.StatusCode.NOT_FOUND, f"commit {repo}@{commit_id} not found")


def commit_set_not_found(commit_set_id: str) -> PachdError:
    return PachdError(grpc.StatusCode.NOT_FOUND, f"no commits found for commitset {commit_set_id}")


def commit_finished(repo: str, commit_id: str) -> PachdError:
    return PachdError(grpc.StatusCode.UNKNOWN, f"commit {repo}@{commit_id} has already finished")


def drop_with_children(repo: str, commit_id: str) -> PachdError:
    return PachdError(grpc.StatusCode.UNKNOWN,
                      f"cannot drop a commit that has children: {repo}@{commit_id}")


def parent_not_finished(repo: str, parent_id: str) -> PachdError:
    # server_commit.go: linkParent's errors.Errorf, wrapped by startCommit ("create commit")
    # and StartCommitInTransaction ("start commit in transaction"); no GRPCStatus: UNKNOWN.
    return PachdError(grpc.StatusCode.UNKNOWN,
                      "start commit in transaction: create commit: "
                      f"parent commit {repo}@{parent_id} has not been finished")


def invalid_path(path: str) -> PachdError | None:
    """src/internal/storage ValidateFilename, applied to add_file's raw path (before cleaning)
    by fileset.UnorderedWriter.Put; errors.Errorf, so UNKNOWN."""
    if not PRINTABLE_ASCII.match(path):
        reason = "only printable ASCII characters allowed"
    elif match := GLOB_CHARACTERS.search(path):
        reason = f"globbing character ({match.group()}) not allowed in path"
    elif any(part in (".", "..") for part in path.split("/")):
        reason = "relative file paths are not allowed"
    else:
        return None
    return PachdError(grpc.StatusCode.UNKNOWN, f"path ({path}) invalid: {reason}")


class FileOperation(NamedTuple):
    """An add_file or delete_file request, decoded without betterproto, which takes about
    100 us a message: the double would otherwise bound every throughput it is part of."""
    kind: str
    path: str
    raw: bytes | None

    @property
    def add_file(self) -> "FileOperation":
        return self

    @property
    def delete_file(self) -> "FileOperation":
        return self


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes):
    """(number, payload) of each length-delimited field; None for any other wire type."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        if key & 7 != 2:
            yield None
            return
        length, pos = _varint(data, pos)
        yield key >> 3, data[pos:pos + length]
        pos += length


def parse_modify_file_request(data: bytes):
    """add_file {path, raw} and delete_file {path} quickly; anything else through the SDK."""
    fields = list(_fields(data))
    if len(fields) == 1 and fields[0] is not None and fields[0][0] in (2, 3):
        number, body = fields[0]
        path, raw, plain = "", None, True
        for field in _fields(body):
            if field is None or field[0] not in (1, 3) or (number == 3 and field[0] != 1):
                plain = False
                break
            if field[0] == 1:
                path = field[1].decode()
            else:
                inner = list(_fields(field[1]))
                raw = inner[0][1] if inner and inner[0] is not None else b""
        if plain:
            return FileOperation("add_file" if number == 2 else "delete_file", path, raw)
    return pfs.ModifyFileRequest().parse(data)


def clean_path(path: str) -> str:
    """pfsfile.CleanPath / fileset.Clean: one leading slash, none trailing."""
    return "/" + path.strip("/")


# --- the model ------------------------------------------------------------------------------
def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_commit_id() -> str:
    # pachd's commit set ids are UUIDs without dashes (uuid.NewWithoutDashes); ModifyFile tells
    # a commit id from a branch name by that shape (uuid.IsUUIDWithoutDashes, server_file.go).
    return uuid.uuid4().hex


@dataclasses.dataclass
class CommitView:
    """What a test sees of one commit."""
    id: str
    parent_id: str | None
    description: str
    finished: bool
    files: dict[str, bytes]
    changed: set[str]
    modify_streams: int
    error: str = ""


@dataclasses.dataclass
class _Commit:
    id: str
    project: str
    repo: str
    branch: str
    parent_id: str | None
    description: str
    started: datetime.datetime
    files: dict[str, bytes]
    finishing: datetime.datetime | None = None
    finished: datetime.datetime | None = None  # may lie ahead: see is_finished()
    error: str = ""
    changed: set[str] = dataclasses.field(default_factory=set)
    modify_streams: int = 0

    def is_finished(self) -> bool:
        return self.finished is not None and self.finished <= now()

    def view(self) -> CommitView:
        return CommitView(self.id, self.parent_id, self.description, self.is_finished(),
                          dict(self.files), set(self.changed), self.modify_streams, self.error)


@dataclasses.dataclass
class _Branch:
    name: str
    head: str | None
    created: datetime.datetime


@dataclasses.dataclass
class _Repo:
    project: str
    name: str
    created: datetime.datetime
    branches: dict[str, _Branch] = dataclasses.field(default_factory=dict)
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        # pfs.Repo.String(): "<project>/<name>" for user repos.
        return f"{self.project}/{self.name}"


class PachdDouble:
    """pachd's PFS API on 127.0.0.1, in memory; see the module docstring."""

    is_double = True   # has the fault hooks (tests/real_pachd.py's RealPachd has not)

    def __init__(self, token: str | None = None, username: str = "pipeline:default/kafka-spout"):
        self.token = token
        self.username = username
        self.port: int | None = None
        self._lock = threading.RLock()
        self._commit_finished = threading.Condition(self._lock)
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._encoded: dict[tuple[str, str], tuple] = {}   # ListCommit's encoded CommitInfos
        self._calls: list[str] = []
        self._faults: dict[str, list] = {}
        self._finish_reply_delay = 0.0
        self._open_streams = 0
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()
        self._streams_released = threading.Event()
        self._streams_released.set()
        self.finish_applied = threading.Event()
        self.modify_stream_open = threading.Event()
        self.modify_stream_held = threading.Event()  # a stream waits in hold_modify_streams

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> "PachdDouble":
        if self._server is not None:
            raise RuntimeError("the double is already running")
        if port is not None:
            self.port = port
        self._stopping.clear()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="pachd-double"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        server.add_generic_rpc_handlers(self._handlers())
        bound = server.add_insecure_port(f"127.0.0.1:{self.port or 0}")
        if bound == 0:
            raise OSError(f"cannot listen on 127.0.0.1:{self.port}")
        self.port = bound
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """pachd goes away: in-flight RPCs are cancelled, new connections refused."""
        server, self._server = self._server, None
        if server is None:
            return
        # Abort the in-flight RPCs first, then wake the handlers waiting on faults, so that none
        # of them gets an answer out.
        stopped = server.stop(grace=None)
        self._stopping.set()
        stopped.wait()
        with self._lock:
            self._open_streams = 0
            self.modify_stream_open.clear()

    def __enter__(self) -> "PachdDouble":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what tests set up and read -----------------------------------------------------------
    def create_repo(self, repo: str, project: str = DEFAULT_PROJECT) -> None:
        """The repo alone, as CreateRepo (`pachctl create repo`) makes it: no branch, no
        commit."""
        with self._lock:
            key = (project, repo)
            if key in self._repos:
                # ErrRepoExists, src/server/pfs/pfs.go
                raise ValueError(f"repo {project}/{repo} already exists")
            self._repos[key] = _Repo(project, repo, now())

    def create_pipeline_repo(self, repo: str, project: str = DEFAULT_PROJECT,
                             branch: str = "master") -> CommitView:
        """The output repo of a new spout pipeline: the repo, its branch and the one empty
        finished commit that PPS makes there (CreateBranch without a head; server_commit.go
        makeEmptyCommit: no provenance, so the commit is closed)."""
        with self._lock:
            if (project, repo) not in self._repos:
                self.create_repo(repo, project)
            record = self._repos[(project, repo)]
            if branch in record.branches:
                # ErrBranchExists, src/server/pfs/pfs.go
                raise ValueError(f'branch "{branch}" already exists in repo {record.label}')
            commit = self._empty_commit(record, branch, None)
            record.branches[branch] = _Branch(branch, commit.id, commit.started)
            return commit.view()

    def _empty_commit(self, record: _Repo, branch: str, parent_id: str | None) -> _Commit:
        stamp = now()
        commit = _Commit(new_commit_id(), record.project, record.name, branch, parent_id, "",
                         stamp, {}, finishing=stamp, finished=stamp)
        record.commits[commit.id] = commit
        return commit

    def commits(self, repo: str, project: str = DEFAULT_PROJECT,
                branch: str = "master") -> list[CommitView]:
        """The branch's chain, oldest first; none while the branch does not exist."""
        with self._lock:
            record = self._repos[(project, repo)]
            chain = []
            commit_id = record.branches[branch].head if branch in record.branches else None
            while commit_id is not None:
                commit = record.commits[commit_id]
                chain.append(commit.view())
                commit_id = commit.parent_id
            return chain[::-1]

    def head(self, repo: str, project: str = DEFAULT_PROJECT, branch: str = "master") -> CommitView:
        return self.commits(repo, project, branch)[-1]

    def has_branch(self, repo: str, project: str = DEFAULT_PROJECT,
                   branch: str = "master") -> bool:
        with self._lock:
            return branch in self._repos[(project, repo)].branches

    def file_count(self, repo: str, project: str = DEFAULT_PROJECT,
                   branch: str = "master") -> int:
        """Files in the branch head, without copying them (for polling during benchmarks)."""
        with self._lock:
            record = self._repos[(project, repo)]
            if branch not in record.branches:
                return 0
            return len(record.commits[record.branches[branch].head].files)

    @property
    def calls(self) -> list[str]:
        with self._lock:
            return list(self._calls)

    # --- faults -------------------------------------------------------------------------------
    def delay_finish_reply(self, seconds: float) -> None:
        """Every later FinishCommit is applied, then its answer waits this long (0: no wait).
        stop() cuts the wait short and the client sees the call fail, commit finished."""
        self._finish_reply_delay = seconds

    def hold_modify_streams(self, hold: bool) -> None:
        """While held, a ModifyFile stream blocks after its first add_file until released."""
        if hold:
            self._streams_released.clear()
        else:
            self._streams_released.set()

    def fail_next(self, method: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                  count: int = 1, message: str = "injected failure") -> None:
        """The next `count` calls of `method` (e.g. "FinishCommit") fail with code, unapplied."""
        with self._lock:
            self._faults[method] = [code, count, message]

    # --- the gRPC surface ---------------------------------------------------------------------
    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(method, request_type):
            return grpc.unary_unary_rpc_method_handler(
                self._guard(method, method_impls[method]),
                request_deserializer=lambda data: request_type().parse(data),
                response_serializer=bytes)

        def server_stream(method, request_type):
            return grpc.unary_stream_rpc_method_handler(
                self._guard(method, method_impls[method]),
                request_deserializer=lambda data: request_type().parse(data),
                response_serializer=bytes)

        method_impls = {
            "InspectRepo": self._inspect_repo, "InspectBranch": self._inspect_branch,
            "StartCommit": self._start_commit, "FinishCommit": self._finish_commit,
            "InspectCommit": self._inspect_commit, "ListCommit": self._list_commit,
            "DropCommitSet": self._drop_commit_set, "ModifyFile": self._modify_file,
            "GetFile": self._get_file, "ListFile": self._list_file,
            "GetVersion": self._get_version, "WhoAmI": self._who_am_i,
        }
        pfs_methods = {
            "InspectRepo": unary("InspectRepo", pfs.InspectRepoRequest),
            "InspectBranch": unary("InspectBranch", pfs.InspectBranchRequest),
            "StartCommit": unary("StartCommit", pfs.StartCommitRequest),
            "FinishCommit": unary("FinishCommit", pfs.FinishCommitRequest),
            "InspectCommit": unary("InspectCommit", pfs.InspectCommitRequest),
            "ListCommit": server_stream("ListCommit", pfs.ListCommitRequest),
            "DropCommitSet": unary("DropCommitSet", pfs.DropCommitSetRequest),
            "ModifyFile": grpc.stream_unary_rpc_method_handler(
                self._guard("ModifyFile", self._modify_file),
                request_deserializer=parse_modify_file_request,
                response_serializer=bytes),
            "GetFile": server_stream("GetFile", pfs.GetFileRequest),
            "ListFile": server_stream("ListFile", pfs.ListFileRequest),
        }
        return [
            grpc.method_handlers_generic_handler("pfs_v2.API", pfs_methods),
            grpc.method_handlers_generic_handler(
                "versionpb_v2.API", {"GetVersion": unary("GetVersion", Empty)}),
            grpc.method_handlers_generic_handler(
                "auth_v2.API", {"WhoAmI": unary("WhoAmI", auth_pb.WhoAmIRequest)}),
        ]

    # Handlers whose auth check is not the interceptor's `authenticated`
    # (src/internal/middleware/auth/interceptor.go): GetVersion is unauthenticated, and WhoAmI
    # answers for itself.
    _UNGUARDED = {"GetVersion", "WhoAmI"}

    def _guard(self, method: str, impl):
        def handler(request, context: grpc.ServicerContext):
            with self._lock:
                self._calls.append(method)
                fault = self._faults.get(method)
                if fault:
                    fault[1] -= 1
                    if fault[1] <= 0:
                        del self._faults[method]
            if fault:
                context.abort(fault[0], fault[2])
            try:
                if method not in self._UNGUARDED:
                    self._authenticate(context)
                return impl(request, context)
            except PachdError as error:
                context.abort(error.code, error.message)
        return handler

    def _presented_token(self, context: grpc.ServicerContext) -> str | None:
        for key, value in context.invocation_metadata():
            if key == "authn-token":  # auth.ContextTokenKey
                return value
        return None

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return  # authDisabledOr: auth not activated lets every call through
        presented = self._presented_token(context)
        if not presented:
            raise not_signed_in()
        if presented != self.token:
            raise bad_token()

    # --- lookups (call with the lock held) ----------------------------------------------------
    def _repo(self, repo: pfs.Repo) -> _Repo:
        project = repo.project.name or DEFAULT_PROJECT  # Repo.EnsureProject()
        record = self._repos.get((project, repo.name))
        if record is None:
            raise repo_not_found(f"{project}/{repo.name}")
        return record

    def _branch(self, branch: pfs.Branch) -> tuple[_Repo, _Branch]:
        record = self._repo(branch.repo)
        found = record.branches.get(branch.name)
        if found is None:
            raise branch_not_found(record.label, branch.name)
        return record, found

    def _commit(self, commit: pfs.Commit) -> tuple[_Repo, _Commit]:
        repo = commit.repo if commit.repo.name else commit.branch.repo
        record = self._repo(repo)
        commit_id = commit.id
        if not commit_id:
            _, branch = self._branch(pfs.Branch(repo=repo, name=commit.branch.name))
            commit_id = branch.head
        found = record.commits.get(commit_id or "")
        if found is None:
            raise commit_not_found(record.label, commit_id or "")
        return record, found

    # --- messages -----------------------------------------------------------------------------
    @staticmethod
    def _repo_message(record: _Repo) -> pfs.Repo:
        return pfs.Repo(name=record.name, type="user", project=pfs.Project(name=record.project))

    def _commit_message(self, record: _Repo, commit: _Commit) -> pfs.Commit:
        repo = self._repo_message(record)
        return pfs.Commit(repo=repo, id=commit.id, branch=pfs.Branch(repo=repo, name=commit.branch))

    def _commit_info(self, record: _Repo, commit: _Commit,
                     children: list[str] | None = None) -> pfs.CommitInfo:
        info = pfs.CommitInfo(
            commit=self._commit_message(record, commit),
            origin=pfs.CommitOrigin(kind=pfs.OriginKind.USER),
            description=commit.description,
            started=commit.started,
            error=commit.error,
            size_bytes_upper_bound=sum(len(value) for value in commit.files.values()),
            created_by=self.username if self.token else "",
            created_at=commit.started,
        )
        if commit.parent_id is not None:
            info.parent_commit = self._commit_message(record, record.commits[commit.parent_id])
        if children is None:
            children = [child.id for child in record.commits.values()
                        if child.parent_id == commit.id]
        info.child_commits = [self._commit_message(record, record.commits[child])
                              for child in children]
        if commit.finishing is not None:  # unset Timestamps while open, as pachd
            info.finishing = commit.finishing
        if commit.is_finished():
            info.finished = commit.finished
            info.details = pfs.CommitInfoDetails(size_bytes=info.size_bytes_upper_bound)
        return info

    # --- RPCs ---------------------------------------------------------------------------------
    def _inspect_repo(self, request: pfs.InspectRepoRequest, context) -> pfs.RepoInfo:
        with self._lock:
            record = self._repo(request.repo)
            repo = self._repo_message(record)
            return pfs.RepoInfo(repo=repo, created=record.created,
                                branches=[pfs.Branch(repo=repo, name=name)
                                          for name in record.branches],
                                details=pfs.RepoInfoDetails(size_bytes=0))

    def _inspect_branch(self, request: pfs.InspectBranchRequest, context) -> pfs.BranchInfo:
        with self._lock:
            record, branch = self._branch(request.branch)
            info = pfs.BranchInfo(branch=pfs.Branch(repo=self._repo_message(record),
                                                    name=branch.name),
                                  created_at=branch.created, updated_at=branch.created)
            if branch.head is not None:
                info.head = self._commit_message(record, record.commits[branch.head])
            return info

    def _start_commit(self, request: pfs.StartCommitRequest, context) -> pfs.Commit:
        with self._lock:
            if not request.branch.name:
                # validateStartCommitArgs, server_commit.go
                raise PachdError(grpc.StatusCode.UNKNOWN,
                                 "start commit in transaction: branch must be specified")
            record = self._repo(request.branch.repo)
            commit = self._open_commit(record, request.branch.name, request.description)
            # StartCommitInTransaction returns the new commit's handle: repo and id, no branch.
            return pfs.Commit(repo=self._repo_message(record), id=commit.id)

    def _open_commit(self, record: _Repo, branch_name: str, description: str) -> _Commit:
        """startCommit: the parent is the branch head, which must be finishing at least
        (linkParent); a missing branch is created (createCommitOnBranch)."""
        branch = record.branches.get(branch_name)
        parent = record.commits[branch.head] if branch and branch.head else None
        if parent is not None and parent.finishing is None:
            raise parent_not_finished(record.label, parent.id)
        commit = _Commit(new_commit_id(), record.project, record.name, branch_name,
                         parent.id if parent else None, description, now(),
                         dict(parent.files) if parent else {})
        record.commits[commit.id] = commit
        if branch is None:
            record.branches[branch_name] = _Branch(branch_name, commit.id, commit.started)
        else:
            branch.head = commit.id
        return commit

    def _finish_commit(self, request: pfs.FinishCommitRequest, context) -> Empty:
        with self._lock:
            record, commit = self._commit(request.commit)
            if commit.finishing is not None:
                raise commit_finished(record.label, commit.id)
            if request.description:  # finishCommit: a non-empty description replaces
                commit.description = request.description
            commit.error = request.error
            commit.finishing = now()
            commit.finished = commit.finishing + datetime.timedelta(seconds=FINISH_SECONDS)
            self._commit_finished.notify_all()
            self.finish_applied.set()
        if self._finish_reply_delay:
            self._stopping.wait(self._finish_reply_delay)
        return Empty()

    def _inspect_commit(self, request: pfs.InspectCommitRequest, context) -> pfs.CommitInfo:
        with self._lock:
            record, commit = self._commit(request.commit)
            if request.wait in (pfs.CommitState.FINISHING, pfs.CommitState.FINISHED):
                # server_commit.go waitForFinishingOrFinished: block until the state is reached.
                handle = self._commit_message(record, commit)
                finishing = request.wait == pfs.CommitState.FINISHING
                while not (commit.finishing is not None if finishing else commit.is_finished()):
                    if not context.is_active() or self._stopping.is_set():
                        raise PachdError(grpc.StatusCode.CANCELLED, "context canceled")
                    self._commit_finished.wait(0.1)
                    record, commit = self._commit(handle)
            return self._commit_info(record, commit)

    def _list_commit(self, request: pfs.ListCommitRequest, context):
        """server_commit.go listCommit: with `to` (a commit or a branch, whose head it means)
        the ancestry from it back to `from` (excluded), newest first; without, every commit
        of the repo, newest first or, with `reverse`, oldest first. Each CommitInfo is sent
        as bytes, encoded once per state of the commit (betterproto takes ~1 ms a message)."""
        with self._lock:
            record = self._repo(request.repo)
            for end in (request.from_, request.to):
                if end.id or end.branch.name:
                    repo = end.repo if end.repo.name else end.branch.repo
                    if (repo.project.name or DEFAULT_PROJECT, repo.name) != \
                            (record.project, record.name):
                        raise PachdError(grpc.StatusCode.UNKNOWN, "`from` and `to` commits "
                                         f"need to be from repo {record.label}")
            has_from = bool(request.from_.id or request.from_.branch.name)
            has_to = bool(request.to.id or request.to.branch.name)
            if has_from:
                _, start = self._commit(request.from_)
            if has_from and not has_to:
                raise PachdError(grpc.StatusCode.UNKNOWN,
                                 "cannot use `from` commit without `to` commit")
            if has_to:
                if request.reverse:
                    raise PachdError(grpc.StatusCode.UNKNOWN,
                                     "cannot use 'Reverse' while also using 'From' or 'To'")
                _, cursor = self._commit(request.to)
                ordered = []
                while cursor is not None and not (has_from and cursor.id == start.id):
                    ordered.append(cursor)
                    cursor = record.commits[cursor.parent_id] if cursor.parent_id else None
            else:
                ordered = list(record.commits.values())  # oldest first: insertion order
                if not request.reverse:
                    ordered.reverse()
            if request.number:
                ordered = ordered[:request.number]
            children: dict[str, list[str]] = {}
            for commit in record.commits.values():
                if commit.parent_id is not None:
                    children.setdefault(commit.parent_id, []).append(commit.id)
            # Built under the lock and raised before the first message, as pachd's errors are.
            return iter([self._commit_info_bytes(record, commit, children.get(commit.id, []))
                         for commit in ordered])

    def _commit_info_bytes(self, record: _Repo, commit: _Commit, children: list[str]) -> bytes:
        key = (commit.description, commit.error, commit.finishing, commit.is_finished(),
               commit.parent_id, tuple(children),
               sum(len(value) for value in commit.files.values()))
        cached = self._encoded.get((record.label, commit.id))
        if cached is None or cached[0] != key:
            cached = self._encoded[(record.label, commit.id)] = (
                key, bytes(self._commit_info(record, commit, children)))
        return cached[1]

    def _list_file(self, request: pfs.ListFileRequest, context):
        """server_file.go listFile: the file at the path itself, or the entries directly under
        the directory (a subdirectory once, as "path/", FileType DIR), in path order; nothing,
        and no error, where there is neither."""
        with self._lock:
            record, commit = self._commit(request.file.commit)
            handle = self._commit_message(record, commit)
            files = dict(commit.files)
        path = clean_path(request.file.path)
        entries: dict[str, pfs.FileInfo] = {}
        if path in files:
            entries[path] = pfs.FileInfo(file=pfs.File(commit=handle, path=path),
                                         file_type=pfs.FileType.FILE,
                                         size_bytes=len(files[path]))
        else:
            directory = path.rstrip("/") + "/"
            for name, value in files.items():
                if not name.startswith(directory):
                    continue
                rest = name[len(directory):]
                if "/" in rest:
                    child = directory + rest.split("/", 1)[0] + "/"
                    entries.setdefault(child, pfs.FileInfo(
                        file=pfs.File(commit=handle, path=child), file_type=pfs.FileType.DIR))
                else:
                    entries[name] = pfs.FileInfo(file=pfs.File(commit=handle, path=name),
                                                 file_type=pfs.FileType.FILE,
                                                 size_bytes=len(value))
        return iter([entries[name] for name in sorted(entries)])

    def _drop_commit_set(self, request: pfs.DropCommitSetRequest, context) -> Empty:
        with self._lock:
            commit_set = request.commit_set.id
            holders = [record for record in self._repos.values() if commit_set in record.commits]
            if not holders:
                raise commit_set_not_found(commit_set)
            for record in holders:
                commit = record.commits[commit_set]
                if any(child.parent_id == commit.id for child in record.commits.values()):
                    raise drop_with_children(record.label, commit.id)
            for record in holders:
                commit = record.commits.pop(commit_set)
                headless = []
                for branch in record.branches.values():
                    if branch.head == commit.id:
                        branch.head = commit.parent_id
                        if branch.head is None:
                            headless.append(branch)
                if headless:
                    # deleteCommit: a branch left without a head gets a new empty commit.
                    empty = self._empty_commit(record, headless[0].name, None)
                    for branch in headless:
                        branch.head = empty.id
        return Empty()

    def _get_file(self, request: pfs.GetFileRequest, context):
        with self._lock:
            record, commit = self._commit(request.file.commit)
            path = clean_path(request.file.path)
            if path not in commit.files:
                # ErrFileNotFound: NotFound
                raise PachdError(grpc.StatusCode.NOT_FOUND,
                                 f"file {request.file.path} not found in repo {record.label} "
                                 f"at commit {commit.id}")
            value = commit.files[path]
        chunk = MAX_MESSAGE_BYTES - 1024 * 1024  # grpcutil.MaxMsgPayloadSize
        return iter([BytesValue(value=value[start:start + chunk])
                     for start in range(0, max(len(value), 1), chunk)])

    def _get_version(self, request: Empty, context) -> version_pb.Version:
        return version_pb.Version(major=2, minor=12, micro=2, additional="-pachd-double")

    def _who_am_i(self, request: auth_pb.WhoAmIRequest, context) -> auth_pb.WhoAmIResponse:
        if self.token is None:
            raise auth_not_activated()
        self._authenticate(context)
        return auth_pb.WhoAmIResponse(username=self.username)

    def _modify_file(self, requests, context) -> Empty:
        """api_server.go ModifyFile + server_file.go modifyFile: the first message names the
        commit; the rest are buffered and added to the commit only once the stream ends
        normally. A stream cut off, or failing on any message, adds nothing."""
        with self._lock:
            self._open_streams += 1
            self.modify_stream_open.set()
        try:
            return self._apply_modify_stream(requests, context)
        except PachdError:
            raise
        except Exception:
            if context.is_active():
                raise
            return Empty()  # the client went away mid-stream: nothing applied, nobody to tell
        finally:
            with self._lock:
                self._open_streams = max(0, self._open_streams - 1)
                if not self._open_streams:
                    self.modify_stream_open.clear()

    def _apply_modify_stream(self, requests, context) -> Empty:
        requests = iter(requests)
        first = next(requests, None)
        if first is None or betterproto.which_one_of(first, "body")[0] != "set_commit":
            # api_server.go readCommit: errors.Errorf, so UNKNOWN.
            raise PachdError(grpc.StatusCode.UNKNOWN, "first message must be a commit")
        target = first.set_commit
        with self._lock:
            record, commit, one_off_branch = self._modify_target(target)
        operations: list[tuple[str, str, bytes]] = []
        held = False
        for request in requests:
            kind = request.kind if isinstance(request, FileOperation) else \
                betterproto.which_one_of(request, "body")[0]
            if kind == "add_file":
                add = request.add_file
                if error := invalid_path(add.path):
                    raise error
                data = add.raw if add.raw is not None else b""
                operations.append(("add", clean_path(add.path), data))
                if not held:
                    held = True
                    self._wait_while_held(context)
            elif kind == "delete_file":
                operations.append(("delete", clean_path(request.delete_file.path), b""))
            elif kind == "set_commit":  # server_file.go modifyFileFromSource
                raise PachdError(grpc.StatusCode.UNKNOWN, "cannot set commit")
            else:  # copy_file: pachd has it, the double does not
                raise PachdError(grpc.StatusCode.UNIMPLEMENTED,
                                 "the double models add_file and delete_file only")
        if not context.is_active():
            return Empty()  # the client is gone: nothing lands
        with self._lock:
            if one_off_branch is not None:
                commit = self._open_commit(record, one_off_branch, "")
            else:
                record, commit = self._commit(self._commit_message(record, commit))
                if commit.finishing is not None:
                    raise commit_finished(record.label, commit.id)
            self._apply(commit, operations)
            if one_off_branch is not None:
                commit.finishing = now()
                commit.finished = commit.finishing + datetime.timedelta(seconds=FINISH_SECONDS)
                self._commit_finished.notify_all()
        return Empty()

    def _modify_target(self, target: pfs.Commit) -> tuple[_Repo, _Commit | None, str | None]:
        """Resolves set_commit as server_file.go modifyFile does: an explicit commit must be
        open; a branch whose head is finished gets a one-off commit for this stream alone."""
        repo = target.repo if target.repo.name else target.branch.repo
        branch_name = target.branch.name
        commit_id = target.id
        if not branch_name and commit_id and not re.fullmatch(r"[0-9a-f]{32}", commit_id):
            branch_name, commit_id = commit_id, ""
        record = self._repo(repo)
        if not commit_id:
            branch = record.branches.get(branch_name)
            if branch is None or branch.head is None:
                return record, None, branch_name
            head = record.commits[branch.head]
            if head.finishing is not None:
                return record, None, branch_name
            return record, head, None
        commit = record.commits.get(commit_id)
        if commit is None:
            raise commit_not_found(record.label, commit_id)
        if commit.finishing is not None:
            raise commit_finished(record.label, commit.id)
        return record, commit, None

    def _wait_while_held(self, context) -> None:
        if not self._streams_released.is_set():
            self.modify_stream_held.set()
        while not self._streams_released.wait(0.05):
            if self._stopping.is_set() or not context.is_active():
                return

    @staticmethod
    def _apply(commit: _Commit, operations: list[tuple[str, str, bytes]]) -> None:
        for kind, path, data in operations:
            if kind == "add":  # putFileRaw: appendFile=true
                commit.files[path] = commit.files.get(path, b"") + data
            else:  # a delete takes the path and everything under it
                for existing in [p for p in commit.files
                                 if p == path or p.startswith(path.rstrip("/") + "/")]:
                    del commit.files[existing]
            commit.changed.add(path)
        commit.modify_streams += 1


def write_pach_config(path: str | Path, address: str, token: str | None = None) -> Path:
    """A pachctl config (the format pachctl and pachyderm_sdk.config.ConfigFile read) whose
    active context points at `address` ("host:port") with `token` as its session token."""
    context: dict = {"pachd_address": f"grpc://{address}"}
    if token is not None:
        context["session_token"] = token
    config = {"v2": {"active_context": "pachd-double", "contexts": {"pachd-double": context},
                     "metrics": False}}
    path = Path(path)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--repo", action="append", default=[], metavar="PROJECT/REPO",
                        help="a spout pipeline's output repo to create: branch master and its "
                        "empty first commit")
    parser.add_argument("--token", default=None, help="the authn-token every call must carry")
    args = parser.parse_args(argv)
    double = PachdDouble(token=args.token)
    for spec in args.repo:
        project, _, repo = spec.rpartition("/")
        double.create_pipeline_repo(repo, project=project or DEFAULT_PROJECT)
    double.start(args.port)
    print(double.address, flush=True)
    finished = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: finished.set())
    finished.wait()
    double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
