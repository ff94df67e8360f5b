"""DECODE against a real Schema Registry (Apicurio 2.4.2, make test-registry): values made by
confluent-kafka's own AvroSerializer, ProtobufSerializer and JSONSerializer, consumed by the
spout as a real process delivering to the pachd double.

The registry is reached through RegistryProxy, which counts what the spout asks for, enforces
auth (the registry itself ignores it) and is closed for an outage.
"""

from __future__ import annotations

import datetime
import decimal
import json
import signal
import urllib.request
import uuid

import pytest
from conftest import PACH_REPO, create_topic, free_port, pfs_env, produce, wait_until
from schema_registry import Apicurio, RegistryProxy, registry_jar
from test_metrics import healthz, metrics_env, scrape, serving, unhealthy, value

import spout

pytestmark = [pytest.mark.registry,
              pytest.mark.skipif(registry_jar() is None,
                                 reason="needs the Schema Registry: make test-registry")]

UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The registry's Confluent-compatible base URL."""
    node = Apicurio(registry_jar(), free_port(), tmp_path_factory.mktemp("apicurio") / "log")
    yield node.url
    node.stop()


@pytest.fixture
def proxy(registry):
    started = []

    def start(**options) -> RegistryProxy:
        front = RegistryProxy(registry, free_port(), **options).start()
        started.append(front)
        return front

    yield start
    for front in started:
        front.stop()


def client(registry):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    return SchemaRegistryClient({"url": registry})


def context(topic: str, field: str = "value"):
    from confluent_kafka.serialization import MessageField, SerializationContext
    return SerializationContext(topic, MessageField.KEY if field == "key" else MessageField.VALUE)


def files_of(pachd) -> dict:
    head = pachd.head(PACH_REPO)
    return head.files if head.finished else {}


def run_until(process, pachd, count: int, what: str = "the files") -> dict:
    wait_until(lambda: len(files_of(pachd)) >= count or process.process.poll() is not None,
               60, what, interval=0.1)
    assert process.process.poll() is None, process.log
    return files_of(pachd)


def stop(process) -> None:
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.log


# -- Avro: evolution, references, unions and nulls, logical types, keys, tombstones,
#    dead letters, and each schema id fetched once

ADDRESS = {"type": "record", "name": "Address", "namespace": "shop",
           "fields": [{"name": "city", "type": "string"}]}
ORDER_V1 = {"type": "record", "name": "Order", "namespace": "shop", "fields": [
    {"name": "id", "type": "long"},
    {"name": "note", "type": ["null", "string"], "default": None},
    {"name": "amount", "type": ["null", "double", "string"]},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}},
    {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9,
                               "scale": 2}},
    {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "blob", "type": "bytes"},
    {"name": "tags", "type": {"type": "map", "values": "int"}},
    {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["NEW", "PAID"]}},
]}
# v2: two fields added with defaults (BACKWARD-compatible), one of a type that lives in
# another subject (a reference).
ORDER_V2 = {**ORDER_V1, "fields": ORDER_V1["fields"] + [
    {"name": "source", "type": "string", "default": "legacy"},
    {"name": "ship_to", "type": ["null", "shop.Address"], "default": None}]}

AT = datetime.datetime(2024, 11, 24, 9, 50, 0, 123000, tzinfo=UTC)
AT_US = datetime.datetime(2024, 11, 24, 9, 50, 0, 123456, tzinfo=UTC)


def order(number: int, **extra) -> dict:
    return {"id": number, "note": None, "amount": 1.5, "at": AT, "at_us": AT_US,
            "day": datetime.date(2024, 2, 29), "price": decimal.Decimal("1234.50"),
            "ref": str(uuid.UUID(int=number)), "blob": b"\x00\xff", "tags": {"a": 1},
            "state": "NEW", **extra}


def test_avro_values_and_keys_land_decoded_with_bad_ones_dead_lettered(
        broker, registry, proxy, pachd, tmp_path, spouts):
    from confluent_kafka.schema_registry import Schema, SchemaReference
    from confluent_kafka.schema_registry.avro import AvroSerializer
    topic = create_topic(broker, 1)
    registry_client = client(registry)
    address_subject = f"{topic}-address"
    registry_client.register_schema(address_subject, Schema(json.dumps(ADDRESS), "AVRO"))
    v1 = AvroSerializer(registry_client, json.dumps(ORDER_V1))
    v2 = AvroSerializer(registry_client, Schema(
        json.dumps(ORDER_V2), "AVRO", [SchemaReference("shop.Address", address_subject, 1)]))
    keys = AvroSerializer(registry_client, '"string"')
    ctx, key_ctx = context(topic), context(topic, "key")
    first = v1(order(1), ctx)
    values = [
        (keys("k1", key_ctx), first),
        (keys("k2", key_ctx), v1(order(2, note="hand over", amount="n/a"), ctx)),
        (keys("k3", key_ctx), v2(order(3, amount=None, ship_to={"city": "Oslo"}), ctx)),
        (keys("k4", key_ctx), None),                                    # a tombstone
        (b"plain key", b"plain bytes, no framing"),                     # no magic byte
        (None, b"\x00\x00\x00\xff\xf0" + first[5:]),                    # unknown id
        (None, b"\x00\x00\x00\xff\xf0" + first[5:]),                    # the same, again
        (None, first[:-4]),                                             # cut short
        (keys("k9", key_ctx), v2(order(9, source="web"), ctx)),
        (keys("k10", key_ctx), v1(order(10), ctx)),                     # v1 after v2
    ]
    produce(broker, topic, [(0, key, data) for key, data in values])
    front = proxy()
    port = free_port()
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, DECODE="key,value",
                             FORMAT="json", TOMBSTONES="keep", SCHEMA_REGISTRY_URL=front.url,
                             **metrics_env(port)))
    # 6 messages, 4 dead letters of 2 files each
    files = run_until(process, pachd, 6 + 4 * 2)
    wait_until(lambda: serving(port), 10, "the metrics server")
    samples = scrape(port)
    stop(process)

    documents = {int(path.rsplit("/", 1)[1]): json.loads(data) for path, data in files.items()
                 if not path.startswith("/_errors/")}
    assert sorted(documents) == [0, 1, 2, 3, 8, 9]
    id_v1 = spout._SCHEMA_ID.unpack_from(first, 1)[0]
    id_v2 = spout._SCHEMA_ID.unpack_from(values[2][1], 1)[0]
    id_key = spout._SCHEMA_ID.unpack_from(values[0][0], 1)[0]
    assert id_v1 != id_v2
    # Logical types, each in its documented form; unions unwrapped; bytes as base64.
    assert documents[0]["value"] == {
        "id": 1, "note": None, "amount": 1.5, "at": "2024-11-24T09:50:00.123000Z",
        "at_us": "2024-11-24T09:50:00.123456Z", "day": "2024-02-29", "price": "1234.50",
        "ref": "00000000-0000-0000-0000-000000000001", "blob": {"base64": "AP8="},
        "tags": {"a": 1}, "state": "NEW"}
    assert (documents[0]["value_schema_id"], documents[0]["key"],
            documents[0]["key_schema_id"]) == (id_v1, "k1", id_key)
    assert (documents[1]["value"]["note"], documents[1]["value"]["amount"]) == \
        ("hand over", "n/a")
    # v2, through its reference; v1 and v2 side by side, each with its writer's fields.
    assert documents[2]["value_schema_id"] == id_v2
    assert (documents[2]["value"]["amount"], documents[2]["value"]["ship_to"],
            documents[2]["value"]["source"]) == (None, {"city": "Oslo"}, "legacy")
    assert (documents[8]["value"]["source"], documents[8]["value"]["ship_to"]) == ("web", None)
    assert documents[9]["value_schema_id"] == id_v1 and "source" not in documents[9]["value"]
    # The kept tombstone: value null, no schema, its key still decoded.
    assert (documents[3]["value"], documents[3]["value_schema_id"], documents[3]["key"]) == \
        (None, None, "k4")

    # Bad records: the bytes as they came and why, under _errors/, in the same commits.
    errors = {path: data for path, data in files.items() if path.startswith("/_errors/")}
    base = f"/_errors/{topic}/0/"
    assert set(errors) == {f"{base}{offset:020d}{suffix}" for offset in (4, 5, 6, 7)
                           for suffix in ("", ".json")}
    for offset in (4, 5, 6, 7):
        assert errors[f"{base}{offset:020d}"] == values[offset][1]
    reasons = {offset: json.loads(errors[f"{base}{offset:020d}.json"]) for offset in (4, 5, 6, 7)}
    assert [reasons[o]["reason"] for o in (4, 5, 6, 7)] == \
        ["no-magic-byte", "unknown-schema-id", "unknown-schema-id", "corrupt-payload"]
    assert (reasons[4]["key"], reasons[4]["offset"], reasons[5]["schema_id"],
            reasons[7]["schema_id"]) == ("plain key", 4, 0xfff0, id_v1)
    assert value(samples, "kafka_spout_bad_records_total", topic=topic,
                 reason="no-magic-byte") == 1
    assert value(samples, "kafka_spout_bad_records_total", topic=topic,
                 reason="unknown-schema-id") == 2
    assert value(samples, "kafka_spout_bad_records_total", topic=topic,
                 reason="corrupt-payload") == 1
    # Each id fetched once, the unknown one included; the reference once, by version.
    assert sorted(front.fetched_ids()) == sorted([id_key, id_v1, id_v2, 0xfff0])
    assert sum(f"/subjects/{address_subject}/versions/1" in path
               for path in front.requests) == 1
    _, positions = spout.record_from_description(pachd.head(PACH_REPO).description)
    assert positions == {(topic, 0): 10}



def delivered(pachd, topic: str) -> int | None:
    """The next offset of partition 0 that the head commit's record holds."""
    record = spout.record_from_description(pachd.head(PACH_REPO).description)
    return None if record is None else record[1].get((topic, 0))


def decoded_rows(files: dict, topic: str, suffix: str) -> list[str]:
    """The segment files of the topic's partition 0, by first offset."""
    return sorted(path for path in files if path.startswith(f"/{topic}/0/") and
                  path.endswith(suffix))


def test_jsonl_lines_are_the_decoded_json_documents_and_dead_letters_files_beside(
        broker, registry, proxy, pachd, tmp_path, spouts):
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from conftest import spout_commits
    topic = create_topic(broker, 1)
    registry_client = client(registry)
    v1 = AvroSerializer(registry_client, json.dumps(ORDER_V1))
    keys = AvroSerializer(registry_client, '"string"')
    ctx, key_ctx = context(topic), context(topic, "key")
    values = [(keys("k0", key_ctx), v1(order(0), ctx)),
              (keys("k1", key_ctx), v1(order(1, note="é"), ctx)),
              (keys("k2", key_ctx), None),                      # a tombstone, kept
              (b"plain key", b"plain bytes, no framing"),       # no magic byte
              (None, v1(order(4), ctx))]
    produce(broker, topic, [(0, key, data) for key, data in values])
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, DECODE="key,value",
                             FORMAT="jsonl", TOMBSTONES="keep", BATCH_MAX_SECONDS=1,
                             SCHEMA_REGISTRY_URL=proxy().url))
    wait_until(lambda: delivered(pachd, topic) == 5 or process.process.poll() is not None,
               60, "offset 5 delivered", interval=0.1)
    stop(process)
    files = files_of(pachd)
    lines = [json.loads(line) for path in decoded_rows(files, topic, ".jsonl")
             for line in files[path].decode().splitlines()]
    id_v1 = spout._SCHEMA_ID.unpack_from(values[0][1], 1)[0]
    id_key = spout._SCHEMA_ID.unpack_from(values[0][0], 1)[0]
    assert [line["offset"] for line in lines] == [0, 1, 2, 4]
    # Each line is FORMAT=json's decoded document, keys in the same order.
    assert list(lines[0]) == ["topic", "partition", "offset", "timestamp", "timestamp_type",
                              "key", "headers", "key_schema_id", "value", "value_schema_id"]
    assert lines[0]["value"] == {
        "id": 0, "note": None, "amount": 1.5, "at": "2024-11-24T09:50:00.123000Z",
        "at_us": "2024-11-24T09:50:00.123456Z", "day": "2024-02-29", "price": "1234.50",
        "ref": "00000000-0000-0000-0000-000000000000", "blob": {"base64": "AP8="},
        "tags": {"a": 1}, "state": "NEW"}
    assert (lines[0]["key"], lines[0]["key_schema_id"], lines[0]["value_schema_id"]) == \
        ("k0", id_key, id_v1)
    assert lines[1]["value"]["note"] == "é"
    assert (lines[2]["key"], lines[2]["value"], lines[2]["value_schema_id"]) == \
        ("k2", None, None)
    assert (lines[3]["key"], lines[3]["key_schema_id"]) == (None, None)
    # The bad record: its own files under _errors/, in the commit of its neighbours' segment.
    dead = f"/_errors/{topic}/0/{3:020d}"
    assert files[dead] == values[3][1]
    assert json.loads(files[dead + ".json"])["reason"] == "no-magic-byte"
    commit = next(c for c in spout_commits(pachd) if dead in c.changed)
    assert any(path.endswith(".jsonl") for path in commit.changed)


# -- Protobuf: message indexes (a nested, non-first message), imports registered as subjects,
#    and both forms the registry gives back: base64 FileDescriptorProto and .proto text

COMMON_PROTO = """syntax = "proto3";
package shop.common;

message Money {
  string currency = 1;
  int64 units = 2;
}
"""
EVENTS_PROTO = """syntax = "proto3";
package shop.events;

import "shop/common.proto";
import "google/protobuf/timestamp.proto";

message Created {
  string id = 1;
}

message Changed {
  string id = 1;
  message Line {
    string sku = 1;
    shop.common.Money price = 2;
    google.protobuf.Timestamp at = 3;
    repeated int32 sizes = 4;
    map<string, bool> flags = 5;
    Kind kind = 6;
    optional string comment = 7;
    bytes raw = 8;
    oneof choice {
      string gift = 9;
      int32 points = 10;
    }
  }
  enum Kind {
    KIND_UNSPECIFIED = 0;
    RETURN = 1;
  }
}
"""


def proto_classes(suffix: str) -> dict:
    """Message classes for COMMON_PROTO and EVENTS_PROTO, built from descriptors (no protoc);
    package names made unique per test, since they share the process's default pool."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
    del timestamp_pb2   # imported for its file in the default pool
    package = f"shop{suffix}"
    common = descriptor_pb2.FileDescriptorProto(name=f"{package}/common.proto",
                                                package=f"{package}.common", syntax="proto3")
    money = common.message_type.add(name="Money")
    money.field.add(name="currency", number=1, type=9, label=1)
    money.field.add(name="units", number=2, type=3, label=1)
    events = descriptor_pb2.FileDescriptorProto(
        name=f"{package}/events.proto", package=f"{package}.events", syntax="proto3",
        dependency=[common.name, "google/protobuf/timestamp.proto"])
    events.message_type.add(name="Created").field.add(name="id", number=1, type=9, label=1)
    changed = events.message_type.add(name="Changed")
    changed.field.add(name="id", number=1, type=9, label=1)
    line = changed.nested_type.add(name="Line")
    line.field.add(name="sku", number=1, type=9, label=1)
    line.field.add(name="price", number=2, type=11, label=1,
                   type_name=f".{package}.common.Money")
    line.field.add(name="at", number=3, type=11, label=1,
                   type_name=".google.protobuf.Timestamp")
    line.field.add(name="sizes", number=4, type=5, label=3)
    entry = line.nested_type.add(name="FlagsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=8, label=1)
    line.field.add(name="flags", number=5, type=11, label=3,
                   type_name=f".{package}.events.Changed.Line.FlagsEntry")
    line.field.add(name="kind", number=6, type=14, label=1,
                   type_name=f".{package}.events.Changed.Kind")
    line.field.add(name="comment", number=7, type=9, label=1, oneof_index=1,
                   proto3_optional=True)
    line.field.add(name="raw", number=8, type=12, label=1)
    line.field.add(name="gift", number=9, type=9, label=1, oneof_index=0)
    line.field.add(name="points", number=10, type=5, label=1, oneof_index=0)
    line.oneof_decl.add(name="choice")
    line.oneof_decl.add(name="_comment")
    kind = changed.enum_type.add(name="Kind")
    kind.value.add(name="KIND_UNSPECIFIED", number=0)
    kind.value.add(name="RETURN", number=1)
    pool = descriptor_pool.Default()
    pool.Add(common)
    pool.Add(events)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"{package}.{name}")) for name in ("common.Money", "events.Created",
                                           "events.Changed.Line")}


def register_text(registry: str, subject: str, text: str, references=()) -> int:
    """As a Java client or plain REST registers a schema: .proto text."""
    body = json.dumps({"schemaType": "PROTOBUF", "schema": text, "references": [
        {"name": name, "subject": ref_subject, "version": 1}
        for name, ref_subject in references]}).encode()
    request = urllib.request.Request(f"{registry}/subjects/{subject}/versions", data=body,
                                     method="POST", headers={
                                         "Content-Type": "application/vnd.schemaregistry.v1+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["id"]


def test_protobuf_message_indexes_imports_and_both_schema_forms_raw_files_skip_bad(
        broker, registry, proxy, pachd, tmp_path, spouts):
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    topic = create_topic(broker, 1)
    suffix = uuid.uuid4().hex[:8]
    classes = proto_classes(suffix)
    registry_client = client(registry)
    strategy = {"use.deprecated.format": False}
    created = ProtobufSerializer(classes["events.Created"], registry_client, strategy)
    line_serializer = ProtobufSerializer(classes["events.Changed.Line"], registry_client, strategy)
    Line, Money = classes["events.Changed.Line"], classes["common.Money"]
    line = Line(sku="A-1", price=Money(currency="EUR", units=12), sizes=[38, 40],
                flags={"gift": True}, kind=1, raw=b"\x01\x02", points=7)
    line.at.FromDatetime(AT)
    bare = Line(sku="B-2")           # defaults, unset optional and oneof, no message fields
    values = [created(classes["events.Created"](id="c-1"), context(topic)),
              line_serializer(line, context(topic))]
    # The same types registered as .proto text under a subject of their own, as Java clients
    # register them: the spout compiles it. The Python serializer reads only the base64 form
    # back, so these values are its bytes for the same messages with the text schema's id in
    # the frame: what a Java producer of that schema writes.
    text_subject = f"{topic}-text"
    common_subject = f"{topic}-common-text"
    package = f"shop{suffix}"
    register_text(registry, common_subject, COMMON_PROTO.replace("shop.", f"{package}."),
                  ())
    text_id = register_text(
        registry, text_subject,
        EVENTS_PROTO.replace("shop.", f"{package}.").replace("shop/", f"{package}/"),
        [(f"{package}/common.proto", common_subject)])

    def from_text(message) -> bytes:
        data = line_serializer(message, context(topic))
        return data[:1] + spout._SCHEMA_ID.pack(text_id) + data[5:]

    values += [from_text(line), from_text(bare),
               b"\x00" + values[1][1:5] + b"\x02\x02\x06",       # indexes [1, 3]: no such type
               values[0]]
    produce(broker, topic, [(0, None, data) for data in values])
    front = proxy()
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, DECODE="value", FORMAT="raw",
                             ON_BAD_RECORD="skip", SCHEMA_REGISTRY_URL=front.url))
    files = run_until(process, pachd, 5)
    stop(process)

    documents = {int(path.rsplit("/", 1)[1]): json.loads(data) for path, data in files.items()}
    assert sorted(documents) == [0, 1, 2, 3, 5]                # 4 skipped, nothing of it lands
    assert documents[0] == documents[5] == {"id": "c-1"}
    expected_line = {"sku": "A-1", "price": {"currency": "EUR", "units": 12},
                     "at": "2024-11-24T09:50:00.123000Z", "sizes": [38, 40],
                     "flags": {"gift": True}, "kind": "RETURN", "comment": None,
                     "raw": {"base64": "AQI="}, "gift": None, "points": 7}
    assert documents[1] == documents[2] == expected_line       # base64 form and text form
    assert documents[3] == {"sku": "B-2", "price": None, "at": None, "sizes": [], "flags": {},
                            "kind": "KIND_UNSPECIFIED", "comment": None, "raw": {"base64": ""},
                            "gift": None, "points": None}
    assert spout._SCHEMA_ID.unpack_from(values[2], 1)[0] == text_id
    assert "skipped (ON_BAD_RECORD=skip)" in process.log and "/_errors/" not in str(files)
    _, positions = spout.record_from_description(pachd.head(PACH_REPO).description)
    assert positions == {(topic, 0): 6}


# -- JSON Schema in raw+meta; ON_BAD_RECORD=fail

def test_json_schema_raw_meta_then_fail_stops_at_the_bad_record(broker, registry, proxy, pachd,
                                                               tmp_path, spouts):
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    topic = create_topic(broker, 1)
    serializer = JSONSerializer(json.dumps({
        "type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}),
        client(registry))
    good = [serializer({"n": n, "s": "é"}, context(topic)) for n in range(3)]
    produce(broker, topic, [(0, b"k", good[0]), (0, None, good[1])])
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, DECODE="value",
                             FORMAT="raw+meta", ON_BAD_RECORD="fail",
                             SCHEMA_REGISTRY_URL=proxy().url))
    files = run_until(process, pachd, 4)
    schema_id = spout._SCHEMA_ID.unpack_from(good[0], 1)[0]
    name = f"/{topic}/0/{0:020d}"
    assert json.loads(files[name]) == {"n": 0, "s": "é"}
    sidecar = json.loads(files[name + ".meta.json"])
    assert (sidecar["value_schema_id"], sidecar["key"], "value" in sidecar) == \
        (schema_id, "k", False)
    # A bad record among good ones: the spout stops, naming it; nothing from it on lands.
    produce(broker, topic, [(0, None, good[2]), (0, None, b"\x00\x00"), (0, None, good[2])])
    assert process.wait(30) == 1, process.log
    errors = [line for line in process.log.splitlines() if "error:" in line]
    assert errors == [f"spout.py: error: {topic}/0 offset 3: no-magic-byte: not in the "
                      "Confluent wire format (a zero byte and a 4-byte schema id first) "
                      "(ON_BAD_RECORD=fail: nothing from this offset on is committed)"]
    _, positions = spout.record_from_description(pachd.head(PACH_REPO).description)
    assert positions[(topic, 0)] <= 3
    assert not any(path.startswith(f"/{topic}/0/{3:020d}") or path.startswith("/_errors")
                   for path in files_of(pachd))


# -- The registry refuses the spout; the registry goes away mid-batch

@pytest.mark.parametrize("kind, refusal", [("basic", 401), ("bearer", 403)])
def test_registry_refusing_the_credentials_is_one_line_and_exit_2(
        broker, registry, proxy, pachd, tmp_path, spouts, kind, refusal):
    from confluent_kafka.schema_registry.avro import AvroSerializer
    topic = create_topic(broker, 1)
    data = AvroSerializer(client(registry), '"string"')("hello", context(topic))
    produce(broker, topic, [(0, None, data)])
    front = proxy(user_info="spout:right-password", refusal=refusal)
    secret = tmp_path / "secret"
    if kind == "basic":
        secret.write_text("spout:wrong-password\n")
        setting = "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE"
    else:
        secret.write_text("wrong-password\n")
        setting = "SCHEMA_REGISTRY_BEARER_TOKEN_FILE"
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, DECODE="value",
                             SCHEMA_REGISTRY_URL=front.url, **{setting: secret}))
    assert process.wait(30) == 2, process.log
    errors = [line for line in process.log.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"spout.py: error: {setting}: ")
    assert f"answered {refusal}" in errors[0] and "Traceback" not in process.log
    assert "wrong-password" not in process.log
    assert len(pachd.commits(PACH_REPO)) == 1    # pachd's own first commit only


def test_registry_outage_mid_batch_waits_and_writes_nothing_undecoded(
        broker, registry, proxy, pachd, tmp_path, spouts):
    """Through HTTPS with basic auth, as a production registry is reached."""
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from kafka_broker import TestCA
    topic = create_topic(broker, 1)
    registry_client = client(registry)
    known = AvroSerializer(registry_client, '"string"')
    later = AvroSerializer(registry_client, json.dumps(
        {"type": "record", "name": "Later", "fields": [{"name": "n", "type": "int"}]}),
        conf={"auto.register.schemas": True, "subject.name.strategy": lambda *_: f"{topic}-2"})
    certificates = TestCA(tmp_path)
    front = proxy(user_info="spout:right-password", certfile=certificates.keystore)
    secret = tmp_path / "user-info"
    secret.write_text("spout:right-password\n")
    port = free_port()
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, DECODE="value", FORMAT="json",
                             SCHEMA_REGISTRY_URL=front.url, BATCH_MAX_SECONDS="0.5",
                             SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE=secret,
                             SCHEMA_REGISTRY_SSL_CA_LOCATION=certificates.ca_file,
                             **metrics_env(port)))
    produce(broker, topic, [(0, None, known("before", context(topic)))])
    run_until(process, pachd, 1, "the first message")
    front.stop()
    # One poll: a value of the schema already known, then one whose schema must be fetched.
    produce(broker, topic, [(0, None, known("during", context(topic))),
                            (0, None, later({"n": 7}, context(topic))),
                            (0, None, known("after", context(topic)))])
    body = wait_until(lambda: unhealthy(port, process, "Schema Registry"), 30,
                      "/healthz naming the registry", interval=0.2)
    assert any(f"https://127.0.0.1:{front.port}" in reason for reason in body["reasons"])
    assert len(files_of(pachd)) == 1      # the poll waits whole: nothing written undecoded
    front.start()
    files = run_until(process, pachd, 4, "the held poll, decoded")
    wait_until(lambda: healthz(port)[0] == 200, 10, "/healthz ok again")
    stop(process)
    documents = [json.loads(files[f"/{topic}/0/{offset:020d}"])["value"]
                 for offset in range(4)]
    assert documents == ["before", "during", {"n": 7}, "after"]
    assert "unreachable" in process.log and "answers again" in process.log


# -- FORMAT=parquet: typed value columns, one writer schema per file, read by pyarrow and DuckDB

def parquet_files(files: dict, topic: str) -> dict:
    """The topic's partition 0 segments as tables, by first offset."""
    import io

    import pyarrow.parquet as pq
    return {int(path.rsplit("/", 1)[1].split(".")[0]): pq.read_table(io.BytesIO(files[path]))
            for path in decoded_rows(files, topic, ".parquet")}


def test_parquet_avro_values_typed_one_schema_per_file_evolution_read_together(
        broker, registry, proxy, pachd, tmp_path, spouts):
    import duckdb
    import pyarrow as pa
    from confluent_kafka.schema_registry import Schema, SchemaReference
    from confluent_kafka.schema_registry.avro import AvroSerializer
    topic = create_topic(broker, 1)
    registry_client = client(registry)
    address_subject = f"{topic}-address"
    registry_client.register_schema(address_subject, Schema(json.dumps(ADDRESS), "AVRO"))
    v1 = AvroSerializer(registry_client, json.dumps(ORDER_V1))
    v2 = AvroSerializer(registry_client, Schema(
        json.dumps(ORDER_V2), "AVRO", [SchemaReference("shop.Address", address_subject, 1)]))
    keys = AvroSerializer(registry_client, '"string"')
    ctx, key_ctx = context(topic), context(topic, "key")
    values = [(keys("k0", key_ctx), v1(order(0), ctx)),
              (keys("k1", key_ctx), v1(order(1, note="x", amount="n/a"), ctx)),
              (keys("k2", key_ctx), None),                                  # a tombstone
              (None, b"plain bytes, no framing"),                           # dead-lettered
              (keys("k4", key_ctx), v2(order(4, source="web", ship_to={"city": "Oslo"}), ctx)),
              (keys("k5", key_ctx), v2(order(5), ctx)),
              (keys("k6", key_ctx), v1(order(6), ctx))]                     # v1 after v2
    produce(broker, topic, [(0, key, data) for key, data in values])
    process = spouts(pfs_env(broker, topic, pachd, tmp_path, DECODE="key,value",
                             FORMAT="parquet", TOMBSTONES="keep", BATCH_MAX_SECONDS=1,
                             SCHEMA_REGISTRY_URL=proxy().url))
    wait_until(lambda: delivered(pachd, topic) == 7 or process.process.poll() is not None,
               60, "offset 7 delivered", interval=0.1)
    stop(process)
    files = files_of(pachd)
    tables = parquet_files(files, topic)
    id_v1, id_v2 = (spout._SCHEMA_ID.unpack_from(values[n][1], 1)[0] for n in (0, 4))
    # A file per run of one writer schema, named by its first offset; the tombstone rides
    # with its neighbours, the bad record is a dead letter.
    assert {first: table.column("offset").to_pylist() for first, table in tables.items()} == \
        {0: [0, 1, 2], 4: [4, 5], 6: [6]}
    assert f"/_errors/{topic}/0/{3:020d}" in files
    value_v1 = tables[0].schema.field("value").type
    assert value_v1 == pa.struct([
        ("id", pa.int64()), ("note", pa.string()), ("amount", pa.string()),
        ("at", pa.timestamp("ms", "UTC")), ("at_us", pa.timestamp("us", "UTC")),
        ("day", pa.date32()), ("price", pa.decimal128(9, 2)), ("ref", pa.string()),
        ("blob", pa.binary()), ("tags", pa.map_(pa.string(), pa.int32())),
        ("state", pa.string())])
    assert tables[4].schema.field("value").type == pa.struct(
        list(value_v1) + [("source", pa.string()),
                          ("ship_to", pa.struct([("city", pa.string())]))])
    rows = tables[0].to_pylist()
    assert rows[0]["value"] == {
        "id": 0, "note": None, "amount": "1.5", "at": AT, "at_us": AT_US,
        "day": datetime.date(2024, 2, 29), "price": decimal.Decimal("1234.50"),
        "ref": "00000000-0000-0000-0000-000000000000", "blob": b"\x00\xff",
        "tags": [("a", 1)], "state": "NEW"}
    assert (rows[0]["key"], rows[0]["value_schema_id"]) == ('"k0"', id_v1)
    assert (rows[1]["value"]["note"], rows[1]["value"]["amount"]) == ("x", '"n/a"')
    assert (rows[2]["key"], rows[2]["value"], rows[2]["value_schema_id"]) == \
        ('"k2"', None, None)
    assert tables[4].column("value_schema_id").to_pylist() == [id_v2, id_v2]
    # v1 and v2 read together by DuckDB: v1's rows have the added fields as nulls.
    for first, path in zip(tables, decoded_rows(files, topic, ".parquet")):
        (tmp_path / f"{first}.parquet").write_bytes(files[path])
    rows = duckdb.sql(
        'SELECT "offset", value.id, value.source, value.ship_to.city, value.at_us '
        f"FROM read_parquet('{tmp_path}/*.parquet', union_by_name = true) "
        'ORDER BY "offset"').fetchall()
    assert [row[:4] for row in rows] == [(0, 0, None, None), (1, 1, None, None),
                                         (2, None, None, None), (4, 4, "web", "Oslo"),
                                         (5, 5, "legacy", None), (6, 6, None, None)]
    assert rows[0][4] == AT_US


def test_parquet_protobuf_message_types_apart_and_json_schema_as_text(
        broker, registry, proxy, pachd, tmp_path, spouts):
    import pyarrow as pa
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    topic, json_topic = create_topic(broker, 1), create_topic(broker, 1)
    classes = proto_classes(uuid.uuid4().hex[:8])
    registry_client = client(registry)
    strategy = {"use.deprecated.format": False}
    Created, Line = classes["events.Created"], classes["events.Changed.Line"]
    created = ProtobufSerializer(Created, registry_client, strategy)
    lines = ProtobufSerializer(Line, registry_client, strategy)
    line = Line(sku="A-1", price=classes["common.Money"](currency="EUR", units=12),
                sizes=[38, 40], flags={"gift": True}, kind=1, raw=b"\x01\x02", points=7)
    line.at.FromDatetime(AT)
    ctx = context(topic)
    # Created and Line live in one file, so one schema id: their message indexes differ.
    produce(broker, topic, [(0, None, data) for data in (
        created(Created(id="c-1"), ctx), lines(line, ctx), lines(Line(sku="B-2"), ctx),
        created(Created(id="c-2"), ctx))])
    as_json = JSONSerializer(json.dumps({
        "type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}),
        registry_client)
    produce(broker, json_topic, [(0, None, as_json({"n": 1, "s": "é"}, context(json_topic)))])
    process = spouts(pfs_env(broker, f"{topic},{json_topic}", pachd, tmp_path, DECODE="value",
                             FORMAT="parquet", BATCH_MAX_SECONDS=1,
                             GROUP_ID=f"g-{topic}", SCHEMA_REGISTRY_URL=proxy().url))
    wait_until(lambda: delivered(pachd, topic) == 4 and delivered(pachd, json_topic) == 1 or
               process.process.poll() is not None, 60, "both topics delivered", interval=0.1)
    stop(process)
    files = files_of(pachd)
    tables = parquet_files(files, topic)
    assert {first: table.column("offset").to_pylist() for first, table in tables.items()} == \
        {0: [0], 1: [1, 2], 3: [3]}
    assert tables[0].column("value").to_pylist() == [{"id": "c-1"}]
    assert tables[1].schema.field("value").type == pa.struct([
        ("sku", pa.string()),
        ("price", pa.struct([("currency", pa.string()), ("units", pa.int64())])),
        ("at", pa.timestamp("us", "UTC")), ("sizes", pa.list_(pa.int32())),
        ("flags", pa.map_(pa.string(), pa.bool_())), ("kind", pa.string()),
        ("comment", pa.string()), ("raw", pa.binary()), ("gift", pa.string()),
        ("points", pa.int32())])
    assert tables[1].column("value").to_pylist() == [
        {"sku": "A-1", "price": {"currency": "EUR", "units": 12}, "at": AT, "sizes": [38, 40],
         "flags": [("gift", True)], "kind": "RETURN", "comment": None, "raw": b"\x01\x02",
         "gift": None, "points": 7},
        {"sku": "B-2", "price": None, "at": None, "sizes": [], "flags": [],
         "kind": "KIND_UNSPECIFIED", "comment": None, "raw": b"", "gift": None,
         "points": None}]
    # JSON Schema values: the document as JSON text.
    (json_table,) = parquet_files(files, json_topic).values()
    assert json_table.schema.field("value").type == pa.string()
    assert json.loads(json_table.column("value")[0].as_py()) == {"n": 1, "s": "é"}
