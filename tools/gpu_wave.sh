#!/usr/bin/env bash
# The GPU runs of this wave's measurement issue, one stage per device call (a call may run for 10
# minutes at most). Run from the repository root on the GPU machine:
#
#   bash tools/gpu_wave.sh STAGE [STAGE...]
#
# Each stage fits one call (its commands' timeouts add up to under 10 minutes with the machine's
# set-up); the exit status counts the commands that failed.
#
# Stages (figures land in $OUT, default ./gpu-out):
#   decode   bench_offline (Llama-3-8B shape B=1, Llama-3.2-1B shape B=1,128; MBU against a read
#            ceiling and a copy ceiling measured in the same run) and the dense JAX baseline
#            (.gpu/dense_jax_decode.py, a copy of the peers' script beside the checkout) on the same shapes
#   kernels  the attention decode sweep (B 1/8/32/128, contexts 4k/8k) and the compiled GPU tests
#   serving  a random-weight Gemma 3 270M-shape checkpoint (Gemma's tokenizer from .gpu/gemma-tok),
#            `jaxgen serve` at saturation through gRPC and HTTP against the offline engine
#   batch    `jaxgen batch` against the offline engine on the same checkpoint (built if missing)
#   spec     speculative decoding with the real Gemma 3 270M and SmolLM2 GGUFs in bfloat16, and
#            the default dtype ("auto") of a served model (SPEC_MODELS=smol or gemma: one of them)
#
# Inputs that cannot be committed travel as ignored paths (`run`'s carry): .whl/ (wheels the
# machine lacks, installed into /tmp/site), .gpu/gemma-N and .gpu/smol-N (pieces of the GGUFs of
# Gemma 3 270M and SmolLM2-135M: each is over one call's transfer limit), .gpu/gemma-tok,
# .gpu/dense_jax_decode.py. The spec stage runs the models whose pieces have all arrived.
# A carried path is there for its own call only (the next call's checkout lacks it): carry
# .gpu/gemma-tok with the stage that builds the bench checkpoint, and .whl with the first call.
# What the script writes outside the checkout (/tmp/w, /tmp/site) stays while the machine is
# warm, so GGUF pieces may arrive one per call, each call running a stage.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/w
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # again each call: a later call may bring more wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/tools
for f in .gpu/gemma-[0-9]* .gpu/smol-[0-9]*; do [ -f "$f" ] && cp "$f" /tmp/w/; done
ls -la /tmp/w
step() { echo "=== $* ($(date -u +%T))"; }
failures=0
run() {  # SECONDS CMD...: runs it under a timeout, counting a failure
  timeout "$@" || { echo "FAILED ($?): ${*:2}"; failures=$((failures + 1)); }
}
bench_checkpoint() {  # the random-weight Gemma 3 270M-shape checkpoint of the serving preset
  [ -d .bench/gemma3-270m ] || timeout 100 python3 tools/make_bench_checkpoint.py \
    --shape gemma3-270m --tokenizer .gpu/gemma-tok --out .bench/gemma3-270m
}

# The GGUFs travel in pieces (.gpu/gemma-N, .gpu/smol-N): each is over one call's transfer limit.
GEMMA_BYTES=253113024
SMOL_BYTES=98362432
assemble() {  # $1: piece prefix, $2: expected bytes, $3: output; fails unless every piece is here
  [ -f "$3" ] && return 0
  ls /tmp/w/"$1"-* >/dev/null 2>&1 || return 1
  cat $(ls /tmp/w/"$1"-* | sort -V) > "$3.part"
  if [ "$(stat -c %s "$3.part")" != "$2" ]; then
    echo "$1: pieces add up to $(stat -c %s "$3.part") bytes, expected $2"; rm "$3.part"; return 1
  fi
  mv "$3.part" "$3"; sha256sum "$3"
}

wait_health() {  # $1: HTTP port; $2: seconds
  for _ in $(seq "$2"); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$1/health', timeout=2)" \
      2>/dev/null && return 0
    sleep 1
  done
  return 1
}

for stage in "$@"; do
  step "stage $stage"
  case $stage in
  decode)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
    run 180 python3 tools/bench_offline.py --models llama-3-8b --batches 1 --reps 2 \
      --out "$OUT/offline.jsonl"
    run 150 python3 tools/bench_offline.py --models llama-3.2-1b --batches 1,128 --reps 2 \
      --out "$OUT/offline.jsonl"
    run 180 python3 .gpu/dense_jax_decode.py --out "$OUT/dense.jsonl" \
      --models llama-3-8b,llama-3.2-1b --batches 1,128 --variants step,loop16 --reps 3
    ;;
  kernels)
    run 280 python3 tools/bench_attention.py --mode decode --batches 1,8,32,128 \
      --contexts 4096,8192 --heads 32/8/128 --page-sizes 16 --backends gpu,reference \
      --out "$OUT/attention.jsonl"
    JAX_PLATFORMS=cuda run 200 python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_attention_gpu.py
    ;;
  serving)
    bench_checkpoint || exit 1
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
    python3 -m jaxgen.cli serve --config configs/serving/gemma3-270m-bench-gpu.json --port 50051 --http-port 8000 \
      --metrics-port 9100 > "$OUT/server.log" 2>&1 &
    spid=$!
    if wait_health 8000 180; then
      # --server-pid: the front end's process, whose CPU per streamed chunk is reported
      run 270 python3 tools/bench_serving.py --api both --concurrency 128 --num-requests 2048 \
        --max-seconds 100 --max-prompt-tokens 1024 --max-output-tokens 512 --server-pid $spid \
        --offline-config configs/serving/gemma3-270m-bench-gpu.json --out-json "$OUT/serving.json"
    else
      echo "server not healthy in 180 s"; tail -30 "$OUT/server.log"; failures=$((failures + 1))
    fi
    kill -TERM $spid
    for _ in $(seq 30); do kill -0 $spid 2>/dev/null || break; sleep 1; done
    kill -KILL $spid 2>/dev/null && echo "server killed after 30 s of drain"
    wait $spid; echo "server exit $?"
    grep -i "warm-up\|error\|traceback" "$OUT/server.log" | head -10
    ;;
  batch)
    bench_checkpoint || exit 1
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
    run 300 python3 tools/bench_batch.py --model .bench/gemma3-270m --lines 1024 \
      --max-tokens 256 --reps 2 -- --config configs/serving/gemma3-270m-bench-gpu.json
    ;;
  spec)
    # SPEC_MODELS=smol or gemma: that model alone (one call may not hold both models' runs)
    models=""
    [ "${SPEC_MODELS:-smol}" = smol ] && assemble smol $SMOL_BYTES /tmp/w/smollm2.gguf \
      && models=/tmp/w/smollm2.gguf
    [ "${SPEC_MODELS:-gemma}" = gemma ] && assemble gemma $GEMMA_BYTES /tmp/w/gemma.gguf \
      && models=/tmp/w/gemma.gguf,$models
    [ -n "$models" ] || { echo "no model has all its pieces here"; exit 1; }
    run 60 python3 - "${models%%,*}" <<'EOF'
import sys

import jax
from jaxgen.build import load_model
from jaxgen.cli import parser
from jaxgen.config_sources import config_from_args
config = config_from_args(parser().parse_args(["serve", "--model", sys.argv[1]]), "serve")
loaded, _ = load_model(config)
print("default dtype:", config.model.dtype, "->", loaded.model.config.dtype,
      {str(x.dtype) for x in jax.tree.leaves(loaded.params)}, jax.devices()[0].device_kind)
EOF
    run 540 python3 tools/bench_speculative.py --models "${models%,}" \
      --batches 1,8 --prompts 2 --max-tokens 128 --reps 2 --dtype bfloat16 \
      --out-json "$OUT/speculative.json"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
step "done: $failures command(s) failed"
exit $((failures > 0))
