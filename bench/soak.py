"""make soak: spout.py with its defaults at a steady rate; does its memory grow?

Produces 1 KiB messages at a fixed rate to a local Tansu for --seconds, while spout.py (group
mode, defaults) writes them to a FIFO read by the benchmark's drain. Prints the spout's RSS
once a minute and the growth from the first minute to the last.

    python bench/soak.py [--seconds 600] [--rate 3000]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Tansu, create_topic  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]) / 1024


def produce_steadily(bootstrap: str, topic: str, rate: int, seconds: float,
                     stop: threading.Event) -> None:
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    value = os.urandom(1024)
    started = time.monotonic()
    sent = 0
    while not stop.is_set() and time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * rate)
        while sent < due:
            producer.send(topic, value=value, partition=sent % 3)
            sent += 1
        time.sleep(0.01)
    producer.flush(30)
    producer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--rate", type=int, default=3000)
    args = parser.parse_args()
    tansu = Tansu()
    stop = threading.Event()
    try:
        topic = create_topic(tansu.bootstrap, 3)
        with tempfile.TemporaryDirectory() as work:
            fifo = os.path.join(work, "out")
            os.mkfifo(fifo)
            drain = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bench.py"),
                                      "_drain", fifo], stdout=subprocess.DEVNULL)
            env = dict(os.environ, BOOTSTRAP_SERVERS=tansu.bootstrap, TOPIC=topic,
                       OUTPUT_PIPE=fifo, LOG_LEVEL="WARNING")
            spout = subprocess.Popen([sys.executable, str(ROOT / "spout.py")], env=env)
            producer = threading.Thread(target=produce_steadily, daemon=True, args=(
                tansu.bootstrap, topic, args.rate, args.seconds, stop))
            producer.start()
            samples = []
            started = time.monotonic()
            try:
                while producer.is_alive():
                    time.sleep(min(60.0, args.seconds / 10))
                    samples.append((time.monotonic() - started, rss_mib(spout.pid)))
                    print(f"{samples[-1][0]:6.0f} s  RSS {samples[-1][1]:6.1f} MiB", flush=True)
            finally:
                stop.set()
                spout.send_signal(signal.SIGTERM)
                spout.wait(30)
                drain.wait(30)
    finally:
        tansu.stop()
    print(f"soak: {args.seconds:.0f} s at {args.rate} msg/s of 1 KiB: RSS {samples[0][1]:.1f} "
          f"MiB after {samples[0][0]:.0f} s, {samples[-1][1]:.1f} MiB at the end, growth "
          f"{samples[-1][1] - samples[0][1]:+.1f} MiB")


if __name__ == "__main__":
    main()
