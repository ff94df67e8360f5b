"""make bench: what the spout's own path costs, beside the pipe's limit and Kafka's.

Every row is measured in separate processes: a writer (the spout's code, or a baseline) and a
drain that reads the FIFO and walks the tar headers, checking member count and sizes. Rows of
one run share the machine's state, so compare within a run; the table shows the median of
--runs runs.

    python bench/bench.py [--runs 3] [--quick] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {"100 B": 100, "10 KiB": 10 * 1024, "1 MiB": 1024 * 1024}
# Messages per size: enough for a few seconds of the fastest path.
COUNTS = {100: 600_000, 10 * 1024: 100_000, 1024 * 1024: 2_000}
QUICK = {100: 100_000, 10 * 1024: 20_000, 1024 * 1024: 400}
TOPIC = "bench"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def records(size: int, count: int, per_poll: int = 500):
    """Batches shaped like KafkaConsumer.poll()'s answer, over 3 partitions."""
    from kafka import TopicPartition
    from kafka.consumer.fetcher import ConsumerRecord
    value = os.urandom(size)
    tps = [TopicPartition(TOPIC, p) for p in range(3)]
    offsets = [0, 0, 0]
    sent = 0
    while sent < count:
        batch = {}
        for p, tp in enumerate(tps):
            n = min(per_poll // 3 or 1, count - sent)
            if n <= 0:
                break
            batch[tp] = [ConsumerRecord(TOPIC, p, 0, offsets[p] + i, 1_700_000_000_000, 0,
                                        b"key-%d" % i, value, [], None, 5, size, 0)
                         for i in range(n)]
            offsets[p] += n
            sent += n
        yield batch


def owned_spout(fifo: str):
    import spout
    config = spout.Config(bootstrap_servers=("localhost:9092",), topics=(TOPIC,),
                          output_pipe=fifo)
    return spout.Spout(config, threading.Event())


# ----------------------------------------------------------------------------- writers
# Each runs in its own process and prints one JSON line: seconds, cpu, rss.

def writer_owned(fifo: str, size: int, count: int) -> dict:
    """The spout's own path: batching, naming, encoding, delivery; no broker."""
    instance = owned_spout(fifo)
    polls = list(records(size, count)) if size <= 10 * 1024 else None
    started, cpu = time.perf_counter(), cpu_seconds()
    for batch in polls if polls is not None else records(size, count):
        instance.add(batch)
        if instance.batch.records and instance.batch_due_in() <= 0:
            instance.flush()
        instance.delivery.poll()
    instance.flush()
    instance.delivery.drain(time.monotonic() + 60)
    instance.delivery.pipe.close()
    return {"seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu,
            "rss": peak_rss_mib()}


def writer_physical(fifo: str, size: int, count: int) -> dict:
    """The same archive bytes, prebuilt: what the pipe and the drain allow at most."""
    instance = owned_spout(fifo)
    captured: list[tuple[bytes, int]] = []
    instance.delivery.send = lambda archive, offsets, deadline=None: captured.append(
        (b"".join(bytes(part) for part in archive.parts), archive.members))
    for batch in records(size, min(count, 4 * instance.config.batch_max_messages)):
        instance.add(batch)
    instance.flush()
    # The same kind of FIFO as the spout's: grown to 1 MiB.
    instance.delivery.pipe.open()
    fd = instance.delivery.pipe.fd
    os.set_blocking(fd, True)
    started, cpu = time.perf_counter(), cpu_seconds()
    sent = 0
    while True:
        fitting = [(data, members) for data, members in captured if sent + members <= count]
        if not fitting:
            break
        for data, members in fitting:
            if sent + members > count:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            sent += members
    os.close(fd)
    return {"seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu,
            "rss": peak_rss_mib(), "members": sent}


def writer_seed(fifo: str, size: int, count: int) -> dict:
    """The seed's design: one tarfile archive per message, named from the clock."""
    value = os.urandom(size)
    started, cpu = time.perf_counter(), cpu_seconds()
    with open(fifo, "wb") as pipe:
        for _ in range(count):
            with tarfile.open(fileobj=pipe, mode="w|") as tar:
                info = tarfile.TarInfo(f"{time.time():.6f}")
                info.size = size
                tar.addfile(info, io.BytesIO(value))
    return {"seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu,
            "rss": peak_rss_mib()}


def drain(fifo: str, expect: int = 0, ignore: str = "") -> dict:
    """Reads the FIFO and walks the tar headers without copying bodies; long bodies are
    passed over with splice(2) to /dev/null. With expect, prints "first T" and "done T"
    (monotonic clock) when the first and the expect-th data member arrive."""
    fd = os.open(fifo, os.O_RDONLY)
    devnull = os.open(os.devnull, os.O_WRONLY)
    ignored = ignore.encode().ljust(100, b"\x00") if ignore else None
    started = None
    cpu = cpu_seconds()
    members = data_bytes = total = skip = 0
    leftover = b""
    zero = bytes(512)
    while True:
        if skip > (1 << 20):
            moved = os.splice(fd, devnull, skip)
            if not moved:
                break
            skip -= moved
            total += moved
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        if started is None:
            started = time.perf_counter()
        total += len(chunk)
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        view = memoryview(leftover + chunk if leftover else chunk)[skip:]  # one is 0
        skip = position = 0
        end = len(view)
        while end - position >= 512:
            header = view[position:position + 512]
            position += 512
            if header == zero:
                continue
            size = int(bytes(header[124:135]), 8)
            if header[156:157] == b"0" and (ignored is None or header[:100] != ignored):
                members += 1
                data_bytes += size
                if expect and members == 1:
                    print(f"first {time.perf_counter()}", flush=True)
                if expect and members == expect:
                    print(f"done {time.perf_counter()}", flush=True)
            position += size + (-size % 512)
        if position > end:
            skip, leftover = position - end, b""
        else:
            leftover = bytes(view[position:])
    os.close(fd)
    return {"seconds": time.perf_counter() - (started or time.perf_counter()),
            "cpu": cpu_seconds() - cpu, "members": members, "data_bytes": data_bytes,
            "bytes": total}


WRITERS = {"owned": writer_owned, "physical": writer_physical, "seed": writer_seed}


# ----------------------------------------------------------------------------- one row

def run_pipe_row(kind: str, size: int, count: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        fifo = os.path.join(work, "out")
        os.mkfifo(fifo)
        reader = subprocess.Popen([sys.executable, __file__, "_drain", fifo],
                                  stdout=subprocess.PIPE, text=True)
        writer = subprocess.Popen([sys.executable, __file__, "_" + kind, fifo, str(size),
                                   str(count)], stdout=subprocess.PIPE, text=True)
        while writer.poll() is None:
            if reader.poll() not in (None, 0):
                writer.kill()
                raise RuntimeError(f"the drain failed during {kind} {size}")
            time.sleep(0.05)
        written = json.loads(writer.communicate()[0])
        read = json.loads(reader.communicate(timeout=60)[0])
    expected = written.get("members", count)
    assert read["members"] == expected, (kind, read, expected)
    assert read["data_bytes"] == expected * size, (kind, read)
    seconds = max(written["seconds"], read["seconds"])
    return {"messages": expected, "seconds": seconds, "msg_per_s": expected / seconds,
            "mb_per_s": expected * size / seconds / 1e6,
            "cpu_us_per_msg": written["cpu"] / expected * 1e6, "rss_mib": written["rss"],
            "drain_cpu_share": read["cpu"] / max(read["seconds"], 1e-9)}


# ----------------------------------------------------------------------------- end to end

def run_end_to_end(size: int, count: int) -> dict:
    """spout.py (marker mode: assign, no group) against a bare poll loop, same topic."""
    from conftest import Tansu, create_topic, produce
    tansu = Tansu()
    try:
        topic = create_topic(tansu.bootstrap, 3)
        value = os.urandom(size)
        produce(tansu.bootstrap, topic, ((i % 3, None, value) for i in range(count)))
        bare = json.loads(subprocess.run(
            [sys.executable, __file__, "_bare", tansu.bootstrap, topic, str(count)],
            capture_output=True, text=True, timeout=600, check=True).stdout)
        spouted = spout_end_to_end(tansu.bootstrap, topic, count)
    finally:
        tansu.stop()
    return {"bare": bare, "spout": spouted,
            "rate_ratio": spouted["msg_per_s"] / bare["msg_per_s"],
            "cpu_ratio": spouted["cpu_us_per_msg"] / bare["cpu_us_per_msg"]}


def bare_consumer(bootstrap: str, topic: str, count: int) -> dict:
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=1000,
                             max_partition_fetch_bytes=4 * 1024 * 1024)
    consumer.assign([TopicPartition(topic, p) for p in range(3)])
    seen = first = 0
    started = cpu = None
    while seen < count:
        for batch in consumer.poll(500).values():
            if started is None:  # steady state: from the first record on
                started, cpu, first = time.perf_counter(), cpu_seconds(), len(batch)
            seen += len(batch)
    seconds = time.perf_counter() - started
    used = cpu_seconds() - cpu
    consumer.close()
    counted = seen - first
    return {"msg_per_s": counted / seconds, "cpu_us_per_msg": used / counted * 1e6}


def spout_end_to_end(bootstrap: str, topic: str, count: int) -> dict:
    """Runs spout.py as users do; its CPU from /proc between the first and the last message
    the drain sees."""
    with tempfile.TemporaryDirectory() as work:
        fifo = os.path.join(work, "out")
        os.mkfifo(fifo)
        reader = subprocess.Popen([sys.executable, __file__, "_drain", fifo, str(count),
                                   "offsets"], stdout=subprocess.PIPE, text=True)
        env = dict(os.environ, BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, OUTPUT_PIPE=fifo,
                   MARKER="offsets", LOG_LEVEL="WARNING")
        process = subprocess.Popen([sys.executable, str(ROOT / "spout.py")], env=env)
        try:
            _, first_at = reader.stdout.readline().split()
            cpu = proc_cpu(process.pid)
            _, done_at = reader.stdout.readline().split()
            used = proc_cpu(process.pid) - cpu
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
            reader.communicate(timeout=30)
    seconds = float(done_at) - float(first_at)
    return {"msg_per_s": (count - 1) / seconds, "cpu_us_per_msg": used / (count - 1) * 1e6}


def run_memory(backlog_mib: int = 256) -> dict:
    """Peak RSS of spout.py, with defaults, draining a backlog of 1 MiB messages."""
    from conftest import Tansu, create_topic, produce
    tansu = Tansu()
    try:
        topic = create_topic(tansu.bootstrap, 3)
        value = os.urandom(1024 * 1024)
        produce(tansu.bootstrap, topic, ((i % 3, None, value) for i in range(backlog_mib)))
        with tempfile.TemporaryDirectory() as work:
            fifo = os.path.join(work, "out")
            os.mkfifo(fifo)
            reader = subprocess.Popen([sys.executable, __file__, "_drain", fifo,
                                       str(backlog_mib), "offsets"], stdout=subprocess.PIPE,
                                      text=True)
            env = dict(os.environ, BOOTSTRAP_SERVERS=tansu.bootstrap, TOPIC=topic,
                       OUTPUT_PIPE=fifo, MARKER="offsets", LOG_LEVEL="WARNING")
            process = subprocess.Popen([sys.executable, str(ROOT / "spout.py")], env=env)
            try:
                reader.stdout.readline()
                reader.stdout.readline()  # "done": the whole backlog went through
                with open(f"/proc/{process.pid}/status") as status:
                    fields = dict(line.split(":", 1) for line in status)
                peak = int(fields["VmHWM"].split()[0]) / 1024
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
                reader.communicate(timeout=30)
    finally:
        tansu.stop()
    return {"backlog_mib": backlog_mib, "peak_rss_mib": peak,
            "limit_mib": 3 * 16 + 150}


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- the table

def median_rows(runs: list[dict]) -> dict:
    merged = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        merged[key] = statistics.median(values) if isinstance(values[0], (int, float)) \
            else values[0]
    return merged


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        command, args = sys.argv[1][1:], sys.argv[2:]
        if command == "drain":
            print(json.dumps(drain(args[0], int(args[1]) if len(args) > 1 else 0,
                                   args[2] if len(args) > 2 else "")))
        elif command == "bare":
            print(json.dumps(bare_consumer(args[0], args[1], int(args[2]))))
        else:
            print(json.dumps(WRITERS[command](args[0], int(args[1]), int(args[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke run")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--no-e2e", action="store_true")
    args = parser.parse_args()
    counts = QUICK if args.quick else COUNTS

    results: dict = {"runs": args.runs, "rows": {}}
    for label, size in SIZES.items():
        per_kind = {kind: [] for kind in WRITERS}
        for _ in range(args.runs):
            for kind in WRITERS:
                seed_count = min(counts[size], 20_000 if size < 1 << 20 else 400)
                count = seed_count if kind == "seed" else counts[size]
                per_kind[kind].append(run_pipe_row(kind, size, count))
        rows = {kind: median_rows(runs) for kind, runs in per_kind.items()}
        ratios = [o["msg_per_s"] / p["msg_per_s"] for o, p in
                  zip(per_kind["owned"], per_kind["physical"])]
        speedups = [o["msg_per_s"] / s["msg_per_s"] for o, s in
                    zip(per_kind["owned"], per_kind["seed"])]
        rows["owned_vs_physical"] = statistics.median(ratios)
        rows["owned_vs_seed"] = statistics.median(speedups)
        results["rows"][label] = rows
    if not args.no_e2e:
        e2e_count = 30_000 if args.quick else 100_000
        e2e = [run_end_to_end(100, e2e_count) for _ in range(args.runs)]
        results["end_to_end_100B"] = {
            "bare_msg_per_s": statistics.median(r["bare"]["msg_per_s"] for r in e2e),
            "spout_msg_per_s": statistics.median(r["spout"]["msg_per_s"] for r in e2e),
            "bare_cpu_us_per_msg": statistics.median(r["bare"]["cpu_us_per_msg"] for r in e2e),
            "spout_cpu_us_per_msg": statistics.median(r["spout"]["cpu_us_per_msg"]
                                                      for r in e2e),
            "rate_ratio": statistics.median(r["rate_ratio"] for r in e2e),
            "cpu_ratio": statistics.median(r["cpu_ratio"] for r in e2e)}
        results["memory"] = run_memory(64 if args.quick else 256)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    print(f"median of {results['runs']} run(s)")
    print(f"{'size':>7} {'path':>9} {'msg/s':>11} {'MB/s':>9} {'CPU us/msg':>11} "
          f"{'RSS MiB':>8} {'drain CPU':>9}")
    for label, rows in results["rows"].items():
        for kind in WRITERS:
            row = rows[kind]
            print(f"{label:>7} {kind:>9} {row['msg_per_s']:>11,.0f} {row['mb_per_s']:>9.1f} "
                  f"{row['cpu_us_per_msg']:>11.2f} {row['rss_mib']:>8.0f} "
                  f"{row['drain_cpu_share']:>8.0%}")
        print(f"{label:>7} owned/physical {rows['owned_vs_physical']:.0%}   "
              f"owned/seed {rows['owned_vs_seed']:.1f}x")
    e2e = results.get("end_to_end_100B")
    if e2e:
        print(f"end to end, 100 B, assign mode: spout {e2e['spout_msg_per_s']:,.0f} msg/s "
              f"{e2e['spout_cpu_us_per_msg']:.1f} us/msg; bare consumer "
              f"{e2e['bare_msg_per_s']:,.0f} msg/s {e2e['bare_cpu_us_per_msg']:.1f} us/msg; "
              f"rate {e2e['rate_ratio']:.2f}x, CPU {e2e['cpu_ratio']:.2f}x")
    memory = results.get("memory")
    if memory:
        print(f"memory, defaults, backlog of {memory['backlog_mib']} x 1 MiB: peak RSS "
              f"{memory['peak_rss_mib']:.0f} MiB (target at most {memory['limit_mib']} MiB)")


if __name__ == "__main__":
    main()
