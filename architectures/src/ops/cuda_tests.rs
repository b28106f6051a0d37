//! CUDA-only tests (`cargo test -p architectures --features cuda`, or `--features cudnn` for the
//! cuDNN convolutions, on a machine with an NVIDIA GPU and driver; build environment from
//! `scripts/build_cuda.sh --env`). They run the op checks of `nnseg doctor`
//! ([`crate::doctor`]) on CUDA device 0: every op on a CUDA tensor must match the CPU kernels in
//! the forward pass and in the gradients of the input and of the parameters (f32, and bf16 for
//! the ops mixed precision runs in bf16; random data, loss `sum(y * r)`), and the convolutions'
//! composite path on the GPU must match too. With `cudnn` the convolution tests fail unless
//! cuDNN initialised.

use super::*;
use crate::doctor::{op_checks, run_op_checks, OpCheckOptions};
use candle_core::{DType, Device, Tensor};

fn gpu() -> Device {
    match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => panic!("these tests need CUDA device 0 (built with --features cuda): {e}"),
    }
}

/// Every doctor check of `families` on the GPU must pass.
fn families_match_cpu(families: &[&str]) {
    let results = run_op_checks(
        &op_checks(),
        &OpCheckOptions::new(&gpu()).families(families),
    );
    assert!(!results.is_empty(), "no checks in {families:?}");
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| {
            format!(
                "{} [{} {}]: max rel err {:?} (tolerance {}, worst {:?}) {}",
                r.name,
                r.dtype,
                r.path,
                r.max_rel_err,
                r.tolerance,
                r.worst,
                r.error.clone().unwrap_or_default()
            )
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// With the `cudnn` feature the convolution tests must exercise cuDNN, not the fallback.
fn expect_cudnn(dev: &Device) {
    #[cfg(feature = "cudnn")]
    if let Err(e) = cudnn_available(dev) {
        panic!("built with --features cudnn but cuDNN is not usable: {e}");
    }
    let _ = dev;
}

#[test]
fn cuda_conv_matches_cpu() {
    expect_cudnn(&gpu());
    families_match_cpu(&["conv"]);
}

#[test]
fn cuda_conv_grads_standalone_match_cpu() {
    expect_cudnn(&gpu());
    families_match_cpu(&["conv_weight_grad", "conv_input_grad"]);
}

#[test]
fn cuda_conv_transpose_matches_cpu() {
    expect_cudnn(&gpu());
    families_match_cpu(&["conv_transpose", "dynamic_conv"]);
}

#[test]
fn cuda_pool_interp_norm_act_match_cpu() {
    families_match_cpu(&[
        "pool",
        "interpolate",
        "norm",
        "fused_norm_act",
        "grn",
        "pixel_shuffle",
        "activation",
    ]);
}

#[test]
fn cuda_ops_keep_dtype_and_device() {
    let dev = gpu();
    let x = Tensor::zeros((1, 2, 4, 4, 4), DType::F32, &dev).expect("zeros");
    let w = Tensor::zeros((3, 2, 3, 3, 3), DType::F32, &dev).expect("zeros");
    let y = conv(&x, &w, None, &ConvOpts::new().padding([1])).expect("conv");
    assert!(y.device().is_cuda());
    assert_eq!(y.dims(), &[1, 3, 4, 4, 4]);
    assert_eq!(y.dtype(), DType::F32);
}
