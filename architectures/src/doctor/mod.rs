//! Numerical self-check of the N-d ops (the op part of `nnseg doctor`).
//!
//! Every [`OpCheck`] runs one op on seeded random inputs twice, on a *target* and on a
//! *reference*, and compares the output and the gradients of the input and of every parameter
//! (loss `sum(y * r)` with a fixed random `r`):
//!
//! | target device | target | reference |
//! |---|---|---|
//! | CPU | f32, the op as networks call it (fast CPU kernels) | f64, [`Variant::Reference`] (the device-agnostic composite path, or another algorithm) |
//! | CUDA | f32 / bf16 on the GPU (cuDNN with the `cudnn` feature) | f32 on the CPU kernels |
//!
//! On CUDA, checks marked [`OpCheck::with_composite`] also run their composite path on the GPU.
//! bf16 checks (the ops mixed-precision training runs in bf16) round the inputs to bf16 on both
//! sides. The error of one tensor is `max |got - ref| / max |ref|` (normwise: the largest
//! deviation relative to the reference's largest magnitude); a check's error is the largest over
//! its output and gradients, and it passes when that is at most the [`Tolerances`] of its dtype.
//! An op that errors or panics fails with the error text; an output of the wrong dtype or on the
//! wrong device fails too.

mod checks;
#[cfg(test)]
mod tests;

pub use checks::op_checks;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Which implementation of an op a check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The op as the networks call it: the fast CPU kernels, cuDNN, or the composite path,
    /// depending on the tensor's device and dtype.
    Default,
    /// An independent implementation: the device-agnostic composite path (convolutions, norms,
    /// activations with CPU kernels), another algorithm (dynamic convolution: K separate
    /// convolutions; standalone gradients: autograd through the composite convolution), or the
    /// same code where an op has a single implementation (then only the dtype differs on CPU).
    Reference,
}

/// The op under test: `(input, parameters, variant) -> output`.
pub type CheckFn = dyn Fn(&Tensor, &[Tensor], Variant) -> candle_core::Result<Tensor> + Send + Sync;

/// One op on one geometry.
#[derive(Clone)]
pub struct OpCheck {
    /// Op family (`conv`, `conv_transpose`, `norm`, `loss`, ...).
    pub family: &'static str,
    /// What is checked, e.g. `conv3d k(1,3,3) s(1,2,2) bias`.
    pub name: String,
    /// Shape of the input.
    pub input: Vec<usize>,
    /// Shapes of the parameters (weights, biases, ...), random values scaled by 0.3.
    pub params: Vec<Vec<usize>>,
    /// Also checked in bf16 (ops that mixed-precision training runs in bf16).
    pub bf16: bool,
    /// Gradients of the input and parameters are compared (false for the standalone gradient
    /// ops, whose output already is a gradient).
    pub grads: bool,
    /// On a non-CPU device, the [`Variant::Reference`] path also runs on that device.
    pub composite_on_device: bool,
    /// The op.
    pub f: Arc<CheckFn>,
}

impl std::fmt::Debug for OpCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpCheck")
            .field("family", &self.family)
            .field("name", &self.name)
            .field("input", &self.input)
            .field("params", &self.params)
            .field("bf16", &self.bf16)
            .field("grads", &self.grads)
            .finish_non_exhaustive()
    }
}

impl OpCheck {
    /// An f32 check with gradients.
    pub fn new(
        family: &'static str,
        name: impl Into<String>,
        input: impl Into<Vec<usize>>,
        params: Vec<Vec<usize>>,
        f: impl Fn(&Tensor, &[Tensor], Variant) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> Self {
        OpCheck {
            family,
            name: name.into(),
            input: input.into(),
            params,
            bf16: false,
            grads: true,
            composite_on_device: false,
            f: Arc::new(f),
        }
    }

    /// Also check in bf16.
    pub fn with_bf16(mut self) -> Self {
        self.bf16 = true;
        self
    }

    /// Compare the output only.
    pub fn without_grads(mut self) -> Self {
        self.grads = false;
        self
    }

    /// Also run the reference (composite) path on the target device.
    pub fn with_composite(mut self) -> Self {
        self.composite_on_device = true;
        self
    }
}

/// Largest allowed error (see the module documentation) per dtype of the target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerances {
    pub f32: f64,
    pub bf16: f64,
}

impl Tolerances {
    /// CPU: f32 kernels against f64 (only f32 rounding remains).
    pub const CPU: Tolerances = Tolerances {
        f32: 1e-4,
        bf16: 3e-2,
    };
    /// GPU: f32 against the CPU's f32 (no TF32; cuDNN's Winograd/FFT algorithms round
    /// differently), bf16 storage with f32 accumulation.
    pub const GPU: Tolerances = Tolerances {
        f32: 1e-3,
        bf16: 3e-2,
    };

    /// The tolerances for checks whose target is `device`.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::CPU
        } else {
            Self::GPU
        }
    }

    fn of(&self, dtype: DType) -> f64 {
        match dtype {
            DType::BF16 | DType::F16 => self.bf16,
            _ => self.f32,
        }
    }
}

/// What [`run_op_checks`] runs.
#[derive(Debug, Clone)]
pub struct OpCheckOptions {
    /// The target device (the reference always runs on the CPU).
    pub device: Device,
    /// Run the bf16 checks.
    pub bf16: bool,
    /// Only these families (empty: all).
    pub families: Vec<String>,
    pub tolerances: Tolerances,
}

impl OpCheckOptions {
    /// Every check on `device`, bf16 included, with [`Tolerances::for_device`].
    pub fn new(device: &Device) -> Self {
        OpCheckOptions {
            device: device.clone(),
            bf16: true,
            families: vec![],
            tolerances: Tolerances::for_device(device),
        }
    }

    /// Only the given families.
    pub fn families(mut self, families: &[&str]) -> Self {
        self.families = families.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// The outcome of one check in one dtype / path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpResult {
    pub name: String,
    pub family: String,
    /// dtype of the target (`f32`, `bf16`).
    pub dtype: String,
    /// `default` (the op as networks call it) or `composite` (the reference path on the
    /// target device).
    pub path: String,
    /// Largest error over output and gradients; `None` when the op failed to run, infinite
    /// (JSON `null`) for non-finite values.
    pub max_rel_err: Option<f64>,
    /// The tensor with the largest error (`output`, `grad input`, `grad param 0`, ...).
    pub worst: Option<String>,
    pub tolerance: f64,
    pub passed: bool,
    /// Why the check failed to run (op error or panic, wrong device or dtype, shapes differ).
    pub error: Option<String>,
}

/// Features `architectures` was built with (`cuda`, `cudnn`).
pub fn build_features() -> Vec<&'static str> {
    let mut v = vec![];
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "cudnn") {
        v.push("cudnn");
    }
    v
}

/// cuDNN as seen from `device` (with the `cudnn` feature on a CUDA device).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CudnnInfo {
    /// `cudnnGetVersion()`, e.g. 91300 for 9.13.0.
    pub version: usize,
    /// The CUDA runtime cuDNN was built against (`cudnnGetCudartVersion()`).
    pub cudart_version: usize,
    /// Why convolutions do not run on cuDNN (initialisation failed); `None` when they do.
    pub error: Option<String>,
}

/// cuDNN's versions and whether it initialises on `device`; `None` without the `cudnn`
/// feature or on a non-CUDA device.
pub fn cudnn_info(device: &Device) -> Option<CudnnInfo> {
    #[cfg(feature = "cudnn")]
    if device.is_cuda() {
        use cudarc::cudnn::result;
        return Some(CudnnInfo {
            version: result::get_version(),
            cudart_version: result::get_cudart_version(),
            error: crate::ops::cudnn_available(device)
                .err()
                .map(|e| e.to_string()),
        });
    }
    let _ = device;
    None
}

/// Runs `checks` as `opts` says, in order: per check f32, then bf16, then the composite path on
/// the device. Never panics; failures are in the results.
pub fn run_op_checks(checks: &[OpCheck], opts: &OpCheckOptions) -> Vec<OpResult> {
    let mut out = vec![];
    for c in checks {
        if !opts.families.is_empty() && !opts.families.iter().any(|f| f == c.family) {
            continue;
        }
        out.push(run_one(c, opts, DType::F32, Variant::Default));
        if opts.bf16 && c.bf16 {
            out.push(run_one(c, opts, DType::BF16, Variant::Default));
        }
        if c.composite_on_device && !opts.device.is_cpu() {
            out.push(run_one(c, opts, DType::F32, Variant::Reference));
        }
    }
    out
}

/// Where and how one side of a comparison runs.
struct Side<'a> {
    device: &'a Device,
    dtype: DType,
    variant: Variant,
}

/// Host-side inputs shared by both sides (already rounded to the target dtype).
struct Inputs {
    x: Tensor,
    params: Vec<Tensor>,
    /// dtype the random output weights `r` are rounded to.
    round: DType,
}

fn run_one(c: &OpCheck, opts: &OpCheckOptions, dtype: DType, variant: Variant) -> OpResult {
    let tolerance = opts.tolerances.of(dtype);
    let mut r = OpResult {
        name: c.name.clone(),
        family: c.family.to_string(),
        dtype: dtype.as_str().to_string(),
        path: match variant {
            Variant::Default => "default",
            Variant::Reference => "composite",
        }
        .to_string(),
        max_rel_err: None,
        worst: None,
        tolerance,
        passed: false,
        error: None,
    };
    let target = Side {
        device: &opts.device,
        dtype,
        variant,
    };
    let reference = if opts.device.is_cpu() {
        Side {
            device: &Device::Cpu,
            dtype: DType::F64,
            variant: Variant::Reference,
        }
    } else {
        Side {
            device: &Device::Cpu,
            dtype: DType::F32,
            variant: Variant::Default,
        }
    };
    let outcome = inputs(c, dtype).and_then(|inp| {
        let got = evaluate(c, &target, &inp)?;
        let want = evaluate(c, &reference, &inp)?;
        compare_all(&got, &want)
    });
    match outcome {
        Ok((err, worst)) => {
            r.max_rel_err = Some(err);
            r.worst = Some(worst);
            r.passed = err <= tolerance;
        }
        Err(e) => r.error = Some(e),
    }
    r
}

/// Deterministic host data in `[-1, 1)` (the same values on every machine and device).
pub fn host_uniform(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `t` rounded to `dtype` and back to f32 (identity for f32).
fn round_to(t: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if dtype == DType::F32 {
        return Ok(t);
    }
    t.to_dtype(dtype)?.to_dtype(DType::F32)
}

fn inputs(c: &OpCheck, dtype: DType) -> Result<Inputs, String> {
    let e = |e: candle_core::Error| format!("inputs: {e}");
    let x = round_to(host_uniform(&c.input, 1).map_err(e)?, dtype).map_err(e)?;
    let params = c
        .params
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = (host_uniform(s, 10 + i as u64)? * 0.3)?;
            round_to(p, dtype)
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(e)?;
    Ok(Inputs {
        x,
        params,
        round: dtype,
    })
}

/// The op's output and gradients on one side, as named f64 CPU tensors. Panics become errors.
fn evaluate(c: &OpCheck, side: &Side, inp: &Inputs) -> Result<Vec<(String, Tensor)>, String> {
    let where_ = format!("{:?} {}", side.device.location(), side.dtype.as_str());
    match catch_unwind(AssertUnwindSafe(|| evaluate_inner(c, side, inp))) {
        Ok(r) => r.map_err(|e| format!("on {where_}: {e}")),
        Err(p) => Err(format!(
            "on {where_}: panicked: {}",
            panic_message(p.as_ref())
        )),
    }
}

fn evaluate_inner(c: &OpCheck, side: &Side, inp: &Inputs) -> Result<Vec<(String, Tensor)>, String> {
    let on = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.to_dtype(side.dtype)?.to_device(side.device)
    };
    let cerr = |what: &str| {
        let what = what.to_string();
        move |e: candle_core::Error| format!("{what}: {e}")
    };
    let xv = Var::from_tensor(&on(&inp.x).map_err(cerr("input"))?).map_err(cerr("input"))?;
    let pv = inp
        .params
        .iter()
        .map(|p| Var::from_tensor(&on(p)?))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(cerr("parameters"))?;
    let pt: Vec<Tensor> = pv.iter().map(|v| v.as_tensor().clone()).collect();
    let y = (c.f)(xv.as_tensor(), &pt, side.variant).map_err(cerr("op"))?;
    if y.dtype() != side.dtype {
        return Err(format!(
            "output dtype {} (expected {})",
            y.dtype().as_str(),
            side.dtype.as_str()
        ));
    }
    if !y.device().same_device(side.device) {
        return Err(format!(
            "output left the device ({:?})",
            y.device().location()
        ));
    }
    let host = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.to_device(&Device::Cpu)?.to_dtype(DType::F64)
    };
    let mut out = vec![("output".to_string(), host(&y).map_err(cerr("output"))?)];
    if !c.grads {
        return Ok(out);
    }
    let r = round_to(host_uniform(y.dims(), 99).map_err(cerr("r"))?, inp.round)
        .and_then(|r| on(&r))
        .map_err(cerr("r"))?;
    let grads = (&y * &r)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .map_err(cerr("backward"))?;
    let named = std::iter::once(("grad input".to_string(), &xv)).chain(
        pv.iter()
            .enumerate()
            .map(|(i, v)| (format!("grad param {i}"), v)),
    );
    for (name, v) in named {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| format!("no gradient reached the {}", &name[5..]))?;
        out.push((name.clone(), host(g).map_err(cerr(&name))?));
    }
    Ok(out)
}

/// Largest [`rel_err`] over matching tensors, and the name of the worst.
fn compare_all(
    got: &[(String, Tensor)],
    want: &[(String, Tensor)],
) -> Result<(f64, String), String> {
    let mut worst = (0.0f64, "output".to_string());
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let e = rel_err(g, w).map_err(|e| format!("{name}: {e}"))?;
        if e > worst.0 || e.is_nan() {
            worst = (if e.is_nan() { f64::INFINITY } else { e }, name.clone());
        }
    }
    Ok(worst)
}

/// The text of a caught panic's payload (`String` or `&str`), or "unknown panic".
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// `max |got - want| / max |want|` (f64 tensors); infinite for non-finite values.
pub fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64, String> {
    if got.dims() != want.dims() {
        return Err(format!(
            "shape {:?} differs from the reference's {:?}",
            got.dims(),
            want.dims()
        ));
    }
    let flat = |t: &Tensor| -> Result<Vec<f64>, String> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| e.to_string())
    };
    let (g, w) = (flat(got)?, flat(want)?);
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    let mut err = 0f64;
    for (a, b) in g.iter().zip(&w) {
        let d = (a - b).abs();
        if !d.is_finite() {
            return Ok(f64::INFINITY);
        }
        err = err.max(d);
    }
    // an all-zero reference: the error is absolute
    Ok(if scale > 1e-30 { err / scale } else { err })
}
