"""make try BOOTSTRAP=host:port TOPIC=name: the spout on your own Kafka, without a Pachyderm.

Runs spout.py against the broker and topic given, delivering to a stand-in of Pachyderm on
this machine: the double of pachd's 2.x PFS API (tests/pachd_double.py), or with
--delivery pipe a FIFO read by the double of Pachyderm 1.x's reader (tests/pfs_reader.py).
Prints each commit as it lands (its description, a few of its files) and writes the files
under demo-out/try/. Stops after --seconds (30), once --messages have landed, or on Ctrl-C.

Every other setting comes from the environment as the spout reads it (FORMAT=jsonl,
KAFKA_SECURITY_PROTOCOL=SASL_SSL, ...). GROUP_ID defaults to a fresh kafka-spout-try-<hex>
group, so that no real consumer group's offsets move; that group's offsets are committed on
your broker, as a spout's are. Reads the topic from its start (AUTO_OFFSET_RESET=earliest)
unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pachd_double import PachdDouble, write_pach_config  # noqa: E402
from pfs_reader import PfsReader  # noqa: E402

OUT = ROOT / "demo-out" / "try"  # --out
REPO = "try"
_MESSAGES = re.compile(r"kafka-spout: (\d+) message\(s\)")


def preview(data: bytes, width: int = 100) -> str:
    text = data.decode("utf-8", "replace").replace("\n", "\\n")
    return text if len(text) <= width else text[:width] + f"... ({len(data):,} bytes)"


def write_files(files: dict, target: Path) -> None:
    for path, data in files.items():
        (target / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (target / path.lstrip("/")).write_bytes(data)


class PachdStandIn:
    """2.x: commits through the pachd double; each finished commit shown once."""

    def __init__(self, work: Path, out: Path):
        self.out = out
        self.pachd = PachdDouble(token="try-token").start()
        self.pachd.create_pipeline_repo(REPO)
        config = write_pach_config(work / "pachctl.json", self.pachd.address, "try-token")
        self.env = {"PACH_CONFIG": str(config), "OUTPUT_PIPE": str(work / "no-pipe"),
                    "OUTPUT_REPO": f"default/{REPO}", "DELIVERY": "pfs"}
        self.shown: set = set()
        self.messages = 0
        self.commits = 0

    def new_commits(self, show: int) -> None:
        for commit in self.pachd.commits(REPO):
            if commit.id in self.shown or not commit.finished or \
                    not commit.description.startswith("kafka-spout"):
                continue
            self.shown.add(commit.id)
            self.commits += 1
            found = _MESSAGES.match(commit.description)
            self.messages += int(found.group(1)) if found else 0
            lines = commit.description.splitlines()
            print(f"commit {commit.id[:12]}  {lines[0]}")
            if len(lines) > 1:
                print(f"{' ' * 20}{lines[1]}")
            for path in sorted(commit.changed)[:show]:
                if path in commit.files:
                    print(f"{' ' * 20}{path} -> {preview(commit.files[path])}")
            if len(commit.changed) > show:
                print(f"{' ' * 20}... and {len(commit.changed) - show} more file(s)")

    def finish(self) -> int:
        files = self.pachd.head(REPO).files
        write_files(files, self.out)
        return len(files)

    def stop(self) -> None:
        self.pachd.stop()


class PipeStandIn:
    """1.x: archives through a FIFO, read by the 1.11.3+ reader double."""

    def __init__(self, work: Path, out: Path):
        self.out = out
        pipe = work / "pfs" / "out"
        pipe.parent.mkdir()
        os.mkfifo(pipe)
        self.reader = PfsReader(str(pipe), "g3", overwrite=True,
                                materialize=str(out / "commits")).start()
        self.env = {"OUTPUT_PIPE": str(pipe), "DELIVERY": "pipe"}
        self.shown = 0
        self.messages = 0
        self.commits = 0

    def new_commits(self, show: int) -> None:
        for commit in list(self.reader.commits)[self.shown:]:
            self.shown += 1
            self.commits += 1
            files = [(path, data) for path, data in commit.puts
                     if not path.endswith(".meta.json")]
            self.messages += len(files)
            print(f"commit {commit.number:<12} an archive of {len(commit.puts)} file(s)")
            for path, data in files[:show]:
                print(f"{' ' * 20}{path} -> {preview(data)}")
            if len(files) > show:
                print(f"{' ' * 20}... and {len(files) - show} more file(s)")

    def finish(self) -> int:
        files = self.reader.snapshot()
        write_files(files, self.out / "files")
        return len(files)

    def stop(self) -> None:
        self.reader.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make try", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="host:port[,host:port...]")
    parser.add_argument("--topic", required=True, help="topic, or comma-separated topics")
    parser.add_argument("--delivery", choices=("pfs", "pipe"), default="pfs",
                        help="pfs: Pachyderm 2.x's commits (default); pipe: 1.x's archives")
    parser.add_argument("--seconds", type=float, default=30.0, help="stop after (30)")
    parser.add_argument("--messages", type=int, help="stop once this many have landed")
    parser.add_argument("--show", type=int, default=2, help="files shown per commit (2)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the files go "
                        "(demo-out/try)")
    args = parser.parse_args(argv)

    shutil.rmtree(args.out, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="kafka-spout-try-"))
    stand_in = (PachdStandIn if args.delivery == "pfs" else PipeStandIn)(work, args.out)
    env = {**os.environ, "GROUP_ID": os.environ.get("GROUP_ID") or
           f"kafka-spout-try-{uuid.uuid4().hex[:8]}", **stand_in.env,
           "BOOTSTRAP_SERVERS": args.bootstrap, "TOPIC": args.topic}
    env.pop("HOST", None)
    env.pop("PORT", None)
    log_path = work / "spout.log"
    print(f"spout.py on {args.bootstrap}, topic {args.topic}, group {env['GROUP_ID']}, "
          f"into {'the pachd double (2.x)' if args.delivery == 'pfs' else 'a FIFO (1.x)'}; "
          f"its log: {log_path}")
    status = None
    with open(log_path, "wb") as log:
        spout = subprocess.Popen([sys.executable, str(ROOT / "spout.py")], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + args.seconds
            while spout.poll() is None and time.monotonic() < deadline and \
                    (args.messages is None or stand_in.messages < args.messages):
                stand_in.new_commits(args.show)
                time.sleep(0.2)
            if spout.poll() is None:
                spout.send_signal(signal.SIGTERM)
            status = spout.wait(20)
        except KeyboardInterrupt:
            spout.send_signal(signal.SIGTERM)
            status = spout.wait(20)
        finally:
            if spout.poll() is None:
                spout.kill()
                spout.wait()
            time.sleep(0.3)  # the last commit's finish, the reader's last archive
            stand_in.new_commits(args.show)
            files = stand_in.finish()
            stand_in.stop()
    text = log_path.read_text(errors="replace")
    errors = [line for line in text.splitlines()
              if line.startswith("spout.py: error:") or " WARNING " in line or " ERROR " in line]
    for line in errors[-5:]:
        print(line, file=sys.stderr)
    print(f"spout exited with status {status}; messages: {stand_in.messages}  "
          f"commits: {stand_in.commits}  files written under {args.out}/: {files}")
    if status == 0:
        shutil.rmtree(work, ignore_errors=True)
    return status if status is not None else 1


if __name__ == "__main__":
    sys.exit(main())
