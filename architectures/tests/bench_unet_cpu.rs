//! Timing / peak-memory probe (ignored by default):
//! `cargo test --release -p architectures --test bench_unet_cpu -- --ignored --nocapture`

use architectures::registry::{NetworkIo, Registry};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::time::Instant;

fn vm_hwm_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[test]
#[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
fn plain_3d_forward_backward_cpu() {
    let patch: Vec<usize> = std::env::var("NNSEG_BENCH_PATCH")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().parse().expect("patch"))
                .collect()
        })
        .unwrap_or_else(|| vec![32, 64, 64]);
    let batch: usize = std::env::var("NNSEG_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let spec = plans::ArchitectureSpec {
        network_class_name: "PlainConvUNet".into(),
        arch_kwargs: json!({
            "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": 3,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": 2, "n_conv_per_stage_decoder": 2, "conv_bias": true,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": true},
            "dropout_op": null, "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
        })
        .as_object()
        .unwrap()
        .clone(),
        kw_requires_import: vec![],
    };
    let dev = Device::Cpu;
    let io = NetworkIo {
        in_channels: 1,
        num_classes: 3,
        deep_supervision: true,
    };
    let (vm, net) = Registry::default()
        .build_initialized(&spec, &io, 0, &dev)
        .unwrap();
    let n_params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    let mut shape = vec![batch, 1];
    shape.extend(&patch);
    let x = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
    let base = vm_hwm_mib();
    let mut times = vec![];
    for it in 0..4 {
        let t0 = Instant::now();
        let ys = net.forward(&x, true).unwrap();
        let t1 = Instant::now();
        let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
        for y in &ys {
            loss = (loss + y.sqr().unwrap().mean_all().unwrap()).unwrap();
        }
        let g = loss.backward().unwrap();
        let t2 = Instant::now();
        assert!(g.get(&vm.all_vars()[0]).is_some());
        println!(
            "iter {it}: forward {:.3} s, backward {:.3} s, total {:.3} s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t2 - t0).as_secs_f64()
        );
        if it > 0 {
            times.push((t2 - t0).as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "PlainConvUNet 3D {:?} x batch {batch}, {n_params} params, threads {}: fwd+bwd min {:.3} s median {:.3} s; peak RSS {:.0} MiB (after build {:.0} MiB)",
        patch,
        candle_core::utils::get_num_threads(),
        times[0],
        times[times.len() / 2],
        vm_hwm_mib(),
        base
    );
}

/// Where does the time of one full-resolution conv block go (forward + backward)?
#[test]
#[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
fn block_parts_cpu() {
    use architectures::ops;
    let dev = Device::Cpu;
    let x = candle_core::Var::randn(0f32, 1f32, (2, 32, 32, 64, 64), &dev).unwrap();
    let w = candle_core::Var::randn(0f32, 0.05f32, (32, 32, 3, 3, 3), &dev).unwrap();
    let b = candle_core::Var::zeros(32, DType::F32, &dev).unwrap();
    let nw = candle_core::Var::ones(32, DType::F32, &dev).unwrap();
    let nb = candle_core::Var::zeros(32, DType::F32, &dev).unwrap();
    let r = Tensor::randn(0f32, 1f32, (2, 32, 32, 64, 64), &dev).unwrap();
    type Part<'a> = Box<dyn Fn() -> Tensor + 'a>;
    let parts: Vec<(&str, Part)> = vec![
        (
            "conv",
            Box::new(|| {
                ops::conv(&x, &w, Some(&b), &ops::ConvOpts::new().padding(vec![1])).unwrap()
            }),
        ),
        (
            "instance_norm",
            Box::new(|| {
                ops::instance_norm(&x, ops::NormAffine::new(Some(&nw), Some(&nb)), 1e-5).unwrap()
            }),
        ),
        (
            "leaky_relu",
            Box::new(|| ops::leaky_relu(&x, 0.01).unwrap()),
        ),
    ];
    for (name, f) in &parts {
        let mut best = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t0 = Instant::now();
            let y = f();
            let t1 = Instant::now();
            let _g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let t2 = Instant::now();
            best.0 = best.0.min((t1 - t0).as_secs_f64());
            best.1 = best.1.min((t2 - t1).as_secs_f64());
        }
        println!("{name}: forward {:.3} s, backward {:.3} s", best.0, best.1);
    }
}
