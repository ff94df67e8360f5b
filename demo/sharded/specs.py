"""Pipeline specs for one topic split between several exactly-once spouts (PARTITIONS), each
its own pipeline and repo, and a downstream pipeline whose union input reads their repos as
one dataset. Written from pipeline-v2.json, so image, broker and topic come from there.

    python demo/sharded/specs.py --spouts 3 --partitions 6 --out build/sharded
    python demo/sharded/specs.py --spouts 3 --partitions 6 --generation 2 \
        --resume-from kafka-spout-0,kafka-spout-1 --out build/resharded

--generation names a new split's pipelines (kafka-spout-g2-0, ...), so that the old ones can be
stopped and kept while the new ones take over with RESUME_FROM (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def split(partitions: int, spouts: int) -> list[str]:
    """Contiguous ranges, as even as they come: 6 over 3 is 0-1, 2-3, 4-5."""
    ranges, start = [], 0
    for index in range(spouts):
        size = partitions // spouts + (index < partitions % spouts)
        ranges.append(f"{start}-{start + size - 1}" if size > 1 else str(start))
        start += size
    return ranges


def specs(spouts: int, partitions: int, generation: int = 1,
          resume_from: list[str] | None = None, project: str = "default") -> dict[str, dict]:
    """{file name: spec}: one spout pipeline per range, and the union pipeline."""
    base = json.loads((ROOT / "pipeline-v2.json").read_text())
    prefix = base["pipeline"]["name"] + ("" if generation == 1 else f"-g{generation}")
    out: dict[str, dict] = {}
    names = []
    for index, owned in enumerate(split(partitions, spouts)):
        spec = copy.deepcopy(base)
        name = f"{prefix}-{index}"
        names.append(name)
        spec["pipeline"]["name"] = name
        spec["description"] = (f"Partitions {owned} of the topic, exactly once, one of "
                               f"{spouts} spouts that split it (demo/sharded).")
        env = spec["transform"]["env"]
        env["PARTITIONS"] = owned
        env["GROUP_ID"] = name
        if resume_from:
            env["RESUME_FROM"] = ",".join(f"{project}/{repo}@master" for repo in resume_from)
        out[f"{name}.json"] = spec
    out[f"{prefix}-union.json"] = {
        "pipeline": {"name": f"{prefix}-union", "project": {"name": project}},
        "description": "The split spouts' repos read as one dataset: a union of their files.",
        "input": {"union": [{"pfs": {"repo": name, "glob": "/*/*", "name": "events"}}
                            for name in names]},
        "transform": {"image": "alpine:3.20",
                      "cmd": ["sh", "-c", "cp -r /pfs/events/. /pfs/out/"]},
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spouts", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--resume-from", help="the old split's repos, comma-separated")
    parser.add_argument("--out", default="build/sharded")
    args = parser.parse_args()
    if not 0 < args.spouts <= args.partitions:
        parser.error("--spouts must be between 1 and --partitions")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resume = args.resume_from.split(",") if args.resume_from else None
    for name, spec in specs(args.spouts, args.partitions, args.generation, resume).items():
        (out / name).write_text(json.dumps(spec, indent=2) + "\n")
        print(out / name)


if __name__ == "__main__":
    main()
