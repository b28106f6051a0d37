//! Peak GPU memory for the training log (CUDA builds only; not verified on a GPU yet).
//!
//! Candle's CUDA backend allocates through cudarc, which uses the stream-ordered allocator
//! (`cuMemAllocAsync`, the device's current memory pool) where the device supports memory
//! pools. The pool's high-water marks are the peak: `USED_MEM_HIGH` (bytes handed out to
//! tensors, like PyTorch's `max_memory_allocated`) and `RESERVED_MEM_HIGH` (bytes the pool
//! held, like `max_memory_reserved`); both are reset after each reading, so each reading is
//! the peak since the previous one. Without memory pools the reading is the device memory in
//! use when sampled (`cuMemGetInfo`: total − free, every process and context included).

use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::Device;

/// One reading; see the module documentation for what is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuMemory {
    /// Pool high-water marks since the previous reading, bytes.
    PoolPeak { used: u64, reserved: u64 },
    /// `total − free` of the device now, bytes.
    InUse { used: u64, total: u64 },
}

impl GpuMemory {
    /// The bytes comparable across readings (the pool's used peak, or the device's in-use).
    pub fn used(&self) -> u64 {
        match *self {
            GpuMemory::PoolPeak { used, .. } | GpuMemory::InUse { used, .. } => used,
        }
    }

    /// A log line, with `max` the largest [`GpuMemory::used`] so far.
    pub fn log_line(&self, max: u64) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        match *self {
            GpuMemory::PoolPeak { used, reserved } => format!(
                "Peak GPU memory this epoch: {:.2} GiB allocated, {:.2} GiB reserved by the \
                 allocator pool (run maximum {:.2} GiB allocated)",
                gib(used),
                gib(reserved),
                gib(max)
            ),
            GpuMemory::InUse { used, total } => format!(
                "GPU memory in use at the end of this epoch: {:.2} of {:.2} GiB (all processes; \
                 run maximum {:.2} GiB)",
                gib(used),
                gib(total),
                gib(max)
            ),
        }
    }
}

/// Reads (and resets) the peak of `device`'s memory; `None` on the CPU or when the driver
/// query fails (a log line is not worth failing training for).
pub fn take_peak(device: &Device) -> Option<GpuMemory> {
    let dev = device.as_cuda_device().ok()?;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    if ctx.has_async_alloc() {
        use sys::CUmemPool_attribute::{
            CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH as RESERVED, CU_MEMPOOL_ATTR_USED_MEM_HIGH as USED,
        };
        // SAFETY: the device comes from a live context bound to this thread; both attributes
        // are cuuint64_t values, read into and reset from a u64.
        unsafe {
            let pool = result::device::get_mem_pool(ctx.cu_device()).ok()?;
            let read = |attr| {
                let mut v = 0u64;
                result::mem_pool::get_attribute(pool, attr, &mut v as *mut u64 as *mut _).ok()?;
                let mut zero = 0u64;
                result::mem_pool::set_attribute(pool, attr, &mut zero as *mut u64 as *mut _)
                    .ok()?;
                Some(v)
            };
            let used = read(USED)?;
            let reserved = read(RESERVED)?;
            Some(GpuMemory::PoolPeak { used, reserved })
        }
    } else {
        let (free, total) = result::mem_get_info().ok()?;
        Some(GpuMemory::InUse {
            used: (total - free) as u64,
            total: total as u64,
        })
    }
}
