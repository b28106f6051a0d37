//! Helpers shared by the tests that compare against the PyTorch fixtures in the workspace's
//! `tests/fixtures/` (see its README for what each set is and how it was made).

use candle_core::{DType, Tensor};
use std::path::PathBuf;

/// `tests/fixtures/{kind}` of this workspace; panics (a test failure, never a skip) with the
/// path when the folder is missing.
pub(crate) fn fixtures_dir(kind: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(kind);
    assert!(
        dir.is_dir(),
        "fixture folder {} is missing: it is part of the repository (tests/fixtures/{kind})",
        dir.display()
    );
    dir
}

/// A fixture file; panics with its path if it is missing.
pub(crate) fn fixture(kind: &str, name: &str) -> PathBuf {
    let p = fixtures_dir(kind).join(name);
    assert!(
        p.exists(),
        "fixture {kind}/{name} not found ({}): it is part of the repository",
        p.display()
    );
    p
}

/// The fixtures' tolerance, |got − ref| ≤ 1e-4·|ref| + 1e-5·max|ref| (and finite).
pub(crate) fn close(got: &Tensor, want: &Tensor, what: &str) -> Result<(), String> {
    if got.dims() != want.dims() {
        return Err(format!(
            "{what}: shape {:?} != {:?}",
            got.dims(),
            want.dims()
        ));
    }
    let vec = |t: &Tensor| -> Result<Vec<f32>, String> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|e| e.to_string())
    };
    let (g, w) = (vec(got)?, vec(want)?);
    let maxref = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let tol = 1e-4 * b.abs() + 1e-5 * maxref;
        if (a - b).abs() > tol || !a.is_finite() {
            return Err(format!(
                "{what}[{i}]: got {a}, reference {b} (tolerance {tol})"
            ));
        }
    }
    Ok(())
}

/// [`close`] as an assertion.
pub(crate) fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    if let Err(e) = close(got, want, what) {
        panic!("{e}");
    }
}

/// max |t| (f32).
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .unwrap_or(f32::NAN)
}

/// A PlainConvUNet-style `arch_kwargs` as nnU-Net's planner writes it (InstanceNorm,
/// LeakyReLU, 2 convs per stage), for `dim` spatial dims.
pub(crate) fn plan_kwargs(
    dim: usize,
    features: &[usize],
    strides: serde_json::Value,
    kernels: serde_json::Value,
) -> serde_json::Map<String, serde_json::Value> {
    let n = features.len();
    let (conv, norm) = if dim == 2 {
        (
            "torch.nn.modules.conv.Conv2d",
            "torch.nn.modules.instancenorm.InstanceNorm2d",
        )
    } else {
        (
            "torch.nn.modules.conv.Conv3d",
            "torch.nn.modules.instancenorm.InstanceNorm3d",
        )
    };
    let v = serde_json::json!({
        "n_stages": n,
        "features_per_stage": features,
        "conv_op": conv,
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage": vec![2; n],
        "n_conv_per_stage_decoder": vec![2; n.saturating_sub(1)],
        "conv_bias": true,
        "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-5, "affine": true},
        "dropout_op": null,
        "dropout_op_kwargs": null,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": true}
    });
    v.as_object().cloned().unwrap_or_default()
}

/// `m` with the entries of the JSON object `extra` inserted (overriding).
pub(crate) fn with_extra(
    mut m: serde_json::Map<String, serde_json::Value>,
    extra: &serde_json::Value,
) -> serde_json::Map<String, serde_json::Value> {
    if let Some(e) = extra.as_object() {
        for (k, v) in e {
            m.insert(k.clone(), v.clone());
        }
    }
    m
}
