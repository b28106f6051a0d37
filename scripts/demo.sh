#!/usr/bin/env bash
# Builds nnseg, writes the synthetic demo datasets and runs plan_and_preprocess on them.
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
# A short training of the 2D demo (nnU-Net's recipe, 1 epoch of 25 iterations): a few seconds on CPU.
"$bin" train 991 2d 0 -tr nnUNetTrainer_1epoch --num_iterations_per_epoch 25 --num_val_iterations_per_epoch 5
echo
echo "Demo data in $root:"
find "$nnUNet_preprocessed" "$nnUNet_results" -maxdepth 2 | sort
