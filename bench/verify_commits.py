"""How long `spout.py verify` takes on a big repo: N commits (default 10,000) with kafka-spout
descriptions, made through the SDK on the pachd double (3 partitions, one batch each, every
100th commit leaving a 1-offset gap so that the report has something to say), then verify
run as a user runs it, twice: the first time the double encodes every CommitInfo (betterproto,
about 0.8 ms each: real pachd does this in Go), the second from its cache, which is closer
to what verify itself costs. Also timed in-process: the ListCommit stream and the analysis.

    .venv/bin/python bench/verify_commits.py [--commits 10000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

import spout  # noqa: E402
from pachd_double import PachdDouble, write_pach_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=10_000)
    args = parser.parse_args()
    from pachyderm_sdk import Client
    from pachyderm_sdk.api import pfs
    double = PachdDouble(token="bench-token").start()
    try:
        double.create_repo("big")
        client = Client("127.0.0.1", double.port, auth_token="bench-token")
        branch = pfs.Branch(repo=pfs.Repo(name="big", type="user",
                                          project=pfs.Project(name="default")), name="master")
        started = time.perf_counter()
        nexts = {("events", p): 0 for p in range(3)}
        gaps = 0
        for i in range(args.commits):
            tp = ("events", i % 3)
            first = nexts[tp] + (1 if i % 100 == 99 else 0)
            gaps += first != nexts[tp]
            nexts[tp] = first + 60
            description = spout.describe_commit({tp: (first, first + 60)}, 60, ["events"],
                                                dict(nexts))
            commit = client.pfs.start_commit(branch=branch, description=description)
            client.pfs.finish_commit(commit=commit)
        made = time.perf_counter() - started
        print(f"made {args.commits} commits through the SDK in {made:.1f}s")
        config = write_pach_config(Path(tempfile.mkdtemp()) / "pachctl.json", double.address,
                                   "bench-token")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PACH", "KAFKA_"))}
        env["PACH_CONFIG"] = str(config)
        for run in ("first (double encodes)", "second (double's cache)"):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, str(ROOT / "spout.py"), "verify", "big"],
                                    env=env, capture_output=True, text=True)
            took = time.perf_counter() - started
            summary = result.stdout.strip().splitlines()[-1] if result.stdout else result.stderr
            print(f"verify, {run}: {took:.2f}s wall, exit {result.returncode}: {summary}")
        settings = spout.ToolSettings(f"grpc://{double.address}", "bench-token", None, (), {},
                                      None)
        repo = spout.parse_output_repo("big")
        reader = spout.RepoReader(settings, repo)
        started = time.perf_counter()
        summaries = reader.commits()
        listed = time.perf_counter() - started
        reader.close()
        started = time.perf_counter()
        commits = spout.spout_commits(repo, summaries, [])
        report = spout.verify_report(commits, {str(repo): len(summaries)}, [])
        analysed = time.perf_counter() - started
        print(f"in-process: ListCommit stream of {len(summaries)} decoded in {listed:.2f}s, "
              f"records read and analysed in {analysed:.2f}s; {len(report['gaps'])} gap(s) "
              f"(made {gaps})")
    finally:
        double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
