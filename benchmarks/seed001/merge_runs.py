"""Add finished runs to benchmarks/results/seed001/runs.jsonl, keeping every run it holds.

    python benchmarks/seed001/merge_runs.py FILES_AT/runs.jsonl     # a device call's export
    python benchmarks/seed001/merge_runs.py /tmp/seed001cpu         # a sweep folder here (its runs/*/results.json)

A run already in runs.jsonl is kept as it is; a new one is appended. The file is rewritten atomically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parents[2] / "benchmarks/results/seed001/runs.jsonl"


def records(source: Path) -> list[tuple[str, str]]:
    """(run name, line) of each finished run in an --export-runs file or a sweep folder."""
    if source.is_dir():
        found = sorted((source / "runs").glob("*/*/*/seed*/results.json"))
        return [(str(p.parent.relative_to(source / "runs")),
                 json.dumps({"run": str(p.parent.relative_to(source / "runs")),
                             "results": json.loads(p.read_text())}, separators=(",", ":"))) for p in found]
    return [(json.loads(line)["run"], line) for line in source.read_text().splitlines() if line.strip()]


def main(sources: list[str]) -> None:
    kept = records(RUNS) if RUNS.exists() else []
    names = {name for name, _ in kept}
    added = []
    for source in sources:
        for name, line in records(Path(source)):
            if name not in names:
                names.add(name)
                added.append((name, line))
    temporary = RUNS.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(line + "\n" for _, line in kept + added))
    os.replace(temporary, RUNS)
    print(f"{len(kept)} runs kept, {len(added)} added: {', '.join(n for n, _ in added) or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:])
