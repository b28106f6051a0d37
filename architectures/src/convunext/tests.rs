use super::*;
use crate::init::count_trainable;
use crate::memory::{plain_conv_unet_feature_map_size, UNetTopology};
use crate::registry::Registry;
use candle_nn::VarMap;
use serde_json::json;
use std::path::PathBuf;

const KW: &str = "architecture.arch_kwargs";

fn io(cin: usize, classes: usize, ds: bool) -> NetworkIo {
    NetworkIo {
        in_channels: cin,
        num_classes: classes,
        deep_supervision: ds,
    }
}

/// A PlainConvUNet plan's kwargs.
fn plan(
    conv: &str,
    features: &[usize],
    kernels: Value,
    strides: Value,
    extra: Value,
) -> Map<String, Value> {
    let dim = if conv.ends_with("3d") { 3 } else { 2 };
    crate::test_util::with_extra(
        crate::test_util::plan_kwargs(dim, features, strides, kernels),
        &extra,
    )
}

fn shape_only(cfg: &ConvUNextConfig) -> (u64, ConvUNext, Vec<crate::init::ParamInfo>) {
    let rec = ShapeRecorder::new();
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    let net = ConvUNext::new(cfg, vb).unwrap();
    let params = rec.params();
    (count_trainable(&params), net, params)
}

fn fixture_dir() -> PathBuf {
    crate::test_util::fixtures_dir("architectures")
}

fn fixture_cfg(ds: bool) -> ConvUNextConfig {
    let kw = plan(
        "torch.nn.modules.conv.Conv2d",
        &[8, 16, 32, 64],
        json!(3),
        json!([[1, 1], [2, 2], [2, 2], [2, 2]]),
        json!({"initial_filters": 8, "depth": 3, "blocks_per_level": 2,
               "convnext_version": "v2", "block_form": "residual"}),
    );
    ConvUNextConfig::from_kwargs(&kw, KW, &io(3, 1, ds)).unwrap()
}

#[test]
fn fixture_residual_v2_matches_pytorch() {
    let name = "convunext_f8_d3_b2_v2_ds_residual";
    let dir = fixture_dir();
    let st = dir.join(format!("{name}.safetensors"));
    let js = dir.join(format!("{name}.json"));
    assert!(
        st.is_file() && js.is_file(),
        "fixture {name} missing under {} (expected the shared fixtures folder)",
        dir.display()
    );
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(&js).unwrap()).unwrap();
    let cfg = fixture_cfg(true);
    // parameter count and names/shapes
    let (count, _, params) = shape_only(&cfg);
    assert_eq!(count, meta["params"].as_u64().unwrap());
    assert_eq!(count, 140_611);
    let keys = meta["keys"].as_object().unwrap();
    assert_eq!(params.len(), keys.len(), "number of weights");
    for p in &params {
        let want: Vec<usize> = keys
            .get(&p.name)
            .unwrap_or_else(|| panic!("{} not in the fixture", p.name))
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(p.shape, want, "{}", p.name);
    }
    // weights by name, eval forward
    let dev = Device::Cpu;
    let tensors = candle_core::safetensors::load(&st, &dev).unwrap();
    let input = tensors["input"].clone();
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let net = ConvUNext::new(&cfg, vb).unwrap();
    let outs = SegNetwork::forward(&net, &input, false).unwrap();
    assert_eq!(outs.len(), 3);
    for (i, got) in outs.iter().enumerate() {
        let want = &tensors[&format!("output.{i}")];
        assert_eq!(got.dims(), want.dims(), "output.{i}");
        let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let maxabs = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut worst = 0f32;
        for (a, b) in g.iter().zip(&w) {
            let tol = 1e-4 * b.abs() + 1e-5 * maxabs;
            worst = worst.max((a - b).abs() - tol);
        }
        assert!(worst <= 0.0, "output.{i} exceeds tolerance by {worst}");
    }
    // without deep supervision the seed builds no heads: its parameters minus `heads.*`, and
    // the network loads from the weights trained with heads (theirs are not read)
    let heads: u64 = keys
        .iter()
        .filter(|(k, _)| k.starts_with("heads."))
        .map(|(_, v)| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    assert!(heads > 0);
    let off = fixture_cfg(false);
    let (count_off, _, params_off) = shape_only(&off);
    assert_eq!(count_off, 140_611 - heads);
    assert!(params_off.iter().all(|p| !p.name.starts_with("heads.")));
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let net = ConvUNext::new(&off, vb).unwrap();
    let outs = SegNetwork::forward(&net, &input, false).unwrap();
    assert_eq!(outs.len(), 1);
    let (g, w) = (&outs[0], &tensors["output.0"]);
    let d = (g - w).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
    // the same weights in the seed form (no residual) give different outputs
    let mut seed = cfg.clone();
    seed.form = BlockForm::Seed;
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let o = ConvUNext::new(&seed, vb)
        .unwrap()
        .forward(&input, false)
        .unwrap();
    let d = (&o[0] - &tensors["output.0"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 1e-3, "seed form should differ from the residual form");
}

fn block_params(c: usize, v: BlockVersion, form: BlockForm, bias: bool) -> u64 {
    let rec = ShapeRecorder::new();
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    let b = CnxBlock::new(c, 4, &[7, 7], v, form, bias, 0.0, vb).unwrap();
    let n = count_trainable(&rec.params());
    assert_eq!(n, b.params());
    n
}

#[test]
fn block_parameter_formulas() {
    for c in [8u64, 24, 64] {
        let q = 8 * c * c;
        let cu = c as usize;
        assert_eq!(
            block_params(cu, BlockVersion::V2, BlockForm::Paper, true),
            q + 65 * c
        );
        assert_eq!(
            block_params(cu, BlockVersion::V2, BlockForm::Residual, true),
            q + 66 * c
        );
        assert_eq!(
            block_params(cu, BlockVersion::V2, BlockForm::Seed, true),
            q + 66 * c
        );
        assert_eq!(
            block_params(cu, BlockVersion::V1, BlockForm::Seed, true),
            q + 58 * c
        );
        assert_eq!(
            block_params(cu, BlockVersion::V1, BlockForm::Paper, true),
            q + 58 * c
        );
        // bias-free: no dw/pw biases (6C), no LN β (C), no GRN β (4C)
        assert_eq!(
            block_params(cu, BlockVersion::V2, BlockForm::Paper, false),
            q + 54 * c
        );
    }
}

#[test]
fn init_values_follow_the_form() {
    let vm = VarMap::new();
    let vb = crate::init::seeded_init_backend(&vm, 1, DType::F32, &Device::Cpu);
    let p = CnxBlock::new(
        4,
        4,
        &[7, 7],
        BlockVersion::V2,
        BlockForm::Paper,
        true,
        0.0,
        vb.pp("p"),
    )
    .unwrap();
    let v1 = CnxBlock::new(
        4,
        4,
        &[7, 7],
        BlockVersion::V1,
        BlockForm::Paper,
        true,
        0.0,
        vb.pp("q"),
    )
    .unwrap();
    let s = CnxBlock::new(
        4,
        4,
        &[7, 7],
        BlockVersion::V2,
        BlockForm::Seed,
        true,
        0.0,
        vb.pp("s"),
    )
    .unwrap();
    let vals = |t: &Tensor| t.to_vec1::<f32>().unwrap();
    let grn = p.grn.as_ref().unwrap();
    assert!(vals(&grn.gamma).iter().all(|&v| v == 0.0));
    assert!(vals(grn.beta.as_ref().unwrap()).iter().all(|&v| v == 0.0));
    assert!(p.gamma.is_none());
    assert!(vals(v1.gamma.as_ref().unwrap())
        .iter()
        .all(|&v| (v - 1e-6).abs() < 1e-12));
    assert!(vals(&s.grn.as_ref().unwrap().gamma)
        .iter()
        .all(|&v| v == 1.0));
    assert!(vals(s.gamma.as_ref().unwrap()).iter().all(|&v| v == 1.0));
}

#[test]
fn grn_matches_the_seed_formula() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev).unwrap();
    let g = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
    let b = Tensor::new(&[0.1f32, 0.2, -0.3], &dev).unwrap();
    let grn = Grn {
        gamma: g.clone(),
        beta: Some(b.clone()),
    };
    let y = grn.forward(&x).unwrap();
    // direct formula
    let nrm = ((x.sqr().unwrap().sum_keepdim(vec![2, 3]).unwrap() + net::EPS).unwrap())
        .sqrt()
        .unwrap();
    let nx = nrm
        .broadcast_div(&(nrm.mean_keepdim(1).unwrap() + net::EPS).unwrap())
        .unwrap();
    let want = (&x
        + x.broadcast_mul(&nx)
            .unwrap()
            .broadcast_mul(&g.reshape((1, 3, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap())
            .unwrap())
    .unwrap();
    let d = (y - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "{d}");
}

fn small_3d_kwargs(extra: Value) -> Map<String, Value> {
    plan(
        "torch.nn.modules.conv.Conv3d",
        &[4, 8, 16, 32],
        json!([[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        json!([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]]),
        extra,
    )
}

#[test]
fn shape_grid_2d_3d_anisotropic_ds_on_off() {
    let dev = Device::Cpu;
    let cases: Vec<(Map<String, Value>, Vec<usize>)> = vec![
        (
            plan(
                "torch.nn.Conv2d",
                &[4, 8, 16],
                json!(3),
                json!([[1, 1], [2, 2], [2, 1]]),
                json!({"blocks_per_level": 1, "dw_kernel": 3, "stem_kernel": 3}),
            ),
            vec![8, 12],
        ),
        (
            small_3d_kwargs(json!({"blocks_per_level": 1, "dw_kernel": 3, "stem_kernel": 3})),
            vec![4, 8, 8],
        ),
        (
            small_3d_kwargs(
                json!({"blocks_per_level": 1, "dw_kernel": [3, 5, 3], "depth": 2,
                                   "initial_filters": 3, "convnext_version": "v1",
                                   "block_form": "seed", "use_bias": false}),
            ),
            vec![2, 8, 4],
        ),
    ];
    for (kw, patch) in cases {
        for ds in [true, false] {
            let cfg = ConvUNextConfig::from_kwargs(&kw, KW, &io(2, 3, ds)).unwrap();
            let vm = VarMap::new();
            let vb = crate::init::seeded_init_backend(&vm, 7, DType::F32, &dev);
            let net = ConvUNext::new(&cfg, vb).unwrap();
            let mut xs = vec![2, 2];
            xs.extend(&patch);
            let x = Tensor::randn(0f32, 1., xs, &dev).unwrap();
            let outs = SegNetwork::forward(&net, &x, true).unwrap();
            let sizes = cfg.level_sizes(&patch);
            let n_out = if ds { cfg.depth } else { 1 };
            assert_eq!(outs.len(), n_out, "{patch:?} ds={ds}");
            for (i, o) in outs.iter().enumerate() {
                let mut want = vec![2, 3];
                want.extend(&sizes[i]);
                assert_eq!(o.dims(), want.as_slice(), "output {i} for {patch:?}");
                let s = o.sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(s.is_finite());
            }
            // the layer table agrees with the forward pass
            let rows = SegNetwork::layers(&net, &patch);
            let fin = rows.iter().find(|r| r.name == "final").unwrap();
            assert_eq!(fin.output_shape[1..], patch[..]);
            let table_params: u64 = rows.iter().map(|r| r.params).sum();
            assert_eq!(table_params, net.params());
            assert_eq!(table_params, shape_only(&cfg).0);
        }
    }
    // wrong input channels / rank are errors, not panics
    let cfg =
        ConvUNextConfig::from_kwargs(&small_3d_kwargs(json!({})), KW, &io(2, 3, false)).unwrap();
    let (_, net, _) = shape_only(&cfg);
    let bad = Tensor::zeros((1, 1, 4, 8, 8), DType::F32, &dev).unwrap();
    assert!(SegNetwork::forward(&net, &bad, false).is_err());
}

#[test]
fn kernels_and_pooling_follow_the_plan() {
    let cfg =
        ConvUNextConfig::from_kwargs(&small_3d_kwargs(json!({})), KW, &io(1, 2, true)).unwrap();
    assert_eq!(cfg.dim, 3);
    assert_eq!(cfg.depth, 3);
    assert_eq!(cfg.features, vec![4, 8, 16, 32]);
    assert_eq!(cfg.stem_kernel, vec![1, 7, 7]);
    assert_eq!(cfg.dw_kernels[0], vec![1, 7, 7]);
    assert_eq!(cfg.dw_kernels[1], vec![7, 7, 7]);
    assert_eq!(cfg.pool, vec![vec![1, 2, 2], vec![2, 2, 2], vec![2, 2, 1]]);
    assert_eq!(cfg.expansions, vec![1, 4, 4, 4]); // 3D default: no expansion at level 0
    let (_, _, params) = shape_only(&cfg);
    let dw0 = params
        .iter()
        .find(|p| p.name == "enc.0.0.dw.weight")
        .unwrap();
    assert_eq!(dw0.shape, vec![4, 1, 1, 7, 7]);
    let pw0 = params
        .iter()
        .find(|p| p.name == "enc.0.0.pw1.weight")
        .unwrap();
    assert_eq!(pw0.shape, vec![4, 4, 1, 1, 1]);
    // variant + overrides; 2D keeps 4× at level 0
    let kw = plan(
        "torch.nn.Conv2d",
        &[32, 64, 128, 256, 512],
        json!(3),
        json!([1, 2, 2, 2, 2]),
        json!({"variant": "small", "depth": 2, "expansion": 2}),
    );
    let c = ConvUNextConfig::from_kwargs(&kw, KW, &io(1, 2, true)).unwrap();
    assert_eq!(
        (c.depth, c.features.clone(), c.blocks_per_level),
        (2, vec![48, 96, 192], 2)
    );
    assert_eq!(c.expansions, vec![2, 2, 2]);
    assert!((c.drop_path_rate - 0.1).abs() < 1e-12);
    assert!((c.drop_rate(1, 1) - 0.1 * 3.0 / 4.0).abs() < 1e-12);
    assert_eq!(c.drop_rate(2, 0), 0.1);
}

#[test]
fn gradients_reach_every_parameter() {
    // seeded draws (Candle's CPU randn is not seeded): with unseeded ones about 1 run in 40 gave
    // `heads.0.1.beta` an all-zero gradient
    let dev = Device::Cpu;
    for (kw, patch) in [
        (
            small_3d_kwargs(json!({"blocks_per_level": 1, "dw_kernel": 3, "depth": 2})),
            vec![2, 4, 4],
        ),
        (
            plan(
                "torch.nn.Conv2d",
                &[4, 8, 16],
                json!(3),
                json!([1, 2, 2]),
                json!({"blocks_per_level": 1, "dw_kernel": 3, "block_form": "seed",
                       "convnext_version": "v1"}),
            ),
            vec![8, 8],
        ),
    ] {
        let cfg = ConvUNextConfig::from_kwargs(&kw, KW, &io(2, 3, true)).unwrap();
        let vm = VarMap::new();
        let vb = crate::init::seeded_init_backend(&vm, 3, DType::F32, &dev);
        let net = ConvUNext::new(&cfg, vb).unwrap();
        // move every parameter off its (often zero / bound) init so no gradient is masked
        for (name, var) in vm.data().lock().unwrap().iter() {
            let r = seeded_randn(var.dims(), 0.3, name, &dev);
            let v = if name.ends_with("gamma") && cfg.form != BlockForm::Paper {
                (r.abs().unwrap() * 0.5).unwrap() // inside [0, 1]
            } else {
                (var.as_tensor() + r).unwrap()
            };
            var.set(&v).unwrap();
        }
        let mut xs = vec![2, 2];
        xs.extend(&patch);
        let x = seeded_randn(&xs, 1.0, "x", &dev);
        let outs = SegNetwork::forward(&net, &x, true).unwrap();
        assert_eq!(outs.len(), cfg.depth);
        let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
        for (i, o) in outs.iter().enumerate() {
            let w = seeded_randn(o.dims(), 1.0, &format!("w{i}"), &dev);
            loss = (loss + (o * w).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        assert!(!data.is_empty());
        for (name, var) in data.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let m = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(m > 0.0 && m.is_finite(), "{name}: max |grad| = {m}");
        }
    }
}

fn plain_topology(ds: bool) -> UNetTopology {
    UNetTopology {
        input_channels: 1,
        n_stages: 4,
        features_per_stage: vec![32, 64, 128, 256],
        kernel_sizes: vec![vec![3; 3]; 4],
        strides: vec![vec![1; 3], vec![2; 3], vec![2; 3], vec![2; 3]],
        n_conv_per_stage: vec![2; 4],
        n_conv_per_stage_decoder: vec![2; 3],
        num_classes: 2,
        deep_supervision: ds,
    }
}

fn plain_3d_kwargs() -> Map<String, Value> {
    plan(
        "torch.nn.modules.conv.Conv3d",
        &[32, 64, 128, 256],
        json!(3),
        json!([1, 2, 2, 2]),
        json!({}),
    )
}

#[test]
fn estimate_ratio_matches_reference_section_3() {
    let patch = [128, 128, 128];
    let plain = plain_conv_unet_feature_map_size(&plain_topology(false), &patch) as f64;
    let r = Registry::default();
    let est = |extra: Value| {
        let mut kw = plain_3d_kwargs();
        for (k, v) in extra.as_object().unwrap() {
            kw.insert(k.clone(), v.clone());
        }
        let spec = plans::ArchitectureSpec {
            network_class_name: "ConvUNext".into(),
            arch_kwargs: kw,
            kw_requires_import: vec![],
        };
        r.estimate(&spec, &io(1, 2, false))
            .unwrap()
            .conv_feature_map_size(&patch) as f64
    };
    // the reference row: tiny, 7³ dw, residual, 4× everywhere → 8.2× plain
    let spec_form =
        est(json!({"variant": "tiny", "expansion_level0": 4, "block_form": "residual"}));
    let ratio = spec_form / plain;
    println!("3D 128³ tiny spec form / plain = {ratio:.2}");
    assert!(
        (8.2 * 0.65..=8.2 * 1.35).contains(&ratio),
        "ConvUNext 3D tiny / plain = {ratio:.2}, reference 8.2"
    );
    // the 3D default (no expansion at level 0) is much cheaper and the estimate shows it
    let default = est(json!({"variant": "tiny"}));
    assert!(default < 0.75 * spec_form, "{default} vs {spec_form}");
    println!(
        "3D 128³ tiny default (expansion_level0 1) / plain = {:.2}",
        default / plain
    );
    // kernel size does not change activations; deep supervision adds its heads
    assert_eq!(est(json!({"variant": "tiny", "dw_kernel": 3})), default);
    assert!(est(json!({"variant": "tiny"})) > 0.0);
}

#[test]
fn bad_kwargs_name_their_json_path() {
    let r = Registry::default();
    let err = |extra: Value| {
        let mut kw = small_3d_kwargs(json!({}));
        for (k, v) in extra.as_object().unwrap() {
            kw.insert(k.clone(), v.clone());
        }
        let spec = plans::ArchitectureSpec {
            network_class_name: CONVUNEXT.into(),
            arch_kwargs: kw,
            kw_requires_import: vec![],
        };
        let e = match r.build_initialized(&spec, &io(1, 2, true), 0, &Device::Cpu) {
            Ok(_) => panic!("{extra} should fail"),
            Err(e) => e.to_string(),
        };
        let e2 = r
            .estimate(&spec, &io(1, 2, true))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(e, e2);
        e
    };
    let e = err(json!({"depth": 4}));
    assert!(
        e.contains("architecture.arch_kwargs.depth") && e.contains("n_stages = 4"),
        "{e}"
    );
    let e = err(json!({"dw_kernel": [7, 7]}));
    assert!(
        e.contains("architecture.arch_kwargs.dw_kernel: has 2 entries"),
        "{e}"
    );
    let e = err(json!({"dw_kernel": [7, 4, 7]}));
    assert!(e.contains("architecture.arch_kwargs.dw_kernel[1]"), "{e}");
    let e = err(json!({"block_form": "keras"}));
    assert!(e.contains("architecture.arch_kwargs.block_form"), "{e}");
    let e = err(json!({"variant": "huge"}));
    assert!(
        e.contains("architecture.arch_kwargs.variant") && e.contains("tiny"),
        "{e}"
    );
    let e = err(json!({"convunext_width": 3}));
    assert!(
        e.contains("architecture.arch_kwargs.convunext_width: unknown argument"),
        "{e}"
    );
    let e = err(json!({"drop_path_rate": 1.5}));
    assert!(e.contains("architecture.arch_kwargs.drop_path_rate"), "{e}");
    let e = err(json!({"strides": [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 1]]}));
    assert!(e.contains("architecture.arch_kwargs.strides[0]"), "{e}");
    let e = err(json!({"use_bias": "no"}));
    assert!(e.contains("architecture.arch_kwargs.use_bias"), "{e}");
}

#[test]
fn registry_names_presets_and_demo_numbers() {
    let r = Registry::default();
    for n in [CONVUNEXT, "ConvUNext", "convunext"] {
        assert_eq!(r.get(n).unwrap().name(), CONVUNEXT);
    }
    let presets: Vec<_> = r
        .presets()
        .into_iter()
        .filter(|(a, _)| a == CONVUNEXT)
        .map(|(_, p)| p)
        .collect();
    let names: Vec<_> = presets.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "convunext_tiny",
            "convunext_small",
            "convunext_base",
            "convunext_large",
            "convunext_xlarge"
        ]
    );
    // demo-like plans: 3D patch 24×56×56 (anisotropic), 2D 256×256 (7 stages)
    let demo3d = plan(
        "torch.nn.modules.conv.Conv3d",
        &[32, 64, 128, 256, 320],
        json!([[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        json!([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
        json!({}),
    );
    let demo2d = plan(
        "torch.nn.modules.conv.Conv2d",
        &[32, 64, 128, 256, 512, 512, 512],
        json!(3),
        json!([1, 2, 2, 2, 2, 2, 2]),
        json!({}),
    );
    let io3 = io(1, 3, true);
    let plain = |kw: &Map<String, Value>, patch: &[usize]| {
        r.estimate(
            &plans::ArchitectureSpec {
                network_class_name: "PlainConvUNet".into(),
                arch_kwargs: kw.clone(),
                kw_requires_import: vec![],
            },
            &io3,
        )
        .unwrap()
        .conv_feature_map_size(patch)
    };
    let mut last = 0;
    for p in &presets {
        for (kw, patch) in [(&demo3d, vec![24usize, 56, 56]), (&demo2d, vec![256, 256])] {
            let mut k = kw.clone();
            for (a, b) in &p.kwargs {
                k.insert(a.clone(), b.clone());
            }
            let spec = plans::ArchitectureSpec {
                network_class_name: CONVUNEXT.into(),
                arch_kwargs: k,
                kw_requires_import: vec![],
            };
            let n = r.parameter_count(&spec, &io3).unwrap();
            let e = r
                .estimate(&spec, &io3)
                .unwrap()
                .conv_feature_map_size(&patch);
            let (_, net) = r.shape_only(&spec, &io3).unwrap();
            assert_eq!(stored_elements(&net.layers(&patch)) / STORED_PER_UNIT, e);
            let pl = plain(kw, &patch);
            println!(
                "{} {}D {patch:?}: params {n}, estimate {e} ({:.2}× PlainConvUNet's {pl})",
                p.name,
                patch.len(),
                e as f64 / pl as f64
            );
            if patch.len() == 3 {
                assert!(
                    n > last,
                    "{} should be larger than the previous preset",
                    p.name
                );
                last = n;
            }
        }
    }
}

/// Timing of one training step at the demo 3D plan (run with `--ignored --nocapture`).
#[test]
#[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
fn time_train_step_demo_3d() {
    let dev = Device::Cpu;
    let kw = plan(
        "torch.nn.modules.conv.Conv3d",
        &[32, 64, 128, 256, 320],
        json!([[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        json!([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
        json!({"variant": "tiny"}),
    );
    for e0 in [1u64, 4] {
        let mut kw = kw.clone();
        kw.insert("expansion_level0".into(), json!(e0));
        let cfg = ConvUNextConfig::from_kwargs(&kw, KW, &io(1, 3, true)).unwrap();
        let vm = VarMap::new();
        let vb = crate::init::seeded_init_backend(&vm, 3, DType::F32, &dev);
        let net = ConvUNext::new(&cfg, vb).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 1, 24, 56, 56), &dev).unwrap();
        for _ in 0..2 {
            let t = std::time::Instant::now();
            let outs = net.forward(&x, true).unwrap();
            let tf = t.elapsed();
            let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
            for o in &outs {
                loss = (loss + o.sqr().unwrap().mean_all().unwrap()).unwrap();
            }
            let g = loss.backward().unwrap();
            drop(g);
            println!(
                "expansion_level0 {e0}: forward {:.2}s, forward+backward {:.2}s",
                tf.as_secs_f64(),
                t.elapsed().as_secs_f64()
            );
        }
    }
}

#[test]
#[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
fn time_ops() {
    let dev = Device::Cpu;
    for (c, sp, k) in [
        (32usize, [24usize, 56, 56], [1usize, 7, 7]),
        (128, [24, 14, 14], [7, 7, 7]),
    ] {
        let x = Tensor::randn(0f32, 1., (2, c, sp[0], sp[1], sp[2]), &dev).unwrap();
        let w = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 0.1, (c, 1, k[0], k[1], k[2]), &dev).unwrap(),
        )
        .unwrap();
        let opts = crate::ops::ConvOpts::new()
            .padding(k.iter().map(|v| v / 2).collect::<Vec<_>>())
            .groups(c);
        let t = std::time::Instant::now();
        let _ = opts;
        let y = fast::depthwise_conv(&x, w.as_tensor(), None).unwrap();
        let tf = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let _g = y.sum_all().unwrap().backward().unwrap();
        let tb = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let ones = Tensor::ones(c, DType::F32, &dev).unwrap();
        let ln = fast::layer_norm_cf(&x, &ones, None, 1e-6).unwrap();
        let tl = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let _ = crate::ops::gelu(&ln, crate::ops::GeluKind::Erf).unwrap();
        let tg = t.elapsed().as_secs_f64();
        println!("dw {c} {sp:?} k{k:?}: fwd {tf:.3}s bwd {tb:.3}s; LN {tl:.3}s GELU {tg:.3}s");
    }
}

/// Normal values of `shape` (std `std`), seeded by `name`, as an f32 tensor.
fn seeded_randn(shape: &[usize], std: f64, name: &str, dev: &Device) -> Tensor {
    let init = candle_nn::Init::Randn {
        mean: 0.0,
        stdev: std,
    };
    let v: Vec<f32> = crate::init::init_values(&init, shape, 11, name)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}
