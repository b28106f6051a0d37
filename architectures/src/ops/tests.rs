//! Tests of the N-d ops: PyTorch fixtures (forward + gradients), finite-difference gradient
//! checks in f64 over a geometry grid, and tests pinning Candle 0.11.1's known bugs.

use super::*;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures_dir() -> PathBuf {
    crate::test_util::fixtures_dir("ops")
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as usize)
                .collect()
        })
        .unwrap_or_default()
}

fn fixture_close(got: &Tensor, want: &Tensor, what: &str) -> std::result::Result<(), String> {
    crate::test_util::close(got, want, what)
}

/// Runs one fixture case; `composite` selects the device-agnostic conv paths.
fn run_case(case: &Value, composite: bool) -> std::result::Result<bool, String> {
    let name = case["name"].as_str().unwrap_or("?");
    let op = case["op"].as_str().unwrap_or("");
    let p = &case["params"];
    const OPS: &[&str] = &[
        "conv",
        "conv_transpose",
        "max_pool",
        "avg_pool",
        "adaptive_avg_pool",
        "interpolate",
        "pixel_shuffle",
        "instance_norm",
        "group_norm",
        "layer_norm_channels_first",
        "batch_norm",
        "grn",
        "relu",
        "leaky_relu",
        "gelu_erf",
        "gelu_tanh",
        "sigmoid",
        "softmax",
        "log_softmax",
    ];
    // losses / optimizer pieces belong to the trainer
    if !OPS.contains(&op) || (composite && !op.starts_with("conv")) {
        return Ok(false);
    }
    let file = fixtures_dir().join(case["file"].as_str().unwrap_or(""));
    let ts: HashMap<String, Tensor> =
        candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| format!("{name}: {e}"))?;
    let get = |k: &str| ts.get(k).cloned().ok_or(format!("{name}: missing {k}"));
    let mut vars: HashMap<String, Var> = HashMap::new();
    if let Some(inp) = case["inputs"].as_object() {
        for k in inp.keys() {
            vars.insert(
                k.clone(),
                Var::from_tensor(&get(k)?).map_err(|e| e.to_string())?,
            );
        }
    }
    let v = |k: &str| -> std::result::Result<Tensor, String> {
        vars.get(k)
            .map(|v| v.as_tensor().clone())
            .ok_or(format!("{name}: no input {k}"))
    };
    let x = v("x")?;
    let opt = |k: &str| vars.get(k).map(|v| v.as_tensor().clone());
    let e = |r: candle_core::Result<Tensor>| r.map_err(|e| format!("{name}: {e}"));
    let eps = p["eps"].as_f64().unwrap_or(1e-5);
    let mut extra: Vec<(String, Tensor)> = vec![];
    let y = match op {
        "conv" => {
            let o = ConvOpts::new()
                .stride(usizes(&p["stride"]))
                .padding(usizes(&p["padding"]))
                .dilation(usizes(&p["dilation"]))
                .groups(p["groups"].as_u64().unwrap_or(1) as usize);
            let (w, b) = (v("w")?, opt("b"));
            if composite {
                e(conv_composite(&x, &w, b.as_ref(), &o))?
            } else {
                e(conv(&x, &w, b.as_ref(), &o))?
            }
        }
        "conv_transpose" => {
            let o = ConvTransposeOpts::new()
                .stride(usizes(&p["stride"]))
                .padding(usizes(&p["padding"]))
                .output_padding(usizes(&p["output_padding"]))
                .dilation(usizes(&p["dilation"]))
                .groups(p["groups"].as_u64().unwrap_or(1) as usize);
            let (w, b) = (v("w")?, opt("b"));
            if composite {
                e(conv_transpose_composite(&x, &w, b.as_ref(), &o))?
            } else {
                e(conv_transpose(&x, &w, b.as_ref(), &o))?
            }
        }
        "max_pool" | "avg_pool" => {
            let o = PoolOpts::new(usizes(&p["kernel_size"]))
                .stride(usizes(&p["stride"]))
                .padding(usizes(&p["padding"]))
                .ceil_mode(p["ceil_mode"].as_bool().unwrap_or(false))
                .count_include_pad(p["count_include_pad"].as_bool().unwrap_or(true));
            if op == "max_pool" {
                e(max_pool(&x, &o))?
            } else {
                e(avg_pool(&x, &o))?
            }
        }
        "adaptive_avg_pool" => e(adaptive_avg_pool_1(&x))?,
        "interpolate" => {
            let mode = match p["mode"].as_str() {
                Some("nearest") => InterpMode::Nearest,
                _ => InterpMode::Linear {
                    align_corners: p["align_corners"].as_bool().unwrap_or(false),
                },
            };
            let size = match p["scale_factor"].as_array() {
                Some(a) => InterpSize::Scale(a.iter().filter_map(|v| v.as_f64()).collect()),
                None => InterpSize::Size(usizes(&p["size"])),
            };
            e(interpolate(&x, &size, mode))?
        }
        "pixel_shuffle" => {
            let r = p["upscale_factor"].as_u64().unwrap_or(2) as usize;
            let y = e(pixel_shuffle(&x, r))?;
            // the inverse must restore the input exactly
            let back = e(pixel_unshuffle(&y, r))?;
            fixture_close(&back, &x, &format!("{name} unshuffle"))?;
            y
        }
        "instance_norm" => {
            let (w, b) = (v("w")?, v("b")?);
            e(instance_norm(&x, NormAffine::new(Some(&w), Some(&b)), eps))?
        }
        "group_norm" => {
            let (w, b) = (v("w")?, v("b")?);
            let g = p["num_groups"].as_u64().unwrap_or(1) as usize;
            e(group_norm(&x, g, NormAffine::new(Some(&w), Some(&b)), eps))?
        }
        "layer_norm_channels_first" => {
            let (w, b) = (v("w")?, v("b")?);
            e(layer_norm_cf(&x, NormAffine::new(Some(&w), Some(&b)), eps))?
        }
        "batch_norm" => {
            let (w, b) = (v("w")?, v("b")?);
            let training = p["training"].as_bool().unwrap_or(false);
            let mut st = BatchNormState {
                running_mean: get("running_mean")?,
                running_var: get("running_var")?,
                momentum: p["momentum"].as_f64().unwrap_or(0.1),
                eps,
            };
            let y = e(batch_norm(
                &x,
                NormAffine::new(Some(&w), Some(&b)),
                &mut st,
                training,
            ))?;
            extra.push(("running_mean_out".into(), st.running_mean.clone()));
            extra.push(("running_var_out".into(), st.running_var.clone()));
            y
        }
        "grn" => e(grn(&x, &v("w")?, &v("b")?, eps))?,
        "relu" => e(x.relu())?,
        "leaky_relu" => e(leaky_relu(&x, p["negative_slope"].as_f64().unwrap_or(0.01)))?,
        "gelu_erf" => e(gelu(&x, GeluKind::Erf))?,
        "gelu_tanh" => e(gelu(&x, GeluKind::Tanh))?,
        "sigmoid" => e(candle_nn::ops::sigmoid(&x))?,
        "softmax" => e(softmax_channels(&x))?,
        "log_softmax" => e(log_softmax_channels(&x))?,
        _ => return Err(format!("{name}: op {op} not handled")),
    };
    fixture_close(&y, &get("y")?, &format!("{name} y"))?;
    for (k, t) in extra {
        if case["extra_outputs"].get(&k).is_some() {
            fixture_close(&t, &get(&k)?, &format!("{name} {k}"))?;
        }
    }
    let gy = get("gy")?;
    let loss = e((&y * &gy).and_then(|t| t.sum_all()))?;
    let grads = loss
        .backward()
        .map_err(|e| format!("{name}: backward {e}"))?;
    if let Some(gm) = case["grads"].as_object() {
        for (inp, gname) in gm {
            let var = vars.get(inp).ok_or(format!("{name}: no var {inp}"))?;
            let g = grads
                .get(var.as_tensor())
                .ok_or(format!("{name}: no gradient for {inp}"))?;
            fixture_close(
                g,
                &get(gname.as_str().unwrap_or(""))?,
                &format!("{name} {gname}"),
            )?;
        }
    }
    Ok(true)
}

fn load_index() -> Vec<Value> {
    let path = fixtures_dir().join("index.json");
    let text = std::fs::read_to_string(&path).expect("fixture index.json readable");
    let v: Value = serde_json::from_str(&text).expect("fixture index.json parses");
    v["cases"].as_array().cloned().unwrap_or_default()
}

#[test]
fn pytorch_fixtures_forward_and_gradients() {
    let cases = load_index();
    assert!(cases.len() >= 100, "expected the 119 fixture cases");
    let mut ran = 0;
    let mut failures = vec![];
    for c in &cases {
        match run_case(c, false) {
            Ok(true) => ran += 1,
            Ok(false) => {}
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // every non-loss, non-optimizer case ran
    assert!(ran >= 84, "only {ran} op cases ran");
}

#[test]
fn pytorch_fixtures_composite_conv_paths() {
    let mut ran = 0;
    let mut failures = vec![];
    for c in &load_index() {
        match run_case(c, true) {
            Ok(true) => ran += 1,
            Ok(false) => {}
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(ran >= 28, "only {ran} conv cases ran");
}

// ---------------------------------------------------------------------------------------------
// finite differences (f64, directional derivatives along random directions)

fn rand64(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Checks d/dh L(inputs + h*dir) at h=0 against <grad, dir> for every input.
fn fd_check<F>(inputs: &[Tensor], f: F, what: &str)
where
    F: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
{
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let r = rand64(y.dims(), 99);
    let loss = (&y * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let lossf = |xs: &[Tensor]| -> f64 {
        (f(xs).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    for (i, t) in inputs.iter().enumerate() {
        let dir = rand64(t.dims(), 7 + i as u64);
        let g = grads.get(vars[i].as_tensor()).expect("gradient exists");
        let analytic = (g * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let mut plus = inputs.to_vec();
        let mut minus = inputs.to_vec();
        plus[i] = (t + (&dir * h).unwrap()).unwrap();
        minus[i] = (t - (&dir * h).unwrap()).unwrap();
        let numeric = (lossf(&plus) - lossf(&minus)) / (2.0 * h);
        let tol = 1e-6 * (1.0 + analytic.abs());
        assert!(
            (analytic - numeric).abs() < tol,
            "{what} input {i}: analytic {analytic} vs numeric {numeric}"
        );
    }
}

#[test]
fn conv_finite_difference_grid() {
    // (spatial input, kernels, strides)
    type Grid<'a> = (&'a [usize], Vec<Vec<usize>>, Vec<Vec<usize>>);
    let grids: [Grid; 2] = [
        (
            &[5, 7],
            vec![vec![1, 1], vec![3, 3], vec![1, 3]],
            vec![vec![1, 1], vec![2, 2], vec![2, 1]],
        ),
        (
            &[3, 5, 6],
            vec![vec![1, 1, 1], vec![3, 3, 3], vec![1, 3, 3]],
            vec![vec![1, 1, 1], vec![2, 2, 2], vec![1, 2, 2]],
        ),
    ];
    let mut n = 0;
    for (sp, kernels, strides) in grids.iter() {
        for k in kernels {
            for s in strides {
                for pad_mode in 0..2 {
                    let p: Vec<usize> = k
                        .iter()
                        .map(|&k| if pad_mode == 0 { 0 } else { k / 2 })
                        .collect();
                    let mut xs = vec![2, 3];
                    xs.extend(sp.iter());
                    let mut ws = vec![4, 3];
                    ws.extend(k);
                    let x = rand64(&xs, 1);
                    let w = rand64(&ws, 2);
                    let b = rand64(&[4], 3);
                    let o = ConvOpts::new().stride(s.clone()).padding(p.clone());
                    fd_check(
                        &[x.clone(), w.clone(), b],
                        |t| conv(&t[0], &t[1], Some(&t[2]), &o),
                        &format!("conv k{k:?} s{s:?} p{p:?}"),
                    );
                    // the transposed conv with the same geometry (weight (C_in, C_out, k))
                    let y = conv(&x, &w, None, &o).unwrap();
                    let op: Vec<usize> = (0..sp.len())
                        .map(|a| {
                            let full = (y.dims()[2 + a] - 1) * s[a] + k[a];
                            (sp[a] + 2 * p[a] - full).min(s[a] - 1)
                        })
                        .collect();
                    let ot = ConvTransposeOpts::new()
                        .stride(s.clone())
                        .padding(p.clone())
                        .output_padding(op.clone());
                    let yt = rand64(y.dims(), 4);
                    fd_check(
                        &[yt, w.clone(), rand64(&[3], 5)],
                        |t| conv_transpose(&t[0], &t[1], Some(&t[2]), &ot),
                        &format!("conv_transpose k{k:?} s{s:?} p{p:?} op{op:?}"),
                    );
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 36);
}

#[test]
fn conv_groups_dilation_and_double_backward() {
    let x = rand64(&[2, 4, 5, 6, 7], 11);
    let w = rand64(&[6, 2, 3, 3, 3], 12);
    let o = ConvOpts::new()
        .padding([2, 1, 2])
        .dilation([2, 1, 2])
        .groups(2)
        .stride([1, 2, 1]);
    fd_check(
        &[x.clone(), w.clone()],
        |t| conv(&t[0], &t[1], None, &o),
        "grouped dilated conv",
    );
    // the gradient of the squared gradient norm (double backward through the custom ops)
    fd_check(
        &[x, w],
        |t| {
            let y = conv(&t[0], &t[1], None, &o)?;
            let gx = conv_transpose(
                &y,
                &t[1],
                None,
                &ConvTransposeOpts::new()
                    .padding([2, 1, 2])
                    .dilation([2, 1, 2])
                    .groups(2)
                    .stride([1, 2, 1]),
            )?;
            gx.sqr()
        },
        "conv -> conv_transpose chain",
    );
}

/// Gradients out of the custom convolution ops are plain values. A weight's gradient stays in the
/// `GradStore` until the optimizer step; with an op graph it would keep the layer's upstream
/// gradient alive that long (3.9 GB at nnU-Net's 3d_fullres plan size).
#[test]
fn conv_gradients_carry_no_graph() {
    let x = rand64(&[1, 2, 4, 5, 6], 41);
    let (w1, b1) = (rand64(&[3, 2, 3, 3, 3], 42), rand64(&[3], 43));
    let (w2, b2) = (rand64(&[3, 2, 2, 2, 2], 44), rand64(&[2], 45));
    let vars = [w1, b1, w2, b2].map(|t| Var::from_tensor(&t).unwrap());
    let y = conv(
        &x,
        vars[0].as_tensor(),
        Some(vars[1].as_tensor()),
        &ConvOpts::new().padding([1, 1, 1]),
    )
    .unwrap();
    let t = ConvTransposeOpts::new().stride([2, 2, 2]);
    let z = conv_transpose(&y, vars[2].as_tensor(), Some(vars[3].as_tensor()), &t).unwrap();
    let g = z.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        assert!(!g.get(v.as_tensor()).unwrap().track_op(), "gradient {i}");
    }
    // the network input needs no gradient, and none is computed
    assert!(g.get(&x).is_none());
}

#[test]
fn other_ops_finite_difference() {
    let x = rand64(&[2, 4, 5, 6, 7], 21);
    let w = rand64(&[4], 22);
    let b = rand64(&[4], 23);
    fd_check(
        &[x.clone(), w.clone(), b.clone()],
        |t| instance_norm(&t[0], NormAffine::new(Some(&t[1]), Some(&t[2])), 1e-5),
        "instance_norm",
    );
    fd_check(
        &[x.clone(), w.clone(), b.clone()],
        |t| group_norm(&t[0], 2, NormAffine::new(Some(&t[1]), Some(&t[2])), 1e-5),
        "group_norm",
    );
    fd_check(
        &[x.clone(), w.clone(), b.clone()],
        |t| grn(&t[0], &t[1], &t[2], 1e-6),
        "grn",
    );
    let o = PoolOpts::new([3, 2, 3])
        .stride([2, 2, 1])
        .padding([1, 0, 1])
        .ceil_mode(true);
    fd_check(
        std::slice::from_ref(&x),
        |t| avg_pool(&t[0], &o),
        "avg_pool",
    );
    fd_check(
        std::slice::from_ref(&x),
        |t| max_pool(&t[0], &o),
        "max_pool",
    );
    let mode = InterpMode::Linear {
        align_corners: false,
    };
    fd_check(
        std::slice::from_ref(&x),
        |t| interpolate(&t[0], &InterpSize::Size(vec![7, 3, 9]), mode),
        "trilinear",
    );
    fd_check(
        std::slice::from_ref(&x),
        |t| pad(&t[0], &[(1, 2), (0, 1), (2, 0)], PadMode::Replicate),
        "replicate pad",
    );
    fd_check(
        std::slice::from_ref(&x),
        |t| leaky_relu(&t[0], 0.01),
        "leaky_relu",
    );
    // the composite (non-CPU) versions of the fused CPU kernels
    fd_check(
        std::slice::from_ref(&x),
        |t| act::leaky_relu_composite(&t[0], 0.01),
        "leaky_relu composite",
    );
    fd_check(
        &[x.clone(), w.clone(), b.clone()],
        |t| norm::instance_norm_composite(&t[0], NormAffine::new(Some(&t[1]), Some(&t[2])), 1e-5),
        "instance_norm composite",
    );
    let fused = instance_norm(&x, NormAffine::new(Some(&w), None), 1e-5).unwrap();
    let comp = norm::instance_norm_composite(&x, NormAffine::new(Some(&w), None), 1e-5).unwrap();
    let d = (fused - comp)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12, "fused vs composite instance norm differ by {d}");
}

/// max |a - b| (f64).
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Output and gradients w.r.t. `(x, w, b)` of `sum(f(x, w, b) * r)` for a fixed random `r`
/// (zeros for an input `f` does not use).
fn value_and_grads<F>(x: &Tensor, w: &Tensor, b: &Tensor, f: F) -> [Tensor; 4]
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
{
    let vars = [x, w, b].map(|t| Var::from_tensor(t).unwrap());
    let y = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )
    .unwrap();
    let r = rand64(y.dims(), 77).to_dtype(y.dtype()).unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    // no gradient (an unused input): zeros
    let g = |i: usize| match grads.get(vars[i].as_tensor()) {
        Some(g) => g.clone(),
        None => vars[i].zeros_like().unwrap(),
    };
    [y, g(0), g(1), g(2)]
}

#[test]
fn fused_instance_norm_leaky_relu_matches_composition() {
    // 3D, 2D, a deep-stage row (6x7x7 = 294), rows of one element, a row of several blocks
    // whose length is not a multiple of the lane count, and one row
    let shapes: [&[usize]; 6] = [
        &[2, 3, 5, 6, 7],
        &[2, 4, 9, 11],
        &[2, 5, 6, 7, 7],
        &[3, 2, 1, 1, 1],
        &[1, 3, 73, 71],
        &[1, 1, 4, 5],
    ];
    for (si, shape) in shapes.iter().enumerate() {
        let c = shape[1];
        let x = rand64(shape, 100 + si as u64);
        let w = (rand64(&[c], 200 + si as u64) * 2.0).unwrap();
        let b = (rand64(&[c], 300 + si as u64) * 0.5).unwrap();
        for slope in [0.01, 0.0] {
            for affine in [true, false] {
                let aff = |w: &Tensor, b: &Tensor| {
                    if affine {
                        (Some(w.clone()), Some(b.clone()))
                    } else {
                        (None, None)
                    }
                };
                let fused = value_and_grads(&x, &w, &b, |x, w, b| {
                    let (w, b) = aff(w, b);
                    instance_norm_leaky_relu(
                        x,
                        NormAffine::new(w.as_ref(), b.as_ref()),
                        1e-5,
                        slope,
                    )
                });
                let comp = value_and_grads(&x, &w, &b, |x, w, b| {
                    let (w, b) = aff(w, b);
                    let y = norm::instance_norm_composite(
                        x,
                        NormAffine::new(w.as_ref(), b.as_ref()),
                        1e-5,
                    )?;
                    act::leaky_relu_composite(&y, slope)
                });
                for (i, what) in ["y", "dx", "dw", "db"].iter().enumerate() {
                    let d = max_diff(&fused[i], &comp[i]);
                    assert!(
                        d < 1e-10,
                        "{shape:?} slope {slope} affine {affine}: {what} differs by {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn fused_instance_norm_leaky_relu_finite_difference() {
    let x = rand64(&[2, 4, 5, 6, 7], 41);
    let w = rand64(&[4], 42);
    let b = rand64(&[4], 43);
    for slope in [0.01, 0.0, 0.3] {
        fd_check(
            &[x.clone(), w.clone(), b.clone()],
            |t| {
                let affine = NormAffine::new(Some(&t[1]), Some(&t[2]));
                instance_norm_leaky_relu(&t[0], affine, 1e-5, slope)
            },
            &format!("instance_norm_leaky_relu slope {slope}"),
        );
    }
    let x2 = rand64(&[2, 3, 9, 8], 44);
    fd_check(
        std::slice::from_ref(&x2),
        |t| instance_norm_leaky_relu(&t[0], NormAffine::none(), 1e-5, 0.01),
        "instance_norm_leaky_relu 2D non-affine",
    );
}

#[test]
fn fused_kernels_f32_match_f64() {
    // f32 kernels (f32 lanes, f64 folds) against the f64 composition, with a large row mean
    // (variance of `x - x[0]`) and rows longer than a block
    let x = ((rand64(&[2, 3, 24, 56, 56], 51) * 3.0).unwrap() + 50.0).unwrap();
    let w = rand64(&[3], 52);
    let b = rand64(&[3], 53);
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let fused = value_and_grads(&f32s(&x), &f32s(&w), &f32s(&b), |x, w, b| {
        instance_norm_leaky_relu(x, NormAffine::new(Some(w), Some(b)), 1e-5, 0.01)
    });
    let comp = value_and_grads(&x, &w, &b, |x, w, b| {
        let y = norm::instance_norm_composite(x, NormAffine::new(Some(w), Some(b)), 1e-5)?;
        act::leaky_relu_composite(&y, 0.01)
    });
    for (i, what) in ["y", "dx", "dw", "db"].iter().enumerate() {
        crate::test_util::assert_close(&fused[i], &comp[i], what);
    }
    // standalone leaky ReLU over several chunks (the last one partial), values and gradient
    let lx = rand64(&[1, 1, 3, 100, 331], 54);
    for t in [lx.clone(), f32s(&lx)] {
        let v = Var::from_tensor(&t).unwrap();
        let y = leaky_relu(v.as_tensor(), 0.1).unwrap();
        assert_eq!(
            max_diff(&y, &act::leaky_relu_composite(&t, 0.1).unwrap()),
            0.0
        );
        let r = rand64(y.dims(), 55).to_dtype(t.dtype()).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let want = t
            .ge(0.0)
            .unwrap()
            .where_cond(&r, &(&r * 0.1).unwrap())
            .unwrap();
        assert_eq!(max_diff(g.get(v.as_tensor()).unwrap(), &want), 0.0);
    }
}

#[test]
fn pad_modes_values() {
    let x = Tensor::new(&[[[1f32, 2., 3.]]], &Device::Cpu).unwrap();
    let z = pad(&x, &[(1, 2)], PadMode::Zeros).unwrap();
    assert_eq!(
        z.to_vec3::<f32>().unwrap()[0][0],
        vec![0., 1., 2., 3., 0., 0.]
    );
    let r = pad(&x, &[(2, 1)], PadMode::Replicate).unwrap();
    assert_eq!(
        r.to_vec3::<f32>().unwrap()[0][0],
        vec![1., 1., 1., 2., 3., 3.]
    );
    let c = pad(&x, &[(1, 0)], PadMode::Constant(-5.0)).unwrap();
    assert_eq!(c.to_vec3::<f32>().unwrap()[0][0], vec![-5., 1., 2., 3.]);
    assert!(pad(&x, &[(1, 0), (1, 1)], PadMode::Zeros).is_err());
}

#[test]
fn dropout_and_drop_path() {
    let x = Tensor::ones((64, 8, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let y = dropout(&x, 0.25, true).unwrap();
    let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let kept = v.iter().filter(|&&a| a != 0.0).count() as f64 / v.len() as f64;
    assert!((kept - 0.75).abs() < 0.02, "kept fraction {kept}");
    assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.75).abs() < 1e-6));
    let m = y.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((m - 1.0).abs() < 0.03);
    assert_eq!(
        dropout(&x, 0.25, false)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        x.elem_count() as f32
    );
    let d = drop_path(&x, 0.5, true).unwrap();
    for i in 0..64 {
        let s = d
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(s.iter().all(|&a| a == 0.0) || s.iter().all(|&a| (a - 2.0).abs() < 1e-6));
    }
    assert!(dropout(&x, 1.0, true).is_err());
}

#[test]
fn standalone_gradient_kernels_match_autograd() {
    let x = Var::from_tensor(&rand64(&[2, 3, 5, 6, 7], 31)).unwrap();
    let w = Var::from_tensor(&rand64(&[4, 3, 1, 3, 3], 32)).unwrap();
    let o = ConvOpts::new().stride([1, 2, 2]).padding([0, 1, 1]);
    let y = conv(x.as_tensor(), w.as_tensor(), None, &o).unwrap();
    let r = rand64(y.dims(), 33);
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = conv_input_grad(&r, w.as_tensor(), &[5, 6, 7], &o).unwrap();
    let dw = conv_weight_grad(x.as_tensor(), &r, &[1, 3, 3], &o).unwrap();
    let maxdiff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    assert!(maxdiff(&dx, g.get(x.as_tensor()).unwrap()) < 1e-12);
    assert!(maxdiff(&dw, g.get(w.as_tensor()).unwrap()) < 1e-12);
    assert!(conv_input_grad(&r, w.as_tensor(), &[5, 6, 9], &o).is_err());
}

#[test]
fn conv_rejects_bad_shapes() {
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((2, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
    assert!(conv(&x, &w, None, &ConvOpts::new()).is_err()); // kernel larger than input
    let w = Tensor::zeros((2, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv(&x, &w, None, &ConvOpts::new()).is_err()); // channel mismatch
    let w = Tensor::zeros((2, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv(&x, &w, None, &ConvOpts::new().stride([1, 1, 1])).is_err());
    assert!(conv(&x, &w, None, &ConvOpts::new().groups(0)).is_err());
    let y = conv(&x, &w, None, &ConvOpts::new().padding([1])).unwrap();
    assert_eq!(y.dims(), &[1, 2, 4, 4]);
}

// ---------------------------------------------------------------------------------------------
// Candle 0.11.1 bugs this module works around. If one of these tests fails after a Candle
// upgrade, the bug changed: re-check the workaround (and candle.md).

#[test]
fn candle_bug_max_pool2d_grad_divided_by_window() {
    let x = Var::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
    let y = x.as_tensor().max_pool2d(2).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx: Vec<f32> = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        gx,
        vec![0.0, 0.0, 0.0, 0.25],
        "candle max_pool2d grad changed"
    );
    // ours routes the full gradient
    let y = max_pool(x.as_tensor(), &PoolOpts::new([2, 2])).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx: Vec<f32> = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(gx, vec![0.0, 0.0, 0.0, 1.0]);
}

#[test]
fn candle_bug_conv2d_backward_output_padding() {
    let x = Var::from_tensor(&rand64(&[2, 3, 6, 7], 1).to_dtype(DType::F32).unwrap()).unwrap();
    let w = rand64(&[4, 3, 3, 3], 2).to_dtype(DType::F32).unwrap();
    let y = x.as_tensor().conv2d(&w, 1, 2, 1, 1).unwrap();
    assert!(
        y.sum_all().unwrap().backward().is_err(),
        "candle conv2d backward on 6x7 k3 s2 p1 now works"
    );
}

#[test]
fn candle_bug_layer_norm_drops_gradients() {
    let x = Var::from_tensor(&rand64(&[2, 5, 4], 1).to_dtype(DType::F32).unwrap()).unwrap();
    let ln = candle_nn::LayerNorm::new(
        Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        1e-5,
    );
    let y = candle_core::Module::forward(&ln, x.as_tensor()).unwrap();
    let g = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(
        g.get(x.as_tensor()).is_none(),
        "candle LayerNorm now propagates gradients"
    );
}

#[test]
fn candle_bug_strided_lhs_broadcast_rhs_matmul() {
    let a = rand64(&[2, 4, 3], 1).transpose(1, 2).unwrap(); // (2, 3, 4), strided
    let b = rand64(&[4, 5], 2)
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((2, 4, 5))
        .unwrap();
    let bad = a.matmul(&b).unwrap();
    let good = a
        .contiguous()
        .unwrap()
        .matmul(&b.contiguous().unwrap())
        .unwrap();
    let diff = (bad - good)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        diff > 1e-3,
        "candle strided x broadcast matmul is now correct (diff {diff})"
    );
}

#[test]
fn candle_bug_nonuniform_nearest_upsample_backward() {
    let x = Var::from_tensor(&rand64(&[1, 1, 4, 5], 1)).unwrap();
    let y = x.as_tensor().upsample_nearest2d(4, 10).unwrap();
    assert!(y.sum_all().unwrap().backward().is_err());
    // ours works
    let y = interpolate(
        x.as_tensor(),
        &InterpSize::Size(vec![4, 10]),
        InterpMode::Nearest,
    )
    .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let s = g
        .get(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((s - 40.0).abs() < 1e-12);
}

/// Peak resident memory (VmHWM) of a 3D conv forward + backward at (2, 32, 64^3), 3x3x3
/// 32 -> 32. Run alone (it reads the process-wide high-water mark):
/// `cargo test --release -p architectures -- --ignored conv3d_peak_memory --nocapture`.
#[test]
#[ignore = "measures process peak memory: run alone, --release -- --ignored --nocapture"]
fn conv3d_peak_memory() {
    fn hwm_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }
    let before = hwm_kb();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 32, 64, 64, 64), &Device::Cpu).unwrap())
        .unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (32, 32, 3, 3, 3), &Device::Cpu).unwrap())
        .unwrap();
    let y = conv(
        x.as_tensor(),
        w.as_tensor(),
        None,
        &ConvOpts::new().padding([1]),
    )
    .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(x.as_tensor()).unwrap().dims(), x.dims());
    let peak = hwm_kb();
    println!(
        "conv3d (2,32,64^3) fwd+bwd: VmHWM {:.0} MB (before {:.0} MB; one feature map = {:.0} MB)",
        peak as f64 / 1024.0,
        before as f64 / 1024.0,
        x.elem_count() as f64 * 4.0 / 1048576.0
    );
    assert!(peak < 1024 * 1024, "peak RSS {peak} kB >= 1 GB");
}

/// Fused instance norm + leaky ReLU against the two separate kernels, forward and backward, on
/// f32 feature maps of a 3D and a 2D plan (`cargo test --release -p architectures --
/// --ignored fused_norm_act_timings --nocapture`).
#[test]
#[ignore = "benchmark: slow, run with --release -- --ignored --nocapture"]
fn fused_norm_act_timings() {
    use candle_core::{CustomOp1, CustomOp3};
    use fused::{LeakyReluOp, NormActOp};
    let shapes: [&[usize]; 3] = [&[2, 32, 24, 56, 56], &[2, 320, 6, 7, 7], &[2, 32, 112, 128]];
    for shape in shapes {
        let c = shape[1];
        let x = rand64(shape, 1).to_dtype(DType::F32).unwrap();
        let g = rand64(shape, 2).to_dtype(DType::F32).unwrap();
        let w = Tensor::ones(c, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap();
        // median and min over 15 runs, seconds
        let time = |f: &dyn Fn()| {
            f();
            let mut t: Vec<f64> = (0..15)
                .map(|_| {
                    let s = std::time::Instant::now();
                    f();
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            (t[7] * 1e3, t[0] * 1e3)
        };
        let fused_f = time(&|| {
            x.apply_op3_no_bwd(&w, &b, &NormActOp::new(1e-5, 0.01))
                .unwrap();
        });
        let fused_b = time(&|| {
            let op = NormActOp::new(1e-5, 0.01);
            let y = x.apply_op3_no_bwd(&w, &b, &op).unwrap();
            op.bwd(&x, &w, &b, &y, &g).unwrap();
        });
        let sep_f = time(&|| {
            let n = x
                .apply_op3_no_bwd(&w, &b, &NormActOp::new(1e-5, 1.0))
                .unwrap();
            n.apply_op1_no_bwd(&LeakyReluOp { slope: 0.01 }).unwrap();
        });
        let sep_b = time(&|| {
            let op = NormActOp::new(1e-5, 1.0);
            let n = x.apply_op3_no_bwd(&w, &b, &op).unwrap();
            let act = LeakyReluOp { slope: 0.01 };
            let y = n.apply_op1_no_bwd(&act).unwrap();
            let gn = act.bwd(&n, &y, &g).unwrap().unwrap();
            op.bwd(&x, &w, &b, &n, &gn).unwrap();
        });
        println!(
            "{shape:?}: fused fwd {:.2} ms (min {:.2}), fwd+bwd {:.2} (min {:.2}); \
             separate fwd {:.2} (min {:.2}), fwd+bwd {:.2} (min {:.2})",
            fused_f.0, fused_f.1, fused_b.0, fused_b.1, sep_f.0, sep_f.1, sep_b.0, sep_b.1
        );
    }
}

/// An identity op whose backward records whether a later op of the graph was already dropped:
/// it probes the vendored candle-core patch's `backward_consuming`.
struct Probe {
    dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    watch: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    saw_dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.dropped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl candle_core::CustomOp1 for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((s.clone(), l.shape().clone()))
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if let Some(w) = &self.watch {
            let seen = w.load(std::sync::atomic::Ordering::SeqCst);
            self.saw_dropped
                .store(seen, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(Some(grad.clone()))
    }
}

/// `backward_consuming` drops each op (and with it the activations only it holds) once its
/// gradient has been passed on, so an earlier op's backward runs after the later op is gone;
/// `backward` keeps the graph. Both give the same gradient, and a tensor somebody still holds
/// keeps its op.
#[test]
fn consuming_backward_frees_ops_as_it_goes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    for consume in [false, true] {
        let w = Var::from_tensor(&Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap()).unwrap();
        let late_dropped = Arc::new(AtomicBool::new(false));
        let saw = Arc::new(AtomicBool::new(false));
        let early = Probe {
            dropped: Arc::new(AtomicBool::new(false)),
            watch: Some(late_dropped.clone()),
            saw_dropped: saw.clone(),
        };
        let late = Probe {
            dropped: late_dropped.clone(),
            watch: None,
            saw_dropped: Arc::new(AtomicBool::new(false)),
        };
        let a = (w.as_tensor() * 2.0).unwrap().apply_op1(early).unwrap();
        let held = a.sqr().unwrap(); // held by the caller: must stay tracked
        let loss = held.apply_op1(late).unwrap().sum_all().unwrap();
        let g = if consume {
            loss.backward_consuming().unwrap()
        } else {
            loss.backward().unwrap()
        };
        let gw: Vec<f32> = g.get(w.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(gw, [8., 16., 24.], "d/dw sum((2w)^2) = 8w");
        assert_eq!(saw.load(Ordering::SeqCst), consume, "consume = {consume}");
        assert_eq!(loss.track_op(), !consume);
        assert!(held.track_op(), "a tensor the caller holds keeps its op");
        drop(g);
    }
}
