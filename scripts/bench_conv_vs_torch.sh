#!/usr/bin/env bash
# nnseg's CPU convolutions (benches/conv.rs) vs PyTorch (scripts/bench_conv_torch.py), side by side,
# in interleaved rounds (per round: nnseg and torch on each instruction-set path in turn):
#   avx2   : NNSEG_ISA=avx2 (gemm's AVX2/FMA micro-kernels) vs torch with ATEN_CPU_CAPABILITY=avx2
#            and ONEDNN_MAX_CPU_ISA=AVX2 -- what an AVX2-only CPU runs, measurable on AVX-512 hosts
#   avx512 : both on their detected (AVX-512) paths; skipped on CPUs without avx512f
# Each side reports the best of NNSEG_BENCH_RUNS (3) runs per round; the table shows the best over
# ROUNDS (3) rounds and the ratio nnseg / torch (< 1: nnseg faster). Both use THREADS threads
# (rayon via RAYON_NUM_THREADS, torch.set_num_threads).
#
# Usage: scripts/bench_conv_vs_torch.sh [workload-name-prefix]     e.g. "conv2d"
# Env:   ROUNDS=3 THREADS=$(nproc) ISAS="avx2 avx512" PYTHON=/work/venv_nnunet/bin/python
#        NNSEG_BENCH_PARTS=1: both sides also time forward (k:fwd), input gradient (k:dx) and
#        weight gradient (k:dw) one by one; the table gets a row for each
set -euo pipefail
cd "$(dirname "$0")/.."
FILTER="${1:-}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-$(nproc)}"
PYTHON="${PYTHON:-/work/venv_nnunet/bin/python}"
ISAS="${ISAS:-avx2 avx512}"
if ! grep -qw avx512f /proc/cpuinfo; then ISAS="${ISAS//avx512/}"; fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

cargo bench -q --bench conv --no-run >&2
run_nnseg() { # isa
    local isa_env=auto
    [ "$1" = avx2 ] && isa_env=avx2
    NNSEG_ISA=$isa_env NNSEG_BENCH_QUICK=1 RAYON_NUM_THREADS=$THREADS \
        cargo bench -q --bench conv -- "$FILTER" 2>/dev/null
}
run_torch() { # isa
    if [ "$1" = avx2 ]; then
        ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
            "$PYTHON" scripts/bench_conv_torch.py "$FILTER" --threads "$THREADS"
    else
        env -u ATEN_CPU_CAPABILITY -u ONEDNN_MAX_CPU_ISA \
            "$PYTHON" scripts/bench_conv_torch.py "$FILTER" --threads "$THREADS"
    fi
}
for r in $(seq "$ROUNDS"); do
    for isa in $ISAS; do
        run_nnseg "$isa" | sed "s/^/$isa nnseg /" >>"$OUT/all.txt"
        run_torch "$isa" | sed "s/^/$isa torch /" >>"$OUT/all.txt"
    done
done
grep -E '^(avx2|avx512) (nnseg threads|torch torch)' "$OUT/all.txt" | sort -u
"$PYTHON" - "$OUT/all.txt" <<'PY'
import re, sys
best = {}
pat = re.compile(r"^(\S+) (\S+) GFLOP/s (.+?)\s+(fwd\+bwd|fwd|kernels|k:fwd|k:dx|k:dw)\s+([\d.]+) s")
for line in open(sys.argv[1]):
    m = pat.match(line)
    if m:
        isa, side, name, p, s = m.groups()
        k = (isa, side, name.strip(), p)
        best[k] = min(best.get(k, float("inf")), float(s))
names = []
for (isa, side, name, p) in best:
    if (isa, name) not in names:
        names.append((isa, name))
print(f"{'isa':<7} {'workload':<44} {'pass':<8} {'nnseg s':>8} {'torch s':>8} {'ratio':>6}"
      f" {'nnseg kernels s':>16}")
for isa, name in names:
    for p in ("fwd", "fwd+bwd", "k:fwd", "k:dx", "k:dw"):
        a, b = best.get((isa, "nnseg", name, p)), best.get((isa, "torch", name, p))
        if a is None or b is None:
            continue
        kern = best.get((isa, "nnseg", name, "kernels"))
        ks = f"{kern:16.4f}" if (kern is not None and p == "fwd+bwd") else ""
        print(f"{isa:<7} {name:<44} {p:<8} {a:8.4f} {b:8.4f} {a / b:6.2f} {ks}")
PY
