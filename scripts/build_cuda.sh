#!/usr/bin/env bash
# Builds the CUDA binary of nnseg (`--features cudnn` by default) on a plain Linux machine: no GPU,
# no NVIDIA driver and no CUDA install needed. Idempotent: a second run only re-runs cargo.
#
#   scripts/build_cuda.sh                 # -> ${CARGO_TARGET_DIR:-target}/release/nnseg
#   scripts/build_cuda.sh --env           # print the exports (eval "$(scripts/build_cuda.sh --env)")
#   scripts/build_cuda.sh -- <cargo args> # extra arguments for cargo (e.g. --bench conv --no-run)
#
# What it does:
#  1. Fetches the pinned CUDA toolkit 13.0.2 from PyPI (nvcc, headers, cudart, cuBLAS, cuRAND, NVRTC)
#     into $NNSEG_CUDA_DIR (default ./.cuda, git-ignored; about 1.2 GB). Pinned because the PTX that
#     candle-kernels embeds must be JIT-able by a CUDA 13.0 driver (R580); newer nvcc emits a newer
#     PTX ISA. Skipped when CUDA_ROOT already points at a toolkit with bin/nvcc.
#  2. Adds the unversioned .so links the linker needs and a link-only libcuda.so stub (soname
#     libcuda.so.1) exporting every cu* symbol cudarc declares; the real driver replaces it at run
#     time. The stub is never put on LD_LIBRARY_PATH.
#  3. Builds with CUDA_COMPUTE_CAP (default 90 = sm_90a, H100/H200 only; use 80 for PTX any
#     Ampere-or-newer GPU can JIT).
#  The default feature set is "cudnn" (convolutions on cuDNN 9): it also fetches cuDNN
#  (nvidia-cudnn-cu13, pinned, ~900 MB) into the same folder and links against it (any cuDNN 9.x
#  works at run time: soname libcudnn.so.9). NNSEG_CUDA_FEATURES=cuda builds without cuDNN (the
#  composite convolution path, the fallback).
# A compile check without any toolkit (CI): scripts/check_cuda.sh. A carry-over bundle for a GPU
# machine (stripped, compressed, with the acceptance script): scripts/gpu_bundle.sh.
# Env: CUDA_ROOT, CUDA_COMPUTE_CAP, NNSEG_CUDA_DIR, NNSEG_CUDA_FEATURES (default "cudnn", or
# "cuda"), CARGO_TARGET_DIR, CARGO_PROFILE (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

TOOLKIT_VERSION="13.0.2"
TOOLKIT_SPEC="cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,cublas,curand,nvrtc]==${TOOLKIT_VERSION}"
CUDNN_VERSION="9.13.0.50"
CUDA_DIR="${NNSEG_CUDA_DIR:-$ROOT/.cuda}"
FEATURES="${NNSEG_CUDA_FEATURES:-cudnn}"
PROFILE="${CARGO_PROFILE:-release}"

mode=build
cargo_extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --env) mode="env" ;;
        --) shift; cargo_extra=("$@"); break ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "build_cuda.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

log() { [ "$mode" = env ] || echo "[build_cuda] $*" >&2; }

# ---- 1. toolkit -------------------------------------------------------------------------------
own=0
if [ -n "${CUDA_ROOT:-}" ] && [ -x "${CUDA_ROOT}/bin/nvcc" ]; then
    log "using CUDA_ROOT=$CUDA_ROOT"
else
    own=1
    site="$CUDA_DIR/site"
    marker="$CUDA_DIR/.installed-$TOOLKIT_VERSION"
    if [ ! -f "$marker" ]; then
        log "fetching $TOOLKIT_SPEC from PyPI into $site (about 1.2 GB)"
        py="${PYTHON:-python3}"
        command -v "$py" >/dev/null || { echo "build_cuda.sh: python3 is needed to fetch the CUDA toolkit wheels (or set CUDA_ROOT)" >&2; exit 1; }
        mkdir -p "$CUDA_DIR"
        if ! "$py" -m pip --version >/dev/null 2>&1; then
            # No pip for this python: a throw-away venv brings one.
            "$py" -m venv "$CUDA_DIR/venv"
            py="$CUDA_DIR/venv/bin/python"
        fi
        rm -rf "$site"
        "$py" -m pip install --disable-pip-version-check --no-warn-script-location -q \
            --target "$site" "$TOOLKIT_SPEC"
        touch "$marker"
    fi
    CUDA_ROOT="$site/nvidia/cu13"
    [ -x "$CUDA_ROOT/bin/nvcc" ] || { echo "build_cuda.sh: no nvcc under $site/nvidia/cu13 (delete $CUDA_DIR and retry)" >&2; exit 1; }
fi

# ---- 2. link names + libcuda stub --------------------------------------------------------------
libdir="$CUDA_ROOT/lib"
[ -d "$CUDA_ROOT/lib64" ] && [ ! -d "$libdir" ] && libdir="$CUDA_ROOT/lib64"
# unversioned names for -lcudart -lcublas -lcublasLt -lcurand -lnvrtc (wheels ship only .so.N;
# an installed toolkit has them, and lib64/stubs/libcuda.so, already)
for f in "$libdir"/lib*.so.*; do
    if [ "$own" != 1 ] || [ ! -e "$f" ]; then continue; fi
    base="${f##*/}"; stem="${base%%.so.*}"
    case "$stem" in libnvrtc-builtins*|*.alt) continue ;; esac
    [ -e "$libdir/$stem.so" ] || ln -s "$base" "$libdir/$stem.so"
done
stubdir="$libdir/stubs"
if [ ! -e "$stubdir/libcuda.so" ] && [ ! -e "$libdir/libcuda.so" ]; then
    [ "$own" = 1 ] || { echo "build_cuda.sh: $CUDA_ROOT has no lib64/stubs/libcuda.so; unset CUDA_ROOT to use the PyPI toolkit" >&2; exit 1; }
    # cudarc's build script adds only search dirs that exist, so this must be in place before the
    # first cargo run. The symbol list comes from cudarc's own driver bindings.
    log "writing link-only libcuda.so stub in $stubdir"
    command -v cc >/dev/null || { echo "build_cuda.sh: a C compiler (cc) is needed for the libcuda stub" >&2; exit 1; }
    cudarc_dir="$(cargo metadata --format-version 1 --features "$FEATURES" 2>/dev/null \
        | python3 -c 'import json,sys,os
m=json.load(sys.stdin)
p=[os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"]
print(p[0] if p else "")')"
    bindings="$cudarc_dir/src/driver/sys/mod.rs"
    [ -f "$bindings" ] || { echo "build_cuda.sh: cudarc sources not found (cargo fetch first?)" >&2; exit 1; }
    mkdir -p "$stubdir"
    tmpc="$stubdir/libcuda_stub.c"
    grep -ohE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$bindings" \
        | sed -E 's/^[[:space:]]+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
        | awk 'BEGIN{print "/* link-time stand-in for the NVIDIA driver; never loaded (soname libcuda.so.1) */"}
               {printf "int %s(void) { return 999; }\n", $1}' >"$tmpc"
    n=$(grep -c '^int ' "$tmpc")
    [ "$n" -gt 100 ] || { echo "build_cuda.sh: only $n cu* symbols found in $bindings" >&2; exit 1; }
    cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stubdir/libcuda.so.tmp" "$tmpc"
    mv "$stubdir/libcuda.so.tmp" "$stubdir/libcuda.so"
    log "stub exports $n symbols"
fi

# ---- 2b. cuDNN for the cudnn feature ------------------------------------------------------------
case ",$FEATURES," in
*,cudnn,*)
    if [ "$own" = 1 ]; then
        cudnn_site="$CUDA_DIR/cudnn-site"
        cmarker="$CUDA_DIR/.installed-cudnn-$CUDNN_VERSION"
        if [ ! -f "$cmarker" ]; then
            log "fetching nvidia-cudnn-cu13==$CUDNN_VERSION from PyPI into $cudnn_site"
            py="${PYTHON:-python3}"
            "$py" -m pip --version >/dev/null 2>&1 || py="$CUDA_DIR/venv/bin/python"
            rm -rf "$cudnn_site"
            "$py" -m pip install --disable-pip-version-check --no-warn-script-location -q --no-deps \
                --target "$cudnn_site" "nvidia-cudnn-cu13==$CUDNN_VERSION"
            touch "$cmarker"
        fi
        cudnn_so="$(find "$cudnn_site" -name 'libcudnn.so.9' | head -n1)"
        [ -n "$cudnn_so" ] || { echo "build_cuda.sh: no libcudnn.so.9 under $cudnn_site (delete $cmarker and retry)" >&2; exit 1; }
        cudnn_lib="$(dirname "$cudnn_so")"
        # the linker looks in the toolkit's lib dir: an unversioned link to cuDNN there
        [ -e "$libdir/libcudnn.so" ] || ln -s "$cudnn_so" "$libdir/libcudnn.so"
        export LD_LIBRARY_PATH="$cudnn_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    else
        log "cudnn feature with CUDA_ROOT=$CUDA_ROOT: cuDNN 9 (libcudnn.so) must be on the linker path"
    fi ;;
esac

# ---- 3. environment + cargo --------------------------------------------------------------------
export CUDA_ROOT CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT"
export NVCC="$CUDA_ROOT/bin/nvcc"
export PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
ldp="$libdir"
[ -d "$CUDA_ROOT/nvvm/lib64" ] && ldp="$ldp:$CUDA_ROOT/nvvm/lib64"
export LD_LIBRARY_PATH="$ldp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ "$mode" = env ]; then
    for v in CUDA_ROOT CUDA_HOME CUDA_PATH NVCC PATH CUDA_COMPUTE_CAP LD_LIBRARY_PATH; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    exit 0
fi

log "nvcc: $("$NVCC" --version | tail -n2 | head -n1)  CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP  features=$FEATURES"
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
start=$(date +%s)
cargo build --profile "$PROFILE" --features "$FEATURES" --bin nnseg ${cargo_extra[@]+"${cargo_extra[@]}"}
pdir="$PROFILE"; [ "$PROFILE" = dev ] && pdir=debug
bin="$target_dir/$pdir/nnseg"
log "built $bin in $(( $(date +%s) - start )) s"
log "run it on a GPU machine with: scripts/run_cuda.sh [args]  (NNSEG_BIN=$bin)"
