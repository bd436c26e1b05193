#!/usr/bin/env bash
# One device call of the seed001 sweep, from the repository root on the GPU machine:
#   run(command="bash benchmarks/seed001/device_call.sh --settings k100,k1000 --deadline 500",
#       carry=[".devcarry"], kind="nvidia-h100-x1")
# It unpacks the data and MiniLM carried in .devcarry/ (pack.py), takes the runs finished in earlier calls
# (benchmarks/results/seed001/runs.jsonl, tracked, so it travels with the working tree) so they are not run
# again, runs the sweep until --deadline, and brings back every finished run as $OUT/runs.jsonl (results
# only: a machine keeps nothing after the call, and a run folder with its model is far over the 64 MiB a call
# returns). Arguments go to `unipelt sweep` (--settings, --tasks, --methods, --seeds, --deadline, --jobs).
# Back here: bash benchmarks/seed001/land.sh FILES_AT
set -uo pipefail
bash benchmarks/seed001/unpack.sh /tmp/s >/dev/null || exit 1
export PYTHONPATH=$PWD/src UNIPELT_CACHE=/tmp/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
runs=benchmarks/results/seed001/runs.jsonl
sweep=(python3 -m unipelt.cli sweep benchmarks/seed001/spec.yaml --data-dir /tmp/s/data --model /tmp/s/minilm
       --out /tmp/seed001)
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'torch', torch.__version__)"
if [ -f "$runs" ]; then "${sweep[@]}" --report-only --import-runs "$runs" | head -1; fi
"${sweep[@]}" --jobs 15 "$@" | grep --line-buffered -v '^done '
"${sweep[@]}" --report-only --export-runs "$OUT/runs.jsonl" | tail -1
