"""make bench: the spout end to end beside kafka-python's and librdkafka's own rates, its own
path without a broker, the pipe's limit, and its memory.

End to end, every row reads the same topic of a local broker (Tansu, or --bootstrap) in the
same run: a bare kafka-python poll loop (with the C CRC32C), confluent-kafka's consumer, and
spout.py itself in marker mode writing to a FIFO read by a drain that walks the tar headers,
or committing to the pachd double; at 200 B and 10 KiB also with FORMAT=jsonl and parquet on
both deliveries (segments, counted by the record); and three spouts splitting the topic with
PARTITIONS, one per partition, whose aggregate rate is set against one spout's. The memory
rows: defaults, and Parquet with 64 MiB batches on both deliveries.
The owned-path rows run the spout's own code (batching, naming, encoding, delivery) on records
shaped like kafka-python's, with no broker. Rows of one run share the machine's state, so
compare within a run; the table shows the median of --runs runs, ratios the median of per-run
ratios. The JSON written beside the table holds every number.

    python bench/bench.py [--runs 3] [--quick] [--json bench/results.json]
                          [--bootstrap HOST:PORT] [--group] [--profile DIR]
                          [--spout PATH] [--compare PATH ...] [--only PART] [--sizes LIST]

--quick is a smoke run: too few messages for CPU figures finer than /proc's 10 ms ticks.
--bootstrap takes any broker (Apache Kafka for group mode: --group); --profile DIR adds one
py-spy run of the spout per size and writes what it saw by function; --compare PATH adds a
row for another copy of spout.py, measured in the same runs (before/after).
"""

from __future__ import annotations

import argparse
import functools
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

KIB, MIB = 1024, 1024 * 1024
SIZES = {"200 B": 200, "10 KiB": 10 * KIB, "1 MiB": MIB}
# Owned-path messages per size: enough for a few seconds of the fastest path.
COUNTS = {200: 600_000, 10 * KIB: 100_000, MIB: 2_000}
QUICK = {200: 100_000, 10 * KIB: 20_000, MIB: 400}
# End-to-end messages per size (one topic each, read by every row): a few seconds of the bare
# consumer. Tansu keeps topics in memory and serves them several times slower once one holds
# about 400 MB, so no topic here is larger than about 200 MB. Each count is a whole number of
# the default archives (1,000 messages, or 16 of 1 MiB): a last, partial archive would wait
# for BATCH_MAX_SECONDS and count that wait as the spout's.
E2E_COUNTS = {200: 300_000, 10 * KIB: 20_000, MIB: 208}
E2E_QUICK = {200: 60_000, 10 * KIB: 8_000, MIB: 96}
TOPIC = "bench"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss, which Linux carries over from the
    parent at fork: the bench's own process grows with the pachd double's commits."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmHWM"].split()[0]) / 1024


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
        instance.delivery.held()
    instance.flush()
    instance.delivery.drain(time.monotonic() + 60)
    instance.delivery.close(time.monotonic() + 1)
    return {"seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu,
            "rss": peak_rss_mib()}


def writer_physical(fifo: str, size: int, count: int) -> dict:
    """The same archive bytes, prebuilt: what the pipe and the drain allow at most."""
    instance = owned_spout(fifo)
    captured: list[tuple[bytes, int]] = []
    archives = instance.delivery.archives
    archives.send = lambda archive, token, deadline=None: captured.append(
        (b"".join(bytes(part) for part in archive.parts), archive.members))
    for batch in records(size, min(count, 4 * instance.config.batch_max_messages)):
        instance.add(batch)
    instance.flush()
    # The same kind of FIFO as the spout's: grown to 1 MiB.
    archives.pipe.open()
    fd = archives.pipe.fd
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


def drain(fifo: str, expect: int = 0, ignore: str = "", by_marker: bool = False) -> dict:
    """Reads the FIFO and walks the tar headers without copying bodies; long bodies are
    passed over with splice(2) to /dev/null. With expect, prints "first T N" and "done T"
    (perf_counter) when the first and the expect-th data member arrive (N: 1). by_marker
    counts messages instead of members, from the marker (`ignore`) that ends each archive:
    the sum of its next offsets, as every partition starts at 0 (segments hold many)."""
    fd = os.open(fifo, os.O_RDONLY)
    devnull = os.open(os.devnull, os.O_WRONLY)
    ignored = ignore.encode().ljust(100, b"\x00") if ignore else None
    started = None
    cpu = cpu_seconds()
    members = data_bytes = total = skip = 0
    leftover = b""
    zero = bytes(512)
    while True:
        if skip >= (1 << 16):  # bodies are passed over in the kernel, not read
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
            if by_marker and header[:100] == ignored:
                if position + size > end:  # the marker's body is not all here yet
                    position -= 512
                    break
                offsets = json.loads(bytes(view[position:position + size]))["offsets"]
                held = sum(o for partitions in offsets.values() for o in partitions.values())
                if expect and members == 0:
                    print(f"first {time.perf_counter()} {held}", flush=True)
                if expect and members < expect <= held:
                    print(f"done {time.perf_counter()}", flush=True)
                members = held
            elif not by_marker and header[156:157] == b"0" and (
                    ignored is None or header[:100] != ignored):
                members += 1
                data_bytes += size
                if expect and members == 1:
                    print(f"first {time.perf_counter()} 1", flush=True)
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
# A reader row is one function (bootstrap, topic, count, group) -> {"msg_per_s",
# "cpu_us_per_msg", ...}: the topic holds `count` messages over PARTITIONS partitions, and the
# row reads all of them once, timed from its first message to its last, with the CPU of the
# consuming process only. group=True reads through a consumer group (subscribe) instead of
# assigned partitions. DELIVERIES holds the spout's rows (one per delivery, each compared with
# the bare kafka-python loop); PEERS the plain consumers.

PARTITIONS = 3


def bench_env(**settings: str) -> dict:
    """The environment for spout.py: this one, less any KAFKA_ options of the caller's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KAFKA_") and k not in ("HOST", "PORT", "TOPIC", "MARKER")}
    env.update(settings)
    return env


def spout_consumer_options(bootstrap: str, topic: str) -> dict:
    """The fetch options spout.py gives kafka-python: the bare loop uses the same, so that a
    ratio is the spout's own cost and not a difference in fetch sizes."""
    import spout
    options = spout.Spout(spout.Config(bootstrap_servers=(bootstrap,), topics=(topic,)),
                          threading.Event()).consumer_options()
    return {name: value for name, value in options.items()
            if name not in ("group_id", "bootstrap_servers", "auto_offset_reset",
                            "enable_auto_commit")}


def bare_kafka_python(bootstrap: str, topic: str, count: int, group: bool = False) -> dict:
    """What a user's own poll loop costs: kafka-python with the C CRC32C, nothing else."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.record import util
    options = spout_consumer_options(bootstrap, topic)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest",
                             group_id=f"bench-{os.getpid()}-{time.time()}" if group else None,
                             **options)
    if group:
        consumer.subscribe([topic])
    else:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    seen = first = data = 0
    started = cpu = None
    while seen < count:
        for batch in consumer.poll(500).values():
            if started is None:  # steady state: from the first record on
                started, cpu, first = time.perf_counter(), cpu_seconds(), len(batch)
            seen += len(batch)
            for record in batch:
                data += len(record.value)
    seconds = time.perf_counter() - started
    used = cpu_seconds() - cpu
    consumer.close()
    counted = seen - first
    return {"msg_per_s": counted / seconds, "cpu_us_per_msg": used / counted * 1e6,
            "crc32c": "C" if util.crc32c_c is not None else "pure Python",
            "options": {k: v for k, v in options.items() if k != "bootstrap_timeout_ms"}}


def bare_confluent(bootstrap: str, topic: str, count: int, group: bool = False) -> dict:
    """The peer: librdkafka through confluent-kafka, defaults (it fetches in its own thread,
    whose CPU counts here too; it does not check CRCs unless check.crcs is set). Timed from
    assign(), as it prefetches before the first message is asked for."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "enable.auto.commit": False,
                         "group.id": f"bench-{os.getpid()}-{time.time()}",
                         "auto.offset.reset": "earliest"})
    started, cpu = time.perf_counter(), cpu_seconds()
    if group:
        consumer.subscribe([topic])
    else:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                         for p in range(PARTITIONS)])
    seen = data = 0
    while seen < count:
        for message in consumer.consume(1000, 0.5):
            if message.error():
                raise RuntimeError(str(message.error()))
            data += len(message.value())
            seen += 1
    seconds = time.perf_counter() - started
    used = cpu_seconds() - cpu
    consumer.close()
    return {"msg_per_s": seen / seconds, "cpu_us_per_msg": used / seen * 1e6}


def subprocess_row(command: str):
    """A row measured in a process of its own, so that no row pays another's imports."""
    def row(bootstrap: str, topic: str, count: int, group: bool = False) -> dict:
        return json.loads(subprocess.run(
            [sys.executable, __file__, "_" + command, bootstrap, topic, str(count),
             "group" if group else "assign"],
            capture_output=True, text=True, timeout=600, check=True).stdout)
    row.__name__ = command
    return row


SPOUT_SCRIPT = ROOT / "spout.py"  # --spout: measure another copy, e.g. the previous commit's


def spout_pipe(bootstrap: str, topic: str, count: int, group: bool = False,
               profile: str | None = None, script: Path | None = None,
               format: str | None = None) -> dict:
    """spout.py as users run it, marker mode (or group mode) into a FIFO read by the drain;
    its CPU from /proc between the first and the last message the drain sees. A segment
    format (format=jsonl|parquet) is counted by the marker, so marker mode only; CPU and
    rate then count the messages after the first archive."""
    with tempfile.TemporaryDirectory() as work:
        fifo = os.path.join(work, "out")
        os.mkfifo(fifo)
        reader = subprocess.Popen([sys.executable, __file__, "_drain", fifo, str(count),
                                   "" if group else "offsets"] + (["by-marker"] if format
                                                                  else []),
                                  stdout=subprocess.PIPE, text=True)
        settings = dict(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, OUTPUT_PIPE=fifo,
                        LOG_LEVEL="WARNING", GROUP_ID=f"bench-{os.getpid()}-{time.time()}",
                        **segment_settings(format, count))
        if not group:
            settings["MARKER"] = "offsets"
        process = subprocess.Popen([sys.executable, str(script or SPOUT_SCRIPT)],
                                   env=bench_env(**settings))
        profiler = None
        if profile:  # sampled from outside the process; the numbers of this run are not kept
            profiler = subprocess.Popen(["py-spy", "record", "--pid", str(process.pid),
                                         "--rate", "400", "--format", "raw", "--nonblocking",
                                         "--output", profile],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=dict(os.environ, PATH=os.path.dirname(
                                            sys.executable) + os.pathsep + os.environ["PATH"]))
        try:
            _, first_at, first = reader.stdout.readline().split()
            cpu = proc_cpu(process.pid)
            _, done_at = reader.stdout.readline().split()
            used = proc_cpu(process.pid) - cpu
        finally:
            if profiler:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
            process.send_signal(signal.SIGTERM)
            process.wait(30)
            reader.communicate(timeout=30)
    seconds = float(done_at) - float(first_at)
    counted = count - int(first)
    return {"msg_per_s": counted / seconds, "cpu_us_per_msg": used / counted * 1e6}


def segment_settings(format: str | None, count: int) -> dict:
    """The spout's settings for a segment row: the format, with the segment defaults but
    for BATCH_MAX_SECONDS, which would hold a topic's last, partial batch for a minute, and
    at least 3 batches of messages (the first is not timed): 100,000 messages (the default)
    in a full run at 200 B."""
    return {"FORMAT": format, "BATCH_MAX_SECONDS": "2",
            "BATCH_MAX_MESSAGES": str(min(100_000, count // 3))} if format else {}


# The pachd double is a Python gRPC server and bounds the 2.x row's rate long before Kafka
# does: the row times only the first messages of the topic, enough for its CPU per message.
PACHD_MAX_MESSAGES = 10_000


def spout_pachd(bootstrap: str, topic: str, count: int, group: bool = False,
                profile: str | None = None, script: Path | None = None,
                format: str | None = None) -> dict:
    """spout.py with the 2.x delivery, committing to the pachd double (served from this
    process, so its CPU is not the spout's). A commit lands whole, so the rate counts the
    messages after the first commit, from it to the last one. Segment formats are counted
    by the head commit's record (the sum of its next offsets), and read the whole topic."""
    from pachd_double import PachdDouble, write_pach_config
    import spout
    if not format:
        count = min(count, PACHD_MAX_MESSAGES)

    def delivered() -> int:
        if not format:
            return pachd.file_count("bench")
        record = spout.record_from_description(pachd.head("bench").description or "")
        return sum(record[1].values()) if record else 0
    pachd = PachdDouble().start()
    pachd.create_pipeline_repo("bench")
    with tempfile.TemporaryDirectory() as work:
        settings = dict(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, DELIVERY="pfs",
                        PACH_CONFIG=str(write_pach_config(Path(work) / "pachctl.json",
                                                          pachd.address)),
                        OUTPUT_REPO="default/bench", LOG_LEVEL="WARNING",
                        MODE="group" if group else "exactly-once",
                        GROUP_ID=f"bench-{os.getpid()}-{time.time()}",
                        **segment_settings(format, count))
        process = subprocess.Popen([sys.executable, str(script or SPOUT_SCRIPT)],
                                   env=bench_env(**settings))
        try:
            deadline = time.monotonic() + 600
            while not (first := delivered()):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the 2.x spout delivered nothing")
                time.sleep(0.002)
            first_at, cpu = time.perf_counter(), proc_cpu(process.pid)
            while delivered() < count:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the 2.x spout stopped before the last message")
                time.sleep(0.002)
            seconds, used = time.perf_counter() - first_at, proc_cpu(process.pid) - cpu
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
            pachd.stop()
    return {"msg_per_s": (count - first) / seconds,
            "cpu_us_per_msg": used / (count - first) * 1e6}


def spouts_split(bootstrap: str, topic: str, count: int, group: bool = False,
                 profile: str | None = None, script: Path | None = None,
                 format: str | None = None) -> dict:
    """PARTITIONS: one exactly-once spout per partition, each into a FIFO of its own read by
    a drain, side by side: the aggregate rate from the first message any drain sees to the
    last, and their CPU per message together (one spout alone is the `spout 1.x pipe` row)."""
    expected = [count // PARTITIONS + (p < count % PARTITIONS) for p in range(PARTITIONS)]
    readers, processes = [], []
    with tempfile.TemporaryDirectory() as work:
        try:
            for partition in range(PARTITIONS):
                fifo = os.path.join(work, f"out-{partition}")
                os.mkfifo(fifo)
                readers.append(subprocess.Popen(
                    [sys.executable, __file__, "_drain", fifo, str(expected[partition]),
                     "offsets"], stdout=subprocess.PIPE, text=True))
                settings = dict(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, OUTPUT_PIPE=fifo,
                                LOG_LEVEL="WARNING", MARKER="offsets",
                                PARTITIONS=str(partition),
                                GROUP_ID=f"bench-{os.getpid()}-{time.time()}-{partition}")
                processes.append(subprocess.Popen([sys.executable,
                                                   str(script or SPOUT_SCRIPT)],
                                                  env=bench_env(**settings)))
            firsts = []
            for reader in readers:
                _, first_at, first = reader.stdout.readline().split()
                firsts.append((float(first_at), int(first)))
            cpu = sum(proc_cpu(process.pid) for process in processes)
            done = [float(reader.stdout.readline().split()[1]) for reader in readers]
            used = sum(proc_cpu(process.pid) for process in processes) - cpu
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
            for reader in readers:
                reader.communicate(timeout=30)
    seconds = max(done) - min(first_at for first_at, _ in firsts)
    counted = count - sum(first for _, first in firsts)
    return {"msg_per_s": counted / seconds, "cpu_us_per_msg": used / counted * 1e6}


PEERS = {"kafka-python": subprocess_row("bare"), "confluent-kafka": subprocess_row("confluent")}
DELIVERIES = {"spout 1.x pipe": spout_pipe, "spout 2.x pachd": spout_pachd,
              f"{PARTITIONS} spouts, PARTITIONS": spouts_split}
# Segment rows: run at SEGMENT_SIZES only, in marker mode (they count by the record).
SEGMENT_SIZES = (200, 10 * KIB)
for _format in ("jsonl", "parquet"):
    DELIVERIES[f"{_format} 1.x"] = functools.partial(spout_pipe, format=_format)
    DELIVERIES[f"{_format} 2.x"] = functools.partial(spout_pachd, format=_format)
SEGMENT_ROWS = ["jsonl 1.x", "jsonl 2.x", "parquet 1.x", "parquet 2.x"]
BASELINE = "kafka-python"


def produce_topic(bootstrap: str, size: int, count: int, distinct: bool = False) -> str:
    """A new topic holding count messages of size bytes; made by a process of its own, so
    that the producer's memory does not become the peak RSS that the writers inherit.
    distinct: every value its own random bytes (else one value, repeated), so that no
    compression of the spout's own (Parquet's) finds them alike."""
    return subprocess.run([sys.executable, __file__, "_produce", bootstrap, str(size),
                           str(count)] + (["distinct"] if distinct else []),
                          capture_output=True, text=True, timeout=600, check=True).stdout.strip()


def produce_here(bootstrap: str, size: int, count: int, distinct: bool = False) -> str:
    from conftest import create_topic, produce
    topic = create_topic(bootstrap, PARTITIONS)
    value = os.urandom(size)
    produce(bootstrap, topic, ((i % PARTITIONS, None, os.urandom(size) if distinct else value)
                               for i in range(count)))
    return topic


def run_end_to_end(bootstrap: str | None, size: int, count: int, runs: int,
                   group: bool) -> dict:
    """Every row of PEERS and DELIVERIES reads one topic, `runs` times, in turn."""
    from conftest import Tansu
    tansu = None if bootstrap else Tansu()
    try:
        address = bootstrap or tansu.bootstrap
        topic = produce_topic(address, size, count)
        rows = {name: row for name, row in {**PEERS, **DELIVERIES}.items()
                if (name not in SEGMENT_ROWS or (size in SEGMENT_SIZES and not group)) and
                not (group and row is spouts_split)}
        per_row: dict[str, list] = {name: [] for name in rows}
        for _ in range(runs):
            for name, row in rows.items():
                per_row[name].append(row(address, topic, count, group))
    finally:
        if tansu:
            tansu.stop()
    result = {}
    for name, measured in per_row.items():
        merged = median_rows(measured)
        merged["mb_per_s"] = merged["msg_per_s"] * size / 1e6
        if name in DELIVERIES:
            merged["rate_ratio"] = statistics.median(
                m["msg_per_s"] / b["msg_per_s"] for m, b in zip(measured, per_row[BASELINE]))
            merged["cpu_ratio"] = statistics.median(
                m["cpu_us_per_msg"] / b["cpu_us_per_msg"]
                for m, b in zip(measured, per_row[BASELINE]))
        merged["each_run"] = measured
        result[name] = merged
    split, alone = f"{PARTITIONS} spouts, PARTITIONS", "spout 1.x pipe"
    if split in per_row and alone in per_row:   # the aggregate rate of a split, per run
        result["split_rate_ratio"] = statistics.median(
            s["msg_per_s"] / a["msg_per_s"] for s, a in zip(per_row[split], per_row[alone]))
    result["messages"] = count
    return result


def profile_end_to_end(bootstrap: str | None, size: int, count: int, out: Path) -> Path:
    """One extra marker-mode run under py-spy; writes the raw stacks and a summary."""
    from conftest import Tansu
    tansu = None if bootstrap else Tansu()
    raw = out / f"spout-{size}.stacks"
    try:
        address = bootstrap or tansu.bootstrap
        topic = produce_topic(address, size, count)
        spout_pipe(address, topic, count, profile=str(raw))
    finally:
        if tansu:
            tansu.stop()
    summary = out / f"spout-{size}.txt"
    summary.write_text(summarise_stacks(raw.read_text()))
    return summary


def summarise_stacks(raw: str, top: int = 40) -> str:
    """py-spy's collapsed stacks as shares of samples: by function itself, and by function
    including what it calls (each function counted once per stack)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit(
            "/", 1)[-1] + ")" if " (" in frame else frame for frame in stack.split(";")]
        total += samples
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    lines = [f"{total} samples"]
    for title, table in (("self", own), ("inclusive", inclusive)):
        lines.append(f"-- {title}")
        for frame, samples in sorted(table.items(), key=lambda item: -item[1])[:top]:
            lines.append(f"{samples / total:6.1%}  {frame}")
    return "\n".join(lines) + "\n"


def run_memory(bootstrap: str | None, backlog_mib: int = 256, format: str | None = None,
               batch_mib: int = 16) -> dict:
    """Peak RSS of spout.py draining a backlog of 1 MiB messages: with defaults, or with a
    segment format and batch_mib MiB batches (distinct random values: nothing compresses)."""
    from conftest import Tansu
    tansu = None if bootstrap else Tansu()
    try:
        address = bootstrap or tansu.bootstrap
        topic = produce_topic(address, MIB, backlog_mib, distinct=bool(format))
        with tempfile.TemporaryDirectory() as work:
            fifo = os.path.join(work, "out")
            os.mkfifo(fifo)
            reader = subprocess.Popen([sys.executable, __file__, "_drain", fifo,
                                       str(backlog_mib), "offsets"] + (["by-marker"] if format
                                                                       else []),
                                      stdout=subprocess.PIPE, text=True)
            settings = {"FORMAT": format, "BATCH_MAX_BYTES": f"{batch_mib}MiB",
                        "BATCH_MAX_SECONDS": "2"} if format else {}
            process = subprocess.Popen([sys.executable, str(SPOUT_SCRIPT)], env=bench_env(
                BOOTSTRAP_SERVERS=address, TOPIC=topic, OUTPUT_PIPE=fifo, MARKER="offsets",
                LOG_LEVEL="WARNING", GROUP_ID=f"bench-{os.getpid()}-{time.time()}",
                **settings))
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
        if tansu:
            tansu.stop()
    return {"backlog_mib": backlog_mib, "peak_rss_mib": peak, "limit_mib": 3 * batch_mib + 150,
            "format": format or "raw", "batch_mib": batch_mib, "delivery": "1.x pipe"}


def run_memory_pachd(bootstrap: str | None, backlog_mib: int, format: str,
                     batch_mib: int) -> dict:
    """run_memory() through the 2.x delivery into the pachd double (in this process)."""
    from conftest import Tansu
    from pachd_double import PachdDouble, write_pach_config
    import spout
    tansu = None if bootstrap else Tansu()
    pachd = PachdDouble().start()
    pachd.create_pipeline_repo("bench")
    try:
        address = bootstrap or tansu.bootstrap
        topic = produce_topic(address, MIB, backlog_mib, distinct=True)
        with tempfile.TemporaryDirectory() as work:
            process = subprocess.Popen([sys.executable, str(SPOUT_SCRIPT)], env=bench_env(
                BOOTSTRAP_SERVERS=address, TOPIC=topic, DELIVERY="pfs",
                PACH_CONFIG=str(write_pach_config(Path(work) / "pachctl.json", pachd.address)),
                OUTPUT_REPO="default/bench", LOG_LEVEL="WARNING", FORMAT=format,
                BATCH_MAX_BYTES=f"{batch_mib}MiB", BATCH_MAX_SECONDS="2",
                GROUP_ID=f"bench-{os.getpid()}-{time.time()}"))
            try:
                deadline = time.monotonic() + 600
                while True:
                    record = spout.record_from_description(
                        pachd.head("bench").description or "")
                    if record and sum(record[1].values()) >= backlog_mib:
                        break
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the 2.x spout did not deliver the backlog")
                    time.sleep(0.05)
                with open(f"/proc/{process.pid}/status") as status:
                    fields = dict(line.split(":", 1) for line in status)
                peak = int(fields["VmHWM"].split()[0]) / 1024
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    finally:
        pachd.stop()
        if tansu:
            tansu.stop()
    return {"backlog_mib": backlog_mib, "peak_rss_mib": peak, "limit_mib": 3 * batch_mib + 150,
            "format": format, "batch_mib": batch_mib, "delivery": "2.x pachd"}


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


def run_owned(sizes: dict, counts: dict, runs: int) -> dict:
    rows_by_size = {}
    for label, size in sizes.items():
        per_kind = {kind: [] for kind in WRITERS}
        for _ in range(runs):
            for kind in WRITERS:
                seed_count = min(counts[size], 20_000 if size < MIB else 400)
                count = seed_count if kind == "seed" else counts[size]
                per_kind[kind].append(run_pipe_row(kind, size, count))
        rows = {kind: median_rows(measured) for kind, measured in per_kind.items()}
        rows["owned_vs_physical"] = statistics.median(
            o["msg_per_s"] / p["msg_per_s"] for o, p in zip(per_kind["owned"],
                                                           per_kind["physical"]))
        rows["owned_vs_seed"] = statistics.median(
            o["msg_per_s"] / s["msg_per_s"] for o, s in zip(per_kind["owned"],
                                                           per_kind["seed"]))
        rows_by_size[label] = rows
    return rows_by_size


def main() -> None:
    global SPOUT_SCRIPT
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        command, args = sys.argv[1][1:], sys.argv[2:]
        if command == "drain":
            print(json.dumps(drain(args[0], int(args[1]) if len(args) > 1 else 0,
                                   args[2] if len(args) > 2 else "",
                                   args[3:4] == ["by-marker"])))
        elif command == "produce":
            print(produce_here(args[0], int(args[1]), int(args[2]), args[3:4] == ["distinct"]))
        elif command in ("bare", "confluent"):
            row = bare_kafka_python if command == "bare" else bare_confluent
            print(json.dumps(row(args[0], args[1], int(args[2]), args[3] == "group")))
        else:
            print(json.dumps(WRITERS[command](args[0], int(args[1]), int(args[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke run")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--only", choices=("e2e", "owned", "memory", "profile", "decode"),
                        action="append",
                        help="run only these parts (repeatable); default all")
    parser.add_argument("--sizes", help="comma-separated sizes to run, e.g. '200 B,10 KiB'")
    parser.add_argument("--bootstrap", help="use this broker (e.g. Apache Kafka) instead of "
                        "starting Tansu; topics are created on it")
    parser.add_argument("--group", action="store_true", help="end to end through a consumer "
                        "group (subscribe) instead of assigned partitions; on Tansu group "
                        "fetches are slow, so use it with --bootstrap and Apache Kafka")
    parser.add_argument("--profile", metavar="DIR", help="also run the spout once per size "
                        "under py-spy and write DIR/spout-SIZE.txt")
    parser.add_argument("--spout", help="measure this copy of spout.py instead")
    parser.add_argument("--compare", action="append", default=[], metavar="PATH",
                        help="also run this copy of spout.py end to end, as one more row of "
                        "the same runs (e.g. the previous commit's, for before/after)")
    args = parser.parse_args()
    if args.spout:
        SPOUT_SCRIPT = Path(args.spout).resolve()
    for path in args.compare:
        # The other copy on both deliveries, raw and jsonl: the rows a before/after needs.
        stem, script = Path(path).stem, Path(path).resolve()
        DELIVERIES[f"{stem} 1.x pipe"] = functools.partial(spout_pipe, script=script)
        DELIVERIES[f"{stem} 2.x pachd"] = functools.partial(spout_pachd, script=script)
        for delivery, row in ((spout_pipe, "1.x"), (spout_pachd, "2.x")):
            DELIVERIES[f"{stem} jsonl {row}"] = functools.partial(delivery, script=script,
                                                                  format="jsonl")
            SEGMENT_ROWS.append(f"{stem} jsonl {row}")
    parts = set(args.only or ("e2e", "owned", "memory", "profile", "decode"))
    sizes = SIZES if not args.sizes else {
        label: SIZES[label] for label in (s.strip() for s in args.sizes.split(","))}
    e2e_counts = E2E_QUICK if args.quick else E2E_COUNTS
    results: dict = {"runs": args.runs, "mode": "group" if args.group else "marker",
                     "broker": args.bootstrap or "Tansu (embedded)", "spout": str(SPOUT_SCRIPT),
                     "compared": args.compare,
                     "end_to_end": {}, "rows": {}}
    if "e2e" in parts:
        for label, size in sizes.items():
            results["end_to_end"][label] = run_end_to_end(
                args.bootstrap, size, e2e_counts[size], args.runs, args.group)
            print_end_to_end({label: results["end_to_end"][label]}, header=label == next(
                iter(sizes)), file=sys.stderr)  # progress; the table follows at the end
    if "owned" in parts:
        results["rows"] = run_owned(sizes, QUICK if args.quick else COUNTS, args.runs)
    if "memory" in parts:
        results["memory"] = run_memory(args.bootstrap, 64 if args.quick else 256)
        results["memory_parquet"] = run_memory(args.bootstrap, 128 if args.quick else 256,
                                               "parquet", 64)
        results["memory_parquet_pachd"] = run_memory_pachd(
            args.bootstrap, 128 if args.quick else 256, "parquet", 64)
    if "decode" in parts:   # DECODE's cost per 200 B Avro record: bench/decode.py
        import decode
        results["decode"] = decode.run(args.runs, 50_000 if args.quick else 200_000)
    if args.profile and "profile" in parts:
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        results["profiles"] = [str(profile_end_to_end(args.bootstrap, size, e2e_counts[size],
                                                       out)) for size in sizes.values()]
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"(all numbers in {args.json})")


def print_end_to_end(end_to_end: dict, header: bool = True, file=sys.stdout) -> None:
    if header:
        print(f"{'size':>7} {'end to end':>16} {'msg/s':>10} {'MB/s':>8} {'CPU us/msg':>11} "
              f"{'rate':>6} {'CPU':>6}", file=file)
    for label, rows in end_to_end.items():
        for name, row in rows.items():
            if not isinstance(row, dict):
                continue
            ratios = f"{row['rate_ratio']:>5.2f}x {row['cpu_ratio']:>5.2f}x" \
                if "rate_ratio" in row else ""
            print(f"{label:>7} {name:>16} {row['msg_per_s']:>10,.0f} {row['mb_per_s']:>8.1f} "
                  f"{row['cpu_us_per_msg']:>11.2f} {ratios}", file=file)
        if "split_rate_ratio" in rows:
            print(f"{label:>7} {PARTITIONS} spouts (PARTITIONS) against one, aggregate rate: "
                  f"{rows['split_rate_ratio']:.2f}x on {os.cpu_count()} cores", file=file)


def print_table(results: dict) -> None:
    print(f"median of {results['runs']} run(s); broker {results['broker']}; "
          f"{results['mode']} mode")
    if results["end_to_end"]:
        print_end_to_end(results["end_to_end"])
        print(f"(rate and CPU: the spout's against the bare {BASELINE} loop of the same run; "
              "targets at 200 B and 10 KiB: rate >= 0.90x, CPU <= 1.30x; segments, CPU at "
              "200 B: jsonl 1.x <= 1.3x, jsonl 2.x <= 1.5x, parquet <= 2.0x)")
    if results["rows"]:
        print(f"{'size':>7} {'owned path':>16} {'msg/s':>10} {'MB/s':>8} {'CPU us/msg':>11} "
              f"{'RSS MiB':>8} {'drain CPU':>9}")
        for label, rows in results["rows"].items():
            for kind in WRITERS:
                row = rows[kind]
                print(f"{label:>7} {kind:>16} {row['msg_per_s']:>10,.0f} "
                      f"{row['mb_per_s']:>8.1f} {row['cpu_us_per_msg']:>11.2f} "
                      f"{row['rss_mib']:>8.0f} {row['drain_cpu_share']:>8.0%}")
            print(f"{label:>7} owned/physical {rows['owned_vs_physical']:.0%}   "
                  f"owned/seed {rows['owned_vs_seed']:.1f}x"
                  + ("   (target: owned <= 1.50 us/msg)" if label == "200 B" else ""))
    if results.get("decode"):
        import decode
        decode.print_rows(results["decode"])
    for memory in (results.get("memory"), results.get("memory_parquet"),
                   results.get("memory_parquet_pachd")):
        if memory:
            what = "defaults" if memory.get("format", "raw") == "raw" else \
                f"FORMAT={memory['format']}, {memory['batch_mib']} MiB batches, " \
                f"{memory['delivery']}"
            print(f"memory, {what}, backlog of {memory['backlog_mib']} x 1 MiB: peak RSS "
                  f"{memory['peak_rss_mib']:.0f} MiB (target at most {memory['limit_mib']} MiB)")


if __name__ == "__main__":
    main()
