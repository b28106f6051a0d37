#!/usr/bin/env bash
# Builds the carry-over bundle for a GPU machine (no Rust, no internet there): the release CUDA
# binary of nnseg with cuDNN convolutions, stripped and xz-compressed, plus the acceptance run.
# Runs on any Linux x86_64 machine, no GPU needed (scripts/build_cuda.sh fetches the toolkit).
#
#   scripts/gpu_bundle.sh            # -> gpu_bundle/ (git-ignored), at most 60 MiB
#   scripts/gpu_bundle.sh --no-build # re-pack the binary already in $CARGO_TARGET_DIR
#
# gpu_bundle/ holds:
#   nnseg.xz             the stripped binary (`--features cudnn`, CUDA_COMPUTE_CAP=90, release
#                        without debug info); gpu_acceptance.sh unpacks it with xz or python3
#   gpu_acceptance.sh    the acceptance run (copy of scripts/gpu_acceptance.sh)
#   run_cuda.sh          finds the CUDA 13 + cuDNN 9 libraries (copy of scripts/run_cuda.sh)
#   bench_torch_unet.py  the PyTorch side of the training-step benchmark
#   manifest.json        git revision, build settings, size and sha256 of every file, the
#                        libraries the binary needs
# No CUDA library is bundled: the GPU machine's PyTorch environment (nvidia-* wheels: cudart,
# cuBLAS, cuRAND, cuDNN 9) provides them, found by run_cuda.sh.
#
# PTX choice: CUDA_COMPUTE_CAP=90 (default) makes candle-kernels embed PTX for sm_90a, which only
# H100/H200 (compute capability 9.0) can load; the driver JIT-compiles it on first use (cached in
# ~/.nv/ComputeCache). nvcc 13.0 (pinned in build_cuda.sh) needs driver R580+. For another GPU set
# CUDA_COMPUTE_CAP=80 (PTX any GPU from Ampere on can JIT, slower kernels on H100).
#
# Env: CARGO_TARGET_DIR (default ./target-cuda, so the CPU build in ./target is untouched),
#      CUDA_COMPUTE_CAP (default 90), NNSEG_CUDA_FEATURES (default cudnn), NNSEG_BUNDLE_DIR
#      (default ./gpu_bundle), NNSEG_BUNDLE_MAX_MIB (default 60), XZ_OPT (default -9 -T0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_bundle.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export NNSEG_CUDA_FEATURES="${NNSEG_CUDA_FEATURES:-cudnn}"
# No debug info (a third of the binary, and link time), symbols stripped by the linker.
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_STRIP=symbols
out="${NNSEG_BUNDLE_DIR:-$ROOT/gpu_bundle}"
max_mib="${NNSEG_BUNDLE_MAX_MIB:-60}"
log() { echo "[gpu_bundle] $*" >&2; }

for t in xz python3; do
    command -v "$t" >/dev/null || { echo "gpu_bundle.sh: $t is needed" >&2; exit 1; }
done

build_s=0
if [ "$build" = 1 ]; then
    log "building: features=$NNSEG_CUDA_FEATURES CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP target dir $CARGO_TARGET_DIR"
    t0=$(date +%s)
    CARGO_PROFILE=release scripts/build_cuda.sh
    build_s=$(( $(date +%s) - t0 ))
    log "build took ${build_s} s"
fi
bin="$CARGO_TARGET_DIR/release/nnseg"
[ -x "$bin" ] || { echo "gpu_bundle.sh: no binary at $bin (run without --no-build)" >&2; exit 1; }
grep -aq 'libcublas.so' "$bin" || { echo "gpu_bundle.sh: $bin is not a CUDA build" >&2; exit 1; }
case ",$NNSEG_CUDA_FEATURES," in
*,cudnn,*) grep -aq 'libcudnn.so.9' "$bin" || { echo "gpu_bundle.sh: $bin does not link cuDNN" >&2; exit 1; } ;;
esac

rm -rf "$out.tmp"
mkdir -p "$out.tmp"
cp "$bin" "$out.tmp/nnseg"
# the linker already stripped the symbols; strip what is left (section names, notes) if we can
if command -v strip >/dev/null 2>&1; then strip --strip-all "$out.tmp/nnseg"; fi
raw_bytes=$(stat -c %s "$bin")
stripped_bytes=$(stat -c %s "$out.tmp/nnseg")
bin_sha="$(sha256sum "$out.tmp/nnseg" | cut -d' ' -f1)"
needed="$( (readelf -d "$out.tmp/nnseg" 2>/dev/null || objdump -p "$out.tmp/nnseg" 2>/dev/null || true) \
    | awk '/NEEDED/ { gsub(/[][]/, "", $NF); print $NF }' | sort -u | tr '\n' ' ')"
log "compressing $stripped_bytes bytes with xz ${XZ_OPT:--9 -T0}"
t0=$(date +%s)
XZ_OPT="${XZ_OPT:--9 -T0}" xz -z "$out.tmp/nnseg"
xz_s=$(( $(date +%s) - t0 ))
cp scripts/gpu_acceptance.sh scripts/run_cuda.sh scripts/bench_torch_unet.py "$out.tmp/"
chmod +x "$out.tmp/gpu_acceptance.sh" "$out.tmp/run_cuda.sh"

rev="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
dirty=false
if [ "$rev" != unknown ] && ! git diff --quiet HEAD -- . 2>/dev/null; then dirty=true; fi
nvcc_v="$(eval "$(scripts/build_cuda.sh --env)"; "$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n1)" || nvcc_v=unknown
python3 - "$out.tmp" "$rev" "$dirty" "$build_s" "$xz_s" "$raw_bytes" "$stripped_bytes" "$bin_sha" \
    "$needed" "$nvcc_v" "$(rustc --version 2>/dev/null || echo unknown)" "$max_mib" <<'EOF'
import hashlib, json, os, sys, time
d, rev, dirty, build_s, xz_s, raw, stripped, sha, needed, nvcc, rustc, max_mib = sys.argv[1:]
files = {}
for f in sorted(os.listdir(d)):
    p = os.path.join(d, f)
    files[f] = {"bytes": os.path.getsize(p), "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()}
total = sum(v["bytes"] for v in files.values())
m = {
    "what": "nnseg GPU bundle (scripts/gpu_bundle.sh); run: gpu_bundle/gpu_acceptance.sh OUT_DIR",
    "git_revision": rev,
    "git_dirty": dirty == "true",
    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "features": os.environ.get("NNSEG_CUDA_FEATURES"),
    "cuda_compute_cap": os.environ.get("CUDA_COMPUTE_CAP"),
    "ptx_target": "sm_%sa" % os.environ.get("CUDA_COMPUTE_CAP") if os.environ.get("CUDA_COMPUTE_CAP") == "90" else "sm_%s" % os.environ.get("CUDA_COMPUTE_CAP"),
    "nvcc": nvcc,
    "rustc": rustc,
    "profile": "release, debug=0, strip=symbols",
    "binary": {
        "name": "nnseg", "packed_as": "nnseg.xz",
        "bytes_built": int(raw), "bytes_stripped": int(stripped), "sha256": sha,
        "needed_libraries": needed.split(),
    },
    "build_seconds": int(build_s),
    "xz_seconds": int(xz_s),
    "files": files,
    "total_bytes_without_manifest": total,
    "limit_mib": float(max_mib),
}
json.dump(m, open(os.path.join(d, "manifest.json"), "w"), indent=1)
EOF
total=$(du -cb "$out.tmp"/* | tail -n1 | cut -f1)
rm -rf "$out"
mv "$out.tmp" "$out"
log "bundle $out:"
(cd "$out" && ls -l) >&2
mib=$(python3 -c "print(f'{$total/2**20:.1f}')")
log "binary: built $raw_bytes B, stripped $stripped_bytes B, xz $(stat -c %s "$out/nnseg.xz") B (${xz_s} s)"
log "total ${mib} MiB (limit ${max_mib} MiB), git $rev$([ "$dirty" = true ] && echo ' (+ uncommitted changes)')"
if python3 -c "import sys; sys.exit(0 if $total <= $max_mib * 2**20 else 1)"; then
    log "ok. On the GPU machine: gpu_bundle/gpu_acceptance.sh OUT_DIR   (see README, 'First run on a GPU machine')"
else
    echo "gpu_bundle.sh: the bundle is ${mib} MiB, over the ${max_mib} MiB limit" >&2
    exit 1
fi
