#!/usr/bin/env bash
# A real Slurm test of `nnseg cross_validate --launcher slurm` (issue 22):
#  - installs Slurm and munge from Debian's packages (when missing);
#  - starts a single-node cluster on localhost (munged, slurmctld, slurmd; 2 CPUs, no GPU,
#    no accounting daemon) with its state in a temp folder;
#  - runs cross_validate on the 2D demo dataset, 2 folds x a few iterations, then
#    find_best_configuration, all as Slurm job arrays chained with afterok;
#  - mid-training, requeues fold 0 with `scontrol requeue` (Slurm's SIGTERM, like a
#    preemption) and sends fold 1 the time-limit warning (`scancel -b -s USR1`, what
#    `--signal=B:USR1@GRACE` does); both must stop gracefully, be requeued and resume from
#    checkpoint_latest;
#  - checks every fold's checkpoint_final, the resume lines in the training logs,
#    find_best_configuration's inference_information.json and the prediction of two images
#    with its recommendation (`--predict`, a third job array); prints the time taken.
# Must run as root (it installs packages and starts the daemons). Usage:
#   scripts/test_slurm.sh            # builds nnseg with cargo
#   NNSEG=/path/to/nnseg scripts/test_slurm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { echo "[test_slurm $(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "[test_slurm] FAILED: $*" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

if [ -z "${NNSEG:-}" ]; then
  say "building nnseg"
  cargo build --bin nnseg
  NNSEG="${CARGO_TARGET_DIR:-$PWD/target}/debug/nnseg"
fi
NNSEG=$(realpath "$NNSEG")

WORK=$(mktemp -d /tmp/nnseg_slurm.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# --- munge ------------------------------------------------------------------------------
mkdir -p "$WORK/munge" /run/munge
chown munge:munge "$WORK/munge" /run/munge 2>/dev/null || true
dd if=/dev/urandom bs=1 count=1024 of="$WORK/munge/munge.key" 2>/dev/null
chown munge:munge "$WORK/munge/munge.key"
chmod 400 "$WORK/munge/munge.key"
MUNGE_SOCKET="$WORK/munge/munge.socket"
runuser -u munge -- munged --key-file="$WORK/munge/munge.key" --socket="$MUNGE_SOCKET" \
  --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" \
  --seed-file="$WORK/munge/munged.seed"
sleep 1
PIDS+=("$(cat "$WORK/munge/munged.pid")")

# --- slurm ------------------------------------------------------------------------------
HOST=$(hostname -s)
mkdir -p "$WORK/slurm/ctld" "$WORK/slurm/d" "$WORK/slurm/log"
export SLURM_CONF="$WORK/slurm/slurm.conf"
cat > "$SLURM_CONF" <<CONF
ClusterName=nnsegtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$WORK/slurm/ctld
SlurmdSpoolDir=$WORK/slurm/d
SlurmctldPidFile=$WORK/slurm/slurmctld.pid
SlurmdPidFile=$WORK/slurm/slurmd.pid
SlurmctldLogFile=$WORK/slurm/log/slurmctld.log
SlurmdLogFile=$WORK/slurm/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=60
InactiveLimit=0
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  [ -f "$WORK/slurm/slurmctld.pid" ] && [ -f "$WORK/slurm/slurmd.pid" ] && break
  sleep 0.5
done
PIDS+=("$(cat "$WORK/slurm/slurmd.pid")" "$(cat "$WORK/slurm/slurmctld.pid")")
for _ in $(seq 60); do
  sinfo -h -o %t 2>/dev/null | grep -q idle && break
  sleep 1
done
sinfo -h -o %t | grep -q idle || { cat "$WORK/slurm/log/"*.log; fail "the node did not come up"; }
say "cluster up: $(sinfo -h -o '%P %D %t %c CPUs')"

# --- data -------------------------------------------------------------------------------
export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/pre" nnUNet_results="$WORK/results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
"$NNSEG" make_demo_dataset >/dev/null
"$NNSEG" plan_and_preprocess 991 -np 2 >/dev/null 2>&1
say "2D demo planned and preprocessed"

RES="$nnUNet_results/Dataset991_Demo2D"
# two training images to predict with the recommended configuration at the end
mkdir -p "$WORK/to_predict"
for f in $(ls "$nnUNet_raw/Dataset991_Demo2D/imagesTr" | head -2); do
  cp "$nnUNet_raw/Dataset991_Demo2D/imagesTr/$f" "$WORK/to_predict/"
done
MODEL="$RES/nnUNetTrainer__nnUNetPlans__2d"
CV=(cross_validate 991 -c 2d -f 0 1 --launcher slurm --then find_best_configuration
    --predict "$WORK/to_predict" "$WORK/predicted"
    --num_epochs "${EPOCHS:-3}" --num_iterations_per_epoch "${ITERS:-10}"
    --num_val_iterations_per_epoch 2 --cpus-per-task 1 --time 00:30:00 --grace 60)
"$NNSEG" "${CV[@]}" --dry-run
"$NNSEG" "${CV[@]}" | tee "$WORK/submit.txt"
ARRAY=$(grep '^level 0' "$WORK/submit.txt" | awk '{print $NF}')
[ -n "$ARRAY" ] || fail "no job id for level 0"
say "level 0 is array job $ARRAY"

# --- interrupt both folds mid-training --------------------------------------------------
wait_for_epoch() { # fold epoch
  for _ in $(seq 600); do
    if grep -qs "Epoch $2\$" "$MODEL/fold_$1"/training_log_*.txt; then return 0; fi
    sleep 0.2
  done
  fail "fold $1 never reached epoch $2"
}
wait_for_epoch 0 1
say "fold 0 in epoch 1: scontrol requeue ${ARRAY}_0"
scontrol requeue "${ARRAY}_0"
wait_for_epoch 1 1
say "fold 1 in epoch 1: time-limit warning (USR1 to the batch shell) for ${ARRAY}_1"
scancel -b -s USR1 "${ARRAY}_1"

# --- wait for everything ----------------------------------------------------------------
for _ in $(seq 900); do
  [ -z "$(squeue -h -o %i)" ] && break
  sleep 1
done
[ -z "$(squeue -h -o %i)" ] || { squeue; fail "jobs still queued after 15 minutes"; }
say "queue empty"
"$NNSEG" cross_validate 991 --status | tee "$WORK/status.txt"

# --- checks -----------------------------------------------------------------------------
for f in 0 1; do
  [ -f "$MODEL/fold_$f/checkpoint_final.safetensors" ] || fail "fold $f has no checkpoint_final"
  grep -qs "Stop requested" "$MODEL/fold_$f"/training_log_*.txt \
    || fail "fold $f: no graceful stop in its training log"
  grep -qs "Resuming from .*checkpoint_latest" "$MODEL/fold_$f"/training_log_*.txt \
    || fail "fold $f: did not resume from checkpoint_latest"
  LOG="$RES/cross_validate/logs/nnUNetTrainer__nnUNetPlans__2d_fold_$f.log"
  [ "$(grep -c '^=== nnseg' "$LOG")" -ge 2 ] || fail "fold $f ran only once ($LOG)"
  grep -h "Stop requested\|Resuming from" "$MODEL/fold_$f"/training_log_*.txt | sed "s/^/  fold $f: /"
done
python3 - "$RES/inference_information.json" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
best = info["best_model_or_ensemble"]
sel = best["selected_model_or_models"]
assert sel == [{"configuration": "2d", "trainer": "nnUNetTrainer", "plans_identifier": "nnUNetPlans"}], sel
assert 0.0 <= best["result_on_crossval_pre_pp"] <= 1.0, best
print(f"  find_best_configuration: 2d, cross-validation Dice {best['result_on_crossval_pre_pp']:.4f}")
PY
grep -q "COMPLETED\|finished" "$WORK/status.txt" || fail "--status shows nothing finished"
N=$(ls "$WORK/predicted" | grep -c '\.png$' || true)
[ "$N" -eq 2 ] || fail "predict_best_configuration wrote $N of 2 segmentations"
say "predict_best_configuration wrote $N postprocessed segmentations"
say "PASSED in $(( $(date +%s) - T0 )) s (work folder $WORK)"
