//! PlainConvUNet / ResidualEncoderUNet: parameter counts, output shapes, gradients, seeded
//! initialisation and building from plans JSON.

use architectures::registry::{NetworkIo, Registry};
use architectures::unet::{PLAIN_CONV_UNET, RESIDUAL_ENCODER_UNET};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

fn spec(name: &str, kwargs: Value) -> plans::ArchitectureSpec {
    plans::ArchitectureSpec {
        network_class_name: name.to_string(),
        arch_kwargs: kwargs.as_object().expect("object").clone(),
        kw_requires_import: vec![
            "conv_op".into(),
            "norm_op".into(),
            "dropout_op".into(),
            "nonlin".into(),
        ],
    }
}

/// nnU-Net's default kwargs (kernel 3, conv_bias, InstanceNorm affine, LeakyReLU).
fn default_kwargs(
    dim: usize,
    features: &[usize],
    strides: &[Value],
    per_stage_key: &str,
    per_stage: &[usize],
    dec: &[usize],
) -> Value {
    let n = features.len();
    json!({
        "n_stages": n,
        "features_per_stage": features,
        "conv_op": format!("torch.nn.modules.conv.Conv{dim}d"),
        "kernel_sizes": vec![vec![3; dim]; n],
        "strides": strides,
        per_stage_key: per_stage,
        "n_conv_per_stage_decoder": dec,
        "conv_bias": true,
        "norm_op": format!("torch.nn.modules.instancenorm.InstanceNorm{dim}d"),
        "norm_op_kwargs": {"eps": 1e-5, "affine": true},
        "dropout_op": null,
        "dropout_op_kwargs": null,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": true}
    })
}

fn iso_strides(dim: usize, s: &[usize]) -> Vec<Value> {
    s.iter().map(|&x| json!(vec![x; dim])).collect()
}

fn io(in_channels: usize, num_classes: usize, ds: bool) -> NetworkIo {
    NetworkIo {
        in_channels,
        num_classes,
        deep_supervision: ds,
    }
}

#[test]
fn parameter_counts_match_nnunet() {
    let r = Registry::default();
    let f3 = [32, 64, 128, 256, 320, 320];
    let s3 = iso_strides(3, &[1, 2, 2, 2, 2, 2]);
    let plain3 = spec(
        PLAIN_CONV_UNET,
        default_kwargs(3, &f3, &s3, "n_conv_per_stage", &[2; 6], &[2; 5]),
    );
    assert_eq!(
        r.parameter_count(&plain3, &io(1, 3, true)).unwrap(),
        31_196_399
    );
    assert_eq!(
        r.parameter_count(&plain3, &io(4, 3, true)).unwrap(),
        31_198_991
    );
    // deep supervision does not change the parameters (heads always built)
    assert_eq!(
        r.parameter_count(&plain3, &io(1, 3, false)).unwrap(),
        31_196_399
    );
    // breakdown from nnunet-v2.md §8.3
    let params = r.parameters(&plain3, &io(1, 3, true)).unwrap();
    let sum = |pred: &dyn Fn(&str) -> bool| -> u64 {
        params
            .iter()
            .filter(|p| pred(&p.name))
            .map(|p| p.shape.iter().product::<usize>() as u64)
            .sum()
    };
    assert_eq!(sum(&|n| n.starts_with("encoder.")), 14_025_120);
    assert_eq!(sum(&|n| n.starts_with("decoder.transpconvs.")), 1_819_424);
    assert_eq!(sum(&|n| n.starts_with("decoder.seg_layers.")), 2_415);

    let f2 = [32, 64, 128, 256, 512, 512, 512];
    let s2 = iso_strides(2, &[1, 2, 2, 2, 2, 2, 2]);
    let plain2 = spec(
        "PlainConvUNet",
        default_kwargs(2, &f2, &s2, "n_conv_per_stage", &[2; 7], &[2; 6]),
    );
    assert_eq!(
        r.parameter_count(&plain2, &io(1, 3, true)).unwrap(),
        33_473_330
    );
    let p2 = r.parameters(&plain2, &io(1, 3, true)).unwrap();
    let enc2: u64 = p2
        .iter()
        .filter(|p| p.name.starts_with("encoder."))
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(enc2, 14_158_944);

    let res3 = spec(
        RESIDUAL_ENCODER_UNET,
        default_kwargs(
            3,
            &f3,
            &s3,
            "n_blocks_per_stage",
            &[1, 3, 4, 6, 6, 6],
            &[1; 5],
        ),
    );
    assert_eq!(
        r.parameter_count(&res3, &io(1, 3, true)).unwrap(),
        102_350_575
    );
    let res2 = spec(
        "ResEncUNet",
        default_kwargs(
            2,
            &f2,
            &s2,
            "n_blocks_per_stage",
            &[1, 3, 4, 6, 6, 6, 6],
            &[1; 6],
        ),
    );
    assert_eq!(
        r.parameter_count(&res2, &io(1, 3, true)).unwrap(),
        105_918_322
    );
}

#[test]
fn residual_weight_names_follow_dna() {
    let r = Registry::default();
    let res = spec(
        RESIDUAL_ENCODER_UNET,
        default_kwargs(
            3,
            &[4, 8, 16],
            &iso_strides(3, &[1, 2, 2]),
            "n_blocks_per_stage",
            &[1, 2, 2],
            &[1, 1],
        ),
    );
    let names: Vec<String> = r
        .parameters(&res, &io(1, 2, true))
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    for want in [
        "encoder.stem.convs.0.conv.weight",
        "encoder.stem.convs.0.norm.weight",
        "encoder.stages.0.blocks.0.conv1.conv.weight",
        "encoder.stages.0.blocks.0.conv2.norm.bias",
        "encoder.stages.1.blocks.0.skip.1.conv.weight",
        "encoder.stages.1.blocks.0.skip.1.norm.weight",
        "encoder.stages.1.blocks.1.conv1.conv.bias",
        "decoder.transpconvs.0.weight",
        "decoder.stages.1.convs.0.conv.weight",
        "decoder.seg_layers.1.bias",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
    }
    // stage 0: 4 → 4 channels, stride 1: no shortcut; shortcut convs have no bias
    assert!(!names
        .iter()
        .any(|n| n.starts_with("encoder.stages.0.blocks.0.skip")));
    assert!(!names.iter().any(|n| n.contains("skip.1.conv.bias")));
    // a channel change without stride puts the projection at skip.0
    let res_ch = spec(
        RESIDUAL_ENCODER_UNET,
        default_kwargs(
            2,
            &[4, 8],
            &iso_strides(2, &[1, 1]),
            "n_blocks_per_stage",
            &[1, 1],
            &[1],
        ),
    );
    let names: Vec<String> = r
        .parameters(&res_ch, &io(1, 2, true))
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n == "encoder.stages.1.blocks.0.skip.0.conv.weight"),
        "{names:?}"
    );
}

/// Forward shapes for 2D/3D × kernels × strides × deep supervision, both U-Nets.
#[test]
fn output_shape_grid() {
    let r = Registry::default();
    let dev = Device::Cpu;
    struct Case {
        kernels: Value,
        strides: Value,
        input: Vec<usize>,
        // expected spatial size of each decoder output, full resolution first
        outs: Vec<Vec<usize>>,
    }
    let cases = vec![
        // 3D isotropic
        Case {
            kernels: json!(3),
            strides: json!([1, 2, 2]),
            input: vec![8, 8, 8],
            outs: vec![vec![8, 8, 8], vec![4, 4, 4]],
        },
        // 3D anisotropic, 1x3x3 kernel in the first stage (nnU-Net style)
        Case {
            kernels: json!([[1, 3, 3], [3, 3, 3], [3, 3, 3]]),
            strides: json!([[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
            input: vec![4, 8, 12],
            outs: vec![vec![4, 8, 12], vec![4, 4, 6]],
        },
        // 2D with a (2, 1) stride
        Case {
            kernels: json!([[3, 3], [3, 3], [3, 1]]),
            strides: json!([[1, 1], [2, 2], [2, 1]]),
            input: vec![8, 6],
            outs: vec![vec![8, 6], vec![4, 3]],
        },
        // 2D isotropic
        Case {
            kernels: json!(3),
            strides: json!(2),
            input: vec![16, 8],
            outs: vec![vec![8, 4], vec![4, 2]],
        },
    ];
    for case in &cases {
        let dim = case.input.len();
        for residual in [false, true] {
            let (key, name) = if residual {
                ("n_blocks_per_stage", "ResEncUNet")
            } else {
                ("n_conv_per_stage", "PlainConvUNet")
            };
            let mut kw = default_kwargs(dim, &[2, 4, 6], &[], key, &[1, 2, 1], &[1, 2]);
            kw["kernel_sizes"] = case.kernels.clone();
            kw["strides"] = case.strides.clone();
            let s = spec(name, kw);
            for ds in [true, false] {
                let (_vm, net) = r.build_initialized(&s, &io(2, 3, ds), 1, &dev).unwrap();
                let mut shape = vec![2usize, 2];
                shape.extend(&case.input);
                let x = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
                let ys = net.forward(&x, false).unwrap();
                let expect: Vec<Vec<usize>> = if ds {
                    case.outs.clone()
                } else {
                    vec![case.outs[0].clone()]
                };
                assert_eq!(ys.len(), expect.len(), "{name} {dim}D ds={ds}");
                for (y, e) in ys.iter().zip(&expect) {
                    let mut want = vec![2usize, 3];
                    want.extend(e);
                    assert_eq!(
                        y.dims(),
                        want.as_slice(),
                        "{name} {dim}D ds={ds} kernels {}",
                        case.kernels
                    );
                }
                // the layer table agrees with the real forward
                let rows = net.layers(&case.input);
                let head = rows
                    .iter()
                    .rev()
                    .find(|r| {
                        r.name.starts_with("decoder.seg_layers") && !r.output_shape.is_empty()
                    })
                    .unwrap();
                assert_eq!(head.output_shape[1..], case.outs[0][..]);
            }
        }
    }
    // wrong rank / channels are errors, not panics
    let s = spec(
        "PlainConvUNet",
        default_kwargs(
            2,
            &[2, 4],
            &iso_strides(2, &[1, 2]),
            "n_conv_per_stage",
            &[1, 1],
            &[1],
        ),
    );
    let (_vm, net) = r.build_initialized(&s, &io(1, 2, false), 0, &dev).unwrap();
    assert!(net
        .forward(
            &Tensor::zeros((1, 1, 4, 4, 4), DType::F32, &dev).unwrap(),
            false
        )
        .is_err());
    assert!(net
        .forward(
            &Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap(),
            false
        )
        .is_err());
}

#[test]
fn set_deep_supervision_toggles_outputs() {
    let r = Registry::default();
    let dev = Device::Cpu;
    let s = spec(
        "PlainConvUNet",
        default_kwargs(
            2,
            &[2, 4, 8],
            &iso_strides(2, &[1, 2, 2]),
            "n_conv_per_stage",
            &[1, 1, 1],
            &[1, 1],
        ),
    );
    let (_vm, mut net) = r.build_initialized(&s, &io(1, 2, true), 5, &dev).unwrap();
    let x = Tensor::randn(0f32, 1f32, (1, 1, 8, 8), &dev).unwrap();
    let with = net.forward(&x, false).unwrap();
    assert_eq!(with.len(), 2);
    net.set_deep_supervision(false);
    assert!(!net.deep_supervision());
    let without = net.forward(&x, false).unwrap();
    assert_eq!(without.len(), 1);
    let d = (&with[0] - &without[0])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
}

/// Tiny nets: backward reaches every parameter.
#[test]
fn gradients_reach_every_parameter() {
    let r = Registry::default();
    let dev = Device::Cpu;
    for (name, key) in [
        ("PlainConvUNet", "n_conv_per_stage"),
        ("ResidualEncoderUNet", "n_blocks_per_stage"),
    ] {
        for dim in [2usize, 3] {
            let strides: Vec<Value> = if dim == 3 {
                vec![json!([1, 1, 1]), json!([1, 2, 2]), json!([2, 2, 2])]
            } else {
                vec![json!([1, 1]), json!([2, 2]), json!([2, 1])]
            };
            let s = spec(
                name,
                default_kwargs(dim, &[2, 4, 6], &strides, key, &[1, 2, 1], &[1, 1]),
            );
            let (vm, net) = r.build_initialized(&s, &io(1, 2, true), 11, &dev).unwrap();
            // ResEnc zero-inits the last norm of each block, which blocks the gradient of the
            // convs inside; move all norm weights away from their init first.
            for (n, v) in vm.data().lock().unwrap().iter() {
                if n.ends_with("norm.weight") {
                    let noise = Tensor::randn(0f32, 0.2, v.dims(), &dev).unwrap();
                    v.set(&(noise + 1.0).unwrap()).unwrap();
                }
            }
            let shape: Vec<usize> = if dim == 3 {
                vec![2, 1, 4, 8, 8]
            } else {
                vec![2, 1, 8, 8]
            };
            let x = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
            let ys = net.forward(&x, true).unwrap();
            let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
            for y in &ys {
                let w = Tensor::randn(0f32, 1f32, y.dims(), &dev).unwrap();
                loss = (loss + (y * w).unwrap().sum_all().unwrap()).unwrap();
            }
            let grads = loss.backward().unwrap();
            let data = vm.data().lock().unwrap();
            assert!(!data.is_empty());
            for (n, v) in data.iter() {
                let g = grads
                    .get(v)
                    .unwrap_or_else(|| panic!("{name} {dim}D: no gradient for {n}"));
                let gmax = g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // a conv bias right before an instance norm cancels out (zero gradient in exact
                // arithmetic), so only its presence is checked
                let before_norm = n.ends_with("conv.bias") && !n.contains("seg_layers");
                if !before_norm {
                    assert!(
                        gmax > 0.0 && gmax.is_finite(),
                        "{name} {dim}D: zero gradient for {n}"
                    );
                }
            }
        }
    }
}

#[test]
fn seeded_init_is_deterministic_and_follows_nnunet() {
    let r = Registry::default();
    let dev = Device::Cpu;
    let s = spec(
        "ResEncUNet",
        default_kwargs(
            3,
            &[8, 16, 32],
            &iso_strides(3, &[1, 2, 2]),
            "n_blocks_per_stage",
            &[1, 2, 2],
            &[1, 1],
        ),
    );
    let get = |seed: u64| {
        let (vm, _net) = r
            .build_initialized(&s, &io(1, 2, true), seed, &dev)
            .unwrap();
        let data = vm.data().lock().unwrap();
        let mut v: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let a = get(42);
    let b = get(42);
    let c = get(43);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let find = |n: &str| a.iter().find(|(k, _)| k == n).unwrap().1.clone();
    // He normal: std = sqrt(2 / (1 + 1e-4)) / sqrt(fan_in); conv1 of stage 2 block 1 is 32 → 32, 3x3x3
    let w = find("encoder.stages.2.blocks.1.conv1.conv.weight");
    let n = w.len() as f64;
    let std = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / n).sqrt();
    let want = (2.0f64 / 1.0001).sqrt() / ((32 * 27) as f64).sqrt();
    assert!((std / want - 1.0).abs() < 0.05, "std {std} vs {want}");
    assert!(find("encoder.stages.2.blocks.1.conv1.conv.bias")
        .iter()
        .all(|&x| x == 0.0));
    assert!(find("encoder.stages.2.blocks.1.conv1.norm.weight")
        .iter()
        .all(|&x| x == 1.0));
    assert!(find("encoder.stages.2.blocks.1.conv1.norm.bias")
        .iter()
        .all(|&x| x == 0.0));
    // init_last_bn_before_add_to_0
    assert!(find("encoder.stages.2.blocks.1.conv2.norm.weight")
        .iter()
        .all(|&x| x == 0.0));
    // transposed conv: fan_in = C_out * prod(k) (PyTorch's rule on the (C_in, C_out, k) weight)
    let t = find("decoder.transpconvs.0.weight");
    let tstd = (t.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / t.len() as f64).sqrt();
    let twant = (2.0f64 / 1.0001).sqrt() / ((16 * 8) as f64).sqrt();
    assert!(
        (tstd / twant - 1.0).abs() < 0.1,
        "transp std {tstd} vs {twant}"
    );
}

#[test]
fn builds_from_plans_json() {
    let dir = std::env::temp_dir().join(format!("nnseg-arch-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // the fixture's real plans file, plus a ResEnc configuration inheriting from it
    let fixture = fixtures().join(
        "nnunet_checkpoint/Dataset991_Fixture3D/nnUNetTrainer__nnUNetPlans__3d_fullres/plans.json",
    );
    let text = std::fs::read_to_string(&fixture)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", fixture.display()));
    let mut v: Value = serde_json::from_str(&text).unwrap();
    let mut resenc = v["configurations"]["3d_fullres"]["architecture"].clone();
    resenc["network_class_name"] =
        json!("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet");
    let kw = resenc["arch_kwargs"].as_object_mut().unwrap();
    kw.remove("n_conv_per_stage");
    kw.insert("n_blocks_per_stage".into(), json!([1, 2, 2, 2]));
    kw.insert("n_conv_per_stage_decoder".into(), json!([1, 1, 1]));
    v["configurations"]["3d_fullres_resenc"] =
        json!({"inherits_from": "3d_fullres", "architecture": resenc});
    let path = dir.join("nnUNetPlans.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();

    let plans = plans::Plans::load(&path).unwrap();
    let r = Registry::default();
    let dev = Device::Cpu;
    for cname in ["3d_fullres", "3d_fullres_resenc"] {
        let cfg = plans.configuration(cname).unwrap();
        let (_vm, net) = r
            .build_initialized(&cfg.architecture, &io(1, 3, true), 0, &dev)
            .unwrap();
        let mut shape = vec![1usize, 1];
        shape.extend(&cfg.patch_size);
        let ys = net
            .forward(&Tensor::randn(0f32, 1f32, shape, &dev).unwrap(), false)
            .unwrap();
        assert_eq!(ys.len(), 3, "{cname}");
        assert_eq!(ys[0].dims(), &[1, 3, 8, 32, 32]);
        assert_eq!(ys[2].dims(), &[1, 3, 4, 8, 8]);
    }
    // a bad value in the plans names its JSON path
    let mut bad = v.clone();
    bad["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["kernel_sizes"][2] =
        json!([3, 3]);
    std::fs::write(&path, serde_json::to_string_pretty(&bad).unwrap()).unwrap();
    let plans = plans::Plans::load(&path).unwrap();
    let err = match plans.configuration("3d_fullres") {
        Err(e) => e.to_string(),
        Ok(cfg) => r
            .build_initialized(&cfg.architecture, &io(1, 3, true), 0, &dev)
            .err()
            .expect("bad kernel must fail")
            .to_string(),
    };
    assert!(err.contains("kernel_sizes[2]"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn registry_estimate_matches_planner_values() {
    let r = Registry::default();
    let f3 = [32, 64, 128, 256, 320, 320];
    let s3 = iso_strides(3, &[1, 2, 2, 2, 2, 2]);
    let plain3 = spec(
        PLAIN_CONV_UNET,
        default_kwargs(3, &f3, &s3, "n_conv_per_stage", &[2; 6], &[2; 5]),
    );
    let est = r.estimate(&plain3, &io(1, 3, false)).unwrap();
    assert_eq!(est.conv_feature_map_size(&[128, 128, 128]), 452_796_416);
    let res3 = spec(
        RESIDUAL_ENCODER_UNET,
        default_kwargs(
            3,
            &f3,
            &s3,
            "n_blocks_per_stage",
            &[1, 3, 4, 6, 6, 6],
            &[1; 5],
        ),
    );
    let est = r.estimate(&res3, &io(1, 3, false)).unwrap();
    assert_eq!(est.conv_feature_map_size(&[128, 128, 128]), 557_420_544);
}

#[test]
fn summary_of_large_networks_without_allocating() {
    let f3 = [32, 64, 128, 256, 320, 320];
    let s3 = iso_strides(3, &[1, 2, 2, 2, 2, 2]);
    let res3 = spec(
        RESIDUAL_ENCODER_UNET,
        default_kwargs(
            3,
            &f3,
            &s3,
            "n_blocks_per_stage",
            &[1, 3, 4, 6, 6, 6],
            &[1; 5],
        ),
    );
    let s = architectures::summary::network_summary(&res3, 1, 3, &[128, 128, 128], 2).unwrap();
    assert_eq!(s.parameter_count, 102_350_575);
    // deep supervision on (training): nnU-Net's residual_encoder_unet_planners.py value
    assert_eq!(s.nnunet_feature_map_size, 558_319_104);
    assert_eq!(
        s.rows.iter().map(|r| r.params).sum::<u64>(),
        s.parameter_count
    );
    let last = s
        .rows
        .iter()
        .rev()
        .find(|r| !r.output_shape.is_empty())
        .unwrap();
    assert_eq!(last.output_shape, vec![3, 128, 128, 128]);
    assert!(s.table.contains("encoder.stages.5.blocks.5"));
    if std::env::var("NNSEG_PRINT_SUMMARY").is_ok() {
        println!("{}", s.table);
    }
}

/// Every configuration of real nnU-Net plans files parses, builds (shape only) and estimates.
#[test]
fn real_nnunet_plans_build() {
    let root = fixtures().join("nnunet_examples");
    let r = Registry::default();
    let mut n = 0;
    for f in [
        "example_nnUNetPlans_Dataset501.json",
        "example_nnUNetPlans_FakeLiver_cascade.json",
    ] {
        let plans = plans::Plans::load(&root.join(f)).unwrap();
        for c in plans.configuration_names() {
            let cfg = plans.configuration(&c).unwrap();
            let io = io(1, 3, true);
            let (params, net) = r.shape_only(&cfg.architecture, &io).unwrap();
            assert!(
                architectures::registry::count_trainable(&params) > 1_000_000,
                "{f} {c}"
            );
            let rows = net.layers(&cfg.patch_size);
            let head = rows
                .iter()
                .rev()
                .find(|r| !r.output_shape.is_empty())
                .unwrap();
            assert_eq!(head.output_shape[1..], cfg.patch_size[..], "{f} {c}");
            assert!(
                r.estimate(&cfg.architecture, &io)
                    .unwrap()
                    .conv_feature_map_size(&cfg.patch_size)
                    > 0
            );
            n += 1;
        }
    }
    assert!(n >= 4, "{n} configurations");
}

/// The workspace's `tests/fixtures` (part of the repository; a missing folder fails the test).
fn fixtures() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    assert!(dir.is_dir(), "fixture folder {} is missing", dir.display());
    dir
}
