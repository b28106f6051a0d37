#!/usr/bin/env bash
# GPU benchmarks of nnseg, side by side with PyTorch when it is installed.
#
#   scripts/bench_gpu.sh                         # ops + 3d_fullres + 2d, 20 timed steps each
#   scripts/bench_gpu.sh --configs 2d --iters 10 --skip-ops
#   scripts/bench_gpu.sh --compile               # PyTorch side with torch.compile (nnU-Net default)
#   scripts/bench_gpu.sh --torch-bf16            # PyTorch autocast bf16 (nnseg's precision) instead of fp16
#
# 1. Op benchmarks: the conv bench (`cargo bench --bench conv`) on the GPU (NNSEG_BENCH_DEVICE=cuda,
#    NNSEG_BENCH_QUICK=1). Uses $NNSEG_BENCH_CONV_BIN, or builds it with cargo when cargo is here
#    (features $NNSEG_CUDA_FEATURES, default cudnn as scripts/build_cuda.sh).
# 2. Training step of nnU-Net's PlainConvUNet at its typical plans (forward + backward + SGD
#    Nesterov step, DC+CE loss with deep supervision, grad clipping), iterations/s and peak memory:
#      3d_fullres: patch 128x128x128, batch 2, features 32,64,128,256,320,320
#      2d:         patch 512x512, batch 12, features 32,64,128,256,512,512,512
#    nnseg side: `nnseg bench_train --config <cfg> --device cuda --json` (bf16 mixed precision:
#    `--amp auto` is on for CUDA; the JSON's `precision` says which).
#    PyTorch side (if `import torch` works and sees a GPU): scripts/bench_torch_unet.py, the same
#    network and step in plain torch with AMP, as nnU-Net trains.
# 3. A table with the step-time ratio nnseg / PyTorch.
# Peak memory: nnseg's own report if it has one, and the peak of `nvidia-smi` memory.used sampled
# every 100 ms during each run (whole GPU: run on an otherwise idle GPU).
# Env: NNSEG_BIN (CUDA nnseg; default as scripts/run_cuda.sh finds it), NNSEG_BENCH_CONV_BIN,
#      PYTHON (with torch; default python3), NNSEG_BENCH_OUT (default bench_gpu_out/<UTC time>),
#      NNSEG_BENCH_TIMEOUT (seconds per run, default 900), CUDA_VISIBLE_DEVICES.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
here="$PWD"

configs="3d_fullres 2d"
iters=20
warmup=5
do_ops=1
do_torch=1
compile=""
amp_dtype=()
while [ $# -gt 0 ]; do
    case "$1" in
        --configs) configs="$2"; shift ;;
        --iters) iters="$2"; shift ;;
        --warmup) warmup="$2"; shift ;;
        --skip-ops) do_ops=0 ;;
        --skip-torch) do_torch=0 ;;
        --compile) compile="--compile" ;;
        --torch-bf16) amp_dtype=(--amp-dtype bf16) ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "bench_gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

out="${NNSEG_BENCH_OUT:-$here/bench_gpu_out/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
tmo="${NNSEG_BENCH_TIMEOUT:-900}"
py="${PYTHON:-python3}"
echo "== results in $out"

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv | tee "$out/gpu.txt"
else
    echo "bench_gpu.sh: warning: nvidia-smi not found (no peak-memory sampling)" >&2
fi

# nvidia-smi memory.used poller: start_poll <file>; stop_poll sets $peak (max MiB)
poll_pid=""
start_poll() {
    poll_file="$1"
    : >"$poll_file"
    if command -v nvidia-smi >/dev/null 2>&1; then
        idx="${CUDA_VISIBLE_DEVICES:-0}"; idx="${idx%%,*}"
        nvidia-smi -i "$idx" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$poll_file" 2>/dev/null &
        poll_pid=$!
    fi
}
stop_poll() {  # sets $peak
    if [ -n "$poll_pid" ]; then
        kill "$poll_pid" 2>/dev/null; wait "$poll_pid" 2>/dev/null
        poll_pid=""
    fi
    peak="$(sort -n "$poll_file" 2>/dev/null | tail -n1)"
}
# add_peak <json file> <MiB>: stores the nvidia-smi peak in the result's last JSON line
add_peak() {
    [ -n "$2" ] && [ -s "$1" ] || return 0
    "$py" - "$1" "$2" <<'EOF' || true
import json, sys
fn, peak = sys.argv[1], float(sys.argv[2])
lines = open(fn).read().splitlines()
for i in range(len(lines) - 1, -1, -1):
    if lines[i].strip().startswith("{"):
        d = json.loads(lines[i]); d["nvidia_smi_peak_mib"] = peak; lines[i] = json.dumps(d); break
open(fn, "w").write("\n".join(lines) + "\n")
EOF
}

# ---- 1. op benchmarks ----------------------------------------------------------------------------
if [ "$do_ops" = 1 ]; then
    conv_bin="${NNSEG_BENCH_CONV_BIN:-}"
    if [ -z "$conv_bin" ] && command -v cargo >/dev/null 2>&1; then
        feats="${NNSEG_CUDA_FEATURES:-cudnn}"
        echo "== building the conv bench with --features $feats"
        eval "$(scripts/build_cuda.sh --env)"
        conv_bin="$(cargo bench --features "$feats" --bench conv --no-run --message-format=json 2>"$out/conv_build.log" \
            | "$py" -c 'import json,sys
exe=[json.loads(l).get("executable") for l in sys.stdin if l.startswith("{")]
exe=[e for e in exe if e]
print(exe[-1] if exe else "")')"
    fi
    if [ -n "$conv_bin" ] && [ -x "$conv_bin" ]; then
        echo "== op benchmarks on the GPU ($conv_bin)"
        NNSEG_BIN="$conv_bin" NNSEG_BENCH_DEVICE=cuda NNSEG_BENCH_QUICK=1 \
            timeout "$tmo" scripts/run_cuda.sh --bench 2>&1 | tee "$out/ops.txt"
    else
        echo "== op benchmarks skipped: no conv bench binary (set NNSEG_BENCH_CONV_BIN or install cargo)"
    fi
fi

# ---- 2. training steps ---------------------------------------------------------------------------
have_torch=0
if [ "$do_torch" = 1 ] && "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    have_torch=1
elif [ "$do_torch" = 1 ]; then
    echo "== PyTorch with CUDA not found for $py: nnseg side only (set PYTHON=/path/to/python)"
fi

for cfg in $configs; do
    echo "== $cfg: nnseg (--amp auto: bf16)"
    start_poll "$out/smi_nnseg_$cfg.txt"
    timeout "$tmo" scripts/run_cuda.sh bench_train --config "$cfg" --device cuda \
        --iters "$iters" --warmup "$warmup" --json >"$out/nnseg_$cfg.json" 2>"$out/nnseg_$cfg.log"
    rc=$?
    stop_poll
    if [ $rc -ne 0 ]; then
        echo "   nnseg failed (rc $rc), see $out/nnseg_$cfg.log:"; tail -n 5 "$out/nnseg_$cfg.log"
        printf '{"side": "nnseg", "config": "%s", "error": "rc %s (see nnseg_%s.log)"}\n' "$cfg" "$rc" "$cfg" >>"$out/nnseg_$cfg.json"
    else
        add_peak "$out/nnseg_$cfg.json" "$peak"
        tail -n1 "$out/nnseg_$cfg.json"
    fi
    if [ "$have_torch" = 1 ]; then
        echo "== $cfg: PyTorch (AMP${compile:+, compile})"
        start_poll "$out/smi_torch_$cfg.txt"
        timeout "$tmo" "$py" scripts/bench_torch_unet.py --config "$cfg" --iters "$iters" --warmup "$warmup" \
            $compile ${amp_dtype[@]+"${amp_dtype[@]}"} >"$out/torch_$cfg.json" 2>"$out/torch_$cfg.log"
        rc=$?
        stop_poll
        if [ $rc -ne 0 ]; then
            echo "   PyTorch failed (rc $rc), see $out/torch_$cfg.log:"; tail -n 5 "$out/torch_$cfg.log"
        else
            add_peak "$out/torch_$cfg.json" "$peak"
            tail -n1 "$out/torch_$cfg.json"
        fi
    fi
done

# ---- 3. table ------------------------------------------------------------------------------------
echo
echo "== summary (s/it = median step time)"
shopt -s nullglob
files=("$out"/nnseg_*.json "$out"/torch_*.json)
if [ ${#files[@]} -gt 0 ] && command -v "$py" >/dev/null 2>&1; then
    "$py" scripts/bench_torch_unet.py --table "${files[@]}" | tee "$out/summary.txt"
else
    cat ${files[@]+"${files[@]}"}
fi
