"""The pachd double, through the real SDK client: it does what pachd does and refuses what pachd
refuses, with pachd's codes and texts, so tests of the spout's 2.x delivery can trust it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from betterproto.lib.google.protobuf import Empty
from conftest import ROOT, free_port, wait_until
from pachd_double import MAX_MESSAGE_BYTES, PachdDouble, write_pach_config
from pachyderm_sdk import Client
from pachyderm_sdk.api import pfs
from pachyderm_sdk.errors import AuthServiceNotActivated

TOKEN = "pipeline-token"
MASTER = pfs.Branch.from_uri("default/out@master")
MiB = 1024 * 1024


@pytest.fixture
def double():
    double = PachdDouble(token=TOKEN)
    double.create_pipeline_repo("out")
    double.start()
    yield double
    double.stop()


@pytest.fixture
def client(double):
    return Client("127.0.0.1", double.port, auth_token=TOKEN)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def stream(client: Client, commit: pfs.Commit, *operations: pfs.ModifyFileRequest):
    return client.pfs.modify_file(iter([pfs.ModifyFileRequest(set_commit=commit), *operations]))


def add(path: str, data: bytes) -> pfs.ModifyFileRequest:
    return pfs.ModifyFileRequest(add_file=pfs.AddFile(path=path, raw=data))


def delete(path: str) -> pfs.ModifyFileRequest:
    return pfs.ModifyFileRequest(delete_file=pfs.DeleteFile(path=path))


def test_a_created_repo_has_no_branch_until_the_first_start_commit(double, client):
    double.create_repo("plain")
    plain = pfs.Branch.from_uri("default/plain@master")
    error = rpc_error(lambda: client.pfs.inspect_branch(branch=plain))
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND,
                                               'branch "master" not found in repo default/plain')
    assert client.pfs.inspect_repo(repo=plain.repo).branches == []
    assert double.commits("plain") == [] and double.file_count("plain") == 0
    commit = client.pfs.start_commit(branch=plain, description="first")
    assert commit.id and commit.repo.name == "plain" and not commit.branch.name  # as pachd
    [first] = double.commits("plain")
    assert first.id == commit.id and first.parent_id is None and not first.finished
    assert client.pfs.inspect_branch(branch=plain).head.id == commit.id


def test_a_pipeline_repo_has_one_empty_finished_commit(double, client):
    [first] = double.commits("out")
    assert first.finished and first.parent_id is None and first.files == {}
    assert client.pfs.inspect_branch(branch=MASTER).head.id == first.id
    info = client.pfs.inspect_commit(commit=pfs.Commit(branch=MASTER))
    assert info.commit.id == first.id and info.finished.year > 1970
    assert len(first.id) == 32 and int(first.id, 16) >= 0
    assert client.pfs.inspect_repo(repo=MASTER.repo).repo.name == "out"


def test_start_commit_is_refused_while_the_head_is_open(double, client):
    first = double.head("out")
    commit = client.pfs.start_commit(branch=MASTER, description="batch 1")
    assert commit.id != first.id and double.head("out").id == commit.id
    info = client.pfs.inspect_commit(commit=commit)
    assert info.parent_commit.id == first.id and info.description == "batch 1"
    assert info.finished.year == 1970  # unset while open: betterproto reads the epoch
    error = rpc_error(lambda: client.pfs.start_commit(branch=MASTER))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert f"parent commit default/out@{commit.id} has not been finished" in error.details()
    client.pfs.finish_commit(commit=commit)
    assert client.pfs.start_commit(branch=MASTER).id == double.head("out").id


def test_finishing_comes_first_and_finished_follows(double, client):
    commit = client.pfs.start_commit(branch=MASTER)
    client.pfs.finish_commit(commit=commit, description="done")
    info = client.pfs.inspect_commit(commit=commit)
    assert info.finishing.year > 1970 and info.finished.year == 1970
    assert not double.head("out").finished
    child = client.pfs.start_commit(branch=MASTER)  # a finishing parent takes a child
    error = rpc_error(lambda: stream(client, commit, add("/late", b"x")))
    assert "has already finished" in error.details()
    waited = client.pfs.wait_commit(commit)
    assert waited.finished.year > 1970 and waited.description == "done"
    assert double.commits("out")[-2].finished
    assert client.pfs.inspect_commit(commit=child).parent_commit.id == commit.id


def test_modify_file_lands_only_when_its_stream_completes(double, client):
    commit = client.pfs.start_commit(branch=MASTER)
    channel = grpc.insecure_channel(double.address)
    modify_file = channel.stream_unary("/pfs_v2.API/ModifyFile", request_serializer=bytes,
                                       response_deserializer=Empty.FromString)
    client_gone = threading.Event()

    def requests():
        yield pfs.ModifyFileRequest(set_commit=commit)
        yield add("/cut", b"never")
        client_gone.wait(10)

    double.hold_modify_streams(True)  # the cut comes after the double has the add_file
    call = modify_file.future(requests(), metadata=[("authn-token", TOKEN)])
    assert double.modify_stream_held.wait(5), "the stream to get its add_file"
    call.cancel()
    wait_until(lambda: not double.modify_stream_open.is_set(), 5, "the stream to end")
    double.hold_modify_streams(False)
    client_gone.set()
    channel.close()
    assert double.head("out").files == {} and double.head("out").modify_streams == 0
    stream(client, commit, add("/whole", b"kept"))
    assert double.head("out").files == {"/whole": b"kept"}
    assert double.head("out").modify_streams == 1


def test_add_file_appends_and_delete_then_add_overwrites(double, client):
    commit = client.pfs.start_commit(branch=MASTER)
    stream(client, commit, add("a", b"x"), add("/a", b"y"), add("/dir/b", b"1"), add("/dir/c", b"2"))
    client.pfs.put_file_from_bytes(commit=commit, path="/a", data=b"z", append=True)
    client.pfs.finish_commit(commit=commit)
    assert double.head("out").files == {"/a": b"xyz", "/dir/b": b"1", "/dir/c": b"2"}
    child = client.pfs.start_commit(branch=MASTER)
    stream(client, child, add("/a", b"!"))  # appends to what the parent had
    client.pfs.put_file_from_bytes(commit=child, path="/dir/b", data=b"new")  # delete + add
    stream(client, child, delete("/dir/c"))
    client.pfs.finish_commit(commit=child)
    head = double.head("out")
    assert head.files == {"/a": b"xyz!", "/dir/b": b"new"}
    assert head.changed == {"/a", "/dir/b", "/dir/c"} and head.modify_streams == 3
    assert double.commits("out")[-2].files["/a"] == b"xyz"
    got = b"".join(chunk.value for chunk in client.pfs.get_file(
        file=pfs.File(commit=child, path="/a")))
    assert got == b"xyz!"


def test_finish_commit_keeps_or_replaces_the_description_and_refuses_twice(double, client):
    kept = client.pfs.start_commit(branch=MASTER, description="from start")
    client.pfs.finish_commit(commit=kept)
    assert double.head("out").description == "from start"
    replaced = client.pfs.start_commit(branch=MASTER, description="from start")
    client.pfs.finish_commit(commit=replaced, description="offsets 0-9")
    assert double.head("out").description == "offsets 0-9"
    assert client.pfs.inspect_commit(commit=replaced).description == "offsets 0-9"
    error = rpc_error(lambda: client.pfs.finish_commit(commit=replaced))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert error.details() == f"commit default/out@{replaced.id} has already finished"
    error = rpc_error(lambda: stream(client, replaced, add("/late", b"x")))
    assert "has already finished" in error.details()
    assert double.head("out").files == {}


def test_inspect_commit_can_wait_for_the_commit_to_finish(double, client):
    commit = client.pfs.start_commit(branch=MASTER)
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(client.pfs.wait_commit(commit)))
    waiter.start()
    wait_until(lambda: double.calls.count("InspectCommit") == 1, 5, "the waiting InspectCommit")
    assert not waited
    client.pfs.finish_commit(commit=commit, description="done")
    waiter.join(5)
    assert waited and waited[0].description == "done" and waited[0].finished.year > 1970


def test_modify_file_on_a_branch_with_a_finished_head_makes_a_one_off_commit(double, client):
    before = double.head("out")
    client.pfs.put_file_from_bytes(commit=pfs.Commit(branch=MASTER), path="/one", data=b"off")
    head = double.head("out")
    assert head.parent_id == before.id and head.files == {"/one": b"off"}
    wait_until(lambda: double.head("out").finished, 5, "the one-off commit to finish")


def test_drop_commit_set_moves_the_head_back(double, client):
    first = double.head("out")
    commit = client.pfs.start_commit(branch=MASTER)
    stream(client, commit, add("/dropped", b"x"))
    client.pfs.drop_commit_set(commit_set=pfs.CommitSet(id=commit.id))
    assert [view.id for view in double.commits("out")] == [first.id]
    assert client.pfs.inspect_branch(branch=MASTER).head.id == first.id
    error = rpc_error(lambda: client.pfs.inspect_commit(commit=commit))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: client.pfs.drop_commit_set(commit_set=pfs.CommitSet(id=commit.id)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"no commits found for commitset {commit.id}"
    client.pfs.start_commit(branch=MASTER)
    error = rpc_error(lambda: client.pfs.drop_commit_set(commit_set=pfs.CommitSet(id=first.id)))
    assert "cannot drop a commit that has children" in error.details()


def test_dropping_a_branch_s_only_commit_leaves_an_empty_one(double, client):
    double.create_repo("plain")
    plain = pfs.Branch.from_uri("default/plain@master")
    commit = client.pfs.start_commit(branch=plain)
    client.pfs.drop_commit_set(commit_set=pfs.CommitSet(id=commit.id))
    [empty] = double.commits("plain")  # deleteCommit: makeEmptyCommit for a headless branch
    assert empty.id != commit.id and empty.finished and empty.files == {}
    assert empty.parent_id is None


@pytest.mark.parametrize("token, text", [
    (None, "no authentication token (try logging in)"),
    ("stolen", "provided auth token is corrupted or has expired (try logging in again)"),
])
def test_a_missing_or_wrong_token_is_refused(double, token, text, monkeypatch):
    monkeypatch.delenv("PACH_PYTHON_AUTH_TOKEN", raising=False)
    stranger = Client("127.0.0.1", double.port, auth_token=token)
    for call in (lambda: stranger.pfs.inspect_branch(branch=MASTER),
                 lambda: stranger.pfs.start_commit(branch=MASTER),
                 lambda: stream(stranger, pfs.Commit(branch=MASTER), add("/x", b"x")),
                 lambda: stranger.auth.who_am_i()):
        error = rpc_error(call)
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, text)
    assert len(double.commits("out")) == 1
    assert stranger.get_version().minor == 12  # GetVersion is unauthenticated


def test_without_a_token_auth_is_off():
    with PachdDouble().start() as open_double:
        open_double.create_pipeline_repo("out")
        anyone = Client("127.0.0.1", open_double.port)
        assert anyone.pfs.inspect_branch(branch=MASTER).head.id == open_double.head("out").id
        with pytest.raises(AuthServiceNotActivated):
            anyone.auth.who_am_i()


@pytest.mark.parametrize("path, reason", [
    ("/a*b", "globbing character (*) not allowed in path"),
    ("/topic/0/[1]", "globbing character ([) not allowed in path"),
    ("/caf\u00e9", "only printable ASCII characters allowed"),
    ("/line\nbreak", "only printable ASCII characters allowed"),
    ("/a/../b", "relative file paths are not allowed"),
    ("./b", "relative file paths are not allowed"),
    ("", "only printable ASCII characters allowed"),
])
def test_an_invalid_path_fails_the_whole_stream(double, client, path, reason):
    commit = client.pfs.start_commit(branch=MASTER)
    error = rpc_error(lambda: stream(client, commit, add("/fine", b"x"), add(path, b"y")))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert error.details() == f"path ({path}) invalid: {reason}"
    assert double.head("out").files == {} and double.head("out").modify_streams == 0


def test_a_missing_repo_or_branch_is_not_found(client):
    error = rpc_error(lambda: client.pfs.inspect_repo(repo=pfs.Repo.from_uri("default/nope")))
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND,
                                               "repo default/nope not found")
    error = rpc_error(lambda: client.pfs.inspect_branch(
        branch=pfs.Branch.from_uri("default/out@dev")))
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND,
                                               'branch "dev" not found in repo default/out')
    error = rpc_error(lambda: client.pfs.start_commit(
        branch=pfs.Branch.from_uri("other/out@master")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "repo other/out not found" in error.details()


def test_a_value_over_the_message_limit_goes_in_chunks(double, client):
    value = os.urandom(MAX_MESSAGE_BYTES + 2 * MiB)
    commit = client.pfs.start_commit(branch=MASTER)
    error = rpc_error(lambda: stream(client, commit, add("/big", value)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert double.head("out").files == {}
    stream(client, commit, *[add("/big", value[at:at + 2 * MiB])
                             for at in range(0, len(value), 2 * MiB)])
    assert double.head("out").files["/big"] == value


def test_stop_and_start_keep_the_state_on_the_same_port(double, client):
    commit = client.pfs.start_commit(branch=MASTER, description="before the outage")
    port = double.port
    double.stop()
    with pytest.raises((grpc.RpcError, ConnectionError)):
        client.pfs.inspect_commit(commit=commit)
    double.start()
    assert double.port == port
    wait_until(lambda: reachable(client), 15, "the client to reconnect", interval=0.2)
    assert client.pfs.inspect_commit(commit=commit).description == "before the outage"
    error = rpc_error(lambda: client.pfs.start_commit(branch=MASTER))
    assert "has not been finished" in error.details()


def reachable(client: Client) -> bool:
    try:
        client.pfs.inspect_branch(branch=MASTER)
        return True
    except (grpc.RpcError, ConnectionError):
        return False


def test_a_delayed_finish_reply_is_applied_before_the_answer_is_lost(double, client):
    commit = client.pfs.start_commit(branch=MASTER)
    double.delay_finish_reply(30)
    outcome = []

    def finish():
        try:
            client.pfs.finish_commit(commit=commit, description="offsets")
            outcome.append("answered")
        except (grpc.RpcError, ConnectionError) as error:
            outcome.append(error)

    caller = threading.Thread(target=finish)
    caller.start()
    assert double.finish_applied.wait(5)
    wait_until(lambda: double.head("out").finished, 5, "the commit to finish")
    assert double.head("out").description == "offsets"
    assert not outcome  # applied, not yet answered
    double.stop()
    caller.join(5)
    assert outcome and outcome[0] != "answered"
    assert double.head("out").finished


def test_fail_next_fails_calls_unapplied_then_lets_them_through(double, client):
    double.fail_next("StartCommit", grpc.StatusCode.UNAVAILABLE, count=2, message="pachd restarting")
    for _ in range(2):
        error = rpc_error(lambda: client.pfs.start_commit(branch=MASTER))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, "pachd restarting")
    assert len(double.commits("out")) == 1
    client.pfs.start_commit(branch=MASTER)
    assert len(double.commits("out")) == 2
    assert double.calls.count("StartCommit") == 3


def test_held_streams_wait_after_their_first_add_file(double, client):
    commit = client.pfs.start_commit(branch=MASTER)
    assert pfs.Commit.from_uri(f"default/out@{commit.id}").id == commit.id
    double.hold_modify_streams(True)
    writer = threading.Thread(target=stream, args=(client, commit, add("/a", b"1"), add("/b", b"2")))
    writer.start()
    wait_until(double.modify_stream_open.is_set, 5, "the held stream")
    assert double.head("out").files == {}
    double.hold_modify_streams(False)
    writer.join(5)
    assert double.head("out").files == {"/a": b"1", "/b": b"2"}
    assert not double.modify_stream_open.is_set()


def test_a_pach_config_reaches_the_double(double, tmp_path):
    config = write_pach_config(tmp_path / "config.json", double.address, token=TOKEN)
    from_config = Client.from_config(config)
    assert from_config.pfs.inspect_branch(branch=MASTER).head.id == double.head("out").id


def test_standalone_double_serves_until_sigterm(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "pachd_double.py"), "--port", str(port),
         "--repo", "default/out", "--token", TOKEN], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == f"127.0.0.1:{port}"
        standalone = Client("127.0.0.1", port, auth_token=TOKEN)
        assert standalone.pfs.inspect_branch(branch=MASTER).head.id
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_a_client_killed_mid_stream_lands_nothing(double, client):
    commit = client.pfs.start_commit(branch=MASTER)
    assert pfs.Commit.from_uri(f"default/out@{commit.id}").id == commit.id
    double.hold_modify_streams(True)
    writer = subprocess.Popen([sys.executable, "-c", f"""
from pachyderm_sdk import Client
from pachyderm_sdk.api import pfs
client = Client("127.0.0.1", {double.port}, auth_token={TOKEN!r})
commit = pfs.Commit.from_uri("default/out@{commit.id}")
client.pfs.modify_file(iter([pfs.ModifyFileRequest(set_commit=commit)] + [
    pfs.ModifyFileRequest(add_file=pfs.AddFile(path=f"/m/{{i}}", raw=b"x")) for i in range(3)]))
"""])
    try:
        wait_until(double.modify_stream_open.is_set, 20, "the writer's stream")
        assert writer.poll() is None  # held after its first add_file, not refused
        writer.kill()
        writer.wait(10)
        wait_until(lambda: not double.modify_stream_open.is_set(), 10, "the stream to be dropped")
    finally:
        writer.kill()
        double.hold_modify_streams(False)
    assert double.head("out").files == {} and double.head("out").modify_streams == 0
    client.pfs.finish_commit(commit=commit)
    wait_until(lambda: double.head("out").finished, 5, "the commit to finish")
