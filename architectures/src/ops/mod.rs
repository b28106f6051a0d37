//! N-dimensional (1D/2D/3D) network operations on Candle tensors.
//!
//! Every op takes channels-first tensors `(N, C, *spatial)`; the number of spatial dims is the
//! tensor rank minus 2 and is decided at run time. Per-axis parameters are `Vec<usize>`s with one
//! entry per spatial axis (a single entry is broadcast to all axes). All ops are differentiable
//! through Candle's autograd, composed only from Candle ops whose gradients are correct, or from
//! the custom CPU convolution kernels in this module (which carry explicit, fast backward passes).
//!
//! CPU f32/f64 tensors use custom ops: convolution / transposed convolution on blocked im2col +
//! `gemm` (AVX-512 where detected; `NNSEG_ISA=avx2` forces its AVX2/FMA kernels, see `isa`)
//! (forward, input gradient and weight gradient, each parallel with rayon and with a bounded
//! per-thread workspace, see `kernels`), and fused instance norm (+ leaky ReLU). On other
//! devices or dtypes the same functions compose Candle ops (convolutions from Candle's `conv2d`
//! with zero padding and exact tiling, `index_select`, `matmul` and reshapes), so the API runs on
//! CUDA. With the `cudnn` feature, CUDA f32/f16/bf16 convolutions (forward, both gradients,
//! transposed) run the convolution custom ops on cuDNN instead (see `cudnn`); the other custom
//! ops are never handed non-CPU tensors.
//!
//! Performance note for callers: Candle allocates a fresh buffer per op and glibc returns large
//! buffers to the OS, so big feature maps pay page faults on every op. Training binaries should
//! raise glibc's `mmap_threshold` / `trim_threshold` (e.g. `GLIBC_TUNABLES=glibc.malloc.
//! mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296`) or use another allocator.

mod act;
mod conv;
#[cfg(feature = "cudnn")]
mod cudnn;
mod direct;
mod fused;
mod interp;
mod isa;
mod kernels;
mod norm;
mod pool;

pub(crate) use act::leaky_relu_composite;
pub use act::{
    drop_path, dropout, gelu, leaky_relu, log_softmax_channels, pad, softmax_channels, GeluKind,
    PadMode,
};
pub use conv::{
    conv, conv_composite, conv_input_grad, conv_transpose, conv_transpose_composite,
    conv_weight_grad,
};
pub use conv::{ConvOpts, ConvTransposeOpts};
#[cfg(feature = "cudnn")]
pub use cudnn::{cudnn_allow_tf32, cudnn_available, set_cudnn_allow_tf32, CUDNN_MAX_WORKSPACE};
pub use interp::{interpolate, pixel_shuffle, pixel_unshuffle, InterpMode, InterpSize};
pub use isa::{cpu_features, gemm_isa, gemm_path, parse_isa, set_gemm_isa, GemmIsa};
pub(crate) use norm::in_f32;
pub(crate) use norm::instance_norm_composite;
pub use norm::{
    batch_norm, grn, group_norm, instance_norm, instance_norm_leaky_relu, layer_norm_cf,
    BatchNormState, NormAffine,
};
pub use pool::{adaptive_avg_pool_1, avg_pool, max_pool, PoolOpts};

use candle_core::{Result, Tensor};

/// Number of spatial dims of a channels-first tensor (rank - 2), checked to be 1..=3.
pub(crate) fn spatial_dims(x: &Tensor, op: &str) -> Result<usize> {
    let r = x.rank();
    if !(3..=5).contains(&r) {
        candle_core::bail!(
            "{op}: expected a (N, C, *spatial) tensor with 1 to 3 spatial dims, got shape {:?}",
            x.dims()
        );
    }
    Ok(r - 2)
}

/// Expands a per-axis parameter: empty -> `default` everywhere, one entry -> broadcast, otherwise
/// exactly `nd` entries.
pub(crate) fn per_axis(v: &[usize], nd: usize, default: usize, what: &str) -> Result<Vec<usize>> {
    match v.len() {
        0 => Ok(vec![default; nd]),
        1 => Ok(vec![v[0]; nd]),
        n if n == nd => Ok(v.to_vec()),
        n => candle_core::bail!("{what}: got {n} values for {nd} spatial dims ({v:?})"),
    }
}

/// Shape `(1, C, 1, ...)` view of a per-channel vector, for broadcasting over `(N, C, *spatial)`.
pub(crate) fn channel_view(v: &Tensor, rank: usize) -> Result<Tensor> {
    let c = v.elem_count();
    let mut shape = vec![1usize; rank];
    shape[1] = c;
    v.reshape(shape)
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
#[cfg(test)]
mod tests;
