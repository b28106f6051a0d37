#!/usr/bin/env bash
# Time and peak memory (GNU time -v) of `nnseg plan_and_preprocess` on the demo datasets.
# With NNUNET_PY=/path/to/venv/bin (a venv with nnunetv2 installed) it also runs
# nnUNetv2_plan_and_preprocess on the same data and the same number of workers.
set -euo pipefail
cd "$(dirname "$0")/.."
np="${NP:-$(nproc)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo build --release --bin nnseg >/dev/null
bin="$PWD/target/release/nnseg"
export nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/pre" nnUNet_results="$work/res"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
"$bin" make_demo_dataset >/dev/null
for id in 990 991; do
  echo "== nnseg plan_and_preprocess $id (-np $np)"
  /usr/bin/time -v "$bin" plan_and_preprocess "$id" -npfp "$np" -np "$np" 2> "$work/time_$id.txt" >/dev/null || { cat "$work/time_$id.txt"; exit 1; }
  grep -E "Elapsed|Maximum resident" "$work/time_$id.txt"
done
if [ -n "${NNUNET_PY:-}" ]; then
  export nnUNet_preprocessed="$work/pre_py"
  mkdir -p "$nnUNet_preprocessed"
  for id in 990 991; do
    echo "== nnUNetv2_plan_and_preprocess -d $id (-np $np)"
    /usr/bin/time -v "$NNUNET_PY/nnUNetv2_plan_and_preprocess" -d "$id" -npfp "$np" -np "$np" "$np" "$np" 2> "$work/pytime_$id.txt" >/dev/null || { tail -20 "$work/pytime_$id.txt"; exit 1; }
    grep -E "Elapsed|Maximum resident" "$work/pytime_$id.txt"
  done
  for id in 990 991; do
    name=$(basename "$work"/pre/Dataset${id}_*)
    echo "== plans diff ($name): nnseg vs nnU-Net"
    python3 - "$work/pre/$name/nnUNetPlans.json" "$work/pre_py/$name/nnUNetPlans.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
keys = ["spacing", "patch_size", "batch_size", "median_image_size_in_voxels", "normalization_schemes",
        "use_mask_for_norm", "batch_dice", "architecture"]
ok = True
if set(a["configurations"]) != set(b["configurations"]):
    ok = False; print("configurations differ:", sorted(a["configurations"]), sorted(b["configurations"]))
for c in set(a["configurations"]) & set(b["configurations"]):
    for k in keys:
        if a["configurations"][c].get(k) != b["configurations"][c].get(k):
            ok = False; print(f"{c}.{k}: nnseg {a['configurations'][c].get(k)} != nnU-Net {b['configurations'][c].get(k)}")
print("plans identical on compared keys" if ok else "PLANS DIFFER")
PY
  done
fi
