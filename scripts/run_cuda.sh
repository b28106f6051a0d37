#!/usr/bin/env bash
# Runs the CUDA build of nnseg (made by scripts/build_cuda.sh) on a GPU machine: finds the CUDA 13
# runtime libraries the binary links against, puts them on LD_LIBRARY_PATH and execs it.
#
#   scripts/run_cuda.sh train 991 2d 0 --device cuda
#   NNSEG_BIN=/path/to/nnseg scripts/run_cuda.sh --help
#   NNSEG_RUN_CUDA_VERBOSE=1 scripts/run_cuda.sh ...   # print where each library was found
#   scripts/run_cuda.sh --print-env                    # only print the LD_LIBRARY_PATH export
#
# Needed at run time: the NVIDIA driver (libcuda.so.1, R580+ for CUDA 13) and libcudart.so.13,
# libcublas.so.13, libcublasLt.so.13, libcurand.so.10 (+ libcudnn.so.9 for a cudnn build).
# Searched, first hit wins: $NNSEG_CUDA_LIBS (colon-separated dirs), $CUDA_ROOT/$CUDA_HOME/
# $CUDA_PATH, /usr/local/cuda*, $CONDA_PREFIX/lib, the nvidia/*/lib folders of every Python
# environment on PATH (a PyTorch cu13x install brings all of them: `pip install torch` or
# `pip install "cuda-toolkit[cudart,cublas,curand]==13.0.2"`), the system linker cache, and last
# the toolkit build_cuda.sh downloaded into ./.cuda.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
verbose="${NNSEG_RUN_CUDA_VERBOSE:-0}"
say() { if [ "$verbose" = 1 ]; then echo "[run_cuda] $*" >&2; fi; }

# ---- the binary ------------------------------------------------------------------------------
bin="${NNSEG_BIN:-}"
if [ -z "$bin" ]; then
    for c in "${CARGO_TARGET_DIR:-}/release/nnseg" "$here/target-cuda/release/nnseg" "$here/target/release/nnseg"; do
        [ -x "$c" ] && grep -aq 'libcublas.so' "$c" && { bin="$c"; break; }
    done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "run_cuda.sh: no CUDA build of nnseg found (build it with scripts/build_cuda.sh, or set NNSEG_BIN)" >&2
    exit 1
fi
grep -aq 'libcublas.so' "$bin" || echo "run_cuda.sh: warning: $bin does not look like a CUDA build (no libcublas in it)" >&2

need=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10)
grep -aq 'libcudnn.so.9' "$bin" && need+=(libcudnn.so.9)
grep -aq 'libnvrtc.so.13' "$bin" && need+=(libnvrtc.so.13)

# ---- candidate folders -----------------------------------------------------------------------
cands=()
IFS=: read -r -a extra <<<"${NNSEG_CUDA_LIBS:-}"
cands+=(${extra[@]+"${extra[@]}"})
for r in "${CUDA_ROOT:-}" "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13*; do
    [ -n "$r" ] && cands+=("$r/lib64" "$r/lib" "$r/targets/x86_64-linux/lib" "$r/targets/sbsa-linux/lib")
done
[ -n "${CONDA_PREFIX:-}" ] && cands+=("$CONDA_PREFIX/lib")
# nvidia/*/lib of Python environments (PyTorch's CUDA wheels; cuDNN is nvidia/cudnn/lib)
pys=()
for p in "${PYTHON:-}" python3 python; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && pys+=("$(command -v "$p")")
done
for p in ${pys[@]+"${pys[@]}"}; do
    while IFS= read -r d; do
        [ -n "$d" ] && cands+=("$d")
    done < <("$p" - 2>/dev/null <<'EOF' || true
import glob, os, site, sys
roots = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
seen = set()
for r in roots:
    for pat in ("nvidia/cu13/lib", "nvidia/*/lib", "nvidia/cu13/lib64", "torch/lib"):
        for d in sorted(glob.glob(os.path.join(r, pat))):
            d = os.path.realpath(d)
            if d not in seen and os.path.isdir(d):
                seen.add(d); print(d)
EOF
)
done
cands+=(/usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/lib/wsl/lib "$here/.cuda/site/nvidia/cu13/lib")

# ---- resolve each library ----------------------------------------------------------------------
ldp=()
missing=()
add_dir() {
    local d="$1" e
    for e in ${ldp[@]+"${ldp[@]}"}; do [ "$e" = "$d" ] && return 0; done
    ldp+=("$d")
}
for lib in "${need[@]}"; do
    found=""
    for d in ${cands[@]+"${cands[@]}"}; do
        [ -n "$d" ] && [ -e "$d/$lib" ] && { found="$d"; break; }
    done
    if [ -n "$found" ]; then
        say "$lib -> $found"
        add_dir "$found"
    else
        missing+=("$lib")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "run_cuda.sh: not found: ${missing[*]}" >&2
    echo "  install a CUDA 13 toolkit, or: python3 -m pip install \"cuda-toolkit[cudart,cublas,curand]==13.0.2\"" >&2
    echo "  (or point NNSEG_CUDA_LIBS at the folder holding them)" >&2
    exit 1
fi

# the driver: never take the build stub; warn when the loader cannot see a real one
driver=""
if command -v ldconfig >/dev/null 2>&1; then
    driver="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')"
fi
if [ -z "$driver" ]; then
    IFS=: read -r -a ldirs <<<"${LD_LIBRARY_PATH:-}"
    for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/lib/wsl/lib /usr/local/nvidia/lib64 ${ldirs[@]+"${ldirs[@]}"}; do
        [ -e "$d/libcuda.so.1" ] && { driver="$d/libcuda.so.1"; add_dir "$d"; break; }
    done
fi
[ -n "$driver" ] && say "libcuda.so.1 -> $driver" \
    || echo "run_cuda.sh: warning: no NVIDIA driver (libcuda.so.1) found; the binary will not start" >&2

joined="$(IFS=:; echo "${ldp[*]}")"
export LD_LIBRARY_PATH="$joined${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "${1:-}" = "--print-env" ]; then
    printf 'export LD_LIBRARY_PATH=%q\nexport NNSEG_BIN=%q\n' "$LD_LIBRARY_PATH" "$bin"
    exit 0
fi
say "exec $bin $*"
exec "$bin" "$@"
