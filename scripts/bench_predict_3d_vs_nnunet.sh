#!/usr/bin/env bash
# 3D prediction benchmark, nnseg vs nnU-Net v2 on the same nnU-Net model folder (issue #20, 6b):
# wall time, cases/s and peak memory of `nnseg predict_from_modelfolder` and
# `nnUNetv2_predict_from_modelfolder -device cpu`, run alternately on the same input folder, for
# 1 fold and 5 folds, TTA on and off; after each pair the per-case, per-label Dice of nnseg's
# segmentation against nnU-Net's.
#
#   NNUNET_PY=/path/to/venv/bin scripts/bench_predict_3d_vs_nnunet.sh [WORKDIR]
#   (NNUNET_PY: bin/ of a venv with nnunetv2, e.g. 2.8.1; NNSEG_BIN overrides the nnseg binary,
#    otherwise `cargo build --release`; WORKDIR defaults to a new mktemp folder and is the only
#    place written to)
#
# The model and the cases are made by scripts/make_bench_model.py (nnU-Net's own trainer builds a
# 3D PlainConvUNet per fold, 5 labels; see there) and kept in WORKDIR/model for later runs with the
# same settings (and the same make_bench_model.py). Knobs (environment):
#   BENCH3D_SHAPE=128,256,256     case shape z,y,x (quick run: 64,128,128)
#   BENCH3D_PATCH=64,128,128      network patch z,y,x
#   BENCH3D_FEATURES=8,16,32,64,128   features per stage (number of stages = count)
#   BENCH3D_CASES=2               input cases (case 1 has another spacing: resampling both ways)
#   BENCH3D_FOLDS="1 5"           fold counts to run (1 = fold 0; 5 = folds 0-4)
#   BENCH3D_TTA="on off"          mirroring TTA settings to run
#   BENCH3D_BORDER=8              border band (voxels) left out of the "interior" Dice
#   ROUNDS=1                      repetitions of the whole grid (the tool that starts alternates)
#   EXTRA_ARGS=...                extra nnseg arguments, e.g. "--accumulate f32" (f32 sums instead
#                                 sliding-window sums, to reproduce its predictions bit for bit-ish)
#   BENCH3D_DICE_F16=0            1: after each pair also an untimed nnseg run with --accumulate f16,
#                                 and its Dice against nnU-Net (0: not; skipped when EXTRA_ARGS
#                                 has --accumulate)
#
# Output: one row per run (tool, folds, tta, wall_s, cases/s, peak_MB, tree_MB), and after each
# pair the ratios nnseg/nnU-Net of wall time, peak_MB and tree_MB, and the minimum Dice over cases
# and foreground labels (a label absent from both segmentations counts 1), over the whole image
# and over the interior (voxels at least BENCH3D_BORDER from every face), and the same for the
# untimed --accumulate f16 run (f16 Dice). Then a summary with the medians over the rounds.
#   peak_MB: /usr/bin/time's %M, the max RSS of the largest single process (nnU-Net's
#            preprocessing / export worker processes are not added to the main one)
#   tree_MB: max over time of the summed PSS (proportional set size: shared pages split between
#            the processes) of all processes of the run, sampled every 0.2 s from /proc, or
#            peak_MB where that is larger (short runs end between samples)
# Dice note: nnU-Net sums the Gaussian-weighted tile logits in f16 (relative rounding 5e-4, and
# far worse near the image faces, where the Gaussian weights are subnormal f16 numbers); nnseg
# does the same by default ("--accumulate f32" sums in f32). The untrained network's class margins
# are small (its argmax is fragmented), so f16 rounding alone flips ~0.3-0.5% of the voxels, most
# of them near the faces: expect a Dice of ~0.98-0.995 with f32 sums and >= 0.999 with f16.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNUNET_PY:?set NNUNET_PY to the bin folder of a venv with nnunetv2 installed}"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
bin="${NNSEG_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release/nnseg"
fi
shape="${BENCH3D_SHAPE:-128,256,256}"
patch="${BENCH3D_PATCH:-64,128,128}"
features="${BENCH3D_FEATURES:-8,16,32,64,128}"
n_cases="${BENCH3D_CASES:-2}"
fold_counts="${BENCH3D_FOLDS:-1 5}"
ttas="${BENCH3D_TTA:-on off}"
border="${BENCH3D_BORDER:-8}"
dice_f16="${BENCH3D_DICE_F16:-0}"
case "${EXTRA_ARGS:-}" in *--accumulate*) dice_f16=0 ;; esac
rounds="${ROUNDS:-1}"
py="$NNUNET_PY/python"
# nnU-Net wants these set; nothing is read from or written to them here
export nnUNet_raw="$work/nnunet_env/raw" nnUNet_preprocessed="$work/nnunet_env/pre" \
    nnUNet_results="$work/nnunet_env/res" nnUNet_compile=false
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$work/logs"

# ---- model folder + input cases (re-made only when the settings change)
key="shape=$shape patch=$patch features=$features cases=$n_cases $(sha1sum <scripts/make_bench_model.py)"
if [ "$(cat "$work/model/key.txt" 2>/dev/null || true)" != "$key" ]; then
    rm -rf "$work/model"
    "$py" scripts/make_bench_model.py --out "$work/model" --shape "$shape" --patch "$patch" \
        --features "$features" --cases "$n_cases" >"$work/logs/make_bench_model.log" 2>&1 \
        || { tail -30 "$work/logs/make_bench_model.log"; exit 1; }
    echo "$key" >"$work/model/key.txt"
fi
model="$work/model/results/Dataset993_Bench3D/nnUNetTrainer__nnUNetPlans__3d_fullres"
in="$work/model/input"
echo "model: $model"
echo "input: $n_cases cases of $shape (z,y,x), patch $patch, features $features; nnseg: $bin ${EXTRA_ARGS:-}"
nproc_=$(nproc); echo "cpus: $nproc_, load: $(cut -d' ' -f1-3 /proc/loadavg)"

# run NAME LOG CMD...: times CMD with /usr/bin/time and samples the summed PSS of its process
# tree (its own session); sets secs, kb (max RSS, one process) and tree_kb (max summed PSS)
run() {
    local log="$1"; shift
    rm -f "$work/time.txt" "$work/pss.txt"
    setsid /usr/bin/time -f '%e %M' -o "$work/time.txt" "$@" >"$log" 2>&1 &
    local pid=$! max=0 s p v
    while kill -0 "$pid" 2>/dev/null; do
        s=0
        for p in $(ps -o pid= -s "$pid" 2>/dev/null); do
            v=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true)
            s=$((s + ${v:-0}))
        done
        [ "$s" -gt "$max" ] && max=$s
        sleep 0.2
    done
    if ! wait "$pid"; then
        echo "FAILED: $* (log $log):"; tail -20 "$log"; exit 1
    fi
    read -r secs kb <"$work/time.txt"
    tree_kb=$(( max > kb ? max : kb ))  # short runs end between samples: at least the max RSS
}

dice() {  # dice NNSEG_OUT NNUNET_OUT -> "min_dice min_dice_interior worst"
    "$py" - "$1" "$2" "$border" <<'PY'
import os, sys
import numpy as np
import SimpleITK as sitk
a_dir, b_dir, border = sys.argv[1], sys.argv[2], int(sys.argv[3])
labels = range(1, 5)
worst = (2.0, 2.0, '')
for f in sorted(os.listdir(b_dir)):
    if not f.endswith('.nii.gz'):
        continue
    a = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(a_dir, f)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(b_dir, f)))
    assert a.shape == b.shape, (f, a.shape, b.shape)
    inner = tuple(slice(border, s - border) for s in a.shape)
    for l in labels:
        d = []
        for x, y in ((a, b), (a[inner], b[inner])):
            p, q = x == l, y == l
            n = int(p.sum()) + int(q.sum())
            d.append(2.0 * int((p & q).sum()) / n if n else 1.0)
        if d[0] < worst[0]:
            worst = (d[0], worst[1], f'{f[:-7]}:label{l}')
        worst = (worst[0], min(worst[1], d[1]), worst[2])
print(f'{worst[0]:.5f} {worst[1]:.5f} {worst[2]}')
PY
}

printf '%-6s %-7s %-5s %-4s %9s %8s %9s %9s   %s\n' round tool folds tta wall_s cases/s peak_MB tree_MB "nnseg/nnU-Net: time peak tree | min Dice (all, interior, worst) | f16 Dice (all, interior)"
summary="$work/summary.txt"; : >"$summary"
for r in $(seq 1 "$rounds"); do
    for nf in $fold_counts; do
        folds=0; [ "$nf" = 5 ] && folds="0 1 2 3 4"
        for tta in $ttas; do
            tta_arg=(); [ "$tta" = off ] && tta_arg=(--disable_tta)
            order="nnseg nnunet"; [ $((r % 2)) = 0 ] && order="nnunet nnseg"
            declare -A t=() m=() tr=()
            for tool in $order; do
                out="$work/out_$tool"; rm -rf "$out"
                log="$work/logs/r${r}_f${nf}_tta${tta}_$tool.log"
                if [ "$tool" = nnseg ]; then
                    # shellcheck disable=SC2086
                    run "$log" "$bin" predict_from_modelfolder -i "$in" -o "$out" -m "$model" -f $folds \
                        -chk checkpoint_final.pth "${tta_arg[@]}" ${EXTRA_ARGS:-}
                else
                    # shellcheck disable=SC2086
                    run "$log" "$NNUNET_PY/nnUNetv2_predict_from_modelfolder" -i "$in" -o "$out" -m "$model" \
                        -f $folds -chk checkpoint_final.pth -device cpu --disable_progress_bar "${tta_arg[@]}"
                fi
                t[$tool]=$secs m[$tool]=$kb tr[$tool]=$tree_kb
                python3 -c "print(f'{$r:<6} {\"$tool\":<7} {$nf:<5} {\"$tta\":<4} {$secs:9.2f} {$n_cases/max($secs,1e-9):8.4f} {$kb/1024:9.0f} {$tree_kb/1024:9.0f}')"
            done
            dres=$(dice "$work/out_nnseg" "$work/out_nnunet")
            read -r d_all d_in worst <<<"$dres"
            f16_all=nan f16_in=nan
            if [ "$dice_f16" = 1 ]; then
                rm -rf "$work/out_nnseg_f16"
                # shellcheck disable=SC2086
                "$bin" predict_from_modelfolder -i "$in" -o "$work/out_nnseg_f16" -m "$model" -f $folds \
                    -chk checkpoint_final.pth "${tta_arg[@]}" ${EXTRA_ARGS:-} --accumulate f16 \
                    >"$work/logs/r${r}_f${nf}_tta${tta}_nnseg_f16.log" 2>&1
                dres=$(dice "$work/out_nnseg_f16" "$work/out_nnunet")
                read -r f16_all f16_in _ <<<"$dres"
            fi
            python3 -c "print(f'{\"\":<6} {\"ratio\":<7} {$nf:<5} {\"$tta\":<4} {\"\":>9} {\"\":>8} {\"\":>9} {\"\":>9}   {${t[nnseg]}/${t[nnunet]}:.3f} {${m[nnseg]}/${m[nnunet]}:.3f} {${tr[nnseg]}/max(${tr[nnunet]},1):.3f} | $d_all $d_in $worst | $f16_all $f16_in')"
            echo "$nf $tta ${t[nnseg]} ${t[nnunet]} ${m[nnseg]} ${m[nnunet]} ${tr[nnseg]} ${tr[nnunet]} $d_all $d_in $f16_all $f16_in" >>"$summary"
            unset t m tr
        done
    done
done

echo
echo "summary (median over $rounds round(s); ratios nnseg/nnU-Net; goal: time <= 0.5, peak <= 0.5, Dice >= 0.999)"
python3 - "$summary" "$n_cases" <<'PY'
import sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    nf, tta, *v = line.split()
    rows.setdefault((nf, tta), []).append([float(x) for x in v])
n = int(sys.argv[2])
print(f"{'folds':<5} {'tta':<4} {'nnseg_s':>9} {'nnunet_s':>9} {'nnseg_c/s':>10} {'nnunet_c/s':>10} "
      f"{'nnseg_MB':>9} {'nnunet_MB':>9} {'t_ratio':>8} {'peak_r':>7} {'tree_r':>7} {'minDice':>8} {'inDice':>8} {'f16Dice':>8} {'f16in':>8}")
for (nf, tta), v in rows.items():
    med = [st.median(c) for c in zip(*v)]
    ts, tn, ms, mn, trs, trn = med[:6]
    print(f"{nf:<5} {tta:<4} {ts:9.2f} {tn:9.2f} {n/ts:10.4f} {n/tn:10.4f} {ms/1024:9.0f} {mn/1024:9.0f} "
          f"{ts/tn:8.3f} {ms/mn:7.3f} {trs/max(trn,1):7.3f} {min(r[6] for r in v):8.5f} {min(r[7] for r in v):8.5f} "
          f"{min(r[8] for r in v):8.5f} {min(r[9] for r in v):8.5f}")
PY
