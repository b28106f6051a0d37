//! The catalogue of op checks: every op family the networks use, on small 1D/2D/3D geometries
//! with anisotropic strides, groups and dilation where the op has them.

use super::{OpCheck, Variant};
use crate::convunext::fast;
use crate::ops::{
    adaptive_avg_pool_1, avg_pool, batch_norm, conv, conv_composite, conv_input_grad,
    conv_transpose, conv_transpose_composite, conv_weight_grad, gelu, grn, group_norm,
    instance_norm, instance_norm_composite, instance_norm_leaky_relu, interpolate, layer_norm_cf,
    leaky_relu, leaky_relu_composite, log_softmax_channels, max_pool, pixel_shuffle,
    pixel_unshuffle, softmax_channels, BatchNormState, ConvOpts, ConvTransposeOpts, GeluKind,
    InterpMode, InterpSize, NormAffine, PoolOpts,
};
use crate::runext::{pixel_shuffle_axes, BlockOptions, DynamicConv};
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarBuilder;
use std::collections::HashMap;

/// Every op check (f32; the ones mixed precision runs in bf16 are marked for bf16 too).
pub fn op_checks() -> Vec<OpCheck> {
    let mut v = conv_checks();
    v.extend(depthwise_checks());
    v.extend(conv_transpose_checks());
    v.extend(conv_grad_checks());
    v.extend(pool_interp_checks());
    v.extend(norm_checks());
    v.extend(block_checks());
    v.extend(activation_checks());
    v
}

fn conv_check(name: &str, x: &[usize], w: &[usize], bias: bool, o: ConvOpts) -> OpCheck {
    let mut params = vec![w.to_vec()];
    if bias {
        params.push(vec![w[0]]);
    }
    OpCheck::new("conv", name, x, params, move |x, p, v| match v {
        Variant::Default => conv(x, &p[0], p.get(1), &o),
        Variant::Reference => conv_composite(x, &p[0], p.get(1), &o),
    })
    .with_composite()
}

fn conv_checks() -> Vec<OpCheck> {
    let o = ConvOpts::new;
    vec![
        conv_check(
            "conv2d k3 p1 bias",
            &[2, 4, 9, 8],
            &[5, 4, 3, 3],
            true,
            o().padding([1]),
        )
        .with_bf16(),
        conv_check(
            "conv2d k3 s2 p1",
            &[2, 4, 8, 8],
            &[6, 4, 3, 3],
            false,
            o().padding([1]).stride([2]),
        ),
        conv_check(
            "conv2d depthwise groups 4 s(2,1) bias",
            &[2, 4, 9, 7],
            &[8, 1, 3, 3],
            true,
            o().padding([1]).stride([2, 1]).groups(4),
        ),
        conv_check(
            "conv3d k3 p1 bias",
            &[2, 3, 6, 7, 8],
            &[4, 3, 3, 3, 3],
            true,
            o().padding([1]),
        )
        .with_bf16(),
        conv_check(
            "conv3d k(1,3,3) s(1,2,2) p(0,1,1) bias",
            &[1, 3, 4, 8, 8],
            &[4, 3, 1, 3, 3],
            true,
            o().padding([0, 1, 1]).stride([1, 2, 2]),
        )
        .with_bf16(),
        conv_check(
            "conv3d k(3,1,1) s(2,1,1) p(1,0,0)",
            &[1, 3, 7, 5, 5],
            &[4, 3, 3, 1, 1],
            false,
            o().padding([1, 0, 0]).stride([2, 1, 1]),
        ),
        conv_check(
            "conv3d k3 groups 2 dilation 2",
            &[1, 4, 7, 7, 7],
            &[4, 2, 3, 3, 3],
            false,
            o().padding([2]).dilation([2]).groups(2),
        ),
        conv_check(
            "conv3d k3 s(1,2,2) p1 groups 2 bias",
            &[2, 4, 5, 8, 7],
            &[6, 2, 3, 3, 3],
            true,
            o().padding([1]).stride([1, 2, 2]).groups(2),
        ),
        conv_check(
            "conv3d 1x1x1 bias",
            &[2, 5, 3, 4, 5],
            &[3, 5, 1, 1, 1],
            true,
            o(),
        ),
        conv_check(
            "conv1d k3 s2 p1 bias",
            &[2, 3, 11],
            &[4, 3, 3],
            true,
            o().padding([1]).stride([2]),
        ),
    ]
}

/// ConvNeXt's depthwise convolution (a CPU kernel of its own) against the grouped composite.
fn depthwise_checks() -> Vec<OpCheck> {
    let mut v = vec![];
    for (name, x, k) in [
        (
            "depthwise (ConvNeXt) conv2d k7 bias",
            vec![2, 4, 9, 8],
            vec![7, 7],
        ),
        (
            "depthwise (ConvNeXt) conv3d k3 bias",
            vec![2, 4, 4, 5, 6],
            vec![3, 3, 3],
        ),
    ] {
        let ch = x[1];
        let mut w = vec![ch, 1];
        w.extend(&k);
        let pad: Vec<usize> = k.iter().map(|k| k / 2).collect();
        let o = ConvOpts::new().padding(pad).groups(ch);
        let c = OpCheck::new("conv", name, x, vec![w, vec![ch]], move |x, p, v| match v {
            Variant::Default => fast::depthwise_conv(x, &p[0], Some(&p[1])),
            Variant::Reference => conv_composite(x, &p[0], Some(&p[1]), &o),
        });
        v.push(c);
    }
    v
}

fn conv_t_check(name: &str, x: &[usize], w: &[usize], bias: bool, o: ConvTransposeOpts) -> OpCheck {
    let mut params = vec![w.to_vec()];
    if bias {
        params.push(vec![w[1] * o.groups]);
    }
    OpCheck::new("conv_transpose", name, x, params, move |x, p, v| match v {
        Variant::Default => conv_transpose(x, &p[0], p.get(1), &o),
        Variant::Reference => conv_transpose_composite(x, &p[0], p.get(1), &o),
    })
    .with_composite()
}

fn conv_transpose_checks() -> Vec<OpCheck> {
    let o = ConvTransposeOpts::new;
    vec![
        conv_t_check(
            "convT3d k2 s2 bias",
            &[2, 4, 3, 4, 5],
            &[4, 3, 2, 2, 2],
            true,
            o().stride([2]),
        ),
        conv_t_check(
            "convT3d k(1,2,2) s(1,2,2)",
            &[1, 4, 3, 4, 4],
            &[4, 2, 1, 2, 2],
            false,
            o().stride([1, 2, 2]),
        )
        .with_bf16(),
        conv_t_check(
            "convT3d k3 s(1,2,2) p1 output_padding(0,1,1)",
            &[1, 3, 3, 4, 4],
            &[3, 2, 3, 3, 3],
            false,
            o().stride([1, 2, 2]).padding([1]).output_padding([0, 1, 1]),
        ),
        conv_t_check(
            "convT2d k3 s2 p1 output_padding 1",
            &[2, 3, 5, 6],
            &[3, 4, 3, 3],
            false,
            o().stride([2]).padding([1]).output_padding([1]),
        ),
        conv_t_check(
            "convT2d k2 s2 groups 2 bias",
            &[2, 4, 5, 6],
            &[4, 3, 2, 2],
            true,
            o().stride([2]).groups(2),
        )
        .with_bf16(),
        conv_t_check(
            "convT1d k4 s2 p1",
            &[2, 3, 7],
            &[3, 2, 4],
            false,
            o().stride([2]).padding([1]),
        ),
    ]
}

/// Output spatial size of a convolution (per axis: stride, padding, dilation as in `o`'s order).
fn conv_out(x: &[usize], k: &[usize], s: &[usize], p: &[usize], d: &[usize]) -> Vec<usize> {
    let at = |v: &[usize], a: usize| if v.len() == 1 { v[0] } else { v[a] };
    (0..k.len())
        .map(|a| (x[a] + 2 * at(p, a) - at(d, a) * (k[a] - 1) - 1) / at(s, a) + 1)
        .collect()
}

/// `dL/dw` and `dL/dx` of `sum(conv_composite(x, w) * dy)` by autograd; `x_or_w` is the zero
/// variable whose gradient is wanted (the other operand is given).
fn composite_grad(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_w: bool,
    o: &ConvOpts,
) -> Result<Tensor> {
    let var = Var::zeros(
        if want_w { w.dims() } else { x.dims() },
        dy.dtype(),
        dy.device(),
    )?;
    let (xx, ww) = if want_w {
        (x.clone(), var.as_tensor().clone())
    } else {
        (var.as_tensor().clone(), w.clone())
    };
    let y = conv_composite(&xx, &ww, None, o)?;
    let g = (y * dy)?.sum_all()?.backward()?;
    match g.get(var.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => candle_core::bail!("no gradient reached the zero variable"),
    }
}

/// A convolution geometry for the standalone gradient checks.
struct GradGeom {
    name: &'static str,
    x: Vec<usize>,
    w: Vec<usize>,
    stride: Vec<usize>,
    padding: Vec<usize>,
    dilation: Vec<usize>,
    groups: usize,
}

impl GradGeom {
    fn opts(&self) -> ConvOpts {
        ConvOpts::new()
            .stride(self.stride.clone())
            .padding(self.padding.clone())
            .dilation(self.dilation.clone())
            .groups(self.groups)
    }

    /// Shape of the convolution's output (= of `dy`).
    fn y(&self) -> Vec<usize> {
        let (x, w) = (&self.x, &self.w);
        let mut ys = vec![x[0], w[0]];
        ys.extend(conv_out(
            &x[2..],
            &w[2..],
            &self.stride,
            &self.padding,
            &self.dilation,
        ));
        ys
    }
}

fn weight_grad_check(g: &GradGeom) -> OpCheck {
    let (o, k, wshape) = (g.opts(), g.w[2..].to_vec(), g.w.clone());
    let name = format!("conv_weight_grad {}", g.name);
    OpCheck::new(
        "conv_weight_grad",
        name,
        g.x.clone(),
        vec![g.y()],
        move |x, p, v| match v {
            Variant::Default => conv_weight_grad(x, &p[0], &k, &o),
            Variant::Reference => {
                let w = Tensor::zeros(wshape.as_slice(), x.dtype(), x.device())?;
                composite_grad(x, &w, &p[0], true, &o)
            }
        },
    )
    .without_grads()
    .with_composite()
}

fn input_grad_check(g: &GradGeom) -> OpCheck {
    let (o, xshape) = (g.opts(), g.x.clone());
    let name = format!("conv_input_grad {}", g.name);
    OpCheck::new(
        "conv_input_grad",
        name,
        g.y(),
        vec![g.w.clone()],
        move |dy, p, v| match v {
            Variant::Default => conv_input_grad(dy, &p[0], &xshape[2..], &o),
            Variant::Reference => {
                let x = Tensor::zeros(xshape.as_slice(), dy.dtype(), dy.device())?;
                composite_grad(&x, &p[0], dy, false, &o)
            }
        },
    )
    .without_grads()
    .with_composite()
}

fn conv_grad_checks() -> Vec<OpCheck> {
    let geoms = [
        GradGeom {
            name: "2d k3 s2 p1",
            x: vec![2, 4, 9, 8],
            w: vec![6, 4, 3, 3],
            stride: vec![2],
            padding: vec![1],
            dilation: vec![1],
            groups: 1,
        },
        GradGeom {
            name: "3d k(1,3,3) s(1,2,2) p(0,1,1)",
            x: vec![1, 3, 4, 8, 7],
            w: vec![5, 3, 1, 3, 3],
            stride: vec![1, 2, 2],
            padding: vec![0, 1, 1],
            dilation: vec![1],
            groups: 1,
        },
        GradGeom {
            name: "3d k3 groups 2 dilation 2",
            x: vec![2, 4, 7, 6, 7],
            w: vec![6, 2, 3, 3, 3],
            stride: vec![1],
            padding: vec![2],
            dilation: vec![2],
            groups: 2,
        },
    ];
    geoms
        .iter()
        .flat_map(|g| [weight_grad_check(g), input_grad_check(g)])
        .collect()
}

fn pool_interp_checks() -> Vec<OpCheck> {
    let pool = |name: &str, x: &[usize], o: PoolOpts, max: bool| {
        OpCheck::new("pool", name, x, vec![], move |x, _, _| {
            if max {
                max_pool(x, &o)
            } else {
                avg_pool(x, &o)
            }
        })
    };
    let interp = |name: &str, x: &[usize], size: InterpSize, mode: InterpMode| {
        OpCheck::new("interpolate", name, x, vec![], move |x, _, _| {
            interpolate(x, &size, mode)
        })
    };
    let lin = |align_corners| InterpMode::Linear { align_corners };
    vec![
        pool(
            "max_pool3d k3 s2 p1 ceil_mode",
            &[2, 3, 7, 6, 5],
            PoolOpts::new([3]).stride([2]).padding([1]).ceil_mode(true),
            true,
        ),
        pool(
            "max_pool3d k(1,2,2)",
            &[1, 3, 4, 6, 6],
            PoolOpts::new([1, 2, 2]),
            true,
        ),
        pool("max_pool2d k2", &[2, 3, 8, 6], PoolOpts::new([2]), true),
        pool("avg_pool2d k2", &[2, 3, 8, 6], PoolOpts::new([2]), false),
        pool(
            "avg_pool3d k3 s2 p1 count_include_pad=false",
            &[1, 2, 5, 6, 7],
            PoolOpts::new([3])
                .stride([2])
                .padding([1])
                .count_include_pad(false),
            false,
        ),
        OpCheck::new(
            "pool",
            "adaptive_avg_pool3d to 1",
            [2, 3, 4, 5, 6],
            vec![],
            |x, _, _| adaptive_avg_pool_1(x),
        ),
        interp(
            "trilinear x2",
            &[1, 2, 3, 4, 5],
            InterpSize::Scale(vec![2.0]),
            lin(false),
        ),
        interp(
            "trilinear x(1,2,2)",
            &[1, 2, 3, 4, 4],
            InterpSize::Scale(vec![1.0, 2.0, 2.0]),
            lin(false),
        ),
        interp(
            "bilinear align_corners to 7x9",
            &[1, 2, 5, 6],
            InterpSize::Size(vec![7, 9]),
            lin(true),
        ),
        interp(
            "nearest2d to 7x9",
            &[1, 2, 5, 6],
            InterpSize::Size(vec![7, 9]),
            InterpMode::Nearest,
        ),
        interp(
            "nearest3d x2",
            &[1, 2, 3, 4, 4],
            InterpSize::Scale(vec![2.0]),
            InterpMode::Nearest,
        ),
    ]
}

/// Running statistics `(mean, var > 0)` for a batch norm check from two parameters.
fn bn_state(mean: &Tensor, var: &Tensor) -> Result<BatchNormState> {
    Ok(BatchNormState {
        running_mean: mean.clone(),
        running_var: (var.abs()? + 0.5)?,
        momentum: 0.1,
        eps: 1e-5,
    })
}

fn norm_checks() -> Vec<OpCheck> {
    let n = |name: &str,
             x: &[usize],
             params: usize,
             f: fn(&Tensor, &[Tensor], Variant) -> Result<Tensor>| {
        OpCheck::new("norm", name, x, vec![vec![x[1]]; params], f)
    };
    let fused = |name: &str, x: &[usize], params: usize, slope: f64| {
        OpCheck::new(
            "fused_norm_act",
            name,
            x,
            vec![vec![x[1]]; params],
            move |x, p, v| {
                let a = NormAffine::new(p.first(), p.get(1));
                match v {
                    Variant::Default => instance_norm_leaky_relu(x, a, 1e-5, slope),
                    Variant::Reference => {
                        leaky_relu_composite(&instance_norm_composite(x, a, 1e-5)?, slope)
                    }
                }
            },
        )
    };
    vec![
        n("instance_norm3d affine", &[2, 3, 4, 5, 6], 2, |x, p, v| {
            let a = NormAffine::new(Some(&p[0]), Some(&p[1]));
            match v {
                Variant::Default => instance_norm(x, a, 1e-5),
                Variant::Reference => instance_norm_composite(x, a, 1e-5),
            }
        })
        .with_bf16(),
        n("instance_norm2d", &[2, 4, 6, 5], 0, |x, _, v| match v {
            Variant::Default => instance_norm(x, NormAffine::none(), 1e-5),
            Variant::Reference => instance_norm_composite(x, NormAffine::none(), 1e-5),
        }),
        n(
            "group_norm3d 2 groups affine",
            &[2, 4, 3, 4, 5],
            2,
            |x, p, _| group_norm(x, 2, NormAffine::new(Some(&p[0]), Some(&p[1])), 1e-5),
        )
        .with_bf16(),
        n(
            "layer_norm channels-first 3d affine",
            &[2, 4, 3, 4, 5],
            2,
            |x, p, _| layer_norm_cf(x, NormAffine::new(Some(&p[0]), Some(&p[1])), 1e-6),
        )
        .with_bf16(),
        n(
            "layer_norm (ConvNeXt) 3d affine",
            &[2, 6, 3, 4, 5],
            2,
            |x, p, v| match v {
                Variant::Default => fast::layer_norm_cf(x, &p[0], Some(&p[1]), 1e-6),
                Variant::Reference => {
                    layer_norm_cf(x, NormAffine::new(Some(&p[0]), Some(&p[1])), 1e-6)
                }
            },
        ),
        n(
            "batch_norm3d train affine",
            &[2, 3, 4, 5, 6],
            2,
            |x, p, _| {
                let mut st = BatchNormState::new(x.dim(1)?, DType::F32, x.device())?;
                batch_norm(x, NormAffine::new(Some(&p[0]), Some(&p[1])), &mut st, true)
            },
        )
        .with_bf16(),
        n("batch_norm2d eval affine", &[2, 3, 5, 6], 4, |x, p, _| {
            let mut st = bn_state(&p[2], &p[3])?;
            batch_norm(x, NormAffine::new(Some(&p[0]), Some(&p[1])), &mut st, false)
        }),
        fused(
            "instance_norm3d + leaky_relu 0.01 affine",
            &[2, 3, 4, 5, 6],
            2,
            0.01,
        )
        .with_bf16(),
        fused("instance_norm2d + relu", &[2, 4, 6, 5], 0, 0.0),
    ]
}

/// RUNext's dynamic convolution with `k` kernels `(cout, cin, *kernel)` and the attention's
/// linear layer as parameters (`convs.{k}.weight`, `fc.weight`, `fc.bias`).
fn dynamic_conv_check(name: &str, x: &[usize], cout: usize, kernel: &[usize], k: usize) -> OpCheck {
    let cin = x[1];
    let mut w = vec![cout, cin];
    w.extend(kernel);
    let mut params = vec![w; k];
    params.push(vec![k, cin]);
    params.push(vec![k]);
    let kernel = kernel.to_vec();
    OpCheck::new("dynamic_conv", name, x, params, move |x, p, v| {
        let mut ts = HashMap::new();
        for (i, t) in p[..k].iter().enumerate() {
            ts.insert(format!("convs.{i}.weight"), t.clone());
        }
        ts.insert("fc.weight".to_string(), p[k].clone());
        ts.insert("fc.bias".to_string(), p[k + 1].clone());
        let vb = VarBuilder::from_tensors(ts, x.dtype(), x.device());
        let opts = BlockOptions {
            norm: None,
            nonlin: None,
        };
        let dc = DynamicConv::new(cin, cout, &kernel, k, &opts, vb)?;
        match v {
            Variant::Default => dc.dynamic_conv(x),
            Variant::Reference => dc.dynamic_conv_separate(x),
        }
    })
    .with_composite()
}

fn block_checks() -> Vec<OpCheck> {
    let grn_check = |name: &str, x: &[usize]| {
        OpCheck::new("grn", name, x, vec![vec![x[1]]; 2], |x, p, _| {
            grn(x, &p[0], &p[1], 1e-6)
        })
    };
    let shuffle = |name: &str, x: &[usize], f: fn(&Tensor) -> Result<Tensor>| {
        OpCheck::new("pixel_shuffle", name, x, vec![], move |x, _, _| f(x))
    };
    vec![
        grn_check("grn3d", &[2, 4, 3, 4, 5]).with_bf16(),
        grn_check("grn2d", &[2, 4, 6, 5]),
        dynamic_conv_check("dynamic_conv2d K=3 k3", &[2, 3, 6, 5], 4, &[3, 3], 3),
        dynamic_conv_check(
            "dynamic_conv3d K=2 k(1,3,3)",
            &[2, 2, 3, 4, 5],
            3,
            &[1, 3, 3],
            2,
        ),
        shuffle("pixel_shuffle2d r2", &[2, 8, 3, 4], |x| pixel_shuffle(x, 2)),
        shuffle("pixel_unshuffle3d r2", &[1, 2, 4, 4, 6], |x| {
            pixel_unshuffle(x, 2)
        }),
        shuffle("voxel shuffle (1,2,2)", &[1, 8, 2, 3, 3], |x| {
            pixel_shuffle_axes(x, &[1, 2, 2])
        }),
    ]
}

fn activation_checks() -> Vec<OpCheck> {
    let act = |name: &str, x: &[usize], f: fn(&Tensor, Variant) -> Result<Tensor>| {
        OpCheck::new("activation", name, x, vec![], move |x, _, v| f(x, v))
    };
    vec![
        act("leaky_relu 0.01", &[2, 3, 4, 5], |x, v| match v {
            Variant::Default => leaky_relu(x, 0.01),
            Variant::Reference => leaky_relu_composite(x, 0.01),
        }),
        act("gelu (erf)", &[2, 3, 4, 5], |x, _| gelu(x, GeluKind::Erf)),
        act("gelu (tanh)", &[2, 3, 4, 5], |x, _| gelu(x, GeluKind::Tanh)),
        act("softmax over channels 3d", &[2, 3, 3, 4, 5], |x, _| {
            softmax_channels(x)
        }),
        act("log_softmax over channels 2d", &[2, 4, 5, 6], |x, _| {
            log_softmax_channels(x)
        }),
        act("sigmoid", &[2, 3, 4, 5], |x, _| candle_nn::ops::sigmoid(x)),
    ]
}
