use super::*;
use crate::init::{count_trainable, ShapeRecorder};
use crate::network::KWARGS_PATH;
use crate::registry::Registry;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::path::PathBuf;

fn kwargs(dim: usize, features: &[usize], strides: Value, extra: Value) -> Map<String, Value> {
    let kernels = json!(vec![vec![3; dim]; features.len()]);
    crate::test_util::with_extra(
        crate::test_util::plan_kwargs(dim, features, strides, kernels),
        &extra,
    )
}

fn spec(kw: Map<String, Value>) -> plans::ArchitectureSpec {
    plans::ArchitectureSpec {
        network_class_name: "KiUNet".into(),
        arch_kwargs: kw,
        kw_requires_import: vec![],
    }
}

fn io(in_channels: usize, num_classes: usize, ds: bool) -> NetworkIo {
    NetworkIo {
        in_channels,
        num_classes,
        deep_supervision: ds,
    }
}

fn fixtures_dir() -> PathBuf {
    crate::test_util::fixtures_dir("architectures")
}

/// The seed's DynamicKiUNet (fixture `kiunet2d_f4`): outputs and parameter count.
#[test]
fn fixture_kiunet2d_f4_matches_seed() {
    let dir = fixtures_dir();
    let json_path = dir.join("kiunet2d_f4.json");
    let st_path = dir.join("kiunet2d_f4.safetensors");
    assert!(
        json_path.exists() && st_path.exists(),
        "fixture kiunet2d_f4 missing in {} (needed for the seed comparison)",
        dir.display()
    );
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let desc = meta["description"].as_str().unwrap();
    assert!(
        desc.contains("features=[4,8,16,32]") && desc.contains("pool_type=conv"),
        "{desc}"
    );
    let kw = kwargs(
        2,
        &[4, 8, 16, 32],
        json!([[1, 1], [2, 2], [2, 2], [2, 2]]),
        json!({"form": "seed"}),
    );
    let s = spec(kw);
    let io = io(1, 2, true);
    let r = Registry::default();
    // parameter count and names/shapes
    assert_eq!(
        r.parameter_count(&s, &io).unwrap(),
        meta["params"].as_u64().unwrap()
    );
    let params = r.parameters(&s, &io).unwrap();
    let keys = meta["keys"].as_object().unwrap();
    assert_eq!(params.len(), keys.len());
    for p in &params {
        let want: Vec<usize> = keys
            .get(&p.name)
            .unwrap_or_else(|| panic!("fixture has no key {}", p.name))
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(p.shape, want, "{}", p.name);
    }
    // the same forward with the decoder CRFBs not built at all (`decoder_crfb: false`)
    let unused: u64 = keys
        .iter()
        .filter(|(k, _)| k.starts_with("crfb_decoder."))
        .map(|(_, v)| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    assert!(unused > 0);
    let s_off = spec(kwargs(
        2,
        &[4, 8, 16, 32],
        json!([[1, 1], [2, 2], [2, 2], [2, 2]]),
        json!({"kinet_widths": "reversed", "skip_before_crfb": true,
               "decoder_crfb": false, "kinet_sizing": "seed"}),
    ));
    assert_eq!(
        r.parameter_count(&s_off, &io).unwrap(),
        meta["params"].as_u64().unwrap() - unused
    );
    // without deep supervision the seed builds no `unet_deep_supervision_heads`
    let heads: u64 = keys
        .iter()
        .filter(|(k, _)| k.starts_with("unet_deep_supervision_heads."))
        .map(|(_, v)| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    assert!(heads > 0);
    assert_eq!(
        r.parameter_count(&s, &self::io(1, 2, false)).unwrap(),
        meta["params"].as_u64().unwrap() - heads
    );
    // forward
    let dev = Device::Cpu;
    let tensors = candle_core::safetensors::load(&st_path, &dev).unwrap();
    let x = tensors.get("input").unwrap();
    let n_out = meta["output_shapes"].as_array().unwrap().len();
    for s in [&s, &s_off] {
        let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
        let net = r.build(s, &io, vb).unwrap();
        let ys = net.forward(x, false).unwrap();
        assert_eq!(ys.len(), n_out);
        for (i, y) in ys.iter().enumerate() {
            let want = tensors.get(&format!("output.{i}")).unwrap();
            assert_eq!(y.dims(), want.dims(), "output {i}");
            let g: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let maxw = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (k, (a, b)) in g.iter().zip(&w).enumerate() {
                let tol = 1e-4 * b.abs() + 1e-5 * maxw;
                assert!((a - b).abs() <= tol, "output {i}[{k}]: got {a}, want {b}");
            }
        }
    }
}

fn build(
    kw: Map<String, Value>,
    io: &NetworkIo,
    seed: u64,
) -> (candle_nn::VarMap, Box<dyn SegNetwork>) {
    Registry::default()
        .build_initialized(&spec(kw), io, seed, &Device::Cpu)
        .unwrap()
}

#[allow(clippy::needless_range_loop)] // stage-indexed parallel lists
fn expected_shapes(
    patch: &[usize],
    strides: &[Vec<usize>],
    nc: usize,
    n_out: usize,
) -> Vec<Vec<usize>> {
    let mut out = vec![];
    let mut cur = patch.to_vec();
    for s in 0..n_out {
        if s > 0 {
            cur = cur.iter().zip(&strides[s]).map(|(a, b)| a / b).collect();
        }
        let mut v = vec![2, nc];
        v.extend(&cur);
        out.push(v);
    }
    out
}

#[test]
fn shape_grid_2d_3d_anisotropic() {
    let cases: Vec<(usize, Vec<Vec<usize>>, Vec<usize>)> = vec![
        (2, vec![vec![1, 1], vec![2, 2], vec![2, 1]], vec![8, 6]),
        (
            2,
            vec![vec![1, 1], vec![2, 2], vec![2, 2], vec![2, 2]],
            vec![16, 8],
        ),
        (
            3,
            vec![vec![1, 1, 1], vec![1, 2, 2], vec![2, 2, 2]],
            vec![4, 8, 8],
        ),
        (
            3,
            vec![vec![1, 1, 1], vec![1, 2, 2], vec![1, 2, 2], vec![2, 2, 2]],
            vec![2, 8, 8],
        ),
    ];
    let forms = [
        json!({}),
        json!({"form": "seed"}),
        json!({"pool_type": "max", "kinet_widths": "same", "decoder_crfb": false}),
        json!({"pool_type": "avg", "skip_before_crfb": true, "kinet_upsample_axes": "all"}),
    ];
    let dev = Device::Cpu;
    for (dim, strides, patch) in &cases {
        let n = strides.len();
        let feats: Vec<usize> = (0..n).map(|s| 4 << s.min(2)).collect();
        for form in &forms {
            for ds in [true, false] {
                let kw = kwargs(*dim, &feats, json!(strides), form.clone());
                let (_, net) = build(kw.clone(), &io(2, 3, ds), 1);
                let mut shape = vec![2, 2];
                shape.extend(patch);
                let x = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
                let ys = net.forward(&x, false).unwrap();
                let n_out = if ds { n - 1 } else { 1 };
                let got: Vec<Vec<usize>> = ys.iter().map(|y| y.dims().to_vec()).collect();
                assert_eq!(
                    got,
                    expected_shapes(patch, strides, 3, n_out),
                    "{dim}D {strides:?} {form} ds={ds}"
                );
                // the layer table ends with the full-resolution head
                let rows = net.layers(patch);
                let head = rows.iter().find(|r| r.name == "unet_seg_head").unwrap();
                assert_eq!(&head.output_shape[1..], &patch[..]);
            }
        }
    }
}

#[test]
fn set_deep_supervision_toggles_outputs() {
    let kw = kwargs(2, &[2, 4, 8], json!([[1, 1], [2, 2], [2, 2]]), json!({}));
    let (_, mut net) = build(kw, &io(1, 2, true), 3);
    let x = Tensor::randn(0f32, 1f32, (1, 1, 8, 8), &Device::Cpu).unwrap();
    assert_eq!(net.forward(&x, false).unwrap().len(), 2);
    net.set_deep_supervision(false);
    assert!(!net.deep_supervision());
    assert_eq!(net.forward(&x, false).unwrap().len(), 1);
}

#[test]
fn anisotropic_plan_upsamples_ki_net_in_plane_only() {
    let kw = kwargs(
        3,
        &[4, 8, 16, 32, 32],
        json!([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
        json!({}),
    );
    let cfg = KiUNetConfig::from_kwargs(&kw, KWARGS_PATH, 1, 2, true).unwrap();
    assert_eq!(cfg.kinet_upsample_axes, vec![false, true, true]);
    assert_eq!(cfg.kinet_widths, vec![2, 2, 4, 8, 8]);
    let sz = cfg.sizes(&[24, 64, 64]);
    for s in 0..5 {
        assert_eq!(sz.k[s], vec![24, 128, 128], "stage {s}");
        assert_eq!(sz.kd[s], vec![24, 128, 128], "decoder level {s}");
    }
    assert_eq!(sz.k_conv[0], vec![24, 64, 64]);
    assert_eq!(sz.u[4], vec![6, 4, 4]);
    // "all" upsamples axis 0 too (up to the cap), the seed rule doubles every axis
    let mut kw2 = kw.clone();
    kw2.insert("kinet_upsample_axes".into(), json!("all"));
    let cfg2 = KiUNetConfig::from_kwargs(&kw2, KWARGS_PATH, 1, 2, true).unwrap();
    assert_eq!(cfg2.mirror_factors()[2], vec![2, 1, 1]);
    assert_eq!(cfg2.sizes(&[24, 64, 64]).k[4], vec![48, 128, 128]);
}

/// One backward of a weighted sum of all outputs reaches every parameter.
#[test]
fn gradients_reach_every_parameter() {
    let dev = Device::Cpu;
    for (dim, strides, patch, extra) in [
        (
            2usize,
            json!([[1, 1], [2, 2], [2, 1]]),
            vec![8usize, 8],
            json!({}),
        ),
        (
            3,
            json!([[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
            vec![4, 8, 8],
            json!({"pool_type": "max", "kinet_widths": [2, 3, 2]}),
        ),
    ] {
        let kw = kwargs(dim, &[2, 4, 6], strides, extra);
        let (vm, net) = build(kw, &io(1, 2, true), 11);
        for (n, v) in vm.data().lock().unwrap().iter() {
            if n.ends_with("norm.weight") || v.dims().len() == 1 && !n.ends_with("bias") {
                let noise = Tensor::randn(0f32, 0.2, v.dims(), &dev).unwrap();
                v.set(&(noise + 1.0).unwrap()).unwrap();
            }
        }
        let mut shape = vec![2, 1];
        shape.extend(&patch);
        let x = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
        let ys = net.forward(&x, true).unwrap();
        assert_eq!(ys.len(), 2);
        let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
        for y in &ys {
            let w = Tensor::randn(0f32, 1f32, y.dims(), &dev).unwrap();
            loss = (loss + (y * w).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        let weights: Vec<&String> = data.keys().collect();
        for (n, v) in data.iter() {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{dim}D: no gradient for {n}"));
            let gmax = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // conv biases feeding an instance norm (stack convs, CRFB 1x1 convs) cancel out
            let stem = n.trim_end_matches(".bias");
            let conv_bias = n.ends_with(".bias")
                && weights.contains(&&format!("{stem}.weight"))
                && data[&format!("{stem}.weight")].dims().len() > 2;
            let before_norm = conv_bias
                && (n.contains("crfb")
                    || [
                        "unet_encoder",
                        "kinet_encoder",
                        "unet_decoder",
                        "kinet_decoder",
                    ]
                    .iter()
                    .any(|p| n.starts_with(p)));
            if !before_norm {
                assert!(
                    gmax > 0.0 && gmax.is_finite(),
                    "{dim}D: zero gradient for {n}"
                );
            }
        }
    }
}

#[test]
fn layer_table_params_match_parameter_count() {
    let r = Registry::default();
    for extra in [
        json!({}),
        json!({"form": "seed"}),
        json!({"pool_type": "max"}),
    ] {
        for ds in [true, false] {
            let kw = kwargs(
                3,
                &[4, 8, 16, 32],
                json!([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
                extra.clone(),
            );
            let s = spec(kw);
            let io = io(1, 3, ds);
            let (params, net) = r.shape_only(&s, &io).unwrap();
            let rows = net.layers(&[8, 16, 16]);
            let table: u64 = rows.iter().map(|r| r.params).sum();
            assert_eq!(table, count_trainable(&params), "{extra} ds={ds}");
        }
    }
}

fn plain_estimate(dim: usize, feats: &[usize], patch: &[usize]) -> u64 {
    let n = feats.len();
    let strides: Vec<Vec<usize>> = (0..n)
        .map(|s| vec![if s == 0 { 1 } else { 2 }; dim])
        .collect();
    let mut s = spec(kwargs(dim, feats, json!(strides), json!({})));
    s.network_class_name = "PlainConvUNet".into();
    Registry::default()
        .estimate(&s, &io(1, 2, false))
        .unwrap()
        .conv_feature_map_size(patch)
}

fn kiunet_estimate(kw: Map<String, Value>, patch: &[usize]) -> u64 {
    Registry::default()
        .estimate(&spec(kw), &io(1, 2, false))
        .unwrap()
        .conv_feature_map_size(patch)
}

/// Reference §3: the seed form costs ≈49.6× a plain U-Net's activations (3D, 128³,
/// [32,64,128,256]); ±35%. The default form is far cheaper.
#[test]
fn estimate_ratio_matches_reference() {
    let feats = [32, 64, 128, 256];
    let patch = [128, 128, 128];
    let strides = json!([[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]);
    let plain = plain_estimate(3, &feats, &patch) as f64;
    let seed = kiunet_estimate(
        kwargs(3, &feats, strides.clone(), json!({"form": "seed"})),
        &patch,
    ) as f64;
    let ratio = seed / plain;
    eprintln!("3D 128^3 [32..256]: plain {plain}, seed form {seed} ({ratio:.2}x)");
    assert!(
        (49.6 * 0.65..=49.6 * 1.35).contains(&ratio),
        "seed-form ratio {ratio}"
    );
    let default = kiunet_estimate(kwargs(3, &feats, strides.clone(), json!({})), &patch) as f64;
    assert!(
        default / plain < 0.6 * ratio,
        "default-form ratio {}",
        default / plain
    );
    // minimal vs plain [16..128]: same ratio as the full seed form (row 2 of §3)
    let half = [16, 32, 64, 128];
    let plain_h = plain_estimate(3, &half, &patch) as f64;
    let seed_min = kiunet_estimate(
        kwargs(
            3,
            &feats,
            strides,
            json!({"form": "seed", "feature_scale": 0.5}),
        ),
        &patch,
    ) as f64;
    assert!(
        (49.5 * 0.65..=49.5 * 1.35).contains(&(seed_min / plain_h)),
        "minimal seed ratio {}",
        seed_min / plain_h
    );
}

#[test]
fn bad_kwargs_name_their_json_path() {
    let r = Registry::default();
    let strides = json!([[1, 1], [2, 2], [2, 2]]);
    let cases = [
        (
            json!({"kinet_widths": "wide"}),
            "architecture.arch_kwargs.kinet_widths",
        ),
        (
            json!({"kinet_widths": [2, 3]}),
            "architecture.arch_kwargs.kinet_widths: has 2 entries",
        ),
        (
            json!({"kinet_widths": [2, 0, 3]}),
            "architecture.arch_kwargs.kinet_widths[1]",
        ),
        (
            json!({"pool_type": "min"}),
            "architecture.arch_kwargs.pool_type",
        ),
        (
            json!({"decoder_crfb": 1}),
            "architecture.arch_kwargs.decoder_crfb",
        ),
        (
            json!({"skip_before_crfb": "yes"}),
            "architecture.arch_kwargs.skip_before_crfb",
        ),
        (
            json!({"feature_scale": -1.0}),
            "architecture.arch_kwargs.feature_scale",
        ),
        (
            json!({"kinet_upsample_axes": [true]}),
            "architecture.arch_kwargs.kinet_upsample_axes",
        ),
        (
            json!({"kinet_max_scale": 0}),
            "architecture.arch_kwargs.kinet_max_scale",
        ),
        (
            json!({"kinet_width": 2}),
            "architecture.arch_kwargs.kinet_width: unknown argument",
        ),
    ];
    for (extra, want) in cases {
        let s = spec(kwargs(2, &[2, 4, 8], strides.clone(), extra.clone()));
        let e = match r.parameter_count(&s, &io(1, 2, true)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{extra} was accepted"),
        };
        assert!(e.contains(want), "{extra}: {e}");
    }
    // the unknown-key error lists the KiU-Net keys
    let s = spec(kwargs(2, &[2, 4, 8], strides, json!({"kinet_width": 2})));
    let e = r
        .parameter_count(&s, &io(1, 2, true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("kinet_widths"), "{e}");
}

#[test]
fn names_and_presets() {
    let r = Registry::default();
    for n in [
        "nnseg.architectures.KiUNet",
        "KiUNet",
        "kiunet",
        "DynamicKiUNet",
    ] {
        assert_eq!(r.get(n).unwrap().name(), KIUNET);
    }
    let arch = KiUNetArchitecture;
    let presets = arch.presets();
    let names: Vec<&str> = presets.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["kiunet", "kiunet_minimal", "kiunet_large", "kiunet_seed"]
    );
    let count = |p: &ArchPreset| {
        let mut kw = kwargs(
            3,
            &[32, 64, 128, 256, 320],
            json!([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
            json!({}),
        );
        for (k, v) in &p.kwargs {
            kw.insert(k.clone(), v.clone());
        }
        let rec = ShapeRecorder::new();
        let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
        arch.build(&kw, KWARGS_PATH, &io(1, 2, true), vb).unwrap();
        count_trainable(&rec.params())
    };
    let c: Vec<u64> = presets.iter().map(count).collect();
    assert!(c[1] < c[0] && c[0] < c[2] && c[2] < c[3], "{c:?}");
}
