//! `nnseg bench_train`: seconds per training step (forward, deep-supervision DC+CE loss,
//! backward, gradient clipping, SGD Nesterov) of a PlainConvUNet at a given plan, on random
//! data — the number to compare with PyTorch nnU-Net on the same device
//! (`scripts/bench_gpu.sh`, `scripts/bench_train_cpu.sh`). The step is the trainer's
//! ([`crate::train::step::Learner`]) with nnU-Net's default hyper-parameters
//! ([`TrainerConfig::default`]).

use crate::amp::Amp;
use crate::config::TrainerConfig;
use crate::loss::LossOptions;
use crate::train::hooks::Hooks;
use crate::train::step::{nnunet_loss, probe_output_count, Learner, StepAt};
use crate::train::TrainError;
use architectures::network::NetworkIo;
use architectures::registry::Registry;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::json;
use std::time::Instant;

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchTrainOptions {
    /// Name in the report (`3d_fullres`, `2d`, `demo_3d`, ...).
    pub config: String,
    pub patch: Vec<usize>,
    pub batch_size: usize,
    pub features: Vec<usize>,
    /// Per-stage strides (`None`: 1 then 2 on every axis, nnU-Net's isotropic plan).
    pub strides: Option<Vec<Vec<usize>>>,
    /// Per-stage kernels (`None`: 3 everywhere).
    pub kernels: Option<Vec<Vec<usize>>>,
    pub in_channels: usize,
    pub num_classes: usize,
    pub iters: usize,
    pub warmup: usize,
    pub seed: u64,
    /// Another registry network instead of PlainConvUNet: (name, `arch_kwargs` merged over the
    /// plan's), e.g. from a trainer preset.
    pub network: Option<(String, serde_json::Map<String, serde_json::Value>)>,
    /// bf16 mixed precision (`auto`: on CUDA); see [`crate::amp`].
    pub amp: Amp,
}

impl BenchTrainOptions {
    /// nnU-Net's typical plans: `3d_fullres` (patch 128³, batch 2, [32..320]) and `2d`
    /// (512², batch 12, 7 stages to 512).
    pub fn preset(config: &str) -> Option<Self> {
        let (patch, batch_size, features) = match config {
            "3d_fullres" => (vec![128, 128, 128], 2, vec![32, 64, 128, 256, 320, 320]),
            "2d" => (vec![512, 512], 12, vec![32, 64, 128, 256, 512, 512, 512]),
            _ => return None,
        };
        Some(BenchTrainOptions {
            config: config.into(),
            patch,
            batch_size,
            features,
            strides: None,
            kernels: None,
            in_channels: 1,
            num_classes: 3,
            iters: 20,
            warmup: 5,
            seed: 12345,
            network: None,
            amp: Amp::Auto,
        })
    }
}

/// One benchmark result (the JSON line `bench_gpu.sh` reads).
#[derive(Debug, Clone, Serialize)]
pub struct BenchTrainResult {
    pub side: &'static str,
    pub config: String,
    pub network: String,
    pub device: String,
    pub patch: Vec<usize>,
    pub batch_size: usize,
    pub features: Vec<usize>,
    pub params: usize,
    pub iters: usize,
    pub step_s_median: f64,
    pub step_s_min: f64,
    pub iters_per_s: f64,
    pub fwd_s: f64,
    pub bwd_s: f64,
    pub opt_s: f64,
    pub loss: f64,
    /// Dtype of the forward pass (`f32`, or `bf16` with mixed precision).
    pub precision: &'static str,
    /// Peak bytes of the CUDA allocator pool over the timed steps (CUDA builds; see
    /// `crate::gpu_memory`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_memory_bytes: Option<u64>,
}

fn sync(d: &Device) -> candle_core::Result<()> {
    d.synchronize()
}

/// The candle error of a failed bench step, as `bench_train` reports them.
fn bench_err(e: TrainError) -> candle_core::Error {
    match e {
        TrainError::Candle { source, .. } => source,
        e => candle_core::Error::Msg(e.to_string()),
    }
}

/// PlainConvUNet `arch_kwargs` of a bench plan.
fn plain_unet_spec(o: &BenchTrainOptions, strides: &[Vec<usize>]) -> plans::ArchitectureSpec {
    let (dim, n) = (o.patch.len(), o.features.len());
    let kernels = o.kernels.clone().unwrap_or_else(|| vec![vec![3; dim]; n]);
    let conv = if dim == 3 { "Conv3d" } else { "Conv2d" };
    let norm = if dim == 3 {
        "InstanceNorm3d"
    } else {
        "InstanceNorm2d"
    };
    plans::ArchitectureSpec {
        network_class_name: "PlainConvUNet".into(),
        arch_kwargs: json!({
            "n_stages": n, "features_per_stage": o.features, "conv_op": format!("torch.nn.modules.conv.{conv}"),
            "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": vec![2; n],
            "n_conv_per_stage_decoder": vec![2; n - 1], "conv_bias": true,
            "norm_op": format!("torch.nn.modules.instancenorm.{norm}"),
            "norm_op_kwargs": {"eps": 1e-5, "affine": true}, "dropout_op": null, "dropout_op_kwargs": null,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
        kw_requires_import: vec![],
    }
}

/// Random input and random labels at every deep-supervision resolution.
fn random_batch(
    o: &BenchTrainOptions,
    strides: &[Vec<usize>],
    device: &Device,
) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
    let mut xs = vec![o.batch_size, o.in_channels];
    xs.extend(&o.patch);
    let x = Tensor::randn(0f32, 1.0, xs, device)?;
    let mut targets = vec![];
    let mut size = o.patch.clone();
    for s in strides.iter().take(o.features.len() - 1) {
        for (a, st) in size.iter_mut().zip(s) {
            *a /= st;
        }
        let mut ts = vec![o.batch_size, 1];
        ts.extend(&size);
        let t = Tensor::rand(0f32, o.num_classes as f32, ts, device)?.floor()?;
        targets.push(t);
    }
    Ok((x, targets))
}

/// The network of `o` and its learner (nnU-Net's optimizer settings and DC+CE loss); the
/// targets are cut to the network's number of outputs.
fn bench_learner(
    o: &BenchTrainOptions,
    spec: &plans::ArchitectureSpec,
    targets: &mut Vec<Tensor>,
    device: &Device,
) -> Result<Learner, TrainError> {
    let io = NetworkIo {
        in_channels: o.in_channels,
        num_classes: o.num_classes,
        deep_supervision: true,
    };
    let (varmap, net) = Registry::default().build_initialized(spec, &io, o.seed, device)?;
    let config = TrainerConfig {
        amp: o.amp,
        ..TrainerConfig::default()
    };
    let dtype = config.amp.compute_dtype(device);
    // networks other than nnU-Net's may have fewer decoder outputs
    let n_out = probe_output_count(net.as_ref(), o.in_channels, &o.patch, device, dtype)?
        .min(targets.len());
    targets.truncate(n_out);
    let options = LossOptions {
        batch_dice: true,
        ..LossOptions::default()
    };
    let loss = nnunet_loss(options, false, n_out);
    Ok(Learner::new(net, varmap, loss, &config, device))
}

/// Builds the network and times `iters` steps after `warmup` untimed ones.
pub fn bench_train(
    o: &BenchTrainOptions,
    device: &Device,
) -> candle_core::Result<BenchTrainResult> {
    let dim = o.patch.len();
    let n = o.features.len();
    if !(dim == 2 || dim == 3) || n < 2 || o.batch_size == 0 || o.iters == 0 {
        candle_core::bail!(
            "bench_train: need a 2D/3D patch, at least 2 stages, batch ≥ 1 and iters ≥ 1"
        );
    }
    let strides = o.strides.clone().unwrap_or_else(|| {
        (0..n)
            .map(|s| vec![if s == 0 { 1 } else { 2 }; dim])
            .collect()
    });
    let mut spec = plain_unet_spec(o, &strides);
    if let Some((name, kw)) = &o.network {
        let registry = Registry::default();
        spec.network_class_name = registry
            .get(name)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .name()
            .to_string();
        for (k, v) in kw {
            spec.arch_kwargs.insert(k.clone(), v.clone());
        }
    }
    let (x, mut targets) = random_batch(o, &strides, device)?;
    let mut learner = bench_learner(o, &spec, &mut targets, device).map_err(bench_err)?;
    let timing = time_steps(o, &mut learner, &x, &targets, device)?;
    let k = timing.steps.len() as f64;
    let mut sorted = timing.steps.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    Ok(BenchTrainResult {
        side: "nnseg",
        config: o.config.clone(),
        network: spec.network_class_name.clone(),
        device: format!("{:?}", device.location()),
        patch: o.patch.clone(),
        batch_size: o.batch_size,
        features: o.features.clone(),
        params: learner.trainable_parameters(),
        iters: o.iters,
        step_s_median: median,
        step_s_min: sorted[0],
        iters_per_s: 1.0 / median,
        fwd_s: timing.fwd / k,
        bwd_s: timing.bwd / k,
        opt_s: timing.opt / k,
        loss: timing.last_loss,
        precision: learner.compute_dtype.as_str(),
        peak_gpu_memory_bytes: timing.peak,
    })
}

/// Step times (forward + loss, backward, clipping + optimizer) of the timed iterations.
#[derive(Debug, Default)]
struct StepTiming {
    steps: Vec<f64>,
    fwd: f64,
    bwd: f64,
    opt: f64,
    last_loss: f64,
    peak: Option<u64>,
}

fn time_steps(
    o: &BenchTrainOptions,
    learner: &mut Learner,
    x: &Tensor,
    targets: &[Tensor],
    device: &Device,
) -> candle_core::Result<StepTiming> {
    let mut t = StepTiming::default();
    let mut hooks = Hooks::none();
    for it in 0..o.warmup + o.iters {
        #[cfg(feature = "cuda")]
        if it == o.warmup {
            crate::gpu_memory::take_peak(device); // resets the high-water mark
        }
        let at = StepAt::train(0, it);
        sync(device)?;
        let t0 = Instant::now();
        let l = learner
            .forward_loss(x, targets, &mut hooks, at)
            .map_err(bench_err)?;
        sync(device)?;
        let t1 = Instant::now();
        let mut g = learner.backward(&l, at).map_err(bench_err)?;
        sync(device)?;
        let t2 = Instant::now();
        learner.apply_gradients(&mut g, at).map_err(bench_err)?;
        t.last_loss = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        sync(device)?;
        let t3 = Instant::now();
        if it >= o.warmup {
            t.steps.push((t3 - t0).as_secs_f64());
            t.fwd += (t1 - t0).as_secs_f64();
            t.bwd += (t2 - t1).as_secs_f64();
            t.opt += (t3 - t2).as_secs_f64();
        }
    }
    #[cfg(feature = "cuda")]
    {
        t.peak = crate::gpu_memory::take_peak(device).map(|m| m.used());
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_bench_runs_and_reports() {
        let o = BenchTrainOptions {
            config: "tiny".into(),
            patch: vec![16, 16],
            batch_size: 2,
            features: vec![4, 8],
            iters: 2,
            warmup: 1,
            ..BenchTrainOptions::preset("2d").unwrap()
        };
        let r = bench_train(&o, &Device::Cpu).unwrap();
        assert_eq!(r.iters, 2);
        assert!(r.step_s_median > 0.0 && r.loss.is_finite());
        assert!(r.fwd_s + r.bwd_s + r.opt_s <= r.step_s_median * 2.0 + 1e-3);
        assert!(r.params > 0);
        assert_eq!((r.precision, r.peak_gpu_memory_bytes), ("f32", None));
        let r = bench_train(&BenchTrainOptions { amp: Amp::On, ..o }, &Device::Cpu).unwrap();
        assert!(r.precision == "bf16" && r.loss.is_finite());
        assert!(BenchTrainOptions::preset("3d_fullres").is_some());
        assert!(BenchTrainOptions::preset("3d_lowres").is_none());
    }
}
