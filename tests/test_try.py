"""make try: the spout on a given broker and topic, with no Pachyderm, showing its commits."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, create_topic, produce

TRY = ROOT / "demo" / "try.py"


def run_try(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")
            and k not in ("HOST", "PORT", "TOPIC", "GROUP_ID")}
    # Tansu completes a group join only after the session timeout (group mode, the pipe).
    base.update(KAFKA_SESSION_TIMEOUT_MS="6000", KAFKA_HEARTBEAT_INTERVAL_MS="500",
                KAFKA_MAX_POLL_INTERVAL_MS="6000", BATCH_MAX_SECONDS="0.3", **env)
    return subprocess.run([sys.executable, str(TRY), *args], env=base, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("delivery", ["pfs", "pipe"])
def test_try_shows_what_the_spout_would_commit(broker, tmp_path, delivery):
    topic = create_topic(broker, 3)
    produce(broker, topic, [(i % 3, None, b'{"n": %d}' % i) for i in range(30)])
    out = tmp_path / "out"
    result = run_try("--bootstrap", broker, "--topic", topic, "--messages", "30",
                     "--seconds", "60", "--delivery", delivery, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "spout exited with status 0; messages: 30" in result.stdout, result.stdout
    assert re.search(rf"/{topic}/\d/0{{18}}\d\d -> {{\"n\": \d+}}", result.stdout)
    if delivery == "pfs":
        assert re.search(rf"kafka-spout: \d+ message\(s\) from {topic}/", result.stdout)
        files = [path for path in out.rglob("*") if path.is_file()]
    else:
        files = [path for path in (out / "files").rglob("*") if path.is_file()]
    assert len(files) == 30
    assert (out / (topic if delivery == "pfs" else f"files/{topic}") / "1" /
            "00000000000000000000").read_bytes() == b'{"n": 1}'


def test_try_passes_settings_through_and_shows_the_spouts_refusal(broker, tmp_path):
    result = run_try("--bootstrap", broker, "--topic", "t", "--out", str(tmp_path / "o"),
                     FORMAT="xml")
    assert result.returncode == 2
    assert "spout.py: error: FORMAT: must be one of" in result.stderr
