#!/usr/bin/env bash
# Sliding-window prediction benchmark on the 3D demo dataset: seconds per case, voxels/s and
# peak RSS of `nnseg predict` with 1 and 5 folds, with and without mirroring TTA.
#   scripts/bench_predict.sh [WORKDIR]   (default ./bench_predict_data; NNSEG_BIN overrides the binary)
# Trains 5 tiny folds first (a few iterations each: speed does not depend on the weights).
# Then many small 2D images: N_SMALL (default 200) two-channel images of 44×30 and 20×16 with the
# nnU-Net-trained 2D fixture model (fold_0/checkpoint_final.pth read as it is), 1 fold, TTA on;
# with NNUNET_PY=/path/to/venv/bin also nnUNetv2_predict_from_modelfolder on the same images.
# EXTRA_ARGS (e.g. "--batch_tiles 1") is passed to every nnseg predict.
# With NNUNET_PY set, finally the 3D comparison with nnU-Net on the same nnU-Net model folder
# (scripts/bench_predict_3d_vs_nnunet.sh, in WORKDIR/vs_nnunet_3d; its BENCH3D_* and ROUNDS knobs
# apply; the default 128x256x256 cases take long on a small CPU); BENCH3D=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$PWD/bench_predict_data}"
bin="${NNSEG_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release/nnseg"
fi
export nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/pre" nnUNet_results="$work/res"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
"$bin" make_demo_dataset >/dev/null
"$bin" plan_and_preprocess 990 -c 3d_fullres -np 2 >/dev/null 2>&1
for f in 0 1 2 3 4; do
    if [ ! -f "$nnUNet_results/Dataset990_Demo3D/nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres/fold_$f/checkpoint_final.safetensors" ]; then
        "$bin" train 990 3d_fullres "$f" -tr nnUNetTrainer_1epoch --num_iterations_per_epoch 2 \
            --num_val_iterations_per_epoch 1 >/dev/null 2>&1
    fi
done
in="$work/in"; rm -rf "$in"; mkdir -p "$in"
for c in 000 001 002; do cp "$nnUNet_raw/Dataset990_Demo3D/imagesTr/demo3d_${c}_0000.nii.gz" "$in/"; done
vox=$(python3 - "$in" <<'PY' 2>/dev/null || echo 0
import gzip, struct, sys, os
t = 0
for f in os.listdir(sys.argv[1]):
    h = gzip.open(os.path.join(sys.argv[1], f)).read(348)
    d = struct.unpack('<8h', h[40:56]); t += d[1] * d[2] * d[3]
print(t)
PY
)
printf '%-8s %-6s %10s %12s %12s\n' folds tta s/case vox/s peak_MB
for folds in "0" "0 1 2 3 4"; do
    for tta in on off; do
        out="$work/out"; rm -rf "$out"
        extra=(); [ "$tta" = off ] && extra=(--disable_tta)
        # shellcheck disable=SC2086
        /usr/bin/time -f '%e %M' -o "$work/time.txt" "$bin" predict -i "$in" -o "$out" -d 990 \
            -c 3d_fullres -f $folds -tr nnUNetTrainer_1epoch "${extra[@]}" ${EXTRA_ARGS:-} >/dev/null 2>&1
        read -r secs kb <"$work/time.txt"
        n=$(echo $folds | wc -w)
        python3 -c "print(f'{$n:<8} {\"$tta\":<6} {$secs/3:10.2f} {($vox/$secs if $secs>0 else 0):12.0f} {$kb/1024:12.0f}')"
    done
done

# ---- many small 2D images
n_small="${N_SMALL:-200}"
ref2d=tests/fixtures/nnunet_checkpoint/reference/2d/input
model2d=tests/fixtures/nnunet_checkpoint/Dataset992_Fixture2D/nnUNetTrainer__nnUNetPlans__2d
small="$work/small2d"; rm -rf "$small"; mkdir -p "$small"
for i in $(seq -w 1 "$n_small"); do
    src=2d_small; [ $((10#$i % 2)) = 0 ] && src=2d_big
    for c in 0000 0001; do cp "$ref2d/${src}_$c.nii.gz" "$small/img${i}_$c.nii.gz"; done
done
printf '\n%-34s %8s %9s %9s\n' "$n_small small 2D images, 1 fold, TTA" wall_s cases/s peak_MB
run_small() {
    local name="$1"; shift
    rm -rf "$work/out_small"
    /usr/bin/time -f '%e %M' -o "$work/time.txt" "$@" >/dev/null 2>&1
    read -r secs kb <"$work/time.txt"
    python3 -c "print(f'{\"$name\":<34} {$secs:8.2f} {$n_small/max($secs,1e-9):9.1f} {$kb/1024:9.0f}')"
}
# shellcheck disable=SC2086
run_small "nnseg" "$bin" predict_from_modelfolder -i "$small" -o "$work/out_small" -m "$model2d" -f 0 \
    -chk checkpoint_final.pth ${EXTRA_ARGS:-}
if [ -n "${NNUNET_PY:-}" ]; then
    run_small "nnU-Net (nnUNetv2_predict_from_modelfolder)" "$NNUNET_PY/nnUNetv2_predict_from_modelfolder" \
        -i "$small" -o "$work/out_small" -m "$model2d" -f 0 -chk checkpoint_final.pth -device cpu
fi

# ---- 3D, nnseg vs nnU-Net on the same nnU-Net model folder (1 / 5 folds, TTA on / off)
if [ -n "${NNUNET_PY:-}" ] && [ "${BENCH3D:-1}" != 0 ]; then
    echo
    NNSEG_BIN="$bin" scripts/bench_predict_3d_vs_nnunet.sh "$work/vs_nnunet_3d"
fi
