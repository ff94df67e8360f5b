"""DECODE against hostile and unusual input (issue 22, "Nothing lost, nothing hung"): whatever
one record holds, it is a bad record for ON_BAD_RECORD or lands as valid output; it never
stops the spout. The registry is a double: SchemaCache's own (FakeRegistry) in-process, or a
small HTTP server speaking the Confluent API (RegistryDouble) for the spout as a process."""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import random
import signal
import subprocess
import sys
import threading
from collections import namedtuple

import pytest
from conftest import PACH_REPO, ROOT, create_topic, free_port, pfs_env, produce, wait_until
from test_config import run_spout

import spout

URL = "http://registry:8081"
Message = namedtuple("Message", "topic partition offset timestamp timestamp_type key value "
                                "headers")


class FakeRegistry(spout.SchemaRegistry):
    """Schemas by id; any other id is unknown. Counts what it is asked."""

    where = "the registry double"

    def __init__(self, schemas: dict[int, tuple[str, str]]):
        self.schemas = schemas
        self.asked: list[int] = []

    def by_id(self, schema_id: int) -> spout.RegistrySchema:
        self.asked.append(schema_id)
        if schema_id not in self.schemas:
            raise spout.UnknownSchema(f"no schema {schema_id}")
        schema_type, text = self.schemas[schema_id]
        return spout.RegistrySchema(schema_type, text, ())


@pytest.fixture
def base(fifo):
    return {"HOST": "kafka", "PORT": "9092", "TOPIC": "events", "OUTPUT_PIPE": str(fifo)}


def decoding(base, schemas: dict, **settings) -> spout.Decoding:
    config = spout.Config.from_sources({**base, "DECODE": "value", "SCHEMA_REGISTRY_URL": URL,
                                        **settings})
    return spout.Decoding(config, threading.Event(), FakeRegistry(schemas))


def framed(schema_id: int, payload: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + payload


def decode(decoder: spout.Decoding, *values: bytes, keys=None) -> list[spout.DecodedRecord]:
    keys = keys or [None] * len(values)
    messages = [Message("t", 0, offset, 1_700_000_000_000, 0, key, value, [])
                for offset, (key, value) in enumerate(zip(keys, values))]
    return decoder.decode({("t", 0): messages})[("t", 0)]


def avro(schema, value) -> bytes:
    import fastavro
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), value)
    return out.getvalue()


def strict_json(text):
    """json.loads that refuses what is not JSON: NaN, Infinity, -Infinity."""
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


# -- case 4: any failure to decode one record is a bad record

def test_a_json_value_nested_100000_deep_is_a_bad_record(base):
    deep = framed(3, b"[" * 100_000 + b"]" * 100_000)
    good = framed(3, b'{"n": 1}')
    decoder = decoding(base, {3: ("JSON", "{}")})
    first, second, third = decode(decoder, good, deep, good)
    assert (first.document, third.document) == ({"n": 1}, {"n": 1})
    assert (second.problem.reason, second.schema_id) == ("too-deep", 3)
    assert decoder.bad_records == {("t", "too-deep"): 1}
    # Inline too, now that the schema is known: the first record above fetched it.
    assert decode(decoder, deep)[0].problem.reason == "too-deep"
    with pytest.raises(spout.BadRecordFailure, match="t/0 offset 0: too-deep"):
        decode(decoding(base, {3: ("JSON", "{}")}, ON_BAD_RECORD="fail"), deep)


def test_a_json_value_too_deep_to_write_out_again_is_a_bad_record(base):
    """json.loads reads about 990 levels, but writing them (FORMAT=json, jsonl, Parquet's JSON
    text) from further down the stack fails past ON_BAD_RECORD: such values are bad records."""
    depth = 980
    [record] = decode(decoding(base, {3: ("JSON", "{}")}),
                      framed(3, b"[" * depth + b"]" * depth))
    assert record.problem is not None and record.problem.reason == "too-deep"
    # At the limit it decodes, and is written out from deep in the stack.
    limit = spout.MAX_DOCUMENT_DEPTH
    [record] = decode(decoding(base, {3: ("JSON", "{}")}),
                      framed(3, b'{"a": ' * (limit - 1) + b"[]" + b"}" * (limit - 1)))
    assert record.problem is None

    def nested(levels):
        return spout.document_json(record.document) if levels == 0 else nested(levels - 1)
    assert len(nested(100)) > limit


NODE = {"type": "record", "name": "Node", "fields": [
    {"name": "n", "type": "int"}, {"name": "next", "type": ["null", "Node"]}]}


def test_a_recursive_avro_value_nested_100000_deep_is_a_bad_record_not_a_crash(base):
    """fastavro's compiled reader recursed in C until the process died (SIGSEGV): run in a
    process of its own."""
    script = f"""
import json, sys, threading
sys.path.insert(0, {str(ROOT)!r})
import spout
from test_decoding_hostile import FakeRegistry, Message, framed
config = spout.Config.from_sources({{**json.loads({json.dumps(base)!r}), "DECODE": "value",
                                    "SCHEMA_REGISTRY_URL": {URL!r}}})
decoder = spout.Decoding(config, threading.Event(),
                         FakeRegistry({{7: ("AVRO", {json.dumps(NODE)!r})}}))
shallow = framed(7, b"\\x02\\x02\\x04\\x02\\x06\\x00")   # 1 -> 2 -> 3
deep = framed(7, b"\\x02\\x02" * 100_000 + b"\\x02\\x00")
records = [Message("t", 0, offset, 0, 0, None, value, []) for offset, value in
           enumerate((shallow, deep, shallow))]
for record in decoder.decode({{"tp": records}})["tp"]:
    print(record.problem.reason if record.problem else record.document)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=ROOT / "tests")
    assert result.returncode == 0, result.stderr[-2000:]
    shallow = "{'n': 1, 'next': {'n': 2, 'next': {'n': 3, 'next': None}}}"
    assert result.stdout.splitlines() == [shallow, "too-deep", shallow]


def protobuf_schema(build) -> str:
    """A registry's base64 FileDescriptorProto of file p.proto, filled in by build."""
    from google.protobuf import descriptor_pb2
    proto = descriptor_pb2.FileDescriptorProto(name="p.proto", package="p", syntax="proto3")
    build(proto)
    return base64.b64encode(proto.SerializeToString()).decode()


def test_a_protobuf_value_its_decoder_cannot_make_a_document_of_is_a_bad_record(base):
    """A Timestamp of 2**62 seconds parses, but is no datetime: ValueError, not a DecodeError,
    and no longer past ON_BAD_RECORD."""
    def build(proto):
        proto.dependency.append("google/protobuf/timestamp.proto")
        proto.message_type.add(name="Event").field.add(
            name="at", number=1, type=11, label=1, type_name=".google.protobuf.Timestamp")
    decoder = decoding(base, {4: ("PROTOBUF", protobuf_schema(build))})
    good = framed(4, b"\x00\x0a\x02\x08\x01")           # at: 1 s after the epoch
    seconds = b"\x08" + spout._varint(2**62)
    hostile = framed(4, b"\x00\x0a" + bytes([len(seconds)]) + seconds)
    first, second, third = decode(decoder, good, hostile, good)
    assert first.problem is None and first.document["at"].year == 1970
    assert second.problem.reason == "corrupt-payload" and second.problem.schema_id == 4
    assert third.problem is None


ORDER = {"type": "record", "name": "Order", "fields": [
    {"name": "qty", "type": "int"},
    {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6,
                               "scale": 2}}]}


def test_a_value_that_does_not_fit_its_parquet_column_is_a_bad_record(base):
    """An Avro int of more than 32 bits, a decimal of more digits than its precision: fastavro
    decodes them, pyarrow refused them when Segments.take wrote the file, failing the batch
    at every start. Now bad records, their neighbours written."""
    import pyarrow.parquet as pq
    decoder = decoding(base, {5: ("AVRO", json.dumps(ORDER))}, FORMAT="parquet")
    good = framed(5, avro(ORDER, {"qty": 2, "price": spout.decimal.Decimal("12.50")}))
    too_big = framed(5, spout._varint(2**40) + good[6:])          # qty: beyond int32
    too_precise = framed(5, b"\x04" + b"\x28" + b"\x7f" * 20)      # price: 48 digits
    records = decode(decoder, good, too_big, too_precise, good)
    assert [record.problem.reason if record.problem else None for record in records] == \
        [None, "corrupt-payload", "corrupt-payload", None]
    writer = spout.DecodedParquetWriter(decoder.config, decoder.schemas)
    table = pq.read_table(io.BytesIO(writer.encode(
        [record for record in records if record.problem is None])))
    assert table.column("value").to_pylist() == [
        {"qty": 2, "price": spout.decimal.Decimal("12.50")}] * 2


# -- case 5: every writer schema has a Parquet column shape

AVRO_SHAPES = [
    ('"string"', "text", "string", "text"),
    ('"long"', 7, "int64", 7),
    ('["null", "string"]', "maybe", "string", "maybe"),
    ('["null", "string", "long"]', 5, "string", "5"),               # JSON text
    ('{"type": "array", "items": "int"}', [1, 2], "list<element: int32>", [1, 2]),
    ('{"type": "map", "values": "double"}', {"a": 1.5},
     "map<string, double ('value')>", [("a", 1.5)]),
    ('{"type": "enum", "name": "E", "symbols": ["A", "B"]}', "B", "string", "B"),
    ('{"type": "fixed", "name": "F", "size": 2}', b"\x00\xff",
     "fixed_size_binary[2]", b"\x00\xff"),
    ('{"type": "record", "name": "Empty", "fields": []}', {}, "string", "{}"),
    ('["null", {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}]',
     {"a": 1}, "struct<a: int32>", {"a": 1}),
]


@pytest.mark.parametrize("schema, value, arrow_type, stored", AVRO_SHAPES)
def test_an_avro_value_schema_that_is_no_record_has_a_parquet_column(
        base, schema, value, arrow_type, stored):
    import pyarrow.parquet as pq
    decoder = decoding(base, {6: ("AVRO", schema)}, FORMAT="parquet")
    records = decode(decoder, framed(6, avro(json.loads(schema), value)))
    assert records[0].problem is None
    writer = spout.DecodedParquetWriter(decoder.config, decoder.schemas)
    table = pq.read_table(io.BytesIO(writer.encode(records)))
    assert str(table.schema.field("value").type) == arrow_type
    assert table.column("value").to_pylist() == [stored]


def test_protobuf_and_json_schema_values_of_every_shape_have_a_parquet_column(base):
    """A message without fields (Parquet has no empty struct); a JSON Schema value that is no
    object."""
    import pyarrow.parquet as pq
    empty = protobuf_schema(lambda proto: proto.message_type.add(name="Empty"))
    decoder = decoding(base, {8: ("PROTOBUF", empty), 9: ("JSON", '{"type": "string"}')},
                       FORMAT="parquet")
    writer = spout.DecodedParquetWriter(decoder.config, decoder.schemas)
    for value, arrow_type, stored in [(framed(8, b"\x00"), "string", "{}"),
                                      (framed(9, b'"text"'), "string", '"text"')]:
        records = decode(decoder, value)
        assert records[0].problem is None
        table = pq.read_table(io.BytesIO(writer.encode(records)))
        assert str(table.schema.field("value").type) == arrow_type
        assert table.column("value").to_pylist() == [stored]


class RegistryDouble:
    """GET /schemas/ids/{id} of the Confluent API, from a dict; 404 for any other id."""

    def __init__(self, schemas: dict[int, tuple[str, str]]):
        double = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                found = None
                if path.startswith("/schemas/ids/"):
                    found = double.schemas.get(int(path.rsplit("/", 1)[1]))
                if found is None:
                    status, body = 404, {"error_code": 40403, "message": "Schema not found"}
                else:
                    status, body = 200, {"schemaType": found[0], "schema": found[1]}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.schemas = schemas
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_parquet_of_avro_values_that_are_no_records_lands_instead_of_crash_looping(
        broker, pachd, tmp_path, spouts):
    """End to end: the spout used to die in Segments.take at every start on the first batch
    holding a "string" (or union, ...) value schema."""
    import pyarrow.parquet as pq
    topic = create_topic(broker, 1)
    shapes = AVRO_SHAPES[:4] + AVRO_SHAPES[-2:]
    registry = RegistryDouble({100 + index: ("AVRO", schema)
                               for index, (schema, *_rest) in enumerate(shapes)})
    try:
        produce(broker, topic, [(0, None, framed(100 + index, avro(json.loads(schema), value)))
                                for index, (schema, value, *_rest) in enumerate(shapes)])
        process = spouts(pfs_env(broker, topic, pachd, tmp_path, DECODE="value",
                                 FORMAT="parquet", SCHEMA_REGISTRY_URL=registry.url))

        def files():
            head = pachd.head(PACH_REPO)
            return head.files if head.finished and len(head.files) >= len(shapes) else None
        wait_until(lambda: files() or process.process.poll() is not None, 60,
                   "a file per schema", interval=0.1)
        assert process.process.poll() is None, process.log
        landed = files()
        process.signal(signal.SIGTERM)
        assert process.wait(15) == 0, process.log
    finally:
        registry.stop()
    assert len(landed) == len(shapes)
    for (path, data), (_schema, _value, arrow_type, stored) in zip(sorted(landed.items()),
                                                                   shapes):
        table = pq.read_table(io.BytesIO(data))
        assert str(table.schema.field("value").type) == arrow_type, path
        assert table.column("value").to_pylist() == [stored], path


# -- case 13: TLS files that do not load are refused naming their own setting

def certificate_and_key(tmp_path):
    """A self-signed certificate and its key, as PEM files."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "spout")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(
        key.public_key()).serial_number(1).not_valid_before(now).not_valid_after(
        now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("files, culprit", [
    ({"SCHEMA_REGISTRY_SSL_CA_LOCATION": "garbage"}, "SCHEMA_REGISTRY_SSL_CA_LOCATION"),
    ({"SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION": "garbage"},
     "SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION"),
    ({"SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION": "cert"},   # its key nowhere
     "SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION"),
    ({"SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION": "cert",
      "SCHEMA_REGISTRY_SSL_KEY_LOCATION": "garbage"}, "SCHEMA_REGISTRY_SSL_KEY_LOCATION"),
    ({"SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION": "cert",
      "SCHEMA_REGISTRY_SSL_KEY_LOCATION": "other-key"}, "SCHEMA_REGISTRY_SSL_KEY_LOCATION"),
])
def test_a_registry_tls_file_that_does_not_load_is_one_line_exit_2_naming_it(
        base, tmp_path, files, culprit):
    cert, key = certificate_and_key(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    paths = {"garbage": tmp_path / "garbage.pem", "cert": cert,
             "other-key": certificate_and_key(other)[1]}
    paths["garbage"].write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    env = {**base, "DECODE": "value", "SCHEMA_REGISTRY_URL": "https://registry:8081",
           **{name: str(paths[file]) for name, file in files.items()}}
    result = run_spout(env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"spout.py: error: {culprit}: "), result.stderr


def test_registry_tls_files_that_load_are_taken(base, tmp_path):
    cert, key = certificate_and_key(tmp_path)
    config = spout.Config.from_sources({
        **base, "DECODE": "value", "SCHEMA_REGISTRY_URL": "https://registry:8081",
        "SCHEMA_REGISTRY_SSL_CA_LOCATION": str(cert),
        "SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION": str(cert),
        "SCHEMA_REGISTRY_SSL_KEY_LOCATION": str(key)})
    assert spout.ConfluentSchemaRegistry(config).client is not None


# -- case 14: every JSON written is JSON; NaN and the infinities are strings

def test_nan_and_infinity_are_written_as_strings_in_every_json(base):
    payload = framed(3, b'{"x": NaN, "y": [Infinity, -Infinity], "z": 1.5}')
    expected = {"x": "NaN", "y": ["Infinity", "-Infinity"], "z": 1.5}
    decoder = decoding(base, {3: ("JSON", "{}")}, DECODE="key,value", FORMAT="json")
    [record] = decode(decoder, payload, keys=[framed(3, b"NaN")])
    for format in ("json", "raw+meta", "raw"):
        files = spout.decoded_shape(format, format != "raw", "dead-letter")("f", record, 0)
        documents = [strict_json(data) for _name, data, _mtime in files]
        value = documents[0] if format != "json" else documents[0]["value"]
        assert value == expected, format
        if format != "raw":
            assert documents[-1]["key"] == "NaN"
    [line] = spout.JsonLinesWriter(decoder.config).encode([record]).splitlines()
    assert strict_json(line)["value"] == expected and strict_json(line)["key"] == "NaN"


def test_nan_in_avro_floats_is_a_string_in_json_and_in_parquets_json_text(base):
    import pyarrow.parquet as pq
    schema = {"type": "record", "name": "M", "fields": [
        {"name": "d", "type": "double"}, {"name": "f", "type": "float"},
        {"name": "either", "type": ["null", "double", "string"]}]}
    value = framed(2, avro(schema, {"d": math.nan, "f": -math.inf, "either": math.inf}))
    [record] = decode(decoding(base, {2: ("AVRO", json.dumps(schema))}), value)
    assert strict_json(spout.document_json(record.document)) == {
        "d": "NaN", "f": "-Infinity", "either": "Infinity"}
    decoder = decoding(base, {2: ("AVRO", json.dumps(schema))}, FORMAT="parquet")
    records = decode(decoder, value)
    table = pq.read_table(io.BytesIO(
        spout.DecodedParquetWriter(decoder.config, decoder.schemas).encode(records)))
    [row] = table.column("value").to_pylist()
    assert math.isnan(row["d"]) and row["f"] == -math.inf   # Parquet's own floats hold them
    assert strict_json(row["either"]) == "Infinity"


# -- the schema cache is bounded; mask_url masks the whole password

def test_unknown_schema_ids_are_remembered_within_a_bound(base):
    decoder = decoding(base, {})
    ids = random.Random(22).sample(range(1, 2**31), 5000)
    for schema_id in ids:
        assert decode(decoder, framed(schema_id, b"x"))[0].problem.reason == \
            "unknown-schema-id"
    assert len(decoder.schemas.unknown) <= 1000
    asked = len(decoder.registry.asked)
    # The recent ones are not asked for again: a topic of one bad id does not hammer it.
    for schema_id in ids[-100:] * 3:
        assert decode(decoder, framed(schema_id, b"x"))[0].problem.reason == \
            "unknown-schema-id"
    assert len(decoder.registry.asked) == asked


def test_an_unusable_schema_stays_unusable_when_met_again(base):
    decoder = decoding(base, {5: ("AVRO", "{not json")})
    assert [record.problem.reason for record in decode(decoder, framed(5, b""), framed(5, b""))] \
        == ["unusable-schema", "unusable-schema"]
    assert decoder.registry.asked == [5]


@pytest.mark.parametrize("url, shown", [
    ("https://user:p@ss@registry:8081/apis", "https://user:***@registry:8081/apis"),
    ("https://user:a@b@c@registry", "https://user:***@registry"),
    ("https://user:secret@registry/p@th", "https://user:***@registry/p@th"),
    ("https://registry:8081", "https://registry:8081"),
])
def test_mask_url_masks_all_of_a_password_holding_an_at_sign(url, shown):
    assert spout.mask_url(url) == shown


def test_a_password_with_an_at_sign_is_not_shown_in_the_start_up_log_or_errors(base):
    config = spout.Config.from_sources({**base, "DECODE": "value",
                                        "SCHEMA_REGISTRY_URL": "https://u:pa@ss@registry"})
    assert "ss@" not in config.describe() and "https://u:***@registry" in config.describe()
    result = run_spout({**base, "DECODE": "value",
                        "SCHEMA_REGISTRY_URL": "https://u:pa@ss@registry:99999"})
    assert result.returncode == 2 and "ss@" not in result.stderr, result.stderr


def test_a_record_the_segment_writer_refuses_is_set_aside_not_a_crash(base):
    """Whatever the checks at decoding miss, a record pyarrow refuses when the segment is
    written is a bad record of its own, its neighbours written: here an int beyond int32,
    decoded without the Parquet check (as for jsonl), then written as Parquet."""
    import pyarrow.parquet as pq
    from kafka import TopicPartition
    schemas = {5: ("AVRO", json.dumps(ORDER))}
    good = framed(5, avro(ORDER, {"qty": 2, "price": spout.decimal.Decimal("12.50")}))
    too_big = framed(5, spout._varint(2**40) + good[6:])
    records = decode(decoding(base, schemas, FORMAT="jsonl"), good, too_big, good)
    assert [record.problem for record in records] == [None] * 3
    parquet = decoding(base, schemas, FORMAT="parquet")
    parquet.schemas.writer_schema(5)
    segments = spout.Segments(parquet.config, spout.Stats(), lambda: None, parquet)
    tp = TopicPartition("t", 0)
    segments.add({tp: records})
    batch = segments.take()
    files = {name: data for name, data, _ in batch.members}
    segment = [name for name in files if name.endswith(".parquet")]
    assert segment == ["t/0/00000000000000000000.parquet"], sorted(files)
    assert pq.read_table(io.BytesIO(files[segment[0]])).column("offset").to_pylist() == [0, 2]
    assert sorted(name for name in files if name.startswith("_errors/")) == [
        "_errors/t/0/00000000000000000001", "_errors/t/0/00000000000000000001.json"]
    assert batch.records == 3 and batch.written == {"t": 2}
    assert parquet.bad_records == {("t", "unwritable"): 1}
