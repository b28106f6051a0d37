#!/usr/bin/env bash
# nnseg's predictions of nnU-Net-trained models against nnU-Net's own predictor, on the two
# fixture models of tests/fixtures/nnunet_checkpoint (fold 0, checkpoint_final.pth, TTA on).
#   NNUNET_PY=/path/to/venv/bin scripts/compare_nnunet_predict.sh [WORKDIR]
#   NNUNET_PY=... scripts/compare_nnunet_predict.sh --write-fixture   # refresh the committed reference
# NNUNET_PY: the bin/ folder of a venv with nnunetv2 (pip install nnunetv2==2.8.1).
# Without it, nnseg is compared against the committed reference (tests/fixtures/.../reference).
# Prints per case the min Dice over labels and the max |probability difference| for nnseg's
# f32 sums (default) and for --accumulate f16 (nnU-Net's own f16 numerics); exits 1 if the f16
# run misses Dice >= 0.999 or |dp| <= 1e-3.
set -euo pipefail
cd "$(dirname "$0")/.."
fixture=tests/fixtures/nnunet_checkpoint
write=0
if [ "${1:-}" = "--write-fixture" ]; then write=1; shift; fi
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
bin="${NNSEG_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --quiet --bin nnseg
    bin="${CARGO_TARGET_DIR:-$PWD/target}/debug/nnseg"
fi
py="${NNUNET_PY:+$NNUNET_PY/python}"
if [ -n "$py" ]; then
    ref="$work/reference"
    [ "$write" = 1 ] && ref="$fixture/reference"
    rm -rf "$ref"
    "$py" scripts/nnunet_reference.py make --out "$ref" >"$work/nnunet.log" 2>&1 \
        || { cat "$work/nnunet.log"; exit 1; }
else
    ref="$fixture/reference"
    py=python3
fi
declare -A model=(
    [3d]="$fixture/Dataset991_Fixture3D/nnUNetTrainer__nnUNetPlans__3d_fullres"
    [2d]="$fixture/Dataset992_Fixture2D/nnUNetTrainer__nnUNetPlans__2d"
)
status=0
for acc in f32 f16; do
    for k in 3d 2d; do
        rm -rf "$work/nnseg_$acc/$k"
        "$bin" predict_from_modelfolder -i "$ref/$k/input" -o "$work/nnseg_$acc/$k" -m "${model[$k]}" \
            -f 0 -chk checkpoint_final.pth --save_probabilities --accumulate "$acc" >/dev/null 2>&1
    done
    echo "== nnseg --accumulate $acc vs nnUNetv2_predict_from_modelfolder"
    if ! "$py" scripts/nnunet_reference.py compare --ref "$ref" \
        --pred3d "$work/nnseg_$acc/3d" --pred2d "$work/nnseg_$acc/2d"; then
        [ "$acc" = f16 ] && status=1
    fi
done
exit $status
