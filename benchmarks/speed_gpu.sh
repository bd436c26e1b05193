#!/usr/bin/env bash
# Issue 5's GPU figures. Measured durations on an H100 (plan the 10-minute calls by them): BERT-base eager
# with --profile ~12-20 s a case (all methods and peers ~9.5 min); LLaMA-1B eager ~30 s a case (all ~11 min:
# split with --methods); compiled BERT-base ~60 s a case cold, ~50 s after --prewarm (each case reports
# first_step_s and its compile-cache hits, to find where that time goes). Fifth session: with --optimizer fused
# and --prewarm N (N = the case count), about 35 s a compiled case plus 70-120 s of prewarm: 10-11 cases a call.
# Every GPU case also times its steps back to back (a third table); --compile-scope step compiles the whole
# training step instead of the model. Sixth session: --inductor NAME=VALUE sets torch._inductor.config options
# in every case; --profile --top-kernels 10000 keeps each case's full kernel list; --compile max-autotune
# compiles for about 70 s a case (four at a time); benchmarks/peak_trace.py lists what is alive at a case's peak.
# Ninth session: every case also reports its peak of requested bytes (the tensors' own size) beside
# max_memory_allocated, and records the PYTORCH_CUDA_ALLOC_CONF it inherited. Tenth session: under
# expandable_segments:True max_memory_allocated follows the requested bytes and CUDA graphs run; every
# method with a peer took three calls of about 8 min (runs 42-44). The memory rows, about 6 min
# cold (8 cases, prewarm 75 s):
#   device run: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bash benchmarks/speed_gpu.sh bert-base \
#                    --methods lora parallel mam --compile reduce-overhead --optimizer fused --prewarm 8 --no-full
# Eleventh session: the fused bottleneck kernels against the unfused adapters, one speed run each in the same
# call (UNIPELT_FUSED=0 turns them off; about 140 s a run of three compiled cases, cold), then the kernel
# benchmark and the model check (about 45 s and 70 s a method):
#   device run: for v in 1 0; do UNIPELT_FUSED=$v OUT=$OUT/fused$v PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
#                    bash benchmarks/speed_gpu.sh bert-base --peers --methods houlsby pfeiffer \
#                    --compile reduce-overhead --optimizer fused --prewarm 3 --no-full; done
#   device run: PYTHONPATH=src python benchmarks/fused_bottleneck.py --bottlenecks 48 128 --activations silu relu
#   device run: PYTHONPATH=src python benchmarks/fused_model_check.py houlsby compacter
# Twelfth session: UniPELT's gated adapter the same way (--methods unipelt, every kernel with --top-kernels 10000),
# and the kernels with and without the gate:
#   device run: PYTHONPATH=src python benchmarks/fused_bottleneck.py --bottlenecks 48 24 --activations relu --gates off on
# Thirteenth session: every BERT-base method in three calls of about 490 s each (a group, its own floor):
#   device run: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bash benchmarks/speed_gpu.sh bert-base --peers \
#                    --no-full --compile reduce-overhead --optimizer fused --prewarm 5 --profile --top-kernels 40 \
#                    --methods lora prefix prefix_mlp prompt ia3 ln pfeiffer houlsby parallel
#               (then mam unipelt compacter compacter++ phm_adapter krona krona_ffn kadaptation, then
#                adapter_bias sparse_adapter rational poly poly_s poly_mu attempt lora_fold)
# Fourteenth session: the methods above the line with their host time per step (run 67, about 310 s), one
# adapter's kernels at Compacter's shape (run 68, about 90 s) and where a step's host time goes (about 150 s):
#   device run: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bash benchmarks/speed_gpu.sh bert-base --peers \
#                    --no-full --compile reduce-overhead --optimizer fused --prewarm 8 --profile --top-kernels 40 \
#                    --methods kadaptation compacter phm_adapter unipelt houlsby mam lora pfeiffer
#   device run: PYTHONPATH=src python benchmarks/fused_bottleneck.py --bottlenecks 24 32 48 --activations gelu \
#                    --weight-dtypes float32 bfloat16
#   device run: PYTHONPATH=src python benchmarks/step_phases.py --host-profile --methods - lora unipelt
# Fifteenth session: the gated adapter's kernels (run 72, about 80 s with HEAD's beside) and UniPELT (runs 72-73,
# about 100 s a case with its floor; HEAD's src from git archive on PYTHONPATH for the before):
#   device run: PYTHONPATH=src python benchmarks/fused_bottleneck.py --bottlenecks 24 48 --activations relu \
#                    --gates off on
#   device run: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bash benchmarks/speed_gpu.sh bert-base --peers \
#                    --no-full --compile reduce-overhead --optimizer fused --prewarm 8 --profile --top-kernels 40 \
#                    --methods unipelt                 (runs 75-76, Poly's tries: --methods poly poly_s poly_mu)
# Sixteenth session: the methods above the line beside what bounds them (runs 77-79, about 300 s a call of 6-7
# cases): the floor at a prompt's length (a "+20" floor case, added for methods with "tokens" in METHODS), MAM's
# parts (mam_prefix, parallel) and UniPELT's (lora, prefix_mlp, pfeiffer, and unipelt_ungated: the same parts, no
# gates); then where UniPELT's host time goes beside the ungated parts' (about 100 s):
#   device run: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bash benchmarks/speed_gpu.sh bert-base --peers \
#                    --no-full --compile reduce-overhead --optimizer fused --prewarm 8 --profile --top-kernels 80 \
#                    --methods prompt attempt mam mam_prefix parallel
#               (then --methods unipelt unipelt_ungated lora prefix_mlp pfeiffer)
#   device run: PYTHONPATH=src python benchmarks/step_phases.py --host-profile --methods unipelt unipelt_ungated
#   device run: bash benchmarks/speed_gpu.sh bert-base                 (carry .whl: the adapters wheels, see below)
#   device run: bash benchmarks/speed_gpu.sh llama-1b
#   device run: bash benchmarks/speed_gpu.sh bert-base --compile reduce-overhead --prewarm 8   (every case compiled)
#   device run: bash benchmarks/speed_gpu.sh bert-base --peers --methods krona krona_ffn kadaptation adapter_bias \
#                    sparse_adapter rational poly poly_s compacter++ phm_adapter   (the methods no peer has)
#   device run: bash benchmarks/speed_gpu.sh vit-base --peers peft --methods vpt vpt_deep kadaptation lora ln
#                    (ViT-B/16, batch 32 x 197 tokens; ATTEMPT and poly_mu: add them on bert-base)
# Extra arguments go to benchmarks/speed.py. Every finished case is also appended to
# $OUT/speed_<shape>.cases.jsonl at once, so a run cut short by the call's time limit keeps its cases
# (python benchmarks/speed.py --from-cases FILE --device-name NAME makes its table).
# The adapters peer needs adapters==1.3.0, transformers==4.57.6, tokenizers==0.22.2 and
# huggingface_hub==0.36.2 (and requests, charset-normalizer, idna, urllib3, certifi, which hub 0.36 imports)
# as Python 3.12 wheels in .whl (pip download ... -d .whl, see the device README);
# they are installed into /tmp/adapters-env, apart from the machine's own transformers.
set -euo pipefail
shape=${1:-bert-base}
shift || true
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-out/speed_gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
# the methods the table has, UniPELT first (the slowest to reach its target)
methods=(--methods unipelt mam lora prefix prefix_mlp prompt ia3 ln pfeiffer houlsby parallel compacter)
if [ "$shape" = llama-1b ]; then methods=(--methods unipelt lora prefix prefix_mlp prompt ia3 ln pfeiffer); fi
if [ "$shape" = vit-base ]; then methods=(--methods vpt vpt_deep kadaptation lora ia3 ln); fi
python benchmarks/speed.py --shape "$shape" "${methods[@]}" --steps 20 --warmup 5 --device cuda --profile \
    --adapters-env /tmp/adapters-env --adapters-wheels .whl --out "$out/speed_${shape}.json" "$@" 2>&1 \
    | tee "$out/${shape}.log"
