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
bin=target/release/nnseg
"$bin" make_demo_dataset
"$bin" plan_and_preprocess -d 990 991 --verify_dataset_integrity "$@"
echo
echo "Demo data in $root:"
find "$nnUNet_preprocessed" -maxdepth 2 | sort | head -40
