"""make bench's DECODE row: what decoding a 200 B Avro record costs on the owned path.

Two variants of the owned path (records shaped like kafka-python's, batching, naming, the
archive, the pipe, a drain reading it), each in a fresh process, alternating which runs
first: FORMAT=json with the value's bytes as they are, and FORMAT=json with DECODE=value on
the same Confluent-framed Avro value. The decode cost is the median of the per-run CPU
differences per message. Writer schemas come from an in-process SchemaRegistry here: the
registry is asked once per id, so its round trip is no part of a message's cost.

    python bench/decode.py [--runs 3] [--count 200000]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH = ROOT / "bench" / "bench.py"
TOPIC = "bench"
SCHEMA_ID = 1
# An order event: the mix of strings, numbers, a union and a logical type of a typical topic.
SCHEMA = {"type": "record", "name": "Order", "namespace": "bench", "fields": [
    {"name": "id", "type": "string"},
    {"name": "customer", "type": "string"},
    {"name": "status", "type": {"type": "enum", "name": "Status",
                                "symbols": ["NEW", "PAID", "SHIPPED"]}},
    {"name": "amount", "type": "double"},
    {"name": "items", "type": "int"},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "coupon", "type": ["null", "string"], "default": None},
    {"name": "note", "type": ["null", "string"], "default": None},
    {"name": "address", "type": "string"},
]}
RECORD = {"id": "0b7f3c1e-6a52-4d1e-9c43-2f1d5e8a9b70", "customer": "customer-000042@example.org",
          "status": "PAID", "amount": 129.95, "items": 3,
          "at": datetime.datetime(2024, 11, 24, 9, 50, tzinfo=datetime.timezone.utc),
          "coupon": None, "note": "leave at the back door, ring twice please",
          "address": "Storgata 17, 0184 Oslo, Norway, 3rd floor, flat B, door code 4711"}


def framed_value() -> bytes:
    from fastavro import parse_schema, schemaless_writer
    payload = io.BytesIO()
    schemaless_writer(payload, parse_schema(SCHEMA), RECORD)
    return b"\x00" + struct.pack(">I", SCHEMA_ID) + payload.getvalue()


def writer(variant: str, fifo: str, count: int) -> dict:
    """One variant of the owned path, in this process: prints seconds, CPU, files."""
    import resource

    import spout
    from bench import records

    class InProcessRegistry(spout.SchemaRegistry):
        where = "the bench's schema"

        def by_id(self, schema_id: int) -> spout.RegistrySchema:
            return spout.RegistrySchema("AVRO", json.dumps(SCHEMA), ())

    value = framed_value()
    decode = ("value",) if variant == "json+avro" else ()
    config = spout.Config(bootstrap_servers=("localhost:9092",), topics=(TOPIC,),
                          output_pipe=fifo, format="json", decode=decode,
                          schema_registry_url=("http://registry",) if decode else ())
    stop = threading.Event()
    instance = spout.Spout(config, stop)
    if decode:
        instance.decoding = spout.Decoding(config, stop, InProcessRegistry())
    polls = []
    for poll in records(len(value), count):
        polls.append({tp: [record._replace(value=value) for record in messages]
                      for tp, messages in poll.items()})

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    started, cpu_start = time.perf_counter(), cpu()
    for poll in polls:
        if instance.decoding is not None:   # as Spout.consume does with each poll
            poll = instance.decoding.decode(poll)
        instance.add(poll)
        if instance.batch.records and instance.batch_due_in() <= 0:
            instance.flush()
        instance.delivery.held()
    instance.flush()
    instance.delivery.drain(time.monotonic() + 60)
    instance.delivery.close(time.monotonic() + 1)
    return {"seconds": time.perf_counter() - started, "cpu": cpu() - cpu_start,
            "value_bytes": len(value)}


def run_variant(variant: str, count: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        fifo = os.path.join(work, "out")
        os.mkfifo(fifo)
        drain = subprocess.Popen([sys.executable, str(BENCH), "_drain", fifo],
                                 stdout=subprocess.PIPE, text=True)
        written = json.loads(subprocess.run(
            [sys.executable, __file__, "_" + variant, fifo, str(count)],
            stdout=subprocess.PIPE, text=True, check=True).stdout)
        read = json.loads(drain.communicate(timeout=60)[0])
    assert read["members"] == count, (variant, read)
    return {"msg_per_s": count / written["seconds"],
            "cpu_us_per_msg": written["cpu"] / count * 1e6,
            "value_bytes": written["value_bytes"]}


def run(runs: int, count: int) -> dict:
    variants = ("json", "json+avro")
    measured: dict = {variant: [] for variant in variants}
    for number in range(runs):
        for variant in variants if number % 2 == 0 else variants[::-1]:
            measured[variant].append(run_variant(variant, count))
    rows = {variant: {key: statistics.median(run[key] for run in values)
                      for key in values[0]} for variant, values in measured.items()}
    rows["decode_us_per_msg"] = statistics.median(
        a["cpu_us_per_msg"] - j["cpu_us_per_msg"]
        for a, j in zip(measured["json+avro"], measured["json"]))
    rows["runs"] = runs
    rows["all"] = measured
    return rows


def print_rows(rows: dict, file=sys.stdout) -> None:
    print(f"{'size':>7} {'DECODE':>16} {'msg/s':>10} {'CPU us/msg':>11}", file=file)
    size = f"{rows['json']['value_bytes']:.0f} B"
    for variant in ("json", "json+avro"):
        row = rows[variant]
        print(f"{size:>7} {variant:>16} {row['msg_per_s']:>10,.0f} "
              f"{row['cpu_us_per_msg']:>11.2f}", file=file)
    print(f"{size:>7} decode cost {rows['decode_us_per_msg']:.2f} us/msg (Avro, owned path; "
          "target <= 3 us)", file=file)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        print(json.dumps(writer(sys.argv[1][1:], sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=200_000)
    args = parser.parse_args()
    print_rows(run(args.runs, args.count))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main()
