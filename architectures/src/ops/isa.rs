//! Instruction-set selection for the CPU GEMM of the convolution kernels.
//!
//! The `gemm` crate picks its micro-kernel once per process with `is_x86_feature_detected!`
//! (AVX-512 when the crate's `x86-v4` feature is compiled in, which this crate enables, else
//! FMA/AVX2, else scalar) and offers no override. To measure (and test) the AVX2 path on an
//! AVX-512 host, every GEMM of `kernels` goes through [`gemm`] here: on the default path it calls
//! `gemm::gemm`; when the AVX2 path is selected it runs gemm's own FMA/AVX2 micro-kernels through
//! `gemm_common::gemm::gemm_basic_generic`, exactly what `gemm` runs on an AVX2-only CPU.
//!
//! Selection: [`set_gemm_isa`] at run time; the `nnseg` binary and the benches call it with
//! [`parse_isa`] of the environment variable `NNSEG_ISA` (`avx2` or `fma` forces the AVX2 path,
//! `auto` / `avx512` / unset keep the detected one). This library reads no environment.
//! Forcing AVX2 needs a CPU with AVX2 + FMA; elsewhere the request is ignored. Only the
//! convolution kernels' GEMMs are affected: Candle's own matmul keeps gemm's detection, and the
//! other ops are compiled for the baseline target (no AVX-512 code to switch off).

use std::sync::atomic::{AtomicU8, Ordering};

/// The GEMM micro-kernel family the convolution kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmIsa {
    /// whatever `gemm` detects (AVX-512 where available)
    Auto,
    /// gemm's FMA/AVX2 micro-kernels (8-lane f32), as on an AVX2-only CPU
    Avx2,
}

const UNSET: u8 = 0;
const AUTO: u8 = 1;
const AVX2: u8 = 2;

static SELECTED: AtomicU8 = AtomicU8::new(UNSET);

/// Whether this CPU can run gemm's FMA/AVX2 kernels.
fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Parses an `NNSEG_ISA` value; unknown values select `Auto`.
pub fn parse_isa(v: &str) -> GemmIsa {
    match v.trim().to_ascii_lowercase().as_str() {
        "avx2" | "fma" | "x86-v3" => GemmIsa::Avx2,
        _ => GemmIsa::Auto,
    }
}

/// Selects the GEMM path from now on (for every thread). A request for AVX2 on a CPU without
/// AVX2 + FMA selects `Auto`.
pub fn set_gemm_isa(isa: GemmIsa) {
    let v = match isa {
        GemmIsa::Avx2 if avx2_available() => AVX2,
        _ => AUTO,
    };
    SELECTED.store(v, Ordering::Relaxed);
}

/// The GEMM path in use (`Auto` unless [`set_gemm_isa`] selected another).
pub fn gemm_isa() -> GemmIsa {
    match SELECTED.load(Ordering::Relaxed) {
        AVX2 => GemmIsa::Avx2,
        _ => GemmIsa::Auto,
    }
}

/// Whether the direct convolution kernels of `direct` run: on every CPU with AVX2 and FMA,
/// whichever GEMM path is selected (they beat the GEMM paths on the layers they take: 0.013
/// against 0.017 s for the (2,32,256²) 3x3 forward on a Zen 4 EPYC). Their register tiles are
/// AVX-512 ones on the default path of an AVX-512 host ([`direct_avx512`]), AVX2 ones otherwise.
pub(crate) fn direct_kernels() -> bool {
    avx2_available()
}

/// Whether the direct kernels run their AVX-512 register tile: on the default path of a CPU with
/// AVX-512F (not when the AVX2 path is forced, so that it measures what an AVX2-only CPU runs).
pub(crate) fn direct_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        gemm_isa() == GemmIsa::Auto && is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Destination rows (along its contiguous axis) below which the AVX-512 path still runs gemm's
/// AVX2 micro-kernel. Column-major products (the 32-128-channel weight gradients) measured faster
/// on it on a Zen 4 EPYC (2 threads, (2,C,H,W) 3x3 weight gradient): 0.023 against 0.017 s at 32
/// channels (the AVX-512 kernel's 64-row tile half empty), 0.0052 against 0.0043 s at 64
/// (stride 2), 0.0079 against 0.0063 s at 128. Row-major products, which gemm computes
/// transposed, switch only below [`NARROW_ROWS_TRANSPOSED`]: the deep levels' batch-wide input
/// gradient (64 rows at 8x4) was 0.0015 s on AVX-512 against 0.0021 s on AVX2.
const NARROW_ROWS: usize = 192;
const NARROW_ROWS_TRANSPOSED: usize = 64;

/// Whether an `m x n` product with these destination strides is narrow enough for the AVX2
/// micro-kernel on an AVX-512 host (see [`NARROW_ROWS`]).
fn narrow(m: usize, n: usize, dst_cs: isize, dst_rs: isize) -> bool {
    let narrow = if dst_cs < dst_rs {
        n < NARROW_ROWS_TRANSPOSED
    } else {
        m < NARROW_ROWS
    };
    narrow && avx2_available()
}

/// The CPU features that matter here, e.g. `avx2 fma avx512f`.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let f = [
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
        ];
        let on: Vec<&str> = f.iter().filter(|(_, d)| *d).map(|(n, _)| *n).collect();
        if on.is_empty() {
            "none of avx2/fma/avx512f".to_string()
        } else {
            on.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// The micro-kernel family the convolution GEMMs actually run, e.g.
/// `avx2/fma (forced: NNSEG_ISA=avx2)` or `avx512f (detected; gemm x86-v4 compiled in)`.
pub fn gemm_path() -> String {
    if gemm_isa() == GemmIsa::Avx2 {
        return "avx2/fma 16x6 f32 micro-kernel (forced: NNSEG_ISA=avx2 or set_gemm_isa)".into();
    }
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            "avx512f 64x6 f32 micro-kernel (detected; gemm x86-v4 compiled in; avx2/fma 16x6 for \
             narrow products; AVX-512 tiles in the direct kernels)"
                .into()
        } else if avx2_available() {
            "avx2/fma 16x6 f32 micro-kernel (detected)".into()
        } else {
            "scalar (detected)".into()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        format!("gemm default for {}", std::env::consts::ARCH)
    }
}

/// `dst := (read_dst ? dst : 0) + lhs * rhs` with gemm's column/row strides (gemm's argument
/// order, alpha = beta = 1), on the selected path.
///
/// # Safety
/// As `gemm::gemm`: every pointer with its strides must be valid for the `m x n x k` product.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: super::kernels::Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const T,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const T,
    rhs_cs: isize,
    rhs_rs: isize,
    par: gemm::Parallelism,
) {
    #[cfg(target_arch = "x86_64")]
    if (gemm_isa() == GemmIsa::Avx2 || narrow(m, n, dst_cs, dst_rs))
        && [dst_cs, dst_rs, lhs_cs, lhs_rs, rhs_cs, rhs_rs]
            .iter()
            .all(|&s| s >= 0)
    {
        use std::any::TypeId;
        // As `gemm::gemm` does before its dispatch: the micro-kernels want a column-major
        // destination, so a row-major product is computed as its transpose.
        let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = if dst_cs < dst_rs {
            (
                n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs,
            )
        } else {
            (
                m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
            )
        };
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            return avx2::gemm_f32(
                m,
                n,
                k,
                dst.cast(),
                dst_cs,
                dst_rs,
                read_dst,
                lhs.cast(),
                lhs_cs,
                lhs_rs,
                rhs.cast(),
                rhs_cs,
                rhs_rs,
                par,
            );
        }
        if TypeId::of::<T>() == TypeId::of::<f64>() {
            return avx2::gemm_f64(
                m,
                n,
                k,
                dst.cast(),
                dst_cs,
                dst_rs,
                read_dst,
                lhs.cast(),
                lhs_cs,
                lhs_rs,
                rhs.cast(),
                rhs_cs,
                rhs_rs,
                par,
            );
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        read_dst,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        par,
    );
}

/// gemm's FMA/AVX2 kernels called directly (what `gemm::gemm` runs on an AVX2-only CPU).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use gemm_common::gemm::gemm_basic_generic;
    use gemm_common::simd::{MixedSimd, V3};

    macro_rules! fma_gemm {
        ($name:ident, $ty:ty, $ukr:path) => {
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                m: usize,
                n: usize,
                k: usize,
                dst: *mut $ty,
                dst_cs: isize,
                dst_rs: isize,
                read_dst: bool,
                lhs: *const $ty,
                lhs_cs: isize,
                lhs_rs: isize,
                rhs: *const $ty,
                rhs_cs: isize,
                rhs_rs: isize,
                par: gemm::Parallelism,
            ) {
                use $ukr as u;
                const N: usize = 32 / std::mem::size_of::<$ty>();
                let simd = <V3 as MixedSimd<$ty, $ty, $ty, $ty>>::try_new()
                    .expect("AVX2 + FMA checked by set_gemm_isa");
                gemm_basic_generic::<
                    _,
                    $ty,
                    N,
                    { u::MR_DIV_N * N },
                    { u::NR },
                    { u::MR_DIV_N },
                    { u::H_M },
                    { u::H_N },
                >(
                    simd,
                    m,
                    n,
                    k,
                    dst,
                    dst_cs,
                    dst_rs,
                    read_dst,
                    lhs,
                    lhs_cs,
                    lhs_rs,
                    rhs,
                    rhs_cs,
                    rhs_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    |a, b, c| a * b + c,
                    &u::UKR,
                    &u::H_UKR,
                    false,
                    par,
                );
            }
        };
    }

    fma_gemm!(gemm_f32, f32, gemm_f32::microkernel::fma::f32);
    fma_gemm!(gemm_f64, f64, gemm_f64::microkernel::fma::f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_values() {
        assert_eq!(parse_isa("avx2"), GemmIsa::Avx2);
        assert_eq!(parse_isa(" AVX2 "), GemmIsa::Avx2);
        assert_eq!(parse_isa("fma"), GemmIsa::Avx2);
        assert_eq!(parse_isa("auto"), GemmIsa::Auto);
        assert_eq!(parse_isa("avx512"), GemmIsa::Auto);
        assert_eq!(parse_isa("bogus"), GemmIsa::Auto);
    }

    fn naive(m: usize, n: usize, k: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    /// The forced AVX2 kernels (f32 and f64, serial and parallel, overwrite and accumulate)
    /// agree with a naive product, including edge tiles (m, n not multiples of 16 x 6).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn forced_avx2_matches_naive() {
        if !avx2_available() {
            return;
        }
        let (m, n, k) = (37, 29, 23);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7) % 13) as f64 - 6.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5) % 11) as f64 - 5.0).collect();
        let want = naive(m, n, k, &a, &b);
        for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)] {
            for acc in [false, true] {
                let mut c64 = vec![1.0f64; m * n];
                let mut c32 = vec![1.0f32; m * n];
                let (a32, b32): (Vec<f32>, Vec<f32>) = (
                    a.iter().map(|&v| v as f32).collect(),
                    b.iter().map(|&v| v as f32).collect(),
                );
                // SAFETY: row-major buffers of the stated sizes.
                unsafe {
                    let s = |v: usize| v as isize;
                    avx2::gemm_f64(
                        m,
                        n,
                        k,
                        c64.as_mut_ptr(),
                        1,
                        s(n),
                        acc,
                        a.as_ptr(),
                        1,
                        s(k),
                        b.as_ptr(),
                        1,
                        s(n),
                        par,
                    );
                    avx2::gemm_f32(
                        m,
                        n,
                        k,
                        c32.as_mut_ptr(),
                        1,
                        s(n),
                        acc,
                        a32.as_ptr(),
                        1,
                        s(k),
                        b32.as_ptr(),
                        1,
                        s(n),
                        par,
                    );
                }
                let add = if acc { 1.0 } else { 0.0 };
                for i in 0..m * n {
                    assert_eq!(c64[i], want[i] + add);
                    assert_eq!(c32[i] as f64, want[i] + add);
                }
            }
        }
    }
}
