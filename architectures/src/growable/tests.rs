use super::*;
use crate::network::NetworkIo;
use crate::registry::Registry;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;
use std::collections::HashMap;

fn kwargs_2d(affine: bool) -> Map<String, Value> {
    json!({
        "n_stages": 3,
        "features_per_stage": [4, 6, 8],
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3], [3, 3], [3, 1]],
        "strides": [[1, 1], [2, 1], [2, 2]],
        "n_conv_per_stage": [2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2],
        "conv_bias": true,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": affine},
        "dropout_op": null, "dropout_op_kwargs": null,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": true}
    })
    .as_object()
    .unwrap()
    .clone()
}

fn kwargs_3d() -> Map<String, Value> {
    json!({
        "n_stages": 3,
        "features_per_stage": [3, 4, 5],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": 2,
        "n_conv_per_stage_decoder": 2,
        "conv_bias": true,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": true},
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": true}
    })
    .as_object()
    .unwrap()
    .clone()
}

fn spec(kw: &Map<String, Value>) -> plans::ArchitectureSpec {
    plans::ArchitectureSpec {
        network_class_name: "growable_unet".into(),
        arch_kwargs: kw.clone(),
        kw_requires_import: vec![],
    }
}

const IO: NetworkIo = NetworkIo {
    in_channels: 2,
    num_classes: 3,
    deep_supervision: true,
};

fn build(kw: &Map<String, Value>, seed: u64) -> (VarMap, Box<dyn SegNetwork>) {
    Registry::default()
        .build_initialized(&spec(kw), &IO, seed, &Device::Cpu)
        .unwrap()
}

fn input(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Mean squared error of every output against a fixed pseudo-random target.
fn mse_loss(x: Tensor) -> impl FnMut(&dyn SegNetwork) -> candle_core::Result<Tensor> {
    move |net: &dyn SegNetwork| {
        let outs = net.forward(&x, true)?;
        let mut total: Option<Tensor> = None;
        for (i, o) in outs.iter().enumerate() {
            let t = input(o.dims(), 7 + i as u64);
            let l = (o - t)?.sqr()?.mean_all()?;
            total = Some(match total {
                Some(a) => (a + l)?,
                None => l,
            });
        }
        total.ok_or_else(|| candle_core::Error::Msg("no outputs".into()))
    }
}

fn max_abs_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.dims(), y.dims());
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

fn param_total(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

fn methods() -> Vec<GrowthMethod> {
    vec![
        GrowthMethod::Split {
            noise: 0.05,
            incoming_noise: 0.0,
        },
        GrowthMethod::SampleSelect { n_candidates: 3 },
        GrowthMethod::GradMax { scale: 1.0 },
    ]
}

#[test]
fn names_presets_and_shapes_2d_3d() {
    let r = Registry::default();
    for n in [
        "nnseg.architectures.GrowableUNet",
        "GrowableUNet",
        "growable_unet",
    ] {
        assert_eq!(r.get(n).unwrap().name(), GROWABLE_UNET);
    }
    assert!(r.presets().iter().any(|(_, p)| p.name == "growable_unet"));
    // 2D, anisotropic strides, DS on/off
    for ds in [true, false] {
        let (_, mut net) = build(&kwargs_2d(false), 1);
        net.set_deep_supervision(ds);
        let outs = net.forward(&input(&[2, 2, 8, 12], 0), false).unwrap();
        if ds {
            assert_eq!(outs.len(), 2);
            assert_eq!(outs[0].dims(), &[2, 3, 8, 12]);
            assert_eq!(outs[1].dims(), &[2, 3, 4, 12]);
        } else {
            assert_eq!(outs.len(), 1);
            assert_eq!(outs[0].dims(), &[2, 3, 8, 12]);
        }
    }
    // 3D, anisotropic
    let (_, net) = build(&kwargs_3d(), 2);
    let outs = net.forward(&input(&[1, 2, 4, 8, 8], 0), false).unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[0].dims(), &[1, 3, 4, 8, 8]);
    assert_eq!(outs[1].dims(), &[1, 3, 4, 4, 4]);
    // parameter count through the registry equals the built variables
    let (vm, net) = build(&kwargs_2d(true), 3);
    let n = r.parameter_count(&spec(&kwargs_2d(true)), &IO).unwrap();
    assert_eq!(n as usize, param_total(&vm));
    let rows = net.layers(&[8, 12]);
    assert_eq!(rows.iter().map(|r| r.params).sum::<u64>(), n);
    assert!(rows.iter().any(|r| r.name == "up_sample_layers.1.conv2"));
}

#[test]
fn every_growth_keeps_the_function_and_follows_the_parameter_rule() {
    let x = input(&[2, 2, 8, 12], 3);
    for affine in [false, true] {
        let (_, probe_net) = build(&kwargs_2d(affine), 0);
        let layers = {
            let mut b = probe_net;
            as_growable(b.as_mut()).unwrap().growable_layers()
        };
        assert_eq!(layers.len(), 10);
        for layer in &layers {
            for (mi, method) in methods().into_iter().enumerate() {
                let (vm, mut net) = build(&kwargs_2d(affine), 11 + mi as u64);
                let before = net.forward(&x, false).unwrap();
                let p0 = param_total(&vm);
                let mut loss = mse_loss(x.clone());
                let req = GrowRequest {
                    layer: layer.clone(),
                    method: method.clone(),
                    n_new: 1,
                    seed: 5,
                };
                let g = as_growable(net.as_mut()).unwrap();
                let out = g.grow(&req, &vm, &mut loss).unwrap();
                let after = net.forward(&x, false).unwrap();
                let d = max_abs_diff(&before, &after);
                assert!(
                    d <= 1e-5,
                    "{layer} {} affine={affine}: output changed by {d}",
                    method.name()
                );
                // parameter rule: k^d * C_in + 1 (+2 affine) + sum over consumers k^d * C_out
                let gc = out
                    .changes
                    .iter()
                    .find(|c| c.name.ends_with(".weight") && c.axis == 0)
                    .unwrap();
                let k: usize = gc.old_shape[2..].iter().product();
                let mut want = k * gc.old_shape[1] + 1 + if affine { 2 } else { 0 };
                let mut n_consumers = 0;
                for c in out.changes.iter().filter(|c| c.axis == 1) {
                    let kc: usize = c.old_shape[2..].iter().product();
                    want += kc * c.old_shape[0];
                    n_consumers += 1;
                }
                let two = (layer.starts_with("down") && layer.ends_with("conv2"))
                    || layer == "up_0.conv2"; // next up block + deep-supervision head
                let expect_consumers = if two { 2 } else { 1 };
                assert_eq!(n_consumers, expect_consumers, "{layer}");
                assert_eq!(param_total(&vm) - p0, want, "{layer} {}", method.name());
                assert_eq!(out.new_width, out.old_width + 1);
            }
        }
    }
}

#[test]
fn skip_consumer_gets_the_slice_at_c_up_plus_index() {
    let (vm, mut net) = build(&kwargs_2d(false), 4);
    let x = input(&[1, 2, 8, 12], 1);
    let mut loss = mse_loss(x);
    let req = GrowRequest {
        layer: "down_0.conv2".into(),
        method: GrowthMethod::SampleSelect { n_candidates: 2 },
        n_new: 1,
        seed: 1,
    };
    let out = as_growable(net.as_mut())
        .unwrap()
        .grow(&req, &vm, &mut loss)
        .unwrap();
    // down_0 (4 ch) is the skip of up_1, whose upsampled part is up_0.conv2's 4 channels
    let skip = out
        .changes
        .iter()
        .find(|c| c.name == "up_sample_layers.1.conv1.weight")
        .unwrap();
    assert_eq!((skip.axis, skip.offset, skip.count), (1, 4 + 4, 1));
    assert_eq!(skip.old_shape[1], 8);
    assert_eq!(skip.new_shape[1], 9);
    let next = out
        .changes
        .iter()
        .find(|c| c.name == "down_sample_layers.1.conv1.weight")
        .unwrap();
    assert_eq!((next.axis, next.offset), (1, 4));
}

#[test]
fn sample_select_scores_are_nonzero_and_argmax_is_kept() {
    let (vm, mut net) = build(&kwargs_2d(false), 6);
    let x = input(&[2, 2, 8, 12], 2);
    let mut loss = mse_loss(x);
    let req = GrowRequest {
        layer: "bottleneck.conv1".into(),
        method: GrowthMethod::SampleSelect { n_candidates: 5 },
        n_new: 2,
        seed: 9,
    };
    let out = as_growable(net.as_mut())
        .unwrap()
        .grow(&req, &vm, &mut loss)
        .unwrap();
    assert_eq!(out.scores.len(), 2);
    for (scores, &c) in out.scores.iter().zip(&out.chosen) {
        assert_eq!(scores.len(), 5);
        assert!(scores.iter().all(|s| *s > 0.0), "{scores:?}");
        let best = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(c, best);
        // the candidates differ, so the scores do
        assert!(scores.iter().any(|s| (s - scores[0]).abs() > 1e-9));
    }
    assert_eq!(out.new_width, 10);
    let w = out
        .changes
        .iter()
        .find(|c| c.name == "conv.conv1.weight")
        .unwrap();
    assert_eq!((w.offset, w.count), (8, 2));
}

#[test]
fn gradmax_zero_incoming_and_larger_gradient_than_random_outgoing() {
    let x = input(&[2, 2, 8, 12], 4);
    let grad_norm_new = |net: &mut Box<dyn SegNetwork>, vm: &VarMap, name: &str, at: usize| {
        let mut loss = mse_loss(x.clone());
        let l = loss(net.as_ref()).unwrap();
        let grads = l.backward().unwrap();
        let data = vm.data().lock().unwrap();
        let w = data[name].as_tensor().clone();
        let g = grads.get(&w).unwrap();
        g.narrow(0, at, 1)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    for layer in [
        "down_1.conv1",
        "bottleneck.conv2",
        "up_1.conv2",
        "down_0.conv2",
    ] {
        let (vm, mut net) = build(&kwargs_2d(true), 21);
        let mut loss = mse_loss(x.clone());
        let req = GrowRequest {
            layer: layer.into(),
            method: GrowthMethod::GradMax { scale: 1.0 },
            n_new: 1,
            seed: 2,
        };
        let out = as_growable(net.as_mut())
            .unwrap()
            .grow(&req, &vm, &mut loss)
            .unwrap();
        assert!(out.singular_values[0] > 0.0);
        let wc = out
            .changes
            .iter()
            .find(|c| c.axis == 0 && c.name.contains(".conv") && c.name.ends_with(".weight"))
            .unwrap();
        let new_in = wc.var.as_tensor().narrow(0, wc.offset, 1).unwrap();
        assert_eq!(
            new_in
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let g_gm = grad_norm_new(&mut net, &vm, &wc.name, wc.offset);
        assert!(g_gm > 0.0, "{layer}: gradmax new filter has no gradient");
        // same norm, random direction for the outgoing weights (of the linear consumers)
        let mut total_sq = 0f64;
        let outs: Vec<&ParamChange> = out.changes.iter().filter(|c| c.axis == 1).collect();
        for c in &outs {
            let t = c.var.as_tensor().narrow(1, c.offset, 1).unwrap();
            total_sq += t
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
        let mut rand_sq = 0f64;
        let mut rands = vec![];
        for (i, c) in outs.iter().enumerate() {
            let t = c.var.as_tensor().narrow(1, c.offset, 1).unwrap();
            let nz = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0;
            let r = if nz {
                input(t.dims(), 100 + i as u64)
            } else {
                t.zeros_like().unwrap()
            };
            rand_sq += r
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            rands.push(r);
        }
        let f = (total_sq / rand_sq).sqrt();
        for (c, r) in outs.iter().zip(rands) {
            let full = c.var.as_tensor();
            let r = (r * f).unwrap();
            let len = full.dim(1).unwrap();
            let mut parts = vec![];
            if c.offset > 0 {
                parts.push(full.narrow(1, 0, c.offset).unwrap());
            }
            parts.push(r);
            if c.offset + 1 < len {
                parts.push(full.narrow(1, c.offset + 1, len - c.offset - 1).unwrap());
            }
            let t = Tensor::cat(&parts, 1).unwrap();
            c.var.set(&t).unwrap();
        }
        let g_rand = grad_norm_new(&mut net, &vm, &wc.name, wc.offset);
        assert!(
            g_gm > g_rand,
            "{layer}: gradmax gradient {g_gm} not above random direction {g_rand}"
        );
    }
}

#[test]
fn rebuild_from_grown_kwargs_and_weights_reproduces_outputs() {
    for kw in [kwargs_2d(true), kwargs_3d()] {
        let is3d = kw["conv_op"].as_str().unwrap().ends_with("3d");
        let x = if is3d {
            input(&[1, 2, 4, 8, 8], 5)
        } else {
            input(&[2, 2, 8, 12], 5)
        };
        let (vm, mut net) = build(&kw, 8);
        let before = net.forward(&x, false).unwrap();
        let mut loss = mse_loss(x.clone());
        for (layer, m) in [
            ("bottleneck", GrowthMethod::GradMax { scale: 1.0 }),
            (
                "down_0.conv2",
                GrowthMethod::SampleSelect { n_candidates: 2 },
            ),
            ("up_1.conv2", methods()[0].clone()),
        ] {
            let g = as_growable(net.as_mut()).unwrap();
            for l in g.resolve_layer(layer).unwrap() {
                let req = GrowRequest {
                    layer: l,
                    method: m.clone(),
                    n_new: 2,
                    seed: 3,
                };
                g.grow(&req, &vm, &mut loss).unwrap();
            }
        }
        let grown = as_growable(net.as_mut()).unwrap().grown_kwargs();
        let out = net.forward(&x, false).unwrap();
        let d = max_abs_diff(&before, &out);
        assert!(
            d <= 1e-5,
            "3d={is3d}: six growths changed the output by {d}"
        );
        let mut kw2 = kw.clone();
        for (k, v) in grown {
            kw2.insert(k, v);
        }
        let want = if is3d { json!([7, 7]) } else { json!([10, 10]) };
        assert_eq!(kw2["grown_widths"]["bottleneck"], want);
        let weights: HashMap<String, Tensor> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let net2 = Registry::default().build(&spec(&kw2), &IO, vb).unwrap();
        let out2 = net2.forward(&x, false).unwrap();
        assert!(max_abs_diff(&out, &out2) == 0.0);
        // the registry count of the grown kwargs equals the grown variables
        let n = Registry::default()
            .parameter_count(&spec(&kw2), &IO)
            .unwrap();
        assert_eq!(
            n as usize,
            weights.values().map(|t| t.elem_count()).sum::<usize>()
        );
    }
}

#[test]
fn gradients_reach_every_parameter() {
    let (vm, net) = build(&kwargs_2d(true), 12);
    let outs = net.forward(&input(&[2, 2, 8, 12], 6), true).unwrap();
    let mut s = outs[0].sqr().unwrap().sum_all().unwrap();
    for o in &outs[1..] {
        s = (s + o.sqr().unwrap().sum_all().unwrap()).unwrap();
    }
    let g = s.backward().unwrap();
    for (name, v) in vm.data().lock().unwrap().iter() {
        let gr = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no grad"));
        let m = gr
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m > 0.0, "{name}: zero grad");
    }
}

#[test]
fn estimate_ratio_matches_reference_row() {
    // the seed's form: chans 32, 4 pools, bottleneck 256 at 1/16 vs plain [32,64,128,256]
    let mut g = kwargs_3d();
    g.insert("n_stages".into(), json!(5));
    g.insert("features_per_stage".into(), json!([32, 64, 128, 256, 256]));
    g.insert("kernel_sizes".into(), json!(3));
    g.insert("strides".into(), json!([1, 2, 2, 2, 2]));
    g.insert("n_conv_per_stage_decoder".into(), json!(2));
    let mut p = kwargs_3d();
    p.insert("n_stages".into(), json!(4));
    p.insert("features_per_stage".into(), json!([32, 64, 128, 256]));
    p.insert("kernel_sizes".into(), json!(3));
    p.insert("strides".into(), json!([1, 2, 2, 2]));
    let io = NetworkIo {
        in_channels: 1,
        num_classes: 2,
        deep_supervision: true,
    };
    let r = Registry::default();
    let eg = r
        .estimate(&spec(&g), &io)
        .unwrap()
        .conv_feature_map_size(&[128; 3]);
    let mut ps = spec(&p);
    ps.network_class_name = "PlainConvUNet".into();
    let ep = r
        .estimate(&ps, &io)
        .unwrap()
        .conv_feature_map_size(&[128; 3]);
    let ratio = eg as f64 / ep as f64;
    assert!((ratio / 1.01 - 1.0).abs() <= 0.35, "ratio {ratio}");
    // params of the seed form (2D chans 32, 4 pools, in 2 out 2 in the seed: 7.76M-ish in 3D ×27/9)
    let n3 = r.parameter_count(&spec(&g), &io).unwrap();
    eprintln!("seed-form 3D params {n3}, activation ratio {ratio}");
    assert!(
        n3.abs_diff(10_040_000) < 10_000,
        "{n3} vs the reference 10.04M"
    );
}

#[test]
fn bad_kwargs_name_their_json_path() {
    let mut kw = kwargs_2d(false);
    kw.insert("grown_widths".into(), json!({"down_7": [1, 2]}));
    let e = Registry::default()
        .build_initialized(&spec(&kw), &IO, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("architecture.arch_kwargs.grown_widths.down_7"),
        "{e}"
    );
    kw.insert("grown_widths".into(), json!({"up_0": [1, 0]}));
    let e = Registry::default()
        .build_initialized(&spec(&kw), &IO, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("grown_widths.up_0[1]"), "{e}");
    // the typed option is the key checkpoints record
    assert_eq!(
        crate::kwargs::keys::<super::net::GrowableKwargs>(),
        &[GROWN_WIDTHS_KEY]
    );
    let mut kw = kwargs_2d(false);
    kw.insert("norm_op".into(), json!("torch.nn.BatchNorm2d"));
    let e = Registry::default()
        .build_initialized(&spec(&kw), &IO, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("architecture.arch_kwargs.norm_op"), "{e}");
    let (vm, mut net) = build(&kwargs_2d(false), 0);
    let mut loss = mse_loss(input(&[1, 2, 8, 12], 0));
    let req = GrowRequest {
        layer: "middle".into(),
        method: GrowthMethod::GradMax { scale: 1.0 },
        n_new: 1,
        seed: 0,
    };
    let e = as_growable(net.as_mut())
        .unwrap()
        .grow(&req, &vm, &mut loss)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bottleneck.conv1"), "{e}");
}

/// Without deep supervision there are no `ds_heads` (the seed has none), so growing an
/// `up_j.conv2` widens only the next decoder block, and the function is kept.
#[test]
fn without_deep_supervision_no_heads_and_growth_skips_them() {
    let io_off = NetworkIo {
        deep_supervision: false,
        ..IO
    };
    let r = Registry::default();
    let on = r.parameters(&spec(&kwargs_2d(false)), &IO).unwrap();
    let off = r.parameters(&spec(&kwargs_2d(false)), &io_off).unwrap();
    assert!(on.iter().any(|p| p.name.starts_with("ds_heads.")));
    assert!(off.iter().all(|p| !p.name.starts_with("ds_heads.")));
    assert_eq!(on.len() - off.len(), 2, "one head: weight + bias");
    let vm = VarMap::new();
    let vb = crate::init::seeded_init_backend(&vm, 4, DType::F32, &Device::Cpu);
    let mut net = r.build(&spec(&kwargs_2d(false)), &io_off, vb).unwrap();
    let x = input(&[2, 2, 8, 12], 1);
    let before = net.forward(&x, false).unwrap();
    assert_eq!(before.len(), 1);
    let req = GrowRequest {
        layer: "up_0.conv2".into(),
        method: GrowthMethod::SampleSelect { n_candidates: 3 },
        n_new: 1,
        seed: 2,
    };
    let mut loss = mse_loss(x.clone());
    let out = as_growable(net.as_mut())
        .unwrap()
        .grow(&req, &vm, &mut loss)
        .unwrap();
    assert!(out.changes.iter().all(|c| !c.name.starts_with("ds_heads")));
    assert!(max_abs_diff(&before, &net.forward(&x, false).unwrap()) <= 1e-5);
    // turning deep supervision on needs heads that were built
    net.set_deep_supervision(true);
    assert!(!net.deep_supervision());
    assert_eq!(net.forward(&x, false).unwrap().len(), 1);
}
