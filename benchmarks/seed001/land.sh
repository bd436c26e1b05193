#!/usr/bin/env bash
# Here, after a device call of device_call.sh: keep the runs it brought back and rebuild the report.
#   bash benchmarks/seed001/land.sh FILES_AT
#   bash benchmarks/seed001/land.sh /tmp/seed001cpu   # or a sweep folder of runs made here
set -euo pipefail
back=${1:?the files_at folder of the device call, or a sweep folder}
results=benchmarks/results/seed001
# the returned file holds the runs carried in and the new ones; a run already here is kept (merge_runs.py)
python benchmarks/seed001/merge_runs.py "$back"
rm -rf out/seed001
unipelt sweep benchmarks/seed001/spec.yaml --data-dir "${UNIPELT_DATA_DIR:-../shared/data}" --out out/seed001 --import-runs "$results/runs.jsonl" --report-only
cp out/seed001/summary.json out/seed001/table.txt out/seed001/plot.png "$results/"
