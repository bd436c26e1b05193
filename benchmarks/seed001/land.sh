#!/usr/bin/env bash
# Here, after a device call of device_call.sh: keep the runs it brought back and rebuild the report.
#   bash benchmarks/seed001/land.sh FILES_AT
set -euo pipefail
back=${1:?the files_at folder of the device call}
results=benchmarks/results/seed001
# the returned file holds every finished run (those carried in and the new ones): it supersedes ours,
# unless it is smaller (a call that failed before exporting)
if [ -f "$results/runs.jsonl" ] && [ "$(wc -l <"$back/runs.jsonl")" -lt "$(wc -l <"$results/runs.jsonl")" ]; then
    echo "$back/runs.jsonl has fewer runs than $results/runs.jsonl; not taken" >&2; exit 1
fi
cp "$back/runs.jsonl" "$results/runs.jsonl.tmp" && mv "$results/runs.jsonl.tmp" "$results/runs.jsonl"
rm -rf out/seed001
unipelt sweep benchmarks/seed001/spec.yaml --data-dir "${UNIPELT_DATA_DIR:-../shared/data}" --out out/seed001 --import-runs "$results/runs.jsonl" --report-only
cp out/seed001/summary.json out/seed001/table.txt out/seed001/plot.png "$results/"
