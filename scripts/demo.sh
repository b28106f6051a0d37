#!/usr/bin/env bash
# Builds nnseg, writes the synthetic demo datasets, runs plan_and_preprocess on them, trains two
# short folds of the 2D demo, predicts a few cases with their ensemble and evaluates them.
# Everything goes under ./demo_data (override with NNSEG_DEMO_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${NNSEG_DEMO_DIR:-$PWD/demo_data}"
export nnUNet_raw="$root/nnUNet_raw"
export nnUNet_preprocessed="$root/nnUNet_preprocessed"
export nnUNet_results="$root/nnUNet_results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
cargo build --release --bin nnseg
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/nnseg"
"$bin" make_demo_dataset
"$bin" plan_and_preprocess -d 990 991 --verify_dataset_integrity "$@"
"$bin" show_network 990 3d_fullres
# Two short folds of the 2D demo (nnU-Net's recipe, 1 epoch of 10 iterations each; every fold
# ends with nnU-Net's validation of its held-out cases), then predict a few cases with the
# 2-fold ensemble and evaluate the predictions (training cases: the demo has no test set).
trainer=(-tr nnUNetTrainer_1epoch --num_iterations_per_epoch 10 --num_val_iterations_per_epoch 3)
for fold in 0 1; do
  "$bin" train 991 2d "$fold" "${trainer[@]}"
done
raw2d="$nnUNet_raw/Dataset991_Demo2D"
pred_in="$root/predict_2d/input" pred_ref="$root/predict_2d/reference" pred_out="$root/predict_2d/output"
rm -rf "$root/predict_2d"
mkdir -p "$pred_in" "$pred_ref"
for case in demo2d_000 demo2d_001 demo2d_002 demo2d_003; do
  cp "$raw2d/imagesTr/${case}_0000.png" "$pred_in/"
  cp "$raw2d/labelsTr/${case}.png" "$pred_ref/"
done
"$bin" predict -i "$pred_in" -o "$pred_out" -d 991 -c 2d -f 0 1 -tr nnUNetTrainer_1epoch
"$bin" evaluate_folder "$pred_ref" "$pred_out" -djfile "$raw2d/dataset.json"
echo
echo "Demo data in $root:"
find "$nnUNet_preprocessed" "$nnUNet_results" "$root/predict_2d" -maxdepth 2 | sort
