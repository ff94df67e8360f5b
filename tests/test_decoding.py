"""DECODE without a registry: its settings (refused with one line, exit 2; secrets masked) and
the decoding layer's pure parts. The registry itself: tests/test_registry.py."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid

import pytest
from test_config import run_spout

import spout

URL = "http://registry:8081"


@pytest.fixture
def base(fifo):
    return {"HOST": "kafka", "PORT": "9092", "TOPIC": "events", "OUTPUT_PIPE": str(fifo)}


def test_decode_settings(base, tmp_path):
    secret = tmp_path / "user-info"
    secret.write_text("spout:s3cret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = spout.Config.from_sources({
        **base, "DECODE": "value,key", "FORMAT": "json",
        "SCHEMA_REGISTRY_URL": f"{URL}, https://other/apis/ccompat/v7/",
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE": str(secret),
        "SCHEMA_REGISTRY_SSL_CA_LOCATION": str(ca), "ON_BAD_RECORD": "skip"})
    assert config.decode == ("key", "value")
    assert config.schema_registry_url == (URL, "https://other/apis/ccompat/v7")
    assert config.schema_registry_user_info == "spout:s3cret"
    assert config.schema_registry_credentials_source == \
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE"
    assert config.schema_registry_ssl_ca_location == str(ca)
    assert config.on_bad_record == "skip"
    assert spout.Config.from_sources(base).decode == ()
    assert spout.Config.from_sources(base).on_bad_record == "dead-letter"


def test_decode_secrets_are_masked(base):
    config = spout.Config.from_sources({
        **base, "DECODE": "value", "SCHEMA_REGISTRY_URL": "https://u:pw-in-url@registry",
        "SCHEMA_REGISTRY_BEARER_TOKEN": "token-value"})
    described = config.describe()
    assert "token-value" not in described and "pw-in-url" not in described
    assert "schema_registry_bearer_token='***'" in described
    assert "https://u:***@registry" in described
    assert "token-value" not in repr(config)


@pytest.mark.parametrize("change, culprit", [
    ({"DECODE": "value"}, "SCHEMA_REGISTRY_URL: required with DECODE=value"),
    ({"DECODE": "values", "SCHEMA_REGISTRY_URL": URL}, "DECODE: must be none, value, or"),
    ({"DECODE": "key", "SCHEMA_REGISTRY_URL": URL}, "DECODE: must be none, value, or"),
    ({"DECODE": "key,value", "SCHEMA_REGISTRY_URL": URL},
     "DECODE: key,value needs FORMAT=json, raw+meta, jsonl or parquet"),
    ({"SCHEMA_REGISTRY_URL": URL}, "SCHEMA_REGISTRY_URL: set, but DECODE is none"),
    ({"DECODE": "value", "SCHEMA_REGISTRY_URL": "registry:8081"},
     "SCHEMA_REGISTRY_URL: 'registry:8081' is not an http:// or https:// URL"),
    ({"DECODE": "value", "SCHEMA_REGISTRY_URL": "http://registry:99999"},
     "SCHEMA_REGISTRY_URL: 'http://registry:99999' is not a URL"),
    ({"DECODE": "value", "SCHEMA_REGISTRY_URL": URL,
      "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "no-colon-secret"},
     "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO: must be user:password"),
    ({"DECODE": "value", "SCHEMA_REGISTRY_URL": URL,
      "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "a:b", "SCHEMA_REGISTRY_BEARER_TOKEN": "t"},
     "SCHEMA_REGISTRY_BEARER_TOKEN: set basic auth or a bearer token"),
    ({"DECODE": "value", "SCHEMA_REGISTRY_URL": URL,
      "SCHEMA_REGISTRY_BEARER_TOKEN_FILE": "/nonexistent/token"},
     "SCHEMA_REGISTRY_BEARER_TOKEN_FILE: cannot read /nonexistent/token"),
    ({"DECODE": "value", "SCHEMA_REGISTRY_URL": URL,
      "SCHEMA_REGISTRY_SSL_CA_LOCATION": "/nonexistent/ca.pem"},
     "SCHEMA_REGISTRY_SSL_CA_LOCATION: /nonexistent/ca.pem is not a readable file"),
    ({"DECODE": "value", "SCHEMA_REGISTRY_URL": URL, "ON_BAD_RECORD": "ignore"},
     "ON_BAD_RECORD: must be one of dead-letter, skip, fail"),
])
def test_nonsense_is_one_line_and_exit_2(base, change, culprit):
    result = run_spout({**base, **change})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"spout.py: error: {culprit}"), result.stderr
    assert "no-colon-secret" not in result.stderr


def test_a_key_file_needs_its_certificate(base, tmp_path):
    key = tmp_path / "client.key"
    key.write_text("key")
    with pytest.raises(spout.ConfigError, match="SCHEMA_REGISTRY_SSL_KEY_LOCATION: needs "
                       "SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION"):
        spout.Config.from_sources({**base, "DECODE": "value", "SCHEMA_REGISTRY_URL": URL,
                                   "SCHEMA_REGISTRY_SSL_KEY_LOCATION": str(key)})


@pytest.mark.parametrize("framing, indexes", [
    (b"\x00", [0]),                 # the first message: a lone zero
    (b"\x02\x02", [1]),             # the second top-level message
    (b"\x04\x02\x00", [1, 0]),      # the first message nested in the second
    (b"\x04\x80\x01\x06", [64, 3]),  # a two-byte varint
])
def test_protobuf_message_indexes(framing, indexes):
    data = b"\x00\x00\x00\x00\x07" + framing + b"payload"
    assert spout.read_message_indexes(data, 5, 7) == (indexes, 5 + len(framing))


def test_protobuf_message_indexes_cut_short_are_a_bad_record():
    with pytest.raises(spout.BadRecord, match="corrupt-payload: message indexes cut short"):
        spout.read_message_indexes(b"\x00\x00\x00\x00\x07\x04\x02", 5, 7)


def test_the_json_forms_of_decoded_values():
    document = {
        "ts": datetime.datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=datetime.timezone.utc),
        "ts_offset": datetime.datetime(2024, 1, 2, 5, 4, 5, tzinfo=datetime.timezone(
            datetime.timedelta(hours=2))),
        "local": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "day": datetime.date(2024, 2, 29), "time": datetime.time(23, 59, 1, 500),
        "price": decimal.Decimal("-0.10"), "id": uuid.UUID(int=1), "raw": b"\xff",
        "text": "é"}
    assert json.loads(spout.document_json(document)) == {
        "ts": "2024-01-02T03:04:05.006000Z", "ts_offset": "2024-01-02T03:04:05.000000Z",
        "local": "2024-01-02T03:04:05.000000", "day": "2024-02-29", "time": "23:59:01.000500",
        "price": "-0.10", "id": "00000000-0000-0000-0000-000000000001",
        "raw": {"base64": "/w=="}, "text": "é"}


def record(**fields) -> spout.DecodedRecord:
    values = dict(topic="t", partition=1, offset=42, timestamp=1_700_000_000_000,
                  timestamp_type=0, key=b"k", value=b"\x00\x00\x00\x00\x05data", headers=[],
                  document={"n": 1}, schema_id=5)
    values.update(fields)
    return spout.DecodedRecord(**values)


def test_shapes_of_decoded_records():
    json_shape = spout.decoded_shape("json", True, "dead-letter")
    [(name, data, mtime)] = json_shape("t/1/42", record(key_document="k-doc", key_schema_id=3),
                                       1_700_000_000)
    document = json.loads(data)
    assert (name, mtime) == ("t/1/42", 1_700_000_000)
    assert (document["value"], document["value_schema_id"], document["key"],
            document["key_schema_id"], document["offset"]) == ({"n": 1}, 5, "k-doc", 3, 42)
    [(_, raw, _)] = spout.decoded_shape("raw", False, "dead-letter")("x", record(), 0)
    assert json.loads(raw) == {"n": 1}
    (_, data, _), (sidecar_name, sidecar, _) = spout.decoded_shape("raw+meta", False, "skip")(
        "x", record(value=None, document=None, schema_id=None), 0)
    assert data == b"" and sidecar_name == "x.meta.json"
    assert (json.loads(sidecar)["value"], json.loads(sidecar)["value_schema_id"]) == (None, None)


def test_a_bad_record_is_dead_lettered_or_skipped_by_shape():
    bad = record(document=None, schema_id=None, value=b"\x01junk",
                 problem=spout.BadRecord("no-magic-byte", "not framed"))
    (name, data, _), (sidecar_name, sidecar, _) = \
        spout.decoded_shape("json", False, "dead-letter")("t/1/42", bad, 7)
    assert (name, data, sidecar_name) == ("_errors/t/1/00000000000000000042", b"\x01junk",
                                          "_errors/t/1/00000000000000000042.json")
    reason = json.loads(sidecar)
    assert (reason["reason"], reason["detail"], reason["key"], reason["timestamp"]) == \
        ("no-magic-byte", "not framed", "k", 1_700_000_000_000)
    assert spout.decoded_shape("json", False, "skip")("t/1/42", bad, 7) == []


def test_parquet_types_of_avro_schemas():
    """The corners the registry tests do not reach: a recursive record, a union of several
    types, local timestamps, times, a decimal on fixed, uuids inside an array's records."""
    import fastavro
    import pyarrow as pa
    parsed = fastavro.parse_schema({"type": "record", "name": "Node", "fields": [
        {"name": "v", "type": ["null", "int", "string"]},
        {"name": "next", "type": ["null", "Node"]},
        {"name": "local", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "time", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "price", "type": {"type": "fixed", "name": "P", "size": 20,
                                   "logicalType": "decimal", "precision": 40, "scale": 2}},
        {"name": "items", "type": {"type": "array", "items": {
            "type": "record", "name": "Item", "fields": [
                {"name": "id", "type": {"type": "string", "logicalType": "uuid"}}]}}}]})
    arrow_type, convert = spout.avro_arrow_type(pa, parsed, parsed["__named_schemas"], ())
    assert arrow_type == pa.struct([
        ("v", pa.string()), ("next", pa.string()), ("local", pa.timestamp("us")),
        ("time", pa.time32("ms")), ("price", pa.decimal256(40, 2)),
        ("items", pa.list_(pa.struct([("id", pa.string())])))])
    document = {"v": 7, "next": {"v": "x", "next": None, "local": None, "time": None,
                                 "price": None, "items": []},
                "local": datetime.datetime(2024, 1, 2, 3, 4, 5), "time": datetime.time(23, 59),
                "price": decimal.Decimal("-0.10"), "items": [{"id": uuid.UUID(int=1)}]}
    [row] = pa.array([convert(document)], arrow_type).to_pylist()
    assert (row["v"], json.loads(row["next"])["v"], row["items"]) == \
        ("7", "x", [{"id": "00000000-0000-0000-0000-000000000001"}])
    assert (row["local"], row["time"], row["price"]) == (
        datetime.datetime(2024, 1, 2, 3, 4, 5), datetime.time(23, 59), decimal.Decimal("-0.10"))


def test_a_parquet_file_per_run_of_one_schema_tombstones_riding_along():
    keys = [None, 1, 1, None, 2, 2, None, 1]
    runs = spout.schema_runs(list(range(len(keys))), keys.__getitem__)
    assert runs == [[0, 1, 2, 3], [4, 5, 6], [7]]
    assert spout.schema_runs([0, 1], [None, None].__getitem__) == [[0, 1]]


def test_the_readme_example_spec_parses_strictly_and_configures_decode(tmp_path):
    """docs/schema-registry.md's spec: as pachctl 2.x parses it, and its environment as
    the spout reads it once the secret is mounted."""
    from conftest import ROOT
    from pachyderm_sdk.api import pps
    from test_packaging import check_message
    section = (ROOT / "docs" / "schema-registry.md").read_text()
    raw = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    check_message(pps.CreatePipelineRequest, raw, "")   # protojson: unknown fields fail
    request = pps.CreatePipelineRequest().from_dict(raw)
    [secret] = request.transform.secrets
    mounted = tmp_path / "secrets"
    mounted.mkdir()
    (mounted / "user-info").write_text("spout:s3cret\n")
    (mounted / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    env = {name: value.replace(secret.mount_path, str(mounted))
           for name, value in raw["transform"]["env"].items()}
    env["PACHD_ADDRESS"], env["OUTPUT_REPO"] = "grpc://pachd:30650", "default/orders"
    config = spout.Config.from_sources(env)
    assert (config.decode, config.format, config.schema_registry_user_info) == \
        (("key", "value"), "json", "spout:s3cret")
    assert config.schema_registry_ssl_ca_location == str(mounted / "ca.pem")
