//! Build and device facts for the doctor report.

use architectures::doctor::CudnnInfo;
use candle_core::Device;
use serde::Serialize;

/// How this binary was built.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildInfo {
    /// nnseg's version.
    pub version: String,
    /// Cargo features (`cuda`, `cudnn`).
    pub features: Vec<String>,
    /// `release` or `debug` (debug builds are slow).
    pub profile: String,
    /// `x86_64-linux`, ...
    pub target: String,
    /// CPU features the fast CPU kernels use (`avx2`, `fma`, `avx512f`), as detected now.
    pub cpu_features: Vec<String>,
    /// `CUDA_COMPUTE_CAP` the CUDA kernels were compiled for (CUDA builds).
    pub cuda_compute_cap: Option<String>,
}

/// A shared library the process has mapped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadedLibrary {
    /// File name (`libcublas.so.13`).
    pub name: String,
    /// Full path.
    pub path: String,
}

/// The device the checks ran on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N` (as requested when the device could not be opened).
    pub name: String,
    /// `cpu` or `cuda`.
    pub kind: String,
    /// Whether the device was opened.
    pub available: bool,
    /// GPU model (CUDA).
    pub model: Option<String>,
    /// `major.minor` (CUDA).
    pub compute_capability: Option<String>,
    pub total_memory_bytes: Option<u64>,
    /// Free device memory at the end of the checks (CUDA).
    pub free_memory_bytes: Option<u64>,
    /// CUDA version the driver supports (`cuDriverGetVersion`, e.g. `13.0`).
    pub driver_version: Option<String>,
    /// cuBLAS / cuBLASLt / cuRAND library versions (`major.minor.patch`).
    pub cublas_version: Option<String>,
    pub cublaslt_version: Option<String>,
    pub curand_version: Option<String>,
    /// cuDNN (builds with the `cudnn` feature).
    pub cudnn: Option<CudnnInfo>,
    /// CPU threads the kernels use (rayon's pool).
    pub cpu_threads: usize,
    /// CUDA libraries mapped into the process, with their paths.
    pub libraries: Vec<LoadedLibrary>,
    /// Warnings (e.g. kernels compiled for a newer GPU than this one).
    pub notes: Vec<String>,
}

impl DeviceInfo {
    /// A device that could not be opened.
    pub fn unopened(requested: &str) -> Self {
        let kind = if requested.trim().to_ascii_lowercase().starts_with("cuda") {
            "cuda"
        } else {
            "cpu"
        };
        DeviceInfo {
            name: requested.to_string(),
            kind: kind.into(),
            available: false,
            model: None,
            compute_capability: None,
            total_memory_bytes: None,
            free_memory_bytes: None,
            driver_version: None,
            cublas_version: None,
            cublaslt_version: None,
            curand_version: None,
            cudnn: None,
            cpu_threads: rayon::current_num_threads(),
            libraries: vec![],
            notes: vec![],
        }
    }
}

pub(super) fn build_info() -> BuildInfo {
    let mut features: Vec<String> = architectures::doctor::build_features()
        .into_iter()
        .map(String::from)
        .collect();
    if cfg!(feature = "cuda") && !features.iter().any(|f| f == "cuda") {
        features.push("cuda".into());
    }
    #[cfg(feature = "cuda")]
    let cuda_compute_cap = option_env!("CUDA_COMPUTE_CAP").map(String::from);
    #[cfg(not(feature = "cuda"))]
    let cuda_compute_cap = None;
    BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        features,
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        cpu_features: cpu_features(),
        cuda_compute_cap,
    }
}

fn cpu_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut v: Vec<String> = vec![];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            v.push("avx2".into());
        }
        if std::arch::is_x86_feature_detected!("fma") {
            v.push("fma".into());
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            v.push("avx512f".into());
        }
    }
    v
}

pub(super) fn device_info(device: &Device) -> DeviceInfo {
    let name = match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    };
    let mut info = DeviceInfo::unopened(&name);
    info.available = true;
    info.kind = if device.is_cuda() { "cuda" } else { "cpu" }.into();
    #[cfg(feature = "cuda")]
    cuda::fill(device, &mut info);
    info.cudnn = architectures::doctor::cudnn_info(device);
    info
}

/// Free memory of a CUDA device now.
pub(super) fn free_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        return dev
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64);
    }
    let _ = device;
    None
}

/// CUDA library families whose mappings [`loaded_libraries`] reports.
const CUDA_LIBS: [&str; 7] = [
    "libcuda.so",
    "libcudart",
    "libcublas.so",
    "libcublasLt",
    "libcurand",
    "libcudnn",
    "libnvrtc",
];

/// The CUDA libraries in `/proc/self/maps` (empty where that file does not exist).
pub(super) fn loaded_libraries() -> Vec<LoadedLibrary> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    parse_maps(&maps)
}

/// The CUDA libraries in a `/proc/<pid>/maps` text, each path once, in order of appearance.
pub(super) fn parse_maps(maps: &str) -> Vec<LoadedLibrary> {
    let mut out: Vec<LoadedLibrary> = vec![];
    for line in maps.lines() {
        // address perms offset dev inode pathname
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        if CUDA_LIBS.iter().any(|l| name.starts_with(l)) && !out.iter().any(|l| l.path == path) {
            out.push(LoadedLibrary {
                name: name.to_string(),
                path: path.to_string(),
            });
        }
    }
    out
}

/// `13000` → `13.0` (CUDA's `1000 * major + 10 * minor`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // used by the CUDA build
pub(super) fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// `130102` → `13.1.2` (cuBLAS's and cuBLASLt's `10000 * major + 100 * minor + patch`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // used by the CUDA build
pub(super) fn library_version(v: i64) -> String {
    format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
}

/// cuRAND's `1000 * major + 100 * minor + patch` (10.4.0 → 10400).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // used by the CUDA build
pub(super) fn curand_version(v: i64) -> String {
    format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
}

/// The header of the text report.
pub(super) fn render_header(b: &BuildInfo, d: &DeviceInfo) -> String {
    let gib = |v: u64| format!("{:.1} GiB", v as f64 / (1u64 << 30) as f64);
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut s = format!(
        "nnseg {} ({} build, {}; features: {}; CPU: {})\n",
        b.version,
        b.profile,
        b.target,
        if b.features.is_empty() {
            "none".to_string()
        } else {
            b.features.join(", ")
        },
        if b.cpu_features.is_empty() {
            "-".to_string()
        } else {
            b.cpu_features.join(", ")
        }
    );
    s.push_str(&format!(
        "device: {}{} ({} CPU threads)\n",
        d.name,
        d.model
            .as_ref()
            .map(|m| format!(" = {m}"))
            .unwrap_or_default(),
        d.cpu_threads
    ));
    if d.kind == "cuda" && d.available {
        s.push_str(&format!(
            "  compute capability {} (kernels built for {}), memory {} total / {} free\n",
            opt(&d.compute_capability),
            b.cuda_compute_cap.clone().unwrap_or_else(|| "?".into()),
            d.total_memory_bytes.map(gib).unwrap_or_else(|| "-".into()),
            d.free_memory_bytes.map(gib).unwrap_or_else(|| "-".into()),
        ));
        s.push_str(&format!(
            "  driver CUDA {}, cuBLAS {}, cuBLASLt {}, cuRAND {}, cuDNN {}\n",
            opt(&d.driver_version),
            opt(&d.cublas_version),
            opt(&d.cublaslt_version),
            opt(&d.curand_version),
            d.cudnn
                .as_ref()
                .map(|c| format!("{} (built for CUDA {})", c.version, c.cudart_version))
                .unwrap_or_else(|| "-".into())
        ));
    }
    for l in &d.libraries {
        s.push_str(&format!("  loaded {}\n", l.path));
    }
    for n in &d.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{cuda_version, curand_version, library_version, DeviceInfo};
    use candle_core::cuda_backend::cudarc::{cublas, cublaslt, curand, driver};
    use candle_core::Device;

    /// Name, compute capability, memory and library versions of a CUDA `device`.
    pub(super) fn fill(device: &Device, info: &mut DeviceInfo) {
        let Ok(dev) = device.as_cuda_device() else {
            return;
        };
        let ctx = dev.cuda_stream().context().clone();
        info.model = ctx.name().ok();
        let cc = ctx.compute_capability().ok();
        info.compute_capability = cc.map(|(a, b)| format!("{a}.{b}"));
        info.total_memory_bytes = ctx.total_mem().ok().map(|v| v as u64);
        info.free_memory_bytes = ctx.mem_get_info().ok().map(|(free, _)| free as u64);
        let mut v: std::ffi::c_int = 0;
        // SAFETY: each call writes one int through a valid pointer; the cuBLAS handle is the
        // live one of candle's device.
        unsafe {
            if driver::sys::cuDriverGetVersion(&mut v).result().is_ok() {
                info.driver_version = Some(cuda_version(v));
            }
            let blas = dev.cublas_handle();
            if cublas::sys::cublasGetVersion_v2(*blas.handle(), &mut v)
                .result()
                .is_ok()
            {
                info.cublas_version = Some(library_version(v as i64));
            }
            info.cublaslt_version =
                Some(library_version(cublaslt::sys::cublasLtGetVersion() as i64));
            if curand::sys::curandGetVersion(&mut v).result().is_ok() {
                info.curand_version = Some(curand_version(v as i64));
            }
        }
        if let (Some((major, minor)), Some(Ok(built))) = (
            cc,
            option_env!("CUDA_COMPUTE_CAP").map(|s| s.trim().parse::<i32>()),
        ) {
            let have = major * 10 + minor;
            if have < built {
                info.notes.push(format!(
                    "this GPU has compute capability {major}.{minor} but the kernels were built \
                     for {built}: rebuild with CUDA_COMPUTE_CAP={have} scripts/build_cuda.sh"
                ));
            }
        }
    }
}
