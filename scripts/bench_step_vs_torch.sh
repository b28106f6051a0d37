#!/usr/bin/env bash
# One nnU-Net training step (forward, deep-supervision DC+CE loss, backward, clipping, SGD) of a
# PlainConvUNet: `nnseg bench_train` against the same network and step in PyTorch
# (scripts/bench_torch_unet.py, f32, CPU), in interleaved rounds on the same cores, for each
# instruction-set path:
#   avx2   : NNSEG_ISA=avx2 (gemm's AVX2/FMA micro-kernels) vs torch with ATEN_CPU_CAPABILITY=avx2
#            and ONEDNN_MAX_CPU_ISA=AVX2 -- what an AVX2-only CPU runs, measurable on AVX-512 hosts
#   avx512 : both tools' default dispatch (skipped where the CPU has no AVX-512)
# Workloads (PLANS, default "nuclei2d demo3d"):
#   nuclei2d : the 2D plan of a 256x128 nuclei dataset: 6 stages 32..512, batch 2
#   demo3d   : the 3D demo dataset's 3d_fullres plan (24x56x56, batch 2, 5 stages 32..320)
#   big3d    : nnU-Net-sized 48x192x160, batch 2, 6 stages 32..320 (about a minute per step here)
# Each round runs each tool once (ITERS timed steps after WARMUP); the table shows each round's
# median step time, the best of the rounds, and nnseg / PyTorch of the bests, plus each side's
# peak RSS.
#
# Usage: scripts/bench_step_vs_torch.sh            (env: ROUNDS=3 ISAS="avx2 avx512"
#        PLANS="nuclei2d demo3d" ITERS=5 WARMUP=2 PYTHON=/work/venv_nnunet/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-/work/venv_nnunet/bin/python}"
ROUNDS="${ROUNDS:-3}" ITERS="${ITERS:-5}" WARMUP="${WARMUP:-2}"
ISAS="${ISAS:-avx2 avx512}"
if ! grep -qw avx512f /proc/cpuinfo; then ISAS="${ISAS//avx512/}"; fi
PLANS="${PLANS:-nuclei2d demo3d}"
cargo build --release --bin nnseg >/dev/null
bin="$PWD/target/release/nnseg"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

geometry() { # plan -> bench arguments shared by both tools
    case "$1" in
    nuclei2d) echo '--patch 256,128 --batch_size 2 --features 32,64,128,256,512,512
        --strides 1,1;2,2;2,2;2,2;2,2;2,2 --kernels 3,3;3,3;3,3;3,3;3,3;3,3' ;;
    demo3d) echo '--patch 24,56,56 --batch_size 2 --features 32,64,128,256,320
        --strides 1,1,1;1,2,2;1,2,2;2,2,2;2,1,1 --kernels 1,3,3;1,3,3;3,3,3;3,3,3;3,3,3' ;;
    big3d) echo '--patch 48,192,160 --batch_size 2 --features 32,64,128,256,320,320
        --strides 1,1,1;1,2,2;2,2,2;2,2,2;2,2,2;1,2,2 --kernels 1,3,3;3,3,3;3,3,3;3,3,3;3,3,3;3,3,3' ;;
    *) echo "unknown plan $1" >&2; exit 2 ;;
    esac
}
config_of() { case "$1" in nuclei2d) echo 2d ;; *) echo 3d_fullres ;; esac; }

# median step seconds from either tool's JSON line (key names differ slightly)
median_of() {
    "$PYTHON" -c 'import json,sys
d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(d.get("median_step_s", d.get("median_s", d.get("step_s_median"))))' "$1"
}
peak_of() { awk '/Maximum resident/ {printf "%.2f", $6/1048576}' "$1"; }

run_side() { # side isa plan round
    local side=$1 isa=$2 plan=$3 r=$4 out="$work/$1_$2_$3_$4"
    # shellcheck disable=SC2046
    set -- $(geometry "$plan")
    if [ "$side" = nnseg ]; then
        local env_isa=auto; [ "$isa" = avx2 ] && env_isa=avx2
        NNSEG_ISA=$env_isa /usr/bin/time -v "$bin" bench_train --config "$(config_of "$plan")" \
            --iters "$ITERS" --warmup "$WARMUP" --json "$@" >"$out.json" 2>"$out.time"
    else
        local cap=() ; [ "$isa" = avx2 ] && cap=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
        env "${cap[@]}" /usr/bin/time -v "$PYTHON" scripts/bench_torch_unet.py --device cpu --no-amp \
            --config "$(config_of "$plan")" --iters "$ITERS" --warmup "$WARMUP" "$@" \
            >"$out.json" 2>"$out.time"
    fi
    echo "$(median_of "$out.json") $(peak_of "$out.time")"
}

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); cores: $(nproc);" \
    "avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no)"
echo "torch: $("$PYTHON" -c 'import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())')"
printf '| plan | ISA | nnseg s/step (rounds) | PyTorch s/step (rounds) | best nnseg / best PyTorch | peak RSS nnseg / PyTorch GiB |\n|---|---|---|---|---|---|\n'
for plan in $PLANS; do
    for isa in $ISAS; do
        a=() b=() pa=0 pb=0
        for r in $(seq "$ROUNDS"); do
            read -r t p < <(run_side nnseg "$isa" "$plan" "$r"); a+=("$t"); pa=$p
            read -r t p < <(run_side torch "$isa" "$plan" "$r"); b+=("$t"); pb=$p
        done
        best_a=$(printf '%s\n' "${a[@]}" | sort -g | head -1)
        best_b=$(printf '%s\n' "${b[@]}" | sort -g | head -1)
        printf '| %s | %s | %s | %s | **%.2f** | %s / %s |\n' "$plan" "$isa" "${a[*]}" "${b[*]}" \
            "$("$PYTHON" -c "print($best_a / $best_b)")" "$pa" "$pb"
    done
done
