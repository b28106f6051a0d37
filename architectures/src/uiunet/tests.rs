//! UIU-Net tests: PyTorch fixture, parameter names/counts, shape grid (2D/3D, anisotropic
//! strides, deep supervision on/off), gradients, activation estimate vs reference §3, errors.

use super::*;
use crate::init::count_trainable;
use crate::memory::{plain_conv_unet_feature_map_size, UNetTopology};
use crate::registry::Registry;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

const PATH: &str = "architecture.arch_kwargs";

/// A PlainConvUNet-style `arch_kwargs`.
fn plan(dim: usize, features: &[usize], strides: Value, kernels: Value) -> Map<String, Value> {
    crate::test_util::plan_kwargs(dim, features, strides, kernels)
}

fn with(mut kw: Map<String, Value>, extra: Value) -> Map<String, Value> {
    for (k, v) in extra.as_object().cloned().unwrap() {
        kw.insert(k, v);
    }
    kw
}

fn io(in_channels: usize, num_classes: usize, ds: bool) -> NetworkIo {
    NetworkIo {
        in_channels,
        num_classes,
        deep_supervision: ds,
    }
}

fn seed_form() -> Value {
    json!({"ica": false, "rsu_pool": "seed", "ds_order": "seed"})
}

fn fixture(name: &str) -> PathBuf {
    crate::test_util::fixture("architectures", name)
}

use crate::test_util::{assert_close, max_abs};

fn spec(kw: &Map<String, Value>) -> plans::ArchitectureSpec {
    plans::ArchitectureSpec {
        network_class_name: "UIUNet".into(),
        arch_kwargs: kw.clone(),
        kw_requires_import: vec![],
    }
}

fn build(kw: &Map<String, Value>, io: &NetworkIo, seed: u64) -> (VarMap, Box<dyn SegNetwork>) {
    Registry::default()
        .build_initialized(&spec(kw), io, seed, &Device::Cpu)
        .unwrap()
}

/// The fixture's configuration: "DynamicUIUNet3D features=[8,16,32,64] minimal heights
/// [5,4,3,3] ds=True 1x1 fusion" (the seed's form: no IC-A, stride-1 RSU at stage 0).
fn fixture_kwargs() -> Map<String, Value> {
    with(
        plan(3, &[8, 16, 32, 64], json!([1, 2, 2, 2]), json!(3)),
        with(
            seed_form().as_object().cloned().unwrap(),
            json!({"rsu_heights": [5, 4, 3, 3]}),
        )
        .into(),
    )
}

#[test]
fn fixture_uiunet3d_f8_minimal_matches_pytorch() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("uiunet3d_f8_minimal.json")).unwrap(),
    )
    .unwrap();
    let kw = fixture_kwargs();
    let io = io(1, 2, true);
    // parameter names, shapes and count
    let reg = Registry::default();
    let params = reg.parameters(&spec(&kw), &io).unwrap();
    let ours: BTreeMap<String, Vec<usize>> = params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    let theirs: BTreeMap<String, Vec<usize>> = meta["keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let s = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize);
            (k.clone(), s.collect())
        })
        .collect();
    assert_eq!(ours, theirs);
    assert_eq!(count_trainable(&params), meta["params"].as_u64().unwrap());
    assert_eq!(count_trainable(&params), 663_938);

    // forward with the fixture's weights
    let tensors =
        candle_core::safetensors::load(fixture("uiunet3d_f8_minimal.safetensors"), &Device::Cpu)
            .unwrap();
    let x = tensors["input"].clone();
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let net = reg.build(&spec(&kw), &io, vb).unwrap();
    let out = net.forward(&x, false).unwrap();
    let shapes = meta["output_shapes"].as_array().unwrap();
    assert_eq!(out.len(), shapes.len());
    for (i, o) in out.iter().enumerate() {
        assert_close(o, &tensors[&format!("output.{i}")], &format!("output.{i}"));
    }
}

#[test]
fn parameter_count_matches_layer_table_and_presets_apply() {
    let reg = Registry::default();
    for name in [UIUNET, "UIUNet", "uiunet"] {
        assert_eq!(reg.get(name).unwrap().name(), UIUNET);
    }
    let base = plan(
        3,
        &[8, 16, 32, 64, 64],
        json!([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
        json!([[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
    );
    let io = io(2, 3, true);
    let presets = reg.get("uiunet").unwrap().presets();
    let names: Vec<&str> = presets.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["uiunet", "uiunet_minimal"]);
    let mut counts = vec![];
    for p in &presets {
        let mut kw = base.clone();
        for (k, v) in &p.kwargs {
            kw.insert(k.clone(), v.clone());
        }
        let (params, net) = reg.shape_only(&spec(&kw), &io).unwrap();
        let total = count_trainable(&params);
        let rows: u64 = net.layers(&[8, 32, 32]).iter().map(|r| r.params).sum();
        assert_eq!(rows, total, "{}", p.name);
        counts.push(total);
        let cfg = UiuConfig::from_kwargs(&kw, PATH, &io).unwrap();
        if p.name == "uiunet" {
            assert_eq!(cfg.rsu_heights, [7, 6, 5, 4, 4]);
            assert_eq!(cfg.features, [8, 16, 32, 64, 64]);
            assert!(params.iter().any(|q| q.name == "ica.0.bottomup.sa.weight"));
            // IC-A before decoders 0..=2, not before the full-resolution one
            assert!(params.iter().any(|q| q.name.starts_with("ica.2.")));
            assert!(!params.iter().any(|q| q.name.starts_with("ica.3.")));
            // decoder input = cat[out1, out2] = 2·skip channels
            let p0 = params
                .iter()
                .find(|q| q.name == "decoder_stages.0.inc.conv.weight")
                .unwrap();
            assert_eq!(p0.shape, [64, 128, 3, 3, 3]);
            let p3 = params
                .iter()
                .find(|q| q.name == "decoder_stages.3.inc.conv.weight")
                .unwrap();
            assert_eq!(p3.shape, [8, 24, 1, 3, 3]);
        } else {
            assert_eq!(cfg.rsu_heights, [5, 4, 3, 3, 3]);
            assert_eq!(cfg.features, [4, 8, 16, 32, 32]);
        }
    }
    assert!(counts[1] * 3 < counts[0], "{counts:?}");
    // heights: extension by the last entry, plan-mode kernels follow the deeper stages
    let kw = with(base.clone(), json!({"rsu_heights": [6, 3]}));
    let cfg = UiuConfig::from_kwargs(&kw, PATH, &io).unwrap();
    assert_eq!(cfg.rsu_heights, [6, 3, 3, 3, 3]);
    let s0 = cfg.rsu_spec(0, 2);
    assert_eq!(s0.kernels[0], [1, 3, 3]);
    assert_eq!(s0.kernels[2], [3, 3, 3]);
    assert_eq!(
        s0.pools,
        [vec![1, 2, 2], vec![1, 2, 2], vec![2, 2, 2], vec![2, 2, 2]]
    );
    assert!(!s0.dilated && cfg.rsu_spec(3, 32).dilated && cfg.rsu_spec(4, 64).dilated);
    let seed = with(kw, json!({"rsu_pool": "seed"}));
    let s0 = UiuConfig::from_kwargs(&seed, PATH, &io)
        .unwrap()
        .rsu_spec(0, 2);
    assert_eq!(s0.pools, vec![vec![1, 1, 1]; 4]);
}

fn input(batch: usize, ch: usize, patch: &[usize]) -> Tensor {
    let mut shape = vec![batch, ch];
    shape.extend(patch);
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

#[test]
fn shape_grid_2d_3d_anisotropic_deep_supervision() {
    type Case = (Map<String, Value>, Vec<usize>, Vec<Vec<usize>>);
    let cases: Vec<Case> = vec![
        // 3D anisotropic: (z, y, x) 4x16x16 -> 4x8x8 -> 2x4x4
        (
            plan(
                3,
                &[4, 8, 8],
                json!([[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
                json!([[1, 3, 3], [3, 3, 3], [3, 3, 3]]),
            ),
            vec![4, 16, 16],
            vec![vec![4, 16, 16], vec![4, 8, 8]],
        ),
        // 2D with an anisotropic stride
        (
            plan(
                2,
                &[4, 8, 8, 8],
                json!([[1, 1], [2, 2], [2, 1], [2, 2]]),
                json!(3),
            ),
            vec![16, 12],
            vec![vec![16, 12], vec![8, 6], vec![4, 6]],
        ),
    ];
    for (base, patch, want) in cases {
        let nd = patch.len();
        for (extra, ds) in [
            (json!({"rsu_heights": [4, 3, 3]}), true),
            (json!({"rsu_heights": 3, "ica_full_res": true}), false),
            (
                json!({"rsu_pool": "isotropic", "rsu_heights": [5, 3]}),
                true,
            ),
            (
                with(
                    seed_form().as_object().cloned().unwrap(),
                    json!({"rsu_heights": [4, 3]}),
                )
                .into(),
                true,
            ),
        ] {
            let kw = with(base.clone(), extra.clone());
            let (_, net) = build(&kw, &io(2, 3, ds), 1);
            assert_eq!(net.spatial_dims(), nd);
            let out = net.forward(&input(2, 2, &patch), true).unwrap();
            let seed_order = extra.get("ds_order").is_some();
            let expect: Vec<Vec<usize>> = if !ds {
                want[..1].to_vec()
            } else if seed_order {
                // the seed's order: fused, then every decoder side from full resolution
                let mut v = vec![want[0].clone()];
                v.extend(want.iter().cloned());
                v
            } else {
                want.clone()
            };
            assert_eq!(out.len(), expect.len(), "{extra} ds={ds}");
            for (o, sp) in out.iter().zip(&expect) {
                let mut shape = vec![2, 3];
                shape.extend(sp);
                assert_eq!(o.dims(), shape.as_slice(), "{extra}");
            }
            // the layer table ends with the full-resolution fused output
            let rows = net.layers(&patch);
            let last = rows.last().unwrap();
            assert_eq!(last.name, "fusion");
            assert_eq!(&last.output_shape[1..], patch.as_slice());
        }
    }
}

#[test]
fn gradients_reach_every_parameter() {
    let kw = with(
        plan(
            3,
            &[4, 8, 8],
            json!([[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
            json!([[1, 3, 3], [3, 3, 3], [3, 3, 3]]),
        ),
        json!({"rsu_heights": [4, 3, 3], "ica_full_res": true}),
    );
    let (vm, net) = build(&kw, &io(1, 2, true), 5);
    let out = net.forward(&input(2, 1, &[8, 16, 16]), true).unwrap();
    assert_eq!(out.len(), 2);
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (i, o) in out.iter().enumerate() {
        let w = Tensor::randn(0f32, 1f32, o.dims(), &Device::Cpu).unwrap();
        let term = (o * w).unwrap().sum_all().unwrap();
        loss = (loss + (term * (1.0 + i as f64)).unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut checked = 0;
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
        checked += 1;
    }
    for part in [
        "ica.0.topdown.fc1",
        "ica.1.bottomup.sa",
        "side_heads.0",
        "fusion",
    ] {
        assert!(data.keys().any(|k| k.starts_with(part)), "{part}");
    }
    assert!(checked > 100, "{checked}");
}

fn ratio(features: &[usize], extra: Value) -> f64 {
    let n = features.len();
    let mut strides = vec![1];
    strides.extend(vec![2; n - 1]);
    let kw = with(plan(3, features, json!(strides), json!(3)), extra);
    let io = io(1, 2, true);
    let est = Registry::default().estimate(&spec(&kw), &io).unwrap();
    let patch = [128, 128, 128];
    let ours = est.conv_feature_map_size(&patch) as f64;
    let topo = UNetTopology {
        input_channels: 1,
        n_stages: n,
        features_per_stage: features.to_vec(),
        kernel_sizes: vec![vec![3; 3]; n],
        strides: std::iter::once(vec![1; 3])
            .chain(std::iter::repeat_n(vec![2; 3], n - 1))
            .collect(),
        n_conv_per_stage: vec![2; n],
        n_conv_per_stage_decoder: vec![2; n - 1],
        num_classes: 2,
        deep_supervision: false,
    };
    ours / plain_conv_unet_feature_map_size(&topo, &patch) as f64
}

#[test]
fn parameter_counts_match_reference_section_3() {
    // seed form, 3D, 1 input channel, 2 classes: 13.59M ([32..256], heights 7,6,5,4) and
    // 2.64M ([16..128], heights 5,4,3,3)
    for (f, h, want) in [
        ([32, 64, 128, 256], [7, 6, 5, 4], 13.59e6),
        ([16, 32, 64, 128], [5, 4, 3, 3], 2.64e6),
    ] {
        let kw = with(
            plan(3, &f, json!([1, 2, 2, 2]), json!(3)),
            with(
                seed_form().as_object().cloned().unwrap(),
                json!({ "rsu_heights": h }),
            )
            .into(),
        );
        let got = Registry::default()
            .parameter_count(&spec(&kw), &io(1, 2, true))
            .unwrap() as f64;
        assert!((got - want).abs() < 0.006e6, "{f:?}: {got} vs {want}");
    }
}

#[test]
fn estimate_ratio_matches_reference_section_3() {
    let f = [32, 64, 128, 256];
    let h = json!({"ica": false, "ds_order": "seed", "rsu_heights": [7, 6, 5, 4]});
    let cases = [
        // (row, kwargs, reference "act ×plain")
        (
            "seed, stride-1 RSU",
            with(h.as_object().cloned().unwrap(), json!({"rsu_pool": "seed"})),
            &f[..],
            5.35,
        ),
        (
            "seed, RSU pool 2",
            with(
                h.as_object().cloned().unwrap(),
                json!({"rsu_pool": "isotropic"}),
            ),
            &f[..],
            2.26,
        ),
        (
            "seed, plan pool",
            with(h.as_object().cloned().unwrap(), json!({})),
            &f[..],
            2.26,
        ),
    ];
    for (what, kw, feats, want) in cases {
        let r = ratio(feats, Value::Object(kw));
        println!("{what}: {r:.2}x plain (reference {want})");
        assert!(
            (r / want - 1.0).abs() <= 0.35,
            "{what}: ratio {r:.2}, reference {want}"
        );
    }
    let m = json!({"ica": false, "rsu_heights": [5, 4, 3, 3]});
    let f = [16, 32, 64, 128];
    let r1 = ratio(
        &f,
        with(m.as_object().cloned().unwrap(), json!({"rsu_pool": "seed"})).into(),
    );
    let r2 = ratio(&f, m.clone());
    println!("minimal: {r1:.2}x (ref 4.08), {r2:.2}x (ref 2.20)");
    assert!((r1 / 4.08 - 1.0).abs() <= 0.35, "minimal as coded: {r1:.2}");
    assert!((r2 / 2.20 - 1.0).abs() <= 0.35, "minimal, pool 2: {r2:.2}");
    // IC-A costs a little on top, never more than the stride-1 RSU
    let ica = ratio(&[32, 64, 128, 256], json!({"rsu_heights": [7, 6, 5, 4]}));
    println!("with IC-A: {ica:.2}x");
    assert!(ica > 2.26 && ica < 3.5, "with IC-A: {ica:.2}");
}

#[test]
fn bad_kwargs_name_their_json_path() {
    let base = plan(3, &[4, 8, 8], json!([1, 2, 2]), json!(3));
    let io = io(1, 2, true);
    let err = |extra: Value| {
        UiuNetArchitecture
            .estimator(&with(base.clone(), extra), PATH, &io)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = err(json!({"rsu_heights": [5, 1]}));
    assert!(e.contains("architecture.arch_kwargs.rsu_heights[1]"), "{e}");
    let e = err(json!({"rsu_pool": "anisotropic"}));
    assert!(
        e.contains("arch_kwargs.rsu_pool") && e.contains(r#""plan", "isotropic", "seed""#),
        "{e}"
    );
    let e = err(json!({"feature_scale": -1}));
    assert!(e.contains("arch_kwargs.feature_scale"), "{e}");
    let e = err(json!({"ica": "yes"}));
    assert!(e.contains("arch_kwargs.ica: expected true or false"), "{e}");
    let e = err(json!({"n_dilated_stages": 4}));
    assert!(e.contains("arch_kwargs.n_dilated_stages"), "{e}");
    let e = err(json!({"strides": [2, 2, 2]}));
    assert!(e.contains("arch_kwargs.strides[0]"), "{e}");
    let e = err(json!({"rsu_height": 4}));
    assert!(
        e.contains("arch_kwargs.rsu_height: unknown argument"),
        "{e}"
    );
    let e = err(json!({"kernel_sizes": [3, [3, 3], 3]}));
    assert!(e.contains("arch_kwargs.kernel_sizes[1]"), "{e}");
    assert_eq!(err(json!({})), "");
}

/// Parameters and estimates on demo-like plans (printed with `--nocapture`); checks the
/// ordering the presets promise.
#[test]
fn demo_plan_numbers() {
    let reg = Registry::default();
    let plans = [
        (
            plan(
                3,
                &[32, 64, 128, 256, 320],
                json!([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
                json!([[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
            ),
            vec![24, 56, 56],
        ),
        (
            plan(
                2,
                &[32, 64, 128, 256, 512, 512],
                json!([1, 2, 2, 2, 2, 2]),
                json!(3),
            ),
            vec![128, 128],
        ),
    ];
    let io = io(1, 3, true);
    for (base, patch) in plans {
        let mut plain_spec = spec(&base);
        plain_spec.network_class_name = "PlainConvUNet".into();
        let p_params = reg.parameter_count(&plain_spec, &io).unwrap();
        let p_est = reg
            .estimate(&plain_spec, &io)
            .unwrap()
            .conv_feature_map_size(&patch);
        println!("{patch:?} PlainConvUNet: {p_params} params, estimate {p_est}");
        let mut ests = vec![];
        let presets = reg.get("uiunet").unwrap().presets();
        let variants: Vec<(String, Map<String, Value>)> = presets
            .iter()
            .map(|p| (p.name.clone(), p.kwargs.clone()))
            .chain([(
                "seed form (heights 7,6,5,4,3; stride-1 RSU)".to_string(),
                with(
                    seed_form().as_object().cloned().unwrap(),
                    json!({"rsu_heights": [7, 6, 5, 4, 3]}),
                ),
            )])
            .collect();
        for (name, kwargs) in variants {
            let mut kw = base.clone();
            kw.extend(kwargs);
            let params = reg.parameter_count(&spec(&kw), &io).unwrap();
            let est = reg
                .estimate(&spec(&kw), &io)
                .unwrap()
                .conv_feature_map_size(&patch);
            println!(
                "{patch:?} {name}: {params} params ({:.2}x), estimate {est} ({:.2}x plain)",
                params as f64 / p_params as f64,
                est as f64 / p_est as f64
            );
            ests.push(est);
        }
        assert!(ests[1] < ests[0] && ests[0] < ests[2], "{ests:?}");
    }
}

/// CPU timing of one training step's forward + backward on the demo-like 3D plan (patch 24×64×64 so that PlainConvUNet runs too)
/// (`cargo test -p architectures uiunet_demo_step_timing -- --ignored --nocapture`).
#[test]
#[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
fn uiunet_demo_step_timing() {
    let base = plan(
        3,
        &[32, 64, 128, 256, 320],
        json!([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
        json!([[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
    );
    {
        let mut sp = spec(&base);
        sp.network_class_name = "PlainConvUNet".into();
        let (_vm, net) = Registry::default()
            .build_initialized(&sp, &io(1, 3, true), 0, &Device::Cpu)
            .unwrap();
        let x = input(2, 1, &[24, 64, 64]);
        let t0 = std::time::Instant::now();
        let out = net.forward(&x, true).unwrap();
        let t1 = t0.elapsed();
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for o in &out {
            loss = (loss + o.sqr().unwrap().mean_all().unwrap()).unwrap();
        }
        let _g = loss.backward().unwrap();
        println!(
            "PlainConvUNet: forward {:.2}s, forward+backward {:.2}s",
            t1.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    for preset in ["uiunet_minimal", "uiunet"] {
        let p = Registry::default()
            .get("uiunet")
            .unwrap()
            .presets()
            .into_iter()
            .find(|p| p.name == preset)
            .unwrap();
        let mut kw = base.clone();
        kw.extend(p.kwargs);
        let (_vm, net) = build(&kw, &io(1, 3, true), 0);
        let x = input(2, 1, &[24, 64, 64]);
        let t0 = std::time::Instant::now();
        let out = net.forward(&x, true).unwrap();
        let t1 = t0.elapsed();
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for o in &out {
            loss = (loss + o.sqr().unwrap().mean_all().unwrap()).unwrap();
        }
        let _g = loss.backward().unwrap();
        println!(
            "{preset}: forward {:.2}s, forward+backward {:.2}s (batch 2, 24x64x64, CPU)",
            t1.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
}
