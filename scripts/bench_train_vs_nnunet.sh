#!/usr/bin/env bash
# Epoch time of `nnseg train` vs nnU-Net v2's `nnUNetv2_train` on the demo datasets, same machine,
# same plans (both plan them), same epoch shape: 2 epochs of 10 training + 2 validation
# iterations, CPU. The two run alternately ROUNDS times (default 3) so that machine noise hits
# both; the table shows every epoch time and the median of the second epochs (the first one
# includes start-up work on both sides).
#
#   NNUNET_PY=/path/to/venv/bin scripts/bench_train_vs_nnunet.sh        # venv with nnunetv2
#   ROUNDS=5 NNUNET_PY=... scripts/bench_train_vs_nnunet.sh
#   BIG=1 NNUNET_PY=... scripts/bench_train_vs_nnunet.sh    # the nnU-Net-sized plan instead
#   ISA=avx2 NNUNET_PY=... scripts/bench_train_vs_nnunet.sh # both tools on their AVX2 kernels
#
# ISA=avx2 runs nnseg with NNSEG_ISA=avx2 (gemm's AVX2/FMA micro-kernels) and nnU-Net with
# ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2: what an AVX2-only CPU runs, measurable on an
# AVX-512 host. Default (ISA=auto): each tool's own dispatch. The header names the CPU and path.
#
# BIG=1 times the plan the training issue quotes nnU-Net at (30-80 s per iteration on 2 cores):
# a hand-added configuration `3d_big` (inherits_from 3d_fullres of the 3D demo, so it trains on
# the same preprocessed cases, padded) with patch 48x192x160, batch 2 and a 6-stage
# PlainConvUNet (32..320 features), written into both sides' nnUNetPlans.json. Epochs there are
# 3 training + 1 validation iterations (about 15 minutes per round for both sides on 2 cores).
#
# nnU-Net has no command-line switch for the iterations per epoch, so the script drops a
# two-line trainer subclass (nnUNetTrainer_nnsegBench) into nnU-Net's variants folder for the
# duration of the run and removes it on exit. nnU-Net's final validation is skipped in that
# trainer; nnseg's runs (it is part of `nnseg train`), so nnseg's total wall time includes it.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNUNET_PY:?set NNUNET_PY to the bin folder of a venv with nnunetv2 installed}"
rounds="${ROUNDS:-3}"
isa="${ISA:-auto}"
case "$isa" in
  avx2) nnseg_isa=(NNSEG_ISA=avx2) torch_isa=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) ;;
  auto) nnseg_isa=() torch_isa=() ;;
  *) echo "ISA must be avx2 or auto, got $isa" >&2; exit 2 ;;
esac
if [ "${BIG:-0}" = 1 ]; then
  configs=("990 3d_big") iters=3 val_iters=1
else
  configs=("990 3d_fullres" "991 2d") iters=10 val_iters=2
fi
work="$(mktemp -d)"
variants="$("$NNUNET_PY/python" -c 'import nnunetv2, os; print(os.path.join(os.path.dirname(nnunetv2.__file__), "training", "nnUNetTrainer", "variants"))')"
trainer_py="$variants/nnUNetTrainer_nnsegBench.py"
trap 'rm -rf "$work" "$trainer_py"' EXIT
cat >"$trainer_py" <<PY
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_nnsegBench(nnUNetTrainer):
    """Written by nnseg's scripts/bench_train_vs_nnunet.sh and removed when it exits."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = $iters
        self.num_val_iterations_per_epoch = $val_iters

    def perform_actual_validation(self, save_probabilities=False):
        pass
PY
cargo build --release --bin nnseg >/dev/null
bin="$PWD/target/release/nnseg"
export nnUNet_raw="$work/raw"
mkdir -p "$nnUNet_raw"
"$bin" make_demo_dataset >/dev/null
NNUNET_PREP="$work/pre_py" NNSEG_PREP="$work/pre"
nnUNet_preprocessed="$NNSEG_PREP" "$bin" plan_and_preprocess 990 991 >/dev/null 2>&1
nnUNet_preprocessed="$NNUNET_PREP" "$NNUNET_PY/nnUNetv2_plan_and_preprocess" -d 990 991 >/dev/null 2>&1
if [ "${BIG:-0}" = 1 ]; then
  python3 - "$NNSEG_PREP/Dataset990_Demo3D/nnUNetPlans.json" \
    "$NNUNET_PREP/Dataset990_Demo3D/nnUNetPlans.json" <<'PY'
import copy, json, sys
for path in sys.argv[1:]:
    plans = json.load(open(path))
    arch = copy.deepcopy(plans["configurations"]["3d_fullres"]["architecture"])
    kw = arch["arch_kwargs"]
    kw.update(
        n_stages=6,
        features_per_stage=[32, 64, 128, 256, 320, 320],
        kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5,
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
        n_conv_per_stage=[2] * 6,
        n_conv_per_stage_decoder=[2] * 5,
    )
    plans["configurations"]["3d_big"] = {
        "inherits_from": "3d_fullres",
        "patch_size": [48, 192, 160],
        "batch_size": 2,
        "architecture": arch,
    }
    json.dump(plans, open(path, "w"), indent=4)
PY
fi

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
  "avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no); path: $isa" \
  "(torch: $(env "${torch_isa[@]}" "$NNUNET_PY/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'))"
epochs() { grep -E "Epoch time" "$1" | sed -E 's/.*Epoch time: ([0-9.]+) s.*/\1/' | tr '\n' ' '; }
for r in $(seq 1 "$rounds"); do
  for c in "${configs[@]}"; do
    tag="${c// /_}"
    rm -rf "$work/res" "$work/res_py"
    env "${nnseg_isa[@]}" nnUNet_preprocessed="$NNSEG_PREP" nnUNet_results="$work/res" \
      /usr/bin/time -f "peak RSS %M KB" -o "$work/rss_nnseg_${tag}_$r" "$bin" train $c 0 \
      --num_epochs 2 --num_iterations_per_epoch "$iters" --num_val_iterations_per_epoch "$val_iters" \
      >"$work/nnseg_${tag}_$r.log" 2>&1
    env "${torch_isa[@]}" nnUNet_preprocessed="$NNUNET_PREP" nnUNet_results="$work/res_py" \
      /usr/bin/time -f "peak RSS %M KB" -o "$work/rss_nnunet_${tag}_$r" \
      "$NNUNET_PY/nnUNetv2_train" $c 0 -tr nnUNetTrainer_nnsegBench -device cpu \
      >"$work/nnunet_${tag}_$r.log" 2>&1
    split="$(grep -E "Per training iteration" "$work/nnseg_${tag}_$r.log" | tail -1 | sed -E 's/.*iteration: //')"
    echo "round $r $c: nnseg epochs [ $(epochs "$work/nnseg_${tag}_$r.log")] s ($split), $(cat "$work/rss_nnseg_${tag}_$r");" \
      "nnU-Net epochs [ $(epochs "$work/nnunet_${tag}_$r.log")] s, $(cat "$work/rss_nnunet_${tag}_$r") (main process)"
  done
done
python3 - "$work" "$rounds" "${configs[@]}" <<'PY'
import glob, re, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
def second(path):
    t = re.findall(r"Epoch time: ([0-9.]+) s", open(path).read())
    return float(t[1]) if len(t) > 1 else float("nan")
print("\n| configuration | nnseg epoch 2 (median) | nnU-Net epoch 2 (median) | ratio |")
print("|---|---|---|---|")
for tag in (c.replace(" ", "_") for c in sys.argv[3:]):
    a = statistics.median(second(f"{work}/nnseg_{tag}_{r}.log") for r in range(1, rounds + 1))
    b = statistics.median(second(f"{work}/nnunet_{tag}_{r}.log") for r in range(1, rounds + 1))
    print(f"| {tag} | {a:.2f} s | {b:.2f} s | {a / b:.2f} |")
PY
