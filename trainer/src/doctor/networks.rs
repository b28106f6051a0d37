//! One forward + backward pass of every network family on a small patch: nnU-Net's
//! PlainConvUNet and ResidualEncoderUNet and every registry preset (`kiunet_minimal`,
//! `convunext_tiny`, ...), each in 2D and 3D, built by the registry as training builds them.

use crate::amp::{autocast, forward_autocast, Amp};
use crate::loss::LossOptions;
use crate::loss::{bce_with_logits, deep_supervision_weights, DcAndCeLoss, DeepSupervisionLoss};
use architectures::doctor::{host_uniform, panic_message};
use architectures::registry::{NetworkIo, Registry};
use architectures::runext::as_class_head;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// Batch size of the network checks (2: batch norm needs more than one sample).
const BATCH: usize = 2;
/// Classes of the segmentation head.
const CLASSES: usize = 3;

/// One network to check.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkCase {
    /// Preset (or network) name.
    pub name: String,
    /// Registry name of the architecture.
    pub architecture: String,
    /// 2 or 3.
    pub dims: usize,
    /// The plan's `arch_kwargs` with the preset's merged over them.
    pub kwargs: Map<String, Value>,
    pub patch: Vec<usize>,
}

/// The outcome of one network check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkResult {
    pub name: String,
    /// `network_class_name` of the built network.
    pub network: String,
    pub dims: usize,
    pub patch: Vec<usize>,
    pub batch_size: usize,
    /// Precision of the forward pass (bf16 on CUDA, as training runs).
    pub dtype: String,
    pub params: usize,
    /// Trainable tensors that received no gradient.
    pub params_without_grad: usize,
    pub loss: Option<f64>,
    pub passed: bool,
    /// Build + forward + backward, seconds.
    pub seconds: f64,
    pub error: Option<String>,
}

/// A small nnU-Net plan: 3 stages with 4/8/16 features; 2D 32×32, 3D 16×32×32 with
/// anisotropic first-stage kernels and strides (as nnU-Net plans thick-slice data).
/// [`network_cases`] merges each preset's kwargs over it.
fn plan(dims: usize) -> (Map<String, Value>, Vec<usize>) {
    let (conv, norm, patch, kernels, strides) = if dims == 2 {
        (
            "Conv2d",
            "InstanceNorm2d",
            vec![32, 32],
            json!([[3, 3], [3, 3], [3, 3]]),
            json!([[1, 1], [2, 2], [2, 2]]),
        )
    } else {
        (
            "Conv3d",
            "InstanceNorm3d",
            vec![16, 32, 32],
            json!([[1, 3, 3], [3, 3, 3], [3, 3, 3]]),
            json!([[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
        )
    };
    let kw = json!({
        "n_stages": 3, "features_per_stage": [4, 8, 16],
        "conv_op": format!("torch.nn.modules.conv.{conv}"), "kernel_sizes": kernels,
        "strides": strides, "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
        "conv_bias": true, "norm_op": format!("torch.nn.modules.instancenorm.{norm}"),
        "norm_op_kwargs": {"eps": 1e-5, "affine": true}, "dropout_op": null,
        "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": true}
    });
    (kw.as_object().cloned().unwrap_or_default(), patch)
}

/// nnU-Net's two networks and every preset of the default registry, in 2D and 3D.
pub fn network_cases() -> Vec<NetworkCase> {
    let registry = Registry::default();
    let mut named: Vec<(String, String, Map<String, Value>)> = vec![
        ("PlainConvUNet".into(), "PlainConvUNet".into(), Map::new()),
        (
            "ResidualEncoderUNet".into(),
            "ResidualEncoderUNet".into(),
            Map::new(),
        ),
    ];
    for (arch, p) in registry.presets() {
        named.push((p.name, arch, p.kwargs));
    }
    let mut out = vec![];
    for dims in [2, 3] {
        for (name, architecture, extra) in &named {
            let (mut kwargs, patch) = plan(dims);
            if architecture == "ResidualEncoderUNet" {
                kwargs.remove("n_conv_per_stage");
                kwargs.insert("n_blocks_per_stage".into(), json!([1, 2, 2]));
            }
            for (k, v) in extra {
                kwargs.insert(k.clone(), v.clone());
            }
            // ConvUNext's variants set their own widths (32-128 features at level 0, 47 s for
            // xlarge in 3D on 2 cores): keep each variant's depth, blocks and drop path, start
            // at 8 features
            if architecture == architectures::convunext::CONVUNEXT {
                kwargs.insert("initial_filters".into(), json!(8));
            }
            out.push(NetworkCase {
                name: name.clone(),
                architecture: architecture.clone(),
                dims,
                kwargs,
                patch,
            });
        }
    }
    out
}

/// Builds `case` on `device` (weights from `seed`), runs one training forward pass in the
/// device's training precision, the DC+CE deep-supervision loss (+ BCE on a classification
/// head) and the backward pass. Passes when the outputs have the expected shape and the loss
/// and every gradient are finite.
pub fn run_network(case: &NetworkCase, device: &Device, seed: u64) -> NetworkResult {
    let dtype = Amp::Auto.compute_dtype(device);
    let mut r = NetworkResult {
        name: case.name.clone(),
        network: case.architecture.clone(),
        dims: case.dims,
        patch: case.patch.clone(),
        batch_size: BATCH,
        dtype: dtype.as_str().into(),
        params: 0,
        params_without_grad: 0,
        loss: None,
        passed: false,
        seconds: 0.0,
        error: None,
    };
    let t0 = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        forward_backward(case, device, seed, dtype, &mut r)
    }));
    r.seconds = t0.elapsed().as_secs_f64();
    match outcome {
        Ok(Ok(())) => r.passed = true,
        Ok(Err(e)) => r.error = Some(e),
        Err(p) => r.error = Some(format!("panicked: {}", panic_message(p.as_ref()))),
    }
    r
}

fn forward_backward(
    case: &NetworkCase,
    device: &Device,
    seed: u64,
    dtype: DType,
    r: &mut NetworkResult,
) -> Result<(), String> {
    let e = |what: &'static str| move |e: candle_core::Error| format!("{what}: {e}");
    let registry = Registry::default();
    let spec = plans::ArchitectureSpec {
        network_class_name: registry
            .get(&case.architecture)
            .map_err(|e| e.to_string())?
            .name()
            .to_string(),
        arch_kwargs: case.kwargs.clone(),
        kw_requires_import: vec![],
    };
    r.network = spec.network_class_name.clone();
    let io = NetworkIo {
        in_channels: 1,
        num_classes: CLASSES,
        deep_supervision: true,
    };
    let (varmap, net) = registry
        .build_initialized(&spec, &io, seed, device)
        .map_err(|e| format!("build: {e}"))?;
    let vars = varmap.all_vars();
    r.params = vars.iter().map(|v| v.elem_count()).sum();
    let mut xs = vec![BATCH, 1];
    xs.extend(&case.patch);
    let x = host_uniform(&xs, seed)
        .and_then(|t| t.to_device(device))
        .map_err(e("input"))?;
    let (seg, class_logits) = match as_class_head(net.as_ref()) {
        Some(head) => {
            let mut outs = autocast(&x, dtype, |x| {
                let o = head.forward_with_class(x, true)?;
                let mut v = o.seg;
                v.push(o.class_logits);
                Ok(v)
            })
            .map_err(e("forward"))?;
            let class_logits = outs.pop();
            (outs, class_logits)
        }
        None => {
            let seg = forward_autocast(net.as_ref(), &x, true, dtype).map_err(e("forward"))?;
            (seg, None)
        }
    };
    let mut want = vec![BATCH, CLASSES];
    want.extend(&case.patch);
    match seg.first() {
        Some(y) if y.dims() == want.as_slice() => {}
        Some(y) => return Err(format!("output shape {:?}, expected {want:?}", y.dims())),
        None => return Err("the network returned no output".into()),
    }
    let loss = training_loss(&seg, class_logits.as_ref()).map_err(e("loss"))?;
    let value = loss
        .to_dtype(DType::F64)
        .and_then(|l| l.to_scalar::<f64>())
        .map_err(e("loss"))?;
    r.loss = Some(value);
    if !value.is_finite() {
        return Err(format!("loss is {value}"));
    }
    let grads = loss.backward().map_err(e("backward"))?;
    let mut sq = Tensor::zeros((), DType::F32, device).map_err(e("gradients"))?;
    for v in &vars {
        match grads.get(v.as_tensor()) {
            Some(g) => {
                let s = g.to_dtype(DType::F32).and_then(|g| g.sqr()?.sum_all());
                sq = (sq + s.map_err(e("gradients"))?).map_err(e("gradients"))?;
            }
            None => r.params_without_grad += 1,
        }
    }
    let norm = sq.to_scalar::<f32>().map_err(e("gradients"))?;
    if !norm.is_finite() {
        return Err(format!("gradient norm² is {norm}"));
    }
    Ok(())
}

/// nnU-Net's DC+CE with deep-supervision weights on random labels at each output's size, plus
/// BCE of a classification head against "no class present".
fn training_loss(seg: &[Tensor], class_logits: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let mut targets = vec![];
    for (i, y) in seg.iter().enumerate() {
        let mut s = y.dims().to_vec();
        s[1] = 1;
        let u = host_uniform(&s, 50 + i as u64)?;
        let t = ((u + 1.0)? * (CLASSES as f64 / 2.0))?
            .floor()?
            .clamp(0f32, (CLASSES - 1) as f32)?;
        targets.push(t.to_device(y.device())?);
    }
    let ds = DeepSupervisionLoss::new(
        Box::new(DcAndCeLoss::new(LossOptions {
            batch_dice: true,
            ..LossOptions::default()
        })),
        deep_supervision_weights(seg.len()),
    );
    let mut loss = ds.loss_ds(seg, &targets)?;
    if let Some(c) = class_logits {
        loss = (loss + bce_with_logits(c, &c.zeros_like()?)?)?;
    }
    Ok(loss)
}

/// The networks part of the text report.
pub(super) fn render(results: &[NetworkResult]) -> String {
    let mut s = format!(
        "{:<24} {:<4} {:<12} {:<5} {:>9} {:>8} {:>7}  result\n",
        "network", "dims", "patch", "dtype", "params", "loss", "s"
    );
    for n in results {
        let patch = n
            .patch
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("x");
        s.push_str(&format!(
            "{:<24} {:<4} {:<12} {:<5} {:>9} {:>8} {:>7.2}  {}{}\n",
            n.name,
            format!("{}d", n.dims),
            patch,
            n.dtype,
            n.params,
            n.loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            n.seconds,
            if n.passed { "PASS" } else { "FAIL" },
            n.error
                .as_ref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        ));
    }
    s
}
