"""Add finished runs to benchmarks/results/seed001/runs.jsonl, keeping every run it holds.

    python benchmarks/seed001/merge_runs.py FILES_AT                # a device call's export (FILES_AT/runs.jsonl)
    python benchmarks/seed001/merge_runs.py /tmp/seed001cpu         # a sweep folder here (its runs/*/results.json)

A run already in runs.jsonl is kept as it is; a new one is appended. The file is rewritten atomically.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from unipelt.sweep import export_runs, load_spec

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "benchmarks/results/seed001/runs.jsonl"
SPEC = ROOT / "benchmarks/seed001/spec.yaml"


def records(source: Path) -> list[tuple[str, str]]:
    """(run name, line) of each finished run in an --export-runs file, a device call's files_at folder (its
    runs.jsonl) or a sweep folder made here (exported with the sweep's own export_runs)."""
    if (source / "runs").is_dir():
        with tempfile.TemporaryDirectory() as folder:
            exported = Path(folder) / "runs.jsonl"
            export_runs(load_spec(SPEC), source, exported)
            return records(exported)
    if source.is_dir():
        source = source / "runs.jsonl"
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
