//! `nnseg doctor`: a self-check of a machine and build.
//!
//! [`run_doctor`] reports the build (features, compile-time CUDA target), the device (name,
//! compute capability, memory, driver / cuBLAS / cuRAND / cuDNN versions, and which of those
//! libraries the process loaded from where), then
//! - every op family against a reference ([`architectures::doctor`]: CPU kernels vs f64
//!   composite paths on the CPU, GPU vs CPU kernels on CUDA; f32 and, where mixed precision
//!   uses it, bf16) plus the training losses ([`loss_checks`]);
//! - one forward + backward pass of nnU-Net's networks and of every registry preset, in 2D and
//!   3D, on a small patch ([`networks`]), in the precision training uses on the device.
//!
//! The report serialises to the JSON `nnseg doctor --json` prints; [`DoctorReport::exit_code`]
//! is 0 when everything passed, 1 when a check failed, 2 when the device or a library is
//! unavailable.

mod losses;
mod networks;
mod system;
#[cfg(test)]
mod tests;

pub use losses::loss_checks;
pub use networks::{network_cases, run_network, NetworkCase, NetworkResult};
pub use system::{BuildInfo, DeviceInfo, LoadedLibrary};

use architectures::doctor::{op_checks, run_op_checks, OpCheckOptions, OpResult};
use candle_core::Device;
use serde::Serialize;
use std::time::Instant;

/// What [`run_doctor`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct DoctorOptions {
    /// The op and loss checks.
    pub ops: bool,
    /// The networks' forward + backward passes.
    pub networks: bool,
    /// Seed of the networks' weights.
    pub seed: u64,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            ops: true,
            networks: true,
            seed: 12345,
        }
    }
}

/// Counts and wall time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub ops_run: usize,
    pub ops_failed: usize,
    pub networks_run: usize,
    pub networks_failed: usize,
    pub seconds: f64,
}

/// Everything `nnseg doctor` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// Every check ran and passed, and the device and its libraries are usable.
    pub passed: bool,
    /// Why the device or a library is unavailable (then `passed` is false).
    pub error: Option<String>,
    pub build: BuildInfo,
    pub device: DeviceInfo,
    pub ops: Vec<OpResult>,
    pub networks: Vec<NetworkResult>,
    pub summary: Summary,
}

impl DoctorReport {
    /// The report when the requested device could not be opened (`requested` as the user wrote
    /// it, `error` naming what is missing): nothing ran.
    pub fn unavailable(requested: &str, error: impl Into<String>) -> Self {
        let mut device = DeviceInfo::unopened(requested);
        device.libraries = system::loaded_libraries();
        DoctorReport {
            passed: false,
            error: Some(error.into()),
            build: system::build_info(),
            device,
            ops: vec![],
            networks: vec![],
            summary: Summary {
                ops_run: 0,
                ops_failed: 0,
                networks_run: 0,
                networks_failed: 0,
                seconds: 0.0,
            },
        }
    }

    /// 0: everything passed; 1: checks ran and some failed; 2: the device or a library is
    /// unavailable.
    pub fn exit_code(&self) -> i32 {
        if self.error.is_some() {
            2
        } else if self.passed {
            0
        } else {
            1
        }
    }
}

/// Runs the checks of `opts` on `device` (which the caller opened) and reports. Never panics on
/// a failing op or network: failures are in the report.
pub fn run_doctor(device: &Device, opts: &DoctorOptions) -> DoctorReport {
    let t0 = Instant::now();
    let build = system::build_info();
    let mut device_info = system::device_info(device);
    let error = device_info
        .cudnn
        .as_ref()
        .and_then(|c| c.error.as_ref())
        .map(|e| format!("built with cuDNN, but cuDNN is unusable on this device: {e}"));
    let mut ops = vec![];
    if opts.ops {
        let o = OpCheckOptions::new(device);
        ops = run_op_checks(&op_checks(), &o);
        ops.extend(run_op_checks(&loss_checks(), &o));
    }
    let mut nets = vec![];
    if opts.networks {
        for case in network_cases() {
            nets.push(run_network(&case, device, opts.seed));
        }
    }
    // libraries loaded lazily (cuDNN's sub-libraries) are mapped by now
    device_info.libraries = system::loaded_libraries();
    device_info.free_memory_bytes = system::free_memory(device);
    let summary = Summary {
        ops_run: ops.len(),
        ops_failed: ops.iter().filter(|r| !r.passed).count(),
        networks_run: nets.len(),
        networks_failed: nets.iter().filter(|r| !r.passed).count(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    DoctorReport {
        passed: error.is_none() && summary.ops_failed == 0 && summary.networks_failed == 0,
        error,
        build,
        device: device_info,
        ops,
        networks: nets,
        summary,
    }
}

/// The report as text: build and device header, one line per op and network, summary.
pub fn render_text(r: &DoctorReport) -> String {
    let mut s = system::render_header(&r.build, &r.device);
    if !r.ops.is_empty() {
        s.push_str(&format!(
            "\n{:<16} {:<46} {:<5} {:<9} {:>10} {:>8}  result\n",
            "family", "op", "dtype", "path", "max rel err", "tol"
        ));
        for o in &r.ops {
            let err = match o.max_rel_err {
                Some(e) if e.is_finite() => format!("{e:.2e}"),
                Some(_) => "inf".into(),
                None => "-".into(),
            };
            s.push_str(&format!(
                "{:<16} {:<46} {:<5} {:<9} {:>10} {:>8.0e}  {}{}\n",
                o.family,
                o.name,
                o.dtype,
                o.path,
                err,
                o.tolerance,
                if o.passed { "PASS" } else { "FAIL" },
                failure_detail(o)
            ));
        }
    }
    if !r.networks.is_empty() {
        s.push('\n');
        s.push_str(&networks::render(&r.networks));
    }
    let m = &r.summary;
    s.push_str(&format!(
        "\n{} of {} op checks and {} of {} networks passed in {:.1} s: {}\n",
        m.ops_run - m.ops_failed,
        m.ops_run,
        m.networks_run - m.networks_failed,
        m.networks_run,
        m.seconds,
        if r.passed { "PASSED" } else { "FAILED" }
    ));
    if let Some(e) = &r.error {
        s.push_str(&format!("error: {e}\n"));
    }
    s
}

fn failure_detail(o: &OpResult) -> String {
    match (&o.error, &o.worst) {
        (Some(e), _) => format!("  ({e})"),
        (None, Some(w)) if !o.passed => format!("  (worst: {w})"),
        _ => String::new(),
    }
}
