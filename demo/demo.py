"""make demo: the spout end to end on this machine, with nothing but the repo.

Starts a local Tansu broker, produces a small sample stream (300 messages over 3 partitions,
some keyed), runs spout.py against a FIFO read by the test double of Pachyderm's 1.11.3+
reader, materialises every commit under demo-out/commit-NNNN/, prints a summary, and stops
everything it started, whatever happens.
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
from pfs_reader import PfsReader  # noqa: E402

MESSAGES = 300
OUT = ROOT / "demo-out"


def sample_stream():
    for i in range(MESSAGES):
        key = f"sensor-{i % 7}".encode() if i % 3 == 0 else None
        value = json.dumps({"reading": i, "celsius": round(18 + (i % 40) / 4, 2)}).encode()
        yield i % 3, key, value


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="kafka-spout-demo-"))
    pipe = work / "pfs" / "out"
    pipe.parent.mkdir()
    os.mkfifo(pipe)
    tansu = reader = spout = None
    try:
        tansu = Tansu()
        topic = create_topic(tansu.bootstrap, 3, name="demo-events")
        produce(tansu.bootstrap, topic, sample_stream())
        print(f"produced {MESSAGES} messages to {topic} on {tansu.bootstrap}")

        reader = PfsReader(str(pipe), "g3", overwrite=True, materialize=str(OUT)).start()
        env = dict(os.environ, BOOTSTRAP_SERVERS=tansu.bootstrap, TOPIC=topic,
                   OUTPUT_PIPE=str(pipe), GROUP_ID="demo", BATCH_MAX_MESSAGES="100",
                   BATCH_MAX_SECONDS="0.5", KAFKA_SESSION_TIMEOUT_MS="6000",
                   KAFKA_HEARTBEAT_INTERVAL_MS="500", KAFKA_MAX_POLL_INTERVAL_MS="6000")
        log = open(work / "spout.log", "wb")
        spout = subprocess.Popen([sys.executable, str(ROOT / "spout.py")], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while len(reader.snapshot()) < MESSAGES:
            if spout.poll() is not None or time.monotonic() > deadline:
                print((work / "spout.log").read_text()[-3000:], file=sys.stderr)
                print("demo failed: the spout did not deliver every message", file=sys.stderr)
                return 1
            time.sleep(0.05)
        spout.send_signal(signal.SIGTERM)
        status = spout.wait(15)

        files = reader.snapshot()
        example = sorted(files)[len(files) // 2]
        print(f"spout exited with status {status}")
        print(f"messages: {MESSAGES}  commits: {len(reader.commits)}  files: {len(files)}  "
              f"tar errors: {len(reader.tar_errors)}  empty commits: {reader.empty_commits}")
        print(f"commits materialised under {OUT.relative_to(ROOT)}/commit-NNNN/")
        print(f"example: {example} -> {files[example].decode()}")
        return 0 if status == 0 and len(files) == MESSAGES else 1
    finally:
        if spout is not None and spout.poll() is None:
            spout.kill()
            spout.wait()
        if reader is not None:
            reader.stop()
        if tansu is not None:
            tansu.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
