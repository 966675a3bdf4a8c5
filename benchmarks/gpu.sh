#!/usr/bin/env bash
# One prepared run of the GPU benchmarks and checks (about 6-7 minutes on an H100/H200).
#
# Run as root in the repository root, no network needed:
#
#     bash benchmarks/gpu.sh                 # writes to $OUT, or ./gpu-results if OUT is unset
#
# Dry run on a CPU-only machine (tiny models, seconds per step), to check the script itself:
#
#     DEVICE=cpu EXTRA="--quick --threads 1 --no-memory" bash benchmarks/gpu.sh
#
# Needs python3 with torch (CUDA), torchvision and transformers. Zennit is optional: when a wheel
# named zennit-*.whl lies in $ZENNIT_WHEEL_DIR (default: .whl/, wheels/ or shared/wheels/), it is
# installed with --no-deps --no-index into /tmp/zennit-pkgs, put on PYTHONPATH; without it the
# Zennit columns stay empty. Every step runs under `timeout`, so one slow step cannot eat the
# budget; a failed or timed-out step is recorded in $OUT/summary.txt and the script goes on, and
# exits 1 at the end if any step failed. Each benchmark rewrites its JSON / Markdown after every
# row, so a killed step still leaves the rows it finished.
#
# Afterwards, on any machine, merge the runs into one report (and a chart, needs matplotlib):
#
#     PYTHONPATH=src python benchmarks/speed.py --render gpu-results/speed_*.json \
#         gpu-results/overhead.json --out docs/performance.md --plot docs/performance.png

set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
CHECK_ARGS=()
[ "$DEVICE" = cpu ] && CHECK_ARGS=(--cpu-only --threads 1)
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

step() { # step NAME TIMEOUT_S COMMAND...: run under timeout, log to $OUT/NAME.log
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        echo "--- $name ok in ${took}s" | tee -a "$SUMMARY"
    else
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && rc="$rc (TIMED OUT)"
        echo "--- $name FAILED rc=$rc after ${took}s (see $OUT/$name.log)" | tee -a "$SUMMARY"
        FAILED=$((FAILED + 1))
    fi
}

# --- environment ---------------------------------------------------------------------------------
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    "$PY" -c 'import torchvision, transformers; print("torchvision", torchvision.__version__, "transformers", transformers.__version__)'
    git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.log"

WHEEL_DIRS="${ZENNIT_WHEEL_DIR:-.whl wheels shared/wheels}"
for d in $WHEEL_DIRS; do
    for w in "$d"/zennit-*.whl; do
        [ -f "$w" ] || continue
        echo "installing $w (no deps, no index) into /tmp/zennit-pkgs" | tee -a "$SUMMARY"
        if "$PY" -m pip install --quiet --no-deps --no-index --target "/tmp/zennit-pkgs" "$w"; then
            export PYTHONPATH="$PYTHONPATH:/tmp/zennit-pkgs"
        else
            echo "zennit wheel $w did not install; Zennit columns stay empty" | tee -a "$SUMMARY"
        fi
        break 2
    done
done

# --- correctness on CUDA (fp32, bf16, every SDPA backend) ---------------------------------------
step gpu_check 60 "$PY" benchmarks/gpu_check.py "${CHECK_ARGS[@]}" --json "$OUT/gpu_check.json"
step gpu_branches 30 "$PY" benchmarks/gpu_branches.py --device "$DEVICE"

# --- speed and memory: CNNs / ViT at batch 1 and 8, BERT / Llama-150M at 128 and 512 tokens ------
MODELS=vgg16,resnet50,vit_b_16,bert,llama150m
step speed_fp32 110 "$PY" benchmarks/speed.py --device "$DEVICE" --dtype float32 --models "$MODELS" \
    --batch 1,8 --seq 128,512 --repeats 5 "${EXTRA_ARGS[@]}" \
    --json "$OUT/speed_fp32.json" --out "$OUT/speed_fp32.md"
step speed_bf16 150 "$PY" benchmarks/speed.py --device "$DEVICE" --dtype bfloat16 --models "$MODELS" \
    --batch 1,8 --seq 128,512 --repeats 5 "${EXTRA_ARGS[@]}" \
    --json "$OUT/speed_bf16.json" --out "$OUT/speed_bf16.md"

# --- the ~1B Llama (hidden 2048, 16 layers, GQA 32/8 heads) in bf16 at 512 tokens ----------------
step speed_llama1b 60 "$PY" benchmarks/speed.py --device "$DEVICE" --dtype bfloat16 --models llama1b \
    --seq 512 --repeats 5 "${EXTRA_ARGS[@]}" \
    --json "$OUT/speed_llama1b.json" --out "$OUT/speed_llama1b.md"

# --- Python overhead per graph node (a chain of tiny ops) -----------------------------------------
step overhead 90 "$PY" benchmarks/speed.py --device "$DEVICE" --overhead --nodes 1000,4000,16000 \
    --repeats 3 "${EXTRA_ARGS[@]}" --json "$OUT/overhead.json" --out "$OUT/overhead.md"

# --- one report of everything that finished -------------------------------------------------------
JSONS=()
for name in speed_fp32 speed_bf16 speed_llama1b overhead; do
    [ -f "$OUT/$name.json" ] && JSONS+=("$OUT/$name.json")
done
if [ "${#JSONS[@]}" -gt 0 ]; then
    step render 20 "$PY" benchmarks/speed.py --render "${JSONS[@]}" --out "$OUT/performance.md"
fi

echo "=== done in ${SECONDS}s; failed or timed-out steps: $FAILED" | tee -a "$SUMMARY"
[ "$FAILED" -eq 0 ]
