//! Convolution benchmarks (CPU): our N-d conv / transposed conv custom ops vs Candle's conv2d.
//!
//! `cargo bench --bench conv` prints one `GFLOP/s` line per workload (best of a few runs; FLOPs
//! = 2 * MACs for a forward pass, x3 for forward + backward) and then runs the criterion
//! groups. `NNSEG_BENCH_QUICK=1` only prints the GFLOP/s table; a first argument selects the
//! workloads whose name starts with it.
//!
//! Instruction set: the header prints the detected CPU features and the GEMM micro-kernel the
//! convolution kernels actually run. `NNSEG_ISA=avx2` forces gemm's AVX2/FMA kernels on an
//! AVX-512 host (what an AVX2-only CPU runs; see `architectures/src/ops/isa.rs`).
//! `scripts/bench_conv_vs_torch.sh` runs this bench and PyTorch side by side, both ISA paths.
//!
//! Passes: `fwd` = forward; `fwd+bwd` = forward, loss `sum(y * r)` and Candle's `backward()`
//! (includes Candle's autograd bookkeeping: its single-threaded element-wise passes for the loss
//! and the zeros + add gradient accumulation); `kernels` = forward + input gradient + weight
//! gradient called directly, i.e. the convolution work of a training step. `NNSEG_BENCH_PARTS=1`
//! also times them one by one (`k:fwd`, `k:dx`, `k:dw`; GFLOP/s of one pass each).
//!
//! `NNSEG_BENCH_CPU=1` reports the CPU time of the process (all its threads; Linux) instead
//! of wall time: with `RAYON_NUM_THREADS=1` that is the
//! kernel's own time even on a loaded machine (`scripts/bench_conv_torch.py --cpu` likewise).

use architectures::ops::{self, ConvOpts, ConvTransposeOpts, NormAffine};
use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::Criterion;
use std::time::{Duration, Instant};

// Benchmark with the allocator and runtime settings the product uses (the binary's own
// modules): with another allocator, or mimalloc purging, the kernels' output and gradient
// buffers are page-faulted in again on every call (a third of the 1024->512 weight-gradient
// time in `perf`), which a training step does not pay.
#[cfg(unix)]
#[allow(dead_code)]
#[path = "../src/alloc.rs"]
mod alloc;
#[cfg(unix)]
#[path = "../src/runtime_env.rs"]
mod runtime_env;
#[cfg(unix)]
#[global_allocator]
static GLOBAL: alloc::NnsegAlloc = alloc::NnsegAlloc;
#[cfg(not(unix))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Forward + both gradient kernels of one workload, called directly; the last argument selects
/// which of them run ([`K_FWD`] | [`K_DX`] | [`K_DW`]).
type KernelsFn = fn(&Tensor, &Tensor, &Tensor, u8) -> Result<()>;

const K_FWD: u8 = 1;
const K_DX: u8 = 2;
const K_DW: u8 = 4;
const K_ALL: u8 = K_FWD | K_DX | K_DW;

struct Work {
    name: &'static str,
    /// multiply-adds of one forward pass (0 = not a conv: report time only)
    macs: f64,
    x: Var,
    w: Option<Var>,
    run: fn(&Tensor, Option<&Tensor>) -> Result<Tensor>,
    /// forward + both gradient kernels called directly (no autograd bookkeeping)
    kernels: Option<KernelsFn>,
}

fn randn(shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()).unwrap()
}

fn conv_p1(x: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    let w = w.expect("weight");
    ops::conv(x, w, None, &ConvOpts::new().padding([1]))
}
fn conv_s2(x: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    let w = w.expect("weight");
    ops::conv(x, w, None, &ConvOpts::new().padding([1]).stride([2]))
}
fn conv_aniso(x: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    let w = w.expect("weight");
    ops::conv(x, w, None, &ConvOpts::new().padding([0, 1, 1]))
}
fn conv_aniso_s122(x: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    let w = w.expect("weight");
    ops::conv(
        x,
        w,
        None,
        &ConvOpts::new().padding([0, 1, 1]).stride([1, 2, 2]),
    )
}
fn convt_k2(x: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    let w = w.expect("weight");
    ops::conv_transpose(x, w, None, &ConvTransposeOpts::new().stride([2]))
}
fn candle_conv2d(x: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    let w = w.expect("weight");
    x.conv2d(w, 1, 1, 1, 1)
}
fn in_lrelu(x: &Tensor, _w: Option<&Tensor>) -> Result<Tensor> {
    let y = ops::instance_norm(x, NormAffine::none(), 1e-5)?;
    ops::leaky_relu(&y, 0.01)
}

fn conv_kernels(x: &Tensor, w: &Tensor, r: &Tensor, o: &ConvOpts, which: u8) -> Result<()> {
    if which & K_FWD != 0 {
        std::hint::black_box(ops::conv(x, w, None, o)?);
    }
    if which & K_DX != 0 {
        std::hint::black_box(ops::conv_input_grad(r, w, &x.dims()[2..], o)?);
    }
    if which & K_DW != 0 {
        std::hint::black_box(ops::conv_weight_grad(x, r, &w.dims()[2..], o)?);
    }
    Ok(())
}
fn k_p1(x: &Tensor, w: &Tensor, r: &Tensor, which: u8) -> Result<()> {
    conv_kernels(x, w, r, &ConvOpts::new().padding([1]), which)
}
fn k_s2(x: &Tensor, w: &Tensor, r: &Tensor, which: u8) -> Result<()> {
    conv_kernels(x, w, r, &ConvOpts::new().padding([1]).stride([2]), which)
}
fn k_aniso(x: &Tensor, w: &Tensor, r: &Tensor, which: u8) -> Result<()> {
    conv_kernels(x, w, r, &ConvOpts::new().padding([0, 1, 1]), which)
}
fn k_aniso_s122(x: &Tensor, w: &Tensor, r: &Tensor, which: u8) -> Result<()> {
    conv_kernels(
        x,
        w,
        r,
        &ConvOpts::new().padding([0, 1, 1]).stride([1, 2, 2]),
        which,
    )
}
fn k_convt(x: &Tensor, w: &Tensor, r: &Tensor, which: u8) -> Result<()> {
    if which & K_FWD != 0 {
        std::hint::black_box(convt_k2(x, Some(w))?);
    }
    // transposed conv = conv input gradient: its own gradients are a conv and a weight gradient
    let o = ConvOpts::new().stride([2]);
    if which & K_DX != 0 {
        std::hint::black_box(ops::conv(r, w, None, &o)?);
    }
    if which & K_DW != 0 {
        std::hint::black_box(ops::conv_weight_grad(r, x, &w.dims()[2..], &o)?);
    }
    Ok(())
}

/// Forward multiply-adds of a convolution: batch, channels in and out, kernel taps, output
/// positions.
fn macs_conv(n: f64, cin: f64, cout: f64, k: f64, out: f64) -> f64 {
    n * cin * cout * k * out
}

fn workloads() -> Vec<Work> {
    let mut w = workloads_2d();
    w.extend(workloads_3d());
    w
}

/// The 2D workloads (the 2D plan of the issue-23 training step and Candle's own conv2d).
fn workloads_2d() -> Vec<Work> {
    vec![
        Work {
            name: "conv2d (2,32,256,256) 3x3 32->32",
            macs: macs_conv(2.0, 32.0, 32.0, 9.0, 65536.0),
            x: randn(&[2, 32, 256, 256]),
            w: Some(randn(&[32, 32, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "candle conv2d (2,32,256,256) 3x3 32->32",
            macs: macs_conv(2.0, 32.0, 32.0, 9.0, 65536.0),
            x: randn(&[2, 32, 256, 256]),
            w: Some(randn(&[32, 32, 3, 3])),
            run: candle_conv2d,
            kernels: None,
        },
        // the 2D plan of the issue-23 training step (PlainConvUNet 32-512, patch 256x128, batch 2)
        Work {
            name: "conv2d (2,32,256,128) 3x3 s2 32->64",
            macs: macs_conv(2.0, 32.0, 64.0, 9.0, 128.0 * 64.0),
            x: randn(&[2, 32, 256, 128]),
            w: Some(randn(&[64, 32, 3, 3])),
            run: conv_s2,
            kernels: Some(k_s2),
        },
        Work {
            name: "conv2d (2,128,64,32) 3x3 128->128",
            macs: macs_conv(2.0, 128.0, 128.0, 9.0, 64.0 * 32.0),
            x: randn(&[2, 128, 64, 32]),
            w: Some(randn(&[128, 128, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv2d (2,256,32,16) 3x3 256->256",
            macs: macs_conv(2.0, 256.0, 256.0, 9.0, 32.0 * 16.0),
            x: randn(&[2, 256, 32, 16]),
            w: Some(randn(&[256, 256, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv2d (2,512,8,4) 3x3 512->512",
            macs: macs_conv(2.0, 512.0, 512.0, 9.0, 8.0 * 4.0),
            x: randn(&[2, 512, 8, 4]),
            w: Some(randn(&[512, 512, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv2d (2,1024,16,8) 3x3 1024->512",
            macs: macs_conv(2.0, 1024.0, 512.0, 9.0, 16.0 * 8.0),
            x: randn(&[2, 1024, 16, 8]),
            w: Some(randn(&[512, 1024, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv_transpose2d k=s=2 (2,64,128,64)->32",
            macs: macs_conv(2.0, 64.0, 32.0, 4.0, 128.0 * 64.0),
            x: randn(&[2, 64, 128, 64]),
            w: Some(randn(&[64, 32, 2, 2])),
            run: convt_k2,
            kernels: Some(k_convt),
        },
    ]
}

/// The 3D workloads (nnU-Net-like levels, the 3D demo plan's levels, a norm + activation).
fn workloads_3d() -> Vec<Work> {
    vec![
        Work {
            name: "conv3d (2,32,64,64,64) 3x3x3 32->32",
            macs: macs_conv(2.0, 32.0, 32.0, 27.0, 262144.0),
            x: randn(&[2, 32, 64, 64, 64]),
            w: Some(randn(&[32, 32, 3, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv3d (2,32,16,128,128) 1x3x3 32->32",
            macs: macs_conv(2.0, 32.0, 32.0, 9.0, 16.0 * 128.0 * 128.0),
            x: randn(&[2, 32, 16, 128, 128]),
            w: Some(randn(&[32, 32, 1, 3, 3])),
            run: conv_aniso,
            kernels: Some(k_aniso),
        },
        Work {
            name: "conv3d (2,32,16,128,128) 1x3x3 s(1,2,2)",
            macs: macs_conv(2.0, 32.0, 32.0, 9.0, 16.0 * 64.0 * 64.0),
            x: randn(&[2, 32, 16, 128, 128]),
            w: Some(randn(&[32, 32, 1, 3, 3])),
            run: conv_aniso_s122,
            kernels: Some(k_aniso_s122),
        },
        // the 3D demo plan of the issue-23 training step (24x56x56, batch 2, 32..320): its
        // 3x3x3 levels hold most of the step's FLOPs
        Work {
            name: "conv3d (2,64,24,28,28) 1x3x3 64->64",
            macs: macs_conv(2.0, 64.0, 64.0, 9.0, 24.0 * 28.0 * 28.0),
            x: randn(&[2, 64, 24, 28, 28]),
            w: Some(randn(&[64, 64, 1, 3, 3])),
            run: conv_aniso,
            kernels: Some(k_aniso),
        },
        Work {
            name: "conv3d (2,128,24,14,14) 3x3x3 128->128",
            macs: macs_conv(2.0, 128.0, 128.0, 27.0, 24.0 * 14.0 * 14.0),
            x: randn(&[2, 128, 24, 14, 14]),
            w: Some(randn(&[128, 128, 3, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv3d (2,256,24,14,14) 3x3x3 256->128",
            macs: macs_conv(2.0, 256.0, 128.0, 27.0, 24.0 * 14.0 * 14.0),
            x: randn(&[2, 256, 24, 14, 14]),
            w: Some(randn(&[128, 256, 3, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv3d (2,256,12,7,7) 3x3x3 256->256",
            macs: macs_conv(2.0, 256.0, 256.0, 27.0, 12.0 * 7.0 * 7.0),
            x: randn(&[2, 256, 12, 7, 7]),
            w: Some(randn(&[256, 256, 3, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv3d (2,320,6,7,7) 3x3x3 320->320",
            macs: macs_conv(2.0, 320.0, 320.0, 27.0, 6.0 * 7.0 * 7.0),
            x: randn(&[2, 320, 6, 7, 7]),
            w: Some(randn(&[320, 320, 3, 3, 3])),
            run: conv_p1,
            kernels: Some(k_p1),
        },
        Work {
            name: "conv_transpose3d k=s=2 (2,64,32^3)->32",
            macs: macs_conv(2.0, 64.0, 32.0, 8.0, 32768.0),
            x: randn(&[2, 64, 32, 32, 32]),
            w: Some(randn(&[64, 32, 2, 2, 2])),
            run: convt_k2,
            kernels: Some(k_convt),
        },
        Work {
            name: "instance_norm+leaky_relu (2,32,64^3)",
            macs: 0.0,
            x: randn(&[2, 32, 64, 64, 64]),
            w: None,
            run: in_lrelu,
            kernels: None,
        },
    ]
}

fn fwd(wk: &Work) -> Result<Tensor> {
    (wk.run)(wk.x.as_tensor(), wk.w.as_ref().map(|w| w.as_tensor()))
}

fn fwd_bwd(wk: &Work, r: &Tensor) -> Result<()> {
    let y = fwd(wk)?;
    let loss = (y * r)?.sum_all()?;
    let g = loss.backward()?;
    std::hint::black_box(g.get(wk.x.as_tensor()).map(|t| t.dims().len()));
    Ok(())
}

/// CPU time of this process so far (all its threads, exited ones included):
/// `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)` from the C library std links anyway.
#[cfg(target_os = "linux")]
fn cpu_time() -> Duration {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: a valid out-pointer for the libc call.
    if unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.sec as u64, ts.nsec as u32)
}
#[cfg(not(target_os = "linux"))]
fn cpu_time() -> Duration {
    Duration::ZERO
}

fn best_of(n: usize, mut f: impl FnMut()) -> Duration {
    let cpu = std::env::var("NNSEG_BENCH_CPU").is_ok();
    f(); // warm-up
    (0..n)
        .map(|_| {
            let (t, c) = (
                Instant::now(),
                if cpu { cpu_time() } else { Duration::ZERO },
            );
            f();
            if cpu {
                cpu_time().saturating_sub(c)
            } else {
                t.elapsed()
            }
        })
        .min()
        .unwrap_or_default()
}

fn report(name: &str, pass: &str, macs: f64, mult: f64, d: Duration) {
    let s = d.as_secs_f64();
    if macs > 0.0 {
        println!(
            "GFLOP/s {name:<44} {pass:<8} {:8.4} s {:8.1} GFLOP/s",
            s,
            2.0 * macs * mult / s / 1e9
        );
    } else {
        println!("time    {name:<44} {pass:<8} {s:8.4} s");
    }
}

fn main() {
    #[cfg(unix)]
    runtime_env::reexec_with_runtime_options();
    if let Ok(v) = std::env::var("NNSEG_ISA") {
        ops::set_gemm_isa(ops::parse_isa(&v));
    }
    let quick = std::env::var("NNSEG_BENCH_QUICK").is_ok();
    let parts = std::env::var("NNSEG_BENCH_PARTS").is_ok();
    let runs: usize = std::env::var("NNSEG_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let filter: Option<String> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .filter(|a| !a.is_empty());
    println!(
        "threads: {}, cpu: {}, conv GEMM path: {}",
        candle_core::utils::get_num_threads(),
        ops::cpu_features(),
        ops::gemm_path()
    );
    let works: Vec<Work> = workloads()
        .into_iter()
        .filter(|w| {
            filter
                .as_ref()
                .is_none_or(|f| w.name.starts_with(f.as_str()))
        })
        .collect();
    for wk in &works {
        let y = fwd(wk).expect("forward runs");
        let r = Tensor::randn(0f32, 1f32, y.dims(), &Device::Cpu).expect("randn");
        drop(y);
        let d = best_of(runs, || {
            std::hint::black_box(fwd(wk).expect("forward"));
        });
        report(wk.name, "fwd", wk.macs, 1.0, d);
        let d = best_of(runs, || fwd_bwd(wk, &r).expect("backward"));
        report(wk.name, "fwd+bwd", wk.macs, 3.0, d);
        if let (Some(k), Some(w)) = (wk.kernels, wk.w.as_ref()) {
            let d = best_of(runs, || {
                k(wk.x.as_tensor(), w.as_tensor(), &r, K_ALL).expect("kernels")
            });
            report(wk.name, "kernels", wk.macs, 3.0, d);
            if parts {
                for (which, pass) in [(K_FWD, "k:fwd"), (K_DX, "k:dx"), (K_DW, "k:dw")] {
                    let d = best_of(runs, || {
                        k(wk.x.as_tensor(), w.as_tensor(), &r, which).expect("kernel")
                    });
                    report(wk.name, pass, wk.macs, 1.0, d);
                }
            }
        }
    }
    if quick {
        return;
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    for wk in &works {
        let y = fwd(wk).expect("forward runs");
        let r = Tensor::randn(0f32, 1f32, y.dims(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("randn");
        drop(y);
        let mut g = c.benchmark_group(wk.name);
        g.bench_function("fwd", |b| b.iter(|| fwd(wk).expect("forward")));
        g.bench_function("fwd+bwd", |b| b.iter(|| fwd_bwd(wk, &r).expect("backward")));
        g.finish();
    }
    c.final_summary();
}
