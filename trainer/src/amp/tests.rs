//! bf16 autocast on a tiny 2D network, on the CPU (composite ops: slow per voxel, so tiny).

use super::*;
use crate::loss::{DcAndCeLoss, DeepSupervisionLoss, LossOptions};
use crate::optim::{clip_grad_norm, SgdNesterov, SgdOptions};
use architectures::registry::{NetworkIo, Registry};
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

/// A 2D PlainConvUNet with `features` per stage (strides 1, 2, 2, ...), deep supervision on.
fn tiny_spec(features: &[usize]) -> plans::ArchitectureSpec {
    let n = features.len();
    let kwargs = serde_json::json!({
        "n_stages": n, "features_per_stage": features,
        "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": vec![[3, 3]; n],
        "strides": (0..n).map(|s| if s == 0 { [1, 1] } else { [2, 2] }).collect::<Vec<_>>(),
        "n_conv_per_stage": vec![2; n], "n_conv_per_stage_decoder": vec![2; n - 1],
        "conv_bias": true, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": true}, "dropout_op": null,
        "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": true}
    });
    plans::ArchitectureSpec {
        network_class_name: "PlainConvUNet".into(),
        arch_kwargs: kwargs.as_object().unwrap().clone(),
        kw_requires_import: vec![],
    }
}

const IO: NetworkIo = NetworkIo {
    in_channels: 1,
    num_classes: 2,
    deep_supervision: true,
};

fn build(spec: &plans::ArchitectureSpec) -> (VarMap, Box<dyn SegNetwork>) {
    Registry::default()
        .build_initialized(spec, &IO, 7, &Device::Cpu)
        .unwrap()
}

fn vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap();
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A batch of 2 16×16 images: a bright square (label 1) on noise, and its target.
fn batch() -> (Tensor, Tensor) {
    let dev = &Device::Cpu;
    let mask = Tensor::zeros((2, 1, 16, 16), DType::F32, dev)
        .unwrap()
        .slice_assign(
            &[0..2, 0..1, 4..11, 5..12],
            &Tensor::ones((2, 1, 7, 7), DType::F32, dev).unwrap(),
        )
        .unwrap();
    // fixed noise in [-0.3, 0.3) (Candle's CPU randn is not seeded: with random noise the bf16
    // error below exceeded its bound in about 1 run of many)
    let noise: Vec<f32> = (0..2 * 16 * 16)
        .map(|i| ((((i as f32) * 12.9898).sin() * 43758.547).fract() - 0.5) * 0.6)
        .collect();
    let noise = Tensor::from_vec(noise, (2, 1, 16, 16), dev).unwrap();
    ((&mask * 2.0).unwrap() + noise).map(|x| (x, mask)).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = a.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
}

#[test]
fn amp_setting_parses_and_resolves() {
    assert_eq!("auto".parse::<Amp>(), Ok(Amp::Auto));
    assert_eq!("ON".parse::<Amp>(), Ok(Amp::On));
    assert_eq!("off".parse::<Amp>(), Ok(Amp::Off));
    assert!("fp8"
        .parse::<Amp>()
        .unwrap_err()
        .contains("auto, on or off"));
    assert_eq!(serde_json::to_string(&Amp::Auto).unwrap(), r#""auto""#);
    assert_eq!(serde_json::from_str::<Amp>(r#""on""#).unwrap(), Amp::On);
    assert_eq!(Amp::Auto.compute_dtype(&Device::Cpu), DType::F32);
    assert_eq!(Amp::On.compute_dtype(&Device::Cpu), DType::BF16);
    assert_eq!(Amp::Off.compute_dtype(&Device::Cpu), DType::F32);
    assert!(describe(DType::BF16).contains("bf16 mixed precision"));
}

/// The bf16 forward pass gives f32 outputs within bf16 rounding of the f32 forward pass.
#[test]
fn bf16_forward_is_close_to_f32() {
    let (_vm, net) = build(&tiny_spec(&[4, 8, 16]));
    let (x, _) = batch();
    let want = forward_autocast(net.as_ref(), &x, false, DType::F32).unwrap();
    let got = forward_autocast(net.as_ref(), &x, false, DType::BF16).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.dtype(), DType::F32);
        assert_eq!(g.dims(), w.dims());
        let e = rel_err(w, g);
        eprintln!("bf16 vs f32 output {:?}: relative error {e:.2e}", g.dims());
        // not bit-equal: the forward pass did run in bf16
        assert!(e > 0.0 && e < 2e-2, "relative error {e}");
    }
}

/// Training steps in bf16: the Vars stay f32, every Var gets a finite f32 gradient, and the
/// loss falls over 10 SGD steps.
#[test]
fn bf16_training_keeps_f32_master_weights_and_learns() {
    let (varmap, net) = build(&tiny_spec(&[4, 8, 16]));
    let vars = vars(&varmap);
    let clip: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = SgdNesterov::new(
        vars.clone(),
        SgdOptions {
            lr: 1e-2,
            momentum: 0.99,
            weight_decay: 3e-5,
            nesterov: true,
        },
    );
    let (x, t) = batch();
    let targets = vec![t.clone(), t.max_pool2d(2).unwrap()];
    let loss = DeepSupervisionLoss::new(
        Box::new(DcAndCeLoss::new(LossOptions::default())),
        // both outputs weighted (nnU-Net's weights zero the lowest resolution), so every
        // Var is on the loss's path
        vec![0.6, 0.4],
    );
    let mut losses = vec![];
    for step in 0..10 {
        let out = forward_autocast(net.as_ref(), &x, true, DType::BF16).unwrap();
        let l = loss.loss_ds(&out, &targets).unwrap();
        assert_eq!(l.dtype(), DType::F32);
        let mut g = l.backward().unwrap();
        if step == 0 {
            for (name, v) in &vars {
                let gv = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient: {name}"));
                assert_eq!(gv.dtype(), DType::F32, "{name}");
                let s = gv
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(s.is_finite(), "{name}: gradient not finite");
            }
        }
        clip_grad_norm(&clip, &mut g, 12.0).unwrap();
        opt.step(&g).unwrap();
        losses.push(l.to_scalar::<f32>().unwrap());
    }
    for (name, v) in &vars {
        assert_eq!(v.dtype(), DType::F32, "{name}");
    }
    eprintln!("bf16 training losses {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[9] < losses[0] * 0.9, "loss did not fall: {losses:?}");
}

/// Every architecture preset's network runs a bf16 training step: f32 outputs, a finite f32
/// gradient for its Vars.
#[test]
fn every_preset_network_runs_in_bf16() {
    let registry = Registry::default();
    let presets = crate::presets::Presets::default();
    let base = tiny_spec(&[4, 8, 16]);
    let x = Tensor::randn(0f32, 1.0, (1, 1, 32, 32), &Device::Cpu).unwrap();
    for name in presets.names() {
        let cfg = presets.get(&name).unwrap();
        // the larger ConvUNext presets only widen convunext_tiny's layers (seconds in bf16)
        let wider = name.starts_with("convunext_") && name != "convunext_tiny";
        if cfg.network_override.is_none() || wider {
            continue;
        }
        let t0 = std::time::Instant::now();
        let spec = cfg.network_spec(&base, &registry).unwrap();
        let (varmap, net) = registry
            .build_initialized(&spec, &IO, 1, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = forward_autocast(net.as_ref(), &x, true, DType::BF16)
            .unwrap_or_else(|e| panic!("{name}: bf16 forward: {e}"));
        let mut total = out[0].sqr().unwrap().mean_all().unwrap();
        if let Some(head) = architectures::runext::as_class_head(net.as_ref()) {
            let c = head
                .forward_with_class(&x.to_dtype(DType::BF16).unwrap(), true)
                .and_then(|o| o.class_logits.to_dtype(DType::F32))
                .unwrap_or_else(|e| panic!("{name}: bf16 class head: {e}"));
            total = (total + c.sqr().unwrap().mean_all().unwrap()).unwrap();
        }
        assert!(out.iter().all(|t| t.dtype() == DType::F32), "{name}");
        let g = total
            .backward()
            .unwrap_or_else(|e| panic!("{name}: backward: {e}"));
        let mut reached = 0;
        for (n, v) in vars(&varmap) {
            assert_eq!(v.dtype(), DType::F32, "{name}: {n}");
            if let Some(gv) = g.get(v.as_tensor()) {
                assert_eq!(gv.dtype(), DType::F32, "{name}: {n}");
                let s = gv
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(s.is_finite(), "{name}: {n}: gradient not finite");
                reached += 1;
            }
        }
        assert!(reached > 0, "{name}: no gradient reached the weights");
        eprintln!("{name}: bf16 step {:.2} s", t0.elapsed().as_secs_f64());
    }
}
