#!/usr/bin/env bash
# One device call of the seed001 sweep, from the repository root on the GPU machine:
#   run(command="bash benchmarks/seed001/device_call.sh --settings k100,k1000 --deadline 500",
#       carry=[".devcarry"], kind="nvidia-h100-x1")
# It unpacks the data and MiniLM carried in .devcarry/ (pack.py), takes the runs finished in earlier calls
# (benchmarks/results/seed001/runs.jsonl, tracked, so it travels with the working tree) so they are not run
# again, runs the sweep until --deadline, and brings back every finished run as $OUT/runs.jsonl (results
# only: a machine keeps nothing after the call, and a run folder with its model is far over the 64 MiB a call
# returns). Arguments go to `unipelt sweep` (--settings, --tasks, --methods, --seeds, --deadline, --jobs,
# --start-late); --deadline counts from this script's start, so unpacking and importing are inside it. The sweep
# keeps $OUT/runs.jsonl current after each finished run: a call the time limit kills still brings back what it
# finished (a call whose limit the budget had cut below its deadline once brought back nothing).
# Back here: bash benchmarks/seed001/land.sh FILES_AT
set -uo pipefail
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--deadline" ] && [ $# -gt 1 ]; then deadline=$2; shift 2; continue; fi
  args+=("$1"); shift
done
bash benchmarks/seed001/unpack.sh /tmp/s >/dev/null || exit 1
export PYTHONPATH=$PWD/src UNIPELT_CACHE=/tmp/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
runs=benchmarks/results/seed001/runs.jsonl
sweep=(python3 -m unipelt.cli sweep benchmarks/seed001/spec.yaml --data-dir /tmp/s/data --model /tmp/s/minilm
       --out /tmp/seed001)
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'torch', torch.__version__)"
if [ -f "$runs" ]; then "${sweep[@]}" --report-only --import-runs "$runs" | head -1; fi
if [ -n "${deadline:-}" ]; then
  left=$(python3 -c "print(max(1, $deadline - $SECONDS))")
  echo "deadline: $left s left of $deadline after $SECONDS s of setup"
  args+=(--deadline "$left")
fi
# the sweep writes its report and prints "exported N finished runs" last; $OUT/runs.jsonl is current throughout
"${sweep[@]}" --jobs 15 "${args[@]}" --export-runs "$OUT/runs.jsonl" | grep --line-buffered -v '^done '
