#!/usr/bin/env bash
# Acceptance run of nnseg on a GPU machine, in one command, from the bundle alone
# (scripts/gpu_bundle.sh -> gpu_bundle/), or from a checkout. Everything goes under OUT_DIR.
#
#   gpu_bundle/gpu_acceptance.sh OUT_DIR               # on the GPU machine (≤ 6 min on an H100)
#   scripts/gpu_acceptance.sh --device cpu OUT_DIR     # dry run on the CPU (CI), small sizes
#
# Items (each with its own timeout; a failure never stops the next one):
#   binary      unpack nnseg.xz into OUT_DIR/bin (xz, else python3's lzma), check its sha256
#   libraries   (CUDA) find CUDA 13 + cuDNN 9 the way run_cuda.sh does (PyTorch's nvidia-* wheels)
#   starts      `nnseg --version` runs (driver and libraries load)
#   doctor      `nnseg doctor --device DEV --json`: passed = exit 0 and "passed": true
#   demo        make_demo_dataset, plan_and_preprocess 990 (3d_fullres), train 3d_fullres fold 0
#               (3 epochs x 20 iterations on CUDA; on the CPU 3 x 3, batch 1, no mirroring) whose
#               train_loss falls,
#               predict 2 cases with its checkpoint on DEV (f32 and bf16) and on the CPU,
#               evaluate_folder (CPU prediction = reference): foreground-mean Dice ≥ 0.99 for
#               f32, ≥ 0.90 for bf16 (an undertrained model: rounding flips near-tie voxels)
#   arch        one training step (`bench_train --tr PRESET`) of kiunet_minimal and uiunet_minimal
#               at the demo's 3d_fullres plan (patch, batch, strides, kernels, features)
#   bench       `nnseg bench_train` vs bench_torch_unet.py (same network and step in PyTorch,
#               autocast bf16 + cudnn.benchmark) for 3d_fullres 128³ batch 2 (32..320, 6 stages)
#               and 2d 512² batch 12 (32..512, 7 stages), bf16 on both sides: median s/step, the
#               ratio nnseg/PyTorch, peak GPU memory (each side's own report + nvidia-smi)
# Then summary.txt (table) and summary.json in OUT_DIR; exit 0 when no item failed.
#
# Options: --device cuda|cuda:N|cpu (default cuda), --budget SECONDS (whole run; default 340 on
# CUDA, 900 on the CPU: a step gets min(its timeout, what is left), and a step with under 5 s
# left is marked skipped), --only GROUPS (comma list of the groups above), --skip-torch.
# Env: NNSEG_BIN (binary to test; default: ./nnseg.xz or ./nnseg beside this script, else the
# checkout's target-cuda/release, target/release or target/debug), PYTHON (python with torch;
# default python3), NNSEG_CUDA_LIBS (extra library folders for run_cuda.sh).
# On the CPU PyTorch is optional (skipped when `import torch` fails); on CUDA it is an item.
set -uo pipefail   # no -e: every step's failure is caught and recorded

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
device=cuda
budget=""
only=""
skip_torch=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift ;;
        --device=*) device="${1#*=}" ;;
        --budget) budget="$2"; shift ;;
        --only) only="$2"; shift ;;
        --skip-torch) skip_torch=1 ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        -*) echo "gpu_acceptance.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) [ -z "$out" ] || { echo "gpu_acceptance.sh: one OUT_DIR only" >&2; exit 2; }; out="$1" ;;
    esac
    shift
done
[ -n "$out" ] || { echo "usage: gpu_acceptance.sh [--device cuda|cpu] [--budget S] [--only GROUPS] OUT_DIR" >&2; exit 2; }
case "$device" in
    cpu) on_gpu=0 ;;
    cuda|cuda:[0-9]*) on_gpu=1 ;;
    *) echo "gpu_acceptance.sh: --device must be cuda, cuda:N or cpu" >&2; exit 2 ;;
esac
[ -n "$budget" ] || { [ "$on_gpu" = 1 ] && budget=340 || budget=900; }
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
logs="$out/logs"
# a re-run into the same folder starts clean (only what this script writes)
rm -rf "${logs:?}" "${out:?}/data" "$out/bench" "$out/predict" "${out:?}/bin" "$out/steps.tsv" \
    "$out/summary.txt" "$out/summary.json" "$out/env.txt"
mkdir -p "$logs" "$out/bench" "$out/predict"
steps="$out/steps.tsv"
: >"$steps"
py="${PYTHON:-python3}"
command -v "$py" >/dev/null 2>&1 || py=""

now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }
t_start="$(now)"
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
remaining() { awk -v a="$t_start" -v b="$(now)" -v t="$budget" 'BEGIN { printf "%d", t - (b - a) }'; }
say() { echo "[acceptance] $*" >&2; }

# record ID STATUS SECONDS DETAIL   (STATUS: pass, fail, skip)
record() {
    local d="${4//$'\t'/ }"
    d="${d//$'\n'/ }"
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$d" >>"$steps"
    printf '[acceptance] %-24s %-4s %7s s  %s\n' "$1" "$2" "$3" "$d" >&2
}
status_of() { awk -F'\t' -v id="$1" '$1 == id { s = $2 } END { print s }' "$steps"; }
want() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }
# count DIR GLOB: number of files matching; newest FILE...: the most recently modified one
count() { find "$1" -maxdepth 1 -type f -name "$2" 2>/dev/null | wc -l | tr -d ' '; }
newest() {
    local f best=""
    for f in "$@"; do
        [ -f "$f" ] || continue
        if [ -z "$best" ] || [ "$f" -nt "$best" ]; then best="$f"; fi
    done
    printf '%s' "$best"
}

# run ID TIMEOUT STDOUT_FILE CMD...: runs CMD with a timeout (capped by the budget); stderr (and
# stdout when STDOUT_FILE is -) to logs/ID.log. Sets rc (125 = skipped, out of budget), secs, why.
run() {
    local id="$1" t="$2" so="$3" left t0
    shift 3
    left="$(remaining)"
    why=""
    if [ "$left" -lt 5 ]; then rc=125; secs=0; why="skipped: the ${budget} s budget is spent"; return; fi
    [ "$t" -gt "$left" ] && t="$left"
    printf '+ timeout %s %s\n' "$t" "$*" >"$logs/$id.log"
    t0="$(now)"
    if [ "$so" = - ]; then
        timeout -k 10 "$t" "$@" >>"$logs/$id.log" 2>&1
    else
        timeout -k 10 "$t" "$@" >"$so" 2>>"$logs/$id.log"
    fi
    rc=$?
    secs="$(since "$t0")"
    case "$rc" in
        0) ;;
        124|137) why="timed out after ${t} s" ;;
        *) why="exit $rc: $(first_error "$logs/$id.log")" ;;
    esac
}
# first_error LOG: the first error or panic line of a log, else its last line (backtraces follow
# errors when RUST_BACKTRACE is set)
first_error() {
    local l
    l="$(grep -m1 -iE '^(error|Error:)|panicked|out of memory|Traceback|[A-Za-z]+Error:' "$1" 2>/dev/null)"
    [ -n "$l" ] || l="$(grep -v '^+ ' "$1" 2>/dev/null | grep -v '^[[:space:]]*$' | tail -n 1)"
    printf '%s' "$l" | cut -c1-200
}
# done_step ID OK DETAIL: records pass when rc = 0 and OK = 1, skip for rc 125, else fail
done_step() {
    if [ "$rc" = 125 ]; then record "$1" skip 0 "$why"
    elif [ "$rc" = 0 ] && [ "$2" = 1 ]; then record "$1" pass "$secs" "$3"
    elif [ -n "$why" ] && [ -n "$3" ]; then record "$1" fail "$secs" "$why; $3"
    else record "$1" fail "$secs" "$why$3"; fi
}
# needs ID DEP...: records ID as skipped unless every DEP passed
needs() {
    local id="$1" d
    shift
    for d in "$@"; do
        if [ "$(status_of "$d")" != pass ]; then record "$id" skip 0 "not run: $d did not pass"; return 1; fi
    done
}

{
    echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host=$(uname -n) $(uname -srm)"
    echo "device=$device budget_s=$budget"
    echo "python=${py:-none} $([ -n "$py" ] && "$py" --version 2>&1)"
    echo "nproc=$(nproc 2>/dev/null)"
} >"$out/env.txt"
if [ "$on_gpu" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
    timeout -k 5 20 nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,compute_cap \
        --format=csv >"$out/gpu.txt" 2>&1 || timeout -k 5 20 nvidia-smi >"$out/gpu.txt" 2>&1
    cat "$out/gpu.txt" >&2
fi
say "device $device, budget ${budget} s, results in $out"

# ---- binary -------------------------------------------------------------------------------------
bin="${NNSEG_BIN:-}"
t0="$(now)"
bin_note=""
if [ -z "$bin" ] && [ -f "$here/nnseg.xz" ]; then
    mkdir -p "$out/bin"
    if command -v xz >/dev/null 2>&1; then
        xz -dc "$here/nnseg.xz" >"$out/bin/nnseg.tmp"
    elif [ -n "$py" ]; then
        "$py" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as f, open(sys.argv[2], "wb") as o: shutil.copyfileobj(f, o, 1 << 20)' \
            "$here/nnseg.xz" "$out/bin/nnseg.tmp"
    fi
    if [ -s "$out/bin/nnseg.tmp" ]; then
        chmod +x "$out/bin/nnseg.tmp" && mv "$out/bin/nnseg.tmp" "$out/bin/nnseg" && bin="$out/bin/nnseg"
        bin_note="unpacked from $here/nnseg.xz in $(since "$t0") s"
    fi
    if [ -n "$bin" ] && [ -f "$here/manifest.json" ] && [ -n "$py" ]; then
        want_sha="$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["binary"]["sha256"])' "$here/manifest.json" 2>/dev/null)"
        got_sha="$(sha256sum "$bin" | cut -d' ' -f1)"
        if [ -n "$want_sha" ] && [ "$want_sha" != "$got_sha" ]; then
            bin_note="$bin_note; sha256 MISMATCH (manifest $want_sha, got $got_sha)"
            bin_bad=1
        else
            bin_note="$bin_note, sha256 ok"
        fi
    fi
elif [ -z "$bin" ] && [ -x "$here/nnseg" ]; then
    bin="$here/nnseg"
elif [ -z "$bin" ]; then
    repo="$(cd "$here/.." && pwd)"
    if [ "$on_gpu" = 1 ]; then cands=("$repo/target-cuda/release/nnseg" "$repo/target/release/nnseg")
    else cands=("$repo/target/release/nnseg" "$repo/target/debug/nnseg"); fi
    for c in "${cands[@]}"; do
        [ -x "$c" ] || continue
        if [ "$on_gpu" = 1 ] && ! grep -aq 'libcublas.so' "$c"; then continue; fi
        bin="$c"; break
    done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    record binary fail "$(since "$t0")" "no nnseg binary (set NNSEG_BIN, or run from gpu_bundle/ with nnseg.xz)"
    bin=""
else
    echo "bin=$bin" >>"$out/env.txt"
    if [ "$on_gpu" = 1 ] && ! grep -aq 'libcublas.so' "$bin"; then
        bin_note="${bin_note:+$bin_note; }NOT a CUDA build"; bin_bad=1
    fi
    grep -aq 'libcudnn.so.9' "$bin" && bin_note="${bin_note:+$bin_note, }links cuDNN 9"
    record binary "$([ "${bin_bad:-0}" = 1 ] && echo fail || echo pass)" "$(since "$t0")" "$bin${bin_note:+ ($bin_note)}"
fi

# ---- libraries (CUDA) ---------------------------------------------------------------------------
if [ -n "$bin" ] && [ "$on_gpu" = 1 ]; then
    rcuda="$here/run_cuda.sh"
    t1="$(now)"
    if [ ! -x "$rcuda" ]; then
        record libraries fail 0 "run_cuda.sh not found beside this script"
    elif envs="$(NNSEG_BIN="$bin" NNSEG_RUN_CUDA_VERBOSE=1 "$rcuda" --print-env 2>"$logs/libraries.log")"; then
        eval "$envs"
        record libraries pass "$(since "$t1")" "$(grep -oE 'lib[a-zA-Z]+\.so\.[0-9]+ -> [^ ]+' "$logs/libraries.log" | sed 's/ -> /@/' | tr '\n' ' ')"
    else
        record libraries fail "$(since "$t1")" "$(grep -v '^\[run_cuda\]' "$logs/libraries.log" | head -n 2 | tr '\n' ' ')"
    fi
fi
# the binary starts (on CUDA: the driver and the libraries load)
if [ -n "$bin" ]; then
    run starts 30 - "$bin" --version
    done_step starts 1 "$([ "$rc" = 0 ] && grep -v '^+ ' "$logs/starts.log" | head -n1)"
fi
have_bin=0
[ "$(status_of binary)" = pass ] && [ "$(status_of starts)" = pass ] && have_bin=1
nn_dev() { [ "$have_bin" = 1 ] || { record "$1" skip 0 "not run: no working binary"; return 1; }; }

# ---- doctor -------------------------------------------------------------------------------------
if want doctor && nn_dev doctor; then
    # the dry run leaves out the networks (the test suite runs the whole doctor on the CPU)
    doc_args=(--device "$device" --json)
    if [ "$on_gpu" = 0 ] && timeout 20 "$bin" doctor --help 2>/dev/null | grep -q -- '--no_networks'; then
        doc_args+=(--no_networks)
    fi
    run doctor 90 "$out/doctor.json" "$bin" doctor "${doc_args[@]}"
    doc=""
    if grep -qiE "unrecognized subcommand|unexpected argument 'doctor'|invalid subcommand" "$logs/doctor.log"; then
        doc="this nnseg has no doctor subcommand"
    elif [ -n "$py" ] && [ -s "$out/doctor.json" ]; then
        doc="$("$py" - "$out/doctor.json" <<'EOF' 2>&1
import json, sys
try:
    d = json.loads(open(sys.argv[1]).read())
except ValueError as e:
    print(f"not one JSON object: {e}"); sys.exit(0)
bad = []
def walk(x, path):
    if isinstance(x, dict):
        if x.get("passed") is False and path:
            bad.append(str(x.get("name") or path))
        for k, v in x.items():
            walk(v, f"{path}.{k}" if path else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            walk(v, f"{path}[{i}]")
walk(d, "")
dev = d.get("device")
dev = dev.get("name") or dev.get("description") or json.dumps(dev)[:80] if isinstance(dev, dict) else dev
msg = f"passed={json.dumps(d.get('passed'))}" + (f", device {dev}" if dev else "")
sm = d.get("summary")
if isinstance(sm, dict) and "ops_run" in sm:
    msg += (f"; ops {sm['ops_run'] - sm.get('ops_failed', 0)}/{sm['ops_run']} ok, networks "
            f"{sm.get('networks_run', 0) - sm.get('networks_failed', 0)}/{sm.get('networks_run', 0)} ok")
if d.get("error"):
    msg += f"; error: {d['error']}"
if bad:
    msg += f", failed: {', '.join(bad[:8])}" + (" ..." if len(bad) > 8 else "")
print(msg)
EOF
)"
    fi
    ok=0
    [ "$rc" = 0 ] && grep -q '"passed": *true' "$out/doctor.json" 2>/dev/null && ok=1
    [ "$rc" = 2 ] && [ -z "$doc" ] && why="exit 2: device or library unavailable"
    [[ "$doc" == "this nnseg has no doctor"* ]] && why=""
    done_step doctor "$ok" "$doc$([[ " ${doc_args[*]} " == *" --no_networks "* ]] && echo ' (--no_networks)')"
fi

# ---- demo: train, predict on DEV and CPU, Dice agreement ----------------------------------------
# CUDA: nnU-Net's trainer at the demo's 3d_fullres plan (patch 24x56x56, batch 2), mirroring TTA in
# the fold's validation and in predict. CPU dry run (the test build of the binary is slow): batch 1
# (configuration 3d_dryrun, inheriting 3d_fullres) and nnUNetTrainerNoMirroring (no TTA).
if [ "$on_gpu" = 1 ]; then cfg=3d_fullres; trn=nnUNetTrainer; epochs=3; iters=20; val_iters=5
else cfg=3d_dryrun; trn=nnUNetTrainerNoMirroring; epochs=3; iters=3; val_iters=1; fi
export nnUNet_raw="$out/data/nnUNet_raw" nnUNet_preprocessed="$out/data/nnUNet_preprocessed" \
    nnUNet_results="$out/data/nnUNet_results"
pj="$nnUNet_preprocessed/Dataset990_Demo3D/nnUNetPlans.json"
fold_dir="$nnUNet_results/Dataset990_Demo3D/${trn}__nnUNetPlans__${cfg}/fold_0"
if (want demo || want arch) && nn_dev make_demo_dataset; then
    mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
    run make_demo_dataset 30 - "$bin" make_demo_dataset
    ok=0; [ -f "$nnUNet_raw/Dataset990_Demo3D/dataset.json" ] && ok=1
    done_step make_demo_dataset "$ok" "$(count "$nnUNet_raw/Dataset990_Demo3D/imagesTr" '*.nii.gz') images (Dataset990_Demo3D)"
    if needs plan_and_preprocess make_demo_dataset; then
        run plan_and_preprocess 60 - "$bin" plan_and_preprocess -d 990 -c 3d_fullres
        plan=""
        [ -n "$py" ] && [ -f "$pj" ] && plan="$("$py" - "$pj" "$cfg" <<'EOF'
import json, sys
fn, cfg = sys.argv[1:]
p = json.load(open(fn))
c = p["configurations"]["3d_fullres"]
msg = f"3d_fullres patch {'x'.join(map(str, c['patch_size']))} batch {c['batch_size']}"
if cfg != "3d_fullres":  # the dry run's configuration: batch 1
    p["configurations"][cfg] = {"inherits_from": "3d_fullres", "batch_size": 1}
    json.dump(p, open(fn, "w"), indent=4)
    msg += f"; added {cfg} (batch 1)"
print(msg)
EOF
)"
        ok=0; [ -f "$pj" ] && [[ "$plan" == 3d_fullres* ]] && ok=1
        done_step plan_and_preprocess "$ok" "$plan"
    fi
fi
if want demo && [ "$have_bin" = 1 ] && needs train_3d_demo plan_and_preprocess; then
    run train_3d_demo 150 - "$bin" train 990 "$cfg" 0 -tr "$trn" --device "$device" --seed 12345 \
        --num_epochs "$epochs" --num_iterations_per_epoch "$iters" --num_val_iterations_per_epoch "$val_iters"
    ok=0; detail="no training log"
    tlog="$(newest "$fold_dir"/training_log_*.txt)"
    if [ -n "$tlog" ] && [ -n "$py" ]; then
        cp "$tlog" "$logs/train_3d_demo.training_log.txt"
        detail="$("$py" - "$tlog" "$fold_dir/checkpoint_final.safetensors" <<'EOF'
import os, re, sys
t = open(sys.argv[1]).read()
num = r"(-?[0-9.]+(?:e-?[0-9]+)?|nan|inf)"
losses = [float(v) for v in re.findall(r"train_loss " + num, t)]
times = [float(v) for v in re.findall(r"Epoch time: " + num, t)]
mem = re.findall(r"^.*?: (.*GPU memory.*)$", t, re.M)
falls = len(losses) >= 2 and losses[-1] < losses[0]
msg = f"{'falls' if falls else 'DOES NOT FALL'}: train_loss {' -> '.join(f'{v:.4f}' for v in losses)}"
if times:
    msg += f"; epoch times {', '.join(f'{v:.1f}' for v in times)} s"
if mem:
    msg += f"; {mem[-1].strip()}"
if not os.path.exists(sys.argv[2]):
    msg += "; no checkpoint_final"
print(msg)
EOF
)"
        [[ "$detail" == falls:* ]] && [ -f "$fold_dir/checkpoint_final.safetensors" ] && ok=1
    fi
    done_step train_3d_demo "$ok" "$detail"
fi
pin="$out/predict/input"
# Items: predict_cuda (f32, --amp off), predict_cuda_bf16 (--amp on, the CUDA default),
# predict_cpu (f32, the reference), dice_cuda_vs_cpu (≥ 0.99: the CUDA kernels agree with the
# CPU ones) and dice_cuda_bf16_vs_cpu (≥ 0.90 only: after a few dozen iterations many voxels sit
# near a class boundary, and bf16 rounding alone flips some; 0.955 measured on the CPU dry run).
# predict_cuda_host_sums / dice_cuda_host_sums_vs_cpu: the same with --not_on_device (the sliding
# window's sums in host memory; predict_cuda keeps them on the GPU), so both accumulation paths run.
# Dry run: the device side is a second CPU run (predict_cpu_as_device, ...).
dtag="${device/:/}"
[ "$on_gpu" = 1 ] || dtag=cpu_as_device
pred_cpu="$out/predict/cpu_reference"
npred() { count "$1" '*.nii.gz'; }
if want demo && [ "$have_bin" = 1 ] && ! needs predict_"$dtag" train_3d_demo; then
    record predict_"$dtag"_bf16 skip 0 "not run: train_3d_demo did not pass"
    record predict_cpu skip 0 "not run: train_3d_demo did not pass"
elif want demo && [ "$have_bin" = 1 ]; then
    mkdir -p "$pin"
    # the first two training cases (one image file per case: channel 0000)
    n=0
    for f in "$nnUNet_raw"/Dataset990_Demo3D/imagesTr/*_0000.nii.gz; do
        [ "$n" -lt 2 ] && [ -f "$f" ] && cp "$f" "$pin/" && n=$((n + 1))
    done
    tta_note="$([ "$trn" = nnUNetTrainer ] && echo mirroring TTA || echo no TTA)"
    for v in "$dtag:$device:off:60:" "${dtag}_bf16:$device:on:60:" \
        "${dtag}_host_sums:$device:off:60:--not_on_device" "cpu:cpu:off:90:"; do
        IFS=: read -r id dev amp t extra <<<"$v"
        [ "$id" = cpu ] && dir="$pred_cpu" || dir="$out/predict/$id"
        # shellcheck disable=SC2086
        run predict_"$id" "$t" - "$bin" predict -i "$pin" -o "$dir" -d 990 -c "$cfg" -tr "$trn" -f 0 \
            -device "$dev" --amp "$amp" $extra
        ok=0; [ "$(npred "$dir")" = 2 ] && ok=1
        done_step predict_"$id" "$ok" "$(npred "$dir") of 2 cases on $dev, $([ "$amp" = on ] && echo bf16 || echo f32), $tta_note"
    done
fi
dj="$nnUNet_raw/Dataset990_Demo3D/dataset.json"
gt="$out/predict/ground_truth"
for v in "$dtag:0.99" "${dtag}_bf16:0.90" "${dtag}_host_sums:0.99"; do
    if ! want demo || [ "$have_bin" != 1 ]; then break; fi
    IFS=: read -r id thr <<<"$v"
    needs dice_"$id"_vs_cpu predict_"$id" predict_cpu || continue
    run dice_"$id"_vs_cpu 30 - "$bin" evaluate_folder "$pred_cpu" "$out/predict/$id" -djfile "$dj" \
        -o "$out/predict/dice_${id}_vs_cpu.json"
    rc_eval=$rc; why_eval="$why"; secs_eval="$secs"
    # informational: the predictions against the ground truth (labelsTr holds more cases: copy two)
    mkdir -p "$gt"
    for f in "$pin"/*_0000.nii.gz; do
        c="$(basename "$f" _0000.nii.gz)"
        cp "$nnUNet_raw/Dataset990_Demo3D/labelsTr/$c.nii.gz" "$gt/" 2>/dev/null
    done
    for p in "$id" cpu_reference; do
        [ -f "$out/predict/gt_vs_$p.json" ] && continue
        [ "$p" = cpu_reference ] && pd="$pred_cpu" || pd="$out/predict/$p"
        timeout -k 5 30 "$bin" evaluate_folder "$gt" "$pd" -djfile "$dj" -o "$out/predict/gt_vs_$p.json" \
            >>"$logs/dice_vs_ground_truth.log" 2>&1
    done
    rc=$rc_eval; why="$why_eval"; secs="$secs_eval"
    ok=0; detail="no summary"
    if [ -n "$py" ] && [ -f "$out/predict/dice_${id}_vs_cpu.json" ]; then
        detail="$("$py" - "$thr" "$out/predict/dice_${id}_vs_cpu.json" "$out/predict/gt_vs_$id.json" \
            "$out/predict/gt_vs_cpu_reference.json" <<'EOF'
import json, math, sys
thr = float(sys.argv[1])
s = json.load(open(sys.argv[2]))
fm = s.get("foreground_mean", {}).get("Dice")
# pooled over both cases per class: Dice of the summed TP/FP/FN (1.0 when both are empty)
tp = {}; fp = {}; fn = {}; npred = 0
for c in s.get("metric_per_case", []):
    for k, m in c.get("metrics", {}).items():
        tp[k] = tp.get(k, 0) + m.get("TP", 0); fp[k] = fp.get(k, 0) + m.get("FP", 0)
        fn[k] = fn.get(k, 0) + m.get("FN", 0); npred += m.get("n_pred", 0)
pooled = [1.0 if 2 * tp[k] + fp[k] + fn[k] == 0 else 2 * tp[k] / (2 * tp[k] + fp[k] + fn[k]) for k in tp]
fmv = fm if isinstance(fm, (int, float)) and not math.isnan(fm) else None
score = fmv if fmv is not None else (min(pooled) if pooled else float("nan"))
gts = []
for fn_ in sys.argv[3:]:
    try:
        gts.append(f"{json.load(open(fn_))['foreground_mean']['Dice']:.3f}")
    except Exception:
        gts.append("?")
print(f"{'ok' if score >= thr else 'TOO LOW'} (≥ {thr}): foreground-mean Dice {fm if fmv is None else f'{fmv:.5f}'}"
      f" (pooled per class: {', '.join(f'{v:.5f}' for v in pooled)}); {npred:.0f} foreground voxels predicted;"
      f" vs ground truth: this {gts[0]}, cpu {gts[1]}")
EOF
)"
        [[ "$detail" == ok* ]] && ok=1
    fi
    done_step dice_"$id"_vs_cpu "$ok" "$detail"
done

# ---- arch: one training step of two architecture presets ---------------------------------------
# `bench_train --tr PRESET` at the demo's 3d_fullres plan (patch, batch, features, strides, kernels
# from its plans): forward, deep-supervision loss, backward, SGD step of the preset's network,
# bf16 on CUDA. The dry run shrinks the patch to twice the strides' product and the batch to 1.
arch_geo=()
if want arch && [ "$(status_of plan_and_preprocess)" = pass ] && [ -n "$py" ]; then
    mapfile -t arch_geo < <("$py" - "$pj" "$on_gpu" <<'EOF'
import json, math, sys
c = json.load(open(sys.argv[1]))["configurations"]["3d_fullres"]
a = c["architecture"]["arch_kwargs"]
strides, kernels = a["strides"], a["kernel_sizes"]
patch, batch = c["patch_size"], c["batch_size"]
if sys.argv[2] != "1":
    patch = [2 * math.prod(s[d] for s in strides) for d in range(len(patch))]
    batch = 1
stages = lambda v: ";".join(",".join(map(str, s)) for s in v)
for x in ("--patch", ",".join(map(str, patch)), "--batch_size", str(batch),
          "--features", ",".join(map(str, a["features_per_stage"])),
          "--strides", stages(strides), "--kernels", stages(kernels)):
    print(x)
EOF
)
fi
for tr in kiunet_minimal uiunet_minimal; do
    want arch || continue
    [ "$have_bin" = 1 ] || { record "$tr" skip 0 "not run: no working binary"; continue; }
    needs "$tr" plan_and_preprocess || continue
    if [ ${#arch_geo[@]} -ne 10 ]; then record "$tr" fail 0 "could not read the demo plan's geometry from $pj"; continue; fi
    wu=1; [ "$on_gpu" = 1 ] || wu=0
    run "$tr" 60 "$out/bench/arch_$tr.json" "$bin" bench_train --config demo_3d --tr "$tr" --device "$device" \
        --iters 1 --warmup "$wu" --json "${arch_geo[@]}"
    ok=0; detail=""
    if [ -n "$py" ] && [ -s "$out/bench/arch_$tr.json" ]; then
        detail="$("$py" - "$out/bench/arch_$tr.json" <<'EOF' 2>&1
import json, math, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")][-1]
mem = r.get("peak_gpu_memory_bytes")
ok = math.isfinite(r.get("loss", float("nan")))
print(f"{'ok' if ok else 'LOSS NOT FINITE'}: {r['network']} patch {'x'.join(map(str, r['patch']))} x{r['batch_size']}, "
      f"{r['params']} params, {r['precision']}: step {r['step_s_median']:.3f} s (fwd {r['fwd_s']:.3f}, bwd {r['bwd_s']:.3f}), "
      f"loss {r['loss']:.4f}" + (f", peak GPU memory {mem / 2**30:.2f} GiB" if mem else ""))
EOF
)"
        [[ "$detail" == ok:* ]] && ok=1
    fi
    done_step "$tr" "$ok" "$detail"
done

# ---- bench: nnseg vs PyTorch training step ------------------------------------------------------
have_torch=0
torch_note=""
if want bench && [ "$skip_torch" = 0 ] && [ -n "$py" ]; then
    if [ "$on_gpu" = 1 ]; then
        timeout -k 5 60 "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >"$logs/torch_import.log" 2>&1 \
            && have_torch=1 || torch_note="PyTorch with CUDA not importable by $py"
    else
        timeout -k 5 60 "$py" -c 'import torch' >"$logs/torch_import.log" 2>&1 && have_torch=1 || torch_note="PyTorch not installed (optional on the CPU)"
    fi
fi
[ "$skip_torch" = 1 ] && torch_note="--skip-torch"
[ -z "$py" ] && torch_note="no python3"
poll_pid=""
smi_idx="0"
[[ "$device" == cuda:* ]] && smi_idx="${device#cuda:}"
[ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$device" = cuda ] && smi_idx="${CUDA_VISIBLE_DEVICES%%,*}"
start_poll() {
    : >"$1"
    if [ "$on_gpu" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -i "$smi_idx" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$1" 2>/dev/null &
        poll_pid=$!
    fi
}
stop_poll() {
    if [ -n "$poll_pid" ]; then kill "$poll_pid" 2>/dev/null; wait "$poll_pid" 2>/dev/null; poll_pid=""; fi
}
smi_peak() { sort -n "$1" 2>/dev/null | tail -n1; }
# bench_detail RESULT.json NVIDIA_SMI_PEAK_MIB: one line for the table
bench_detail() {
    [ -n "$py" ] && [ -s "$1" ] || return 0
    "$py" - "$1" "$2" <<'EOF' 2>/dev/null
import json, sys
ls = [l for l in open(sys.argv[1]) if l.strip().startswith("{")]
r = json.loads(ls[-1])
prec = r.get("precision") or ((r.get("amp_dtype") or "fp16") if r.get("amp") else "f32")
msg = (f"{r['step_s_median']:.3f} s/step (min {r['step_s_min']:.3f}), {prec}, "
       f"patch {'x'.join(map(str, r['patch']))} x{r['batch_size']}, {r['params']} params")
if r.get("peak_gpu_memory_bytes"):
    msg += f", pool peak {r['peak_gpu_memory_bytes'] / 2**20:.0f} MiB"
if r.get("peak_mem_mib"):
    msg += f", peak allocated {r['peak_mem_mib']:.0f} MiB (reserved {r.get('peak_reserved_mib', 0):.0f})"
if sys.argv[2]:
    msg += f", nvidia-smi peak {float(sys.argv[2]):.0f} MiB"
print(msg)
EOF
}
for cfg in 3d_fullres 2d; do
    want bench || continue
    if [ "$on_gpu" = 1 ]; then
        size=(); n_it=5; n_wu=2; amp_n=(--amp on); amp_t=(--amp-dtype bf16); t_n=90; t_t=75
    else
        # the dry run: the same commands at toy sizes, f32 (bf16 is slow on the CPU)
        if [ "$cfg" = 3d_fullres ]; then size=(--patch "32,32,32" --batch_size 1 --features "8,16,32,64")
        else size=(--patch "64,64" --batch_size 2 --features "8,16,32,64"); fi
        n_it=2; n_wu=1; amp_n=(--amp off); amp_t=(--no-amp); t_n=90; t_t=90
    fi
    id="bench_${cfg}_nnseg"
    if [ "$have_bin" = 1 ]; then
        start_poll "$out/bench/smi_nnseg_$cfg.txt"
        run "$id" "$t_n" "$out/bench/nnseg_$cfg.json" "$bin" bench_train --config "$cfg" --device "$device" \
            "${amp_n[@]}" --iters "$n_it" --warmup "$n_wu" --json ${size[@]+"${size[@]}"}
        stop_poll
        echo "{\"nvidia_smi_peak_mib\": \"$(smi_peak "$out/bench/smi_nnseg_$cfg.txt")\"}" >"$out/bench/smi_nnseg_$cfg.json"
        ok=0; grep -q '"step_s_median"' "$out/bench/nnseg_$cfg.json" 2>/dev/null && ok=1
        done_step "$id" "$ok" "$(bench_detail "$out/bench/nnseg_$cfg.json" "$(smi_peak "$out/bench/smi_nnseg_$cfg.txt")")"
    else
        record "$id" skip 0 "not run: no working binary"
    fi
    id="bench_${cfg}_pytorch"
    if [ "$have_torch" = 1 ]; then
        start_poll "$out/bench/smi_torch_$cfg.txt"
        run "$id" "$t_t" "$out/bench/torch_$cfg.json" "$py" "$here/bench_torch_unet.py" --config "$cfg" \
            --device "$device" "${amp_t[@]}" --iters "$n_it" --warmup "$n_wu" ${size[@]+"${size[@]}"}
        stop_poll
        echo "{\"nvidia_smi_peak_mib\": \"$(smi_peak "$out/bench/smi_torch_$cfg.txt")\"}" >"$out/bench/smi_torch_$cfg.json"
        ok=0; grep -q '"step_s_median"' "$out/bench/torch_$cfg.json" 2>/dev/null && ok=1
        done_step "$id" "$ok" "$(bench_detail "$out/bench/torch_$cfg.json" "$(smi_peak "$out/bench/smi_torch_$cfg.txt")")"
    elif [ "$on_gpu" = 1 ]; then
        record "$id" fail 0 "$torch_note"
    else
        record "$id" skip 0 "$torch_note"
    fi
done

# ---- summary ------------------------------------------------------------------------------------
total_s="$(since "$t_start")"
# the end of each failed item's log (CI keeps no files)
while IFS=$'\t' read -r id st _; do
    if [ "$st" != fail ] || [ ! -s "$logs/$id.log" ]; then continue; fi
    echo "---- $id: $logs/$id.log (error lines, then the last lines)" >&2
    grep -m5 -iE '^(error|Error:)|panicked|out of memory|Traceback|[A-Za-z]+Error:' "$logs/$id.log" | cut -c1-300 >&2
    echo "  ..." >&2
    tail -n 8 "$logs/$id.log" | cut -c1-300 >&2
done <"$steps"
if [ -z "$py" ]; then
    echo "no python3: raw results in $steps" >&2
    cat "$steps"
    awk -F'\t' '$2 == "fail" { f = 1 } END { exit f }' "$steps"
    exit $?
fi
"$py" - "$out" "$device" "$total_s" "$budget" "$here" <<'EOF'
import json, os, sys
out, device, total_s, budget, here = sys.argv[1:]
items = []
for line in open(os.path.join(out, "steps.tsv")):
    p = line.rstrip("\n").split("\t")
    if len(p) >= 4:
        items.append({"item": p[0], "status": p[1], "seconds": float(p[2] or 0), "detail": p[3]})

def last_json(fn):
    try:
        ls = [l for l in open(fn).read().splitlines() if l.strip().startswith("{")]
        return json.loads(ls[-1]) if ls else None
    except (OSError, ValueError):
        return None

def mib(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

bench = []
for cfg in ("3d_fullres", "2d"):
    n = last_json(os.path.join(out, "bench", f"nnseg_{cfg}.json"))
    t = last_json(os.path.join(out, "bench", f"torch_{cfg}.json"))
    if n is None and t is None:
        continue
    ns = (last_json(os.path.join(out, "bench", f"smi_nnseg_{cfg}.json")) or {}).get("nvidia_smi_peak_mib")
    ts = (last_json(os.path.join(out, "bench", f"smi_torch_{cfg}.json")) or {}).get("nvidia_smi_peak_mib")
    row = {"config": cfg}
    if n and "step_s_median" in n:
        row.update(patch=n.get("patch"), batch_size=n.get("batch_size"), features=n.get("features"),
                   nnseg_precision=n.get("precision"), nnseg_step_s=n["step_s_median"],
                   nnseg_fwd_s=n.get("fwd_s"), nnseg_bwd_s=n.get("bwd_s"),
                   nnseg_peak_pool_mib=(n["peak_gpu_memory_bytes"] / 2**20 if n.get("peak_gpu_memory_bytes") else None),
                   nnseg_nvidia_smi_peak_mib=mib(ns))
    if t and "step_s_median" in t:
        row.update(torch_version=t.get("torch"), torch_amp=(t.get("amp_dtype") if t.get("amp") else "f32"),
                   torch_step_s=t["step_s_median"], torch_peak_allocated_mib=t.get("peak_mem_mib"),
                   torch_peak_reserved_mib=t.get("peak_reserved_mib"), torch_nvidia_smi_peak_mib=mib(ts))
    if row.get("nnseg_step_s") and row.get("torch_step_s"):
        row["ratio_nnseg_over_torch"] = row["nnseg_step_s"] / row["torch_step_s"]
    bench.append(row)

def ver(fn):
    try:
        return json.load(open(fn))
    except (OSError, ValueError):
        return None

counts = {s: sum(1 for i in items if i["status"] == s) for s in ("pass", "fail", "skip")}
env = {}
try:
    for l in open(os.path.join(out, "env.txt")):
        k, _, v = l.rstrip("\n").partition("=")
        env[k] = v
except OSError:
    pass
gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else None
summary = {
    "passed": counts["fail"] == 0 and counts["pass"] > 0,
    "device": device, "total_seconds": float(total_s), "budget_seconds": int(budget),
    "counts": counts, "items": items, "bench": bench, "gpu": gpu, "env": env,
    "bundle_manifest": ver(os.path.join(here, "manifest.json")),
    "doctor": ver(os.path.join(out, "doctor.json")),
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)

L = []
L.append(f"nnseg acceptance on {device}: {'PASSED' if summary['passed'] else 'FAILED'} "
         f"({counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip) in {float(total_s):.0f} s "
         f"(budget {budget} s)")
m = summary["bundle_manifest"]
if m:
    L.append(f"bundle: git {m.get('git_revision', '?')[:12]}{' (dirty)' if m.get('git_dirty') else ''}, "
             f"features {m.get('features')}, PTX {m.get('ptx_target')}")
if gpu:
    L.append("gpu: " + " | ".join(gpu.splitlines()[1:]))
L.append("")
w = max([len(i["item"]) for i in items] + [4])
L.append(f"{'item':<{w}}  {'status':<6} {'seconds':>8}  detail")
L.append("-" * (w + 30))
for i in items:
    d = i["detail"]
    d = d if len(d) <= 150 else d[:147] + "..."
    L.append(f"{i['item']:<{w}}  {i['status'].upper():<6} {i['seconds']:>8.1f}  {d}")
if bench:
    L.append("")
    L.append("training step (median s/step; peak GPU MiB: nnseg pool high-water, PyTorch max allocated / reserved; nvidia-smi whole GPU)")
    L.append(f"{'config':<11} {'patch x batch':<18} {'nnseg s':>8} {'torch s':>8} {'ratio':>6}  {'nnseg MiB':>9} {'torch MiB':>15}  {'smi nnseg/torch':>15}")
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"
    for r in bench:
        pb = ("x".join(map(str, r.get("patch") or [])) + f" x{r.get('batch_size', '?')}") if r.get("patch") else "-"
        tm = f"{f(r.get('torch_peak_allocated_mib'), '.0f')}/{f(r.get('torch_peak_reserved_mib'), '.0f')}"
        sm = f"{f(r.get('nnseg_nvidia_smi_peak_mib'), '.0f')}/{f(r.get('torch_nvidia_smi_peak_mib'), '.0f')}"
        L.append(f"{r['config']:<11} {pb:<18} {f(r.get('nnseg_step_s'), '.3f'):>8} {f(r.get('torch_step_s'), '.3f'):>8} "
                 f"{f(r.get('ratio_nnseg_over_torch'), '.2f'):>6}  {f(r.get('nnseg_peak_pool_mib'), '.0f'):>9} {tm:>15}  {sm:>15}")
    L.append(f"precision: nnseg {', '.join(sorted({str(r.get('nnseg_precision')) for r in bench}))}; "
             f"PyTorch {', '.join(sorted({str(r.get('torch_amp')) for r in bench if r.get('torch_step_s')})) or 'not run'}")
L.append("")
L.append(f"logs: {out}/logs/<item>.log; this table: {out}/summary.txt, {out}/summary.json")
txt = "\n".join(L) + "\n"
open(os.path.join(out, "summary.txt"), "w").write(txt)
print(txt, end="")
sys.exit(0 if summary["passed"] else 1)
EOF
