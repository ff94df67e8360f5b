"""What METRICS_PORT costs the owned path: bench.py's owned writer (batching, naming,
encoding, the pipe to a drain process) driven as the loop drives it, with the loop's monitor
hooks, once with the do-nothing Monitor and once with MetricsMonitor; alternated, medians.

    .venv/bin/python bench/metrics_overhead.py [--size 100] [--count 300000] [--runs 7]

No broker: the consumer that MetricsMonitor.refresh() asks for assignment and high
watermarks is a stand-in answering from the polled records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import spout  # noqa: E402  (bench puts the repo on sys.path)


class PolledConsumer:
    def __init__(self, polls):
        self.highwaters = {}
        for batch in polls:
            for tp, messages in batch.items():
                self.highwaters[tp] = messages[-1].offset + 1

    def assignment(self):
        return set(self.highwaters)

    def highwater(self, tp):
        return self.highwaters.get(tp)


def run(metrics: bool, polls: list, count: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        fifo = os.path.join(work, "out")
        os.mkfifo(fifo)
        drain = subprocess.Popen([sys.executable, bench.__file__, "_drain", fifo],
                                 stdout=subprocess.PIPE, text=True)
        instance = bench.owned_spout(fifo)
        instance.consumer = PolledConsumer(polls)
        if metrics:
            instance.monitor = spout.MetricsMonitor(instance.config, instance)
        monitor = instance.monitor
        started, cpu = time.perf_counter(), time.process_time()
        for batch in polls:  # Spout.consume's per-poll path, the broker aside
            monitor.polled(batch)
            instance.add(batch)
            if instance.batch.records and instance.batch_due_in() <= 0:
                instance.flush()
            for outgoing in instance.delivery.held():
                monitor.held(outgoing)
            monitor.refresh()
        instance.flush()
        for outgoing in instance.delivery.drain(time.monotonic() + 60):
            monitor.held(outgoing)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        instance.delivery.close(time.monotonic() + 1)
        drain.communicate(timeout=60)
        if metrics:
            counted = monitor.registry.get_sample_value("kafka_spout_messages_total",
                                                        {"topic": bench.TOPIC})
            assert counted == count, counted
        return {"msg_per_s": count / seconds, "cpu_us_per_msg": cpu / count * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    polls = list(bench.records(args.size, args.count))
    results: dict = {False: [], True: []}
    for number in range(args.runs):
        for metrics in ((False, True) if number % 2 else (True, False)):  # neither always first
            results[metrics].append(run(metrics, polls, args.count))
    summary = {"size": args.size, "count": args.count, "runs": args.runs}
    for metrics, name in ((False, "off"), (True, "on")):
        for key in ("msg_per_s", "cpu_us_per_msg"):
            summary[f"{name}_{key}"] = round(statistics.median(r[key] for r in results[metrics]),
                                             3)
    summary["cpu_on_vs_off"] = round(summary["on_cpu_us_per_msg"] /
                                     summary["off_cpu_us_per_msg"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
