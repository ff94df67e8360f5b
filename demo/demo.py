"""make demo: the spout end to end on this machine, with nothing but the repo.

Starts a local Tansu broker and produces a small sample stream (300 messages over 3
partitions, some keyed). Then runs spout.py twice: into a FIFO read by the test double of
Pachyderm 1.11.3+'s reader (every commit materialised under demo-out/pipe/commit-NNNN/), and
through the double of pachd's 2.x PFS API (the head's files under demo-out/pfs/). Then once
more through pachd with FORMAT=parquet: one Parquet file per partition and hour, in Hive-style
folders (demo-out/parquet/), a few rows read back with DuckDB. Prints a summary of each and
stops everything it started, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Tansu, create_topic, produce  # noqa: E402
from pachd_double import PachdDouble, write_pach_config  # noqa: E402
from pfs_reader import PfsReader  # noqa: E402

MESSAGES = 300
OUT = ROOT / "demo-out"


def sample_stream():
    for i in range(MESSAGES):
        key = f"sensor-{i % 7}".encode() if i % 3 == 0 else None
        value = json.dumps({"reading": i, "celsius": round(18 + (i % 40) / 4, 2)}).encode()
        yield i % 3, key, value


def run_spout(env: dict, work: Path, delivered, what: str) -> int | None:
    """Runs spout.py until delivered() is true, then stops it with SIGTERM: its exit status,
    or None (and its log's tail on stderr) if it did not deliver within a minute."""
    log_path = work / f"spout-{what}.log"
    with open(log_path, "wb") as log:
        spout = subprocess.Popen([sys.executable, str(ROOT / "spout.py")], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not delivered():
                if spout.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text()[-3000:], file=sys.stderr)
                    print(f"demo failed: the spout did not deliver every message ({what})",
                          file=sys.stderr)
                    return None
                time.sleep(0.05)
            spout.send_signal(signal.SIGTERM)
            return spout.wait(15)
        finally:
            if spout.poll() is None:
                spout.kill()
                spout.wait()


def spout_env(tansu: Tansu, topic: str, group: str, **settings) -> dict:
    return dict(os.environ, BOOTSTRAP_SERVERS=tansu.bootstrap, TOPIC=topic, GROUP_ID=group,
                BATCH_MAX_MESSAGES="100", BATCH_MAX_SECONDS="0.5",
                KAFKA_SESSION_TIMEOUT_MS="6000", KAFKA_HEARTBEAT_INTERVAL_MS="500",
                KAFKA_MAX_POLL_INTERVAL_MS="6000", **settings)


def pipe_delivery(tansu: Tansu, topic: str, work: Path) -> bool:
    """Pachyderm 1.x: archives through the named pipe, read by the 1.11.3+ reader double."""
    print("\n== Pachyderm 1.x: tar archives through the named pipe /pfs/out")
    pipe = work / "pfs" / "out"
    pipe.parent.mkdir()
    os.mkfifo(pipe)
    reader = PfsReader(str(pipe), "g3", overwrite=True, materialize=str(OUT / "pipe")).start()
    try:
        status = run_spout(spout_env(tansu, topic, "demo-pipe", OUTPUT_PIPE=str(pipe)), work,
                           lambda: len(reader.snapshot()) >= MESSAGES, "pipe")
        if status is None:
            return False
        files = reader.snapshot()
        example = sorted(files)[len(files) // 2]
        print(f"spout exited with status {status}")
        print(f"messages: {MESSAGES}  commits: {len(reader.commits)}  files: {len(files)}  "
              f"tar errors: {len(reader.tar_errors)}  empty commits: {reader.empty_commits}")
        print(f"commits materialised under {(OUT / 'pipe').relative_to(ROOT)}/commit-NNNN/")
        print(f"example: {example} -> {files[example].decode()}")
        return status == 0 and len(files) == MESSAGES
    finally:
        reader.stop()


def pfs_delivery(tansu: Tansu, topic: str, work: Path) -> bool:
    """Pachyderm 2.x: commits through pachd's gRPC API (the double of pachd's PFS API)."""
    print("\n== Pachyderm 2.x: commits through pachd, offsets in each commit's description")
    pachd = PachdDouble(token="demo-token").start()
    try:
        pachd.create_pipeline_repo("demo-events")
        config = write_pach_config(work / "pachctl-config.json", pachd.address, "demo-token")
        env = spout_env(tansu, topic, "demo-pfs", PACH_CONFIG=str(config),
                        OUTPUT_PIPE=str(work / "no-pipe-in-2.x"),
                        PPS_PIPELINE_NAME="demo-events", PPS_PROJECT_NAME="default")
        status = run_spout(env, work, lambda: len(pachd.head("demo-events").files) >= MESSAGES,
                           "pfs")
        if status is None:
            return False
        # pachd sets `finished` shortly after the last FinishCommit has returned.
        settled = time.monotonic() + 5
        while not all(c.finished for c in pachd.commits("demo-events")) and \
                time.monotonic() < settled:
            time.sleep(0.05)
        commits = pachd.commits("demo-events")
        files = pachd.head("demo-events").files
        target = OUT / "pfs"
        for path, data in files.items():
            (target / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (target / path.lstrip("/")).write_bytes(data)
        example = sorted(files)[len(files) // 2]
        spout_made = [c for c in commits if c.description.startswith("kafka-spout")]
        print(f"spout exited with status {status}")
        print(f"messages: {MESSAGES}  commits: {len(spout_made)} (after pachd's empty first "
              f"one)  files: {len(files)}  open commits: "
              f"{sum(not c.finished for c in commits)}")
        print("commits, newest first, as `pachctl list commit` shows their descriptions:")
        for commit in reversed(spout_made):
            lines = commit.description.splitlines()
            print(f"  {commit.id[:12]}  {lines[0]}")
            print(f"  {' ' * 12}  {lines[1]}")
        print(f"the head's files written under {target.relative_to(ROOT)}/")
        print(f"example: {example} -> {files[example].decode()}")
        return status == 0 and len(files) == MESSAGES
    finally:
        pachd.stop()


def parquet_delivery(tansu: Tansu, topic: str, work: Path) -> bool:
    """FORMAT=parquet through pachd: one file per partition per batch, read back by DuckDB."""
    import duckdb
    sys.path.insert(0, str(ROOT))
    import spout
    print("\n== FORMAT=parquet through pachd: one file per partition and hour, read by DuckDB")
    pachd = PachdDouble(token="demo-token").start()
    try:
        pachd.create_pipeline_repo("demo-parquet")
        config = write_pach_config(work / "pachctl-parquet.json", pachd.address, "demo-token")
        template = "{topic}/date={date}/hour={hour}/{partition}-{offset:020d}.parquet"
        env = {**spout_env(tansu, topic, "demo-parquet", PACH_CONFIG=str(config),
                           OUTPUT_PIPE=str(work / "no-pipe-in-2.x"), OUTPUT_REPO="demo-parquet",
                           FORMAT="parquet", NAME_TEMPLATE=template),
               "BATCH_MAX_MESSAGES": "100000", "BATCH_MAX_SECONDS": "1"}

        def delivered() -> int:
            record = spout.record_from_description(pachd.head("demo-parquet").description)
            return sum(record[1].values()) if record else 0
        status = run_spout(env, work, lambda: delivered() >= MESSAGES, "parquet")
        if status is None:
            return False
        files = pachd.head("demo-parquet").files
        target = OUT / "parquet"
        for path, data in files.items():
            (target / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (target / path.lstrip("/")).write_bytes(data)
        commits = [c for c in pachd.commits("demo-parquet")
                   if c.description.startswith("kafka-spout")]
        print(f"spout exited with status {status}")
        print(f"messages: {MESSAGES}  commits: {len(commits)}  files: {len(files)}")
        for path in sorted(files):
            print(f"  {path}  ({len(files[path]):,} bytes)")
        glob = f"{target}/**/*.parquet"
        with duckdb.connect() as db:
            (count,), = db.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()
            print(f"DuckDB: SELECT ... FROM read_parquet('{target.relative_to(ROOT)}/**/*.parquet',"
                  " hive_partitioning = true) ORDER BY \"offset\", partition LIMIT 4")
            rows = db.sql(f"SELECT partition, \"offset\", timestamp, decode(value), "
                          f"date, hour FROM read_parquet('{glob}', hive_partitioning = true) "
                          "ORDER BY \"offset\", partition LIMIT 4").fetchall()
        for row in rows:
            print("  " + " | ".join(str(field) for field in row))
        print(f"rows: {count}")
        return status == 0 and count == MESSAGES
    finally:
        pachd.stop()


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="kafka-spout-demo-"))
    tansu = None
    try:
        tansu = Tansu()
        topic = create_topic(tansu.bootstrap, 3, name="demo-events")
        produce(tansu.bootstrap, topic, sample_stream())
        print(f"produced {MESSAGES} messages to {topic} on {tansu.bootstrap}")
        ok = pipe_delivery(tansu, topic, work)
        ok = pfs_delivery(tansu, topic, work) and ok
        ok = parquet_delivery(tansu, topic, work) and ok
        return 0 if ok else 1
    finally:
        if tansu is not None:
            tansu.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
