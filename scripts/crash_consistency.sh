#!/usr/bin/env bash
# Long variant of the crash-consistency test (tests/crash_consistency.rs): kills preprocess,
# train, predict and ensemble of the 2D demo with SIGKILL at N seeded pseudo-random moments
# each, reruns them (train with --c) and checks that nothing partial is accepted and that the
# outputs equal an uninterrupted run's bit for bit.
#
#   NNSEG_CRASH_KILLS=25 NNSEG_CRASH_SEED=7 scripts/crash_consistency.sh
#
# NNSEG_CRASH_KILLS: kills per stage (default 25; the test suite runs 3).
# NNSEG_CRASH_SEED:  seed of the kill moments (default: the current time, printed).
# Extra arguments go to cargo (e.g. --release).
set -euo pipefail
cd "$(dirname "$0")/.."
export NNSEG_CRASH_KILLS="${NNSEG_CRASH_KILLS:-25}"
export NNSEG_CRASH_SEED="${NNSEG_CRASH_SEED:-$(date +%s)}"
echo "crash consistency: $NNSEG_CRASH_KILLS kills per stage, seed $NNSEG_CRASH_SEED"
cargo test "$@" --test crash_consistency -- --nocapture
