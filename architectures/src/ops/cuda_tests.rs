//! CUDA-only tests (`cargo test -p architectures --features cuda`, or `--features cudnn` for the
//! cuDNN convolutions, on a machine with an NVIDIA GPU and driver; build environment from
//! `scripts/build_cuda.sh --env`): every op on a CUDA tensor must match the CPU kernels in the
//! forward pass and in the gradients of the input and of the parameters (f32, random data, loss
//! `sum(y * r)`). With `cudnn` the convolution tests run the cuDNN path (and fail if cuDNN did not
//! initialise); `cuda_conv_composite_matches_cpu` keeps the composite path covered either way.

use super::*;
use candle_core::{DType, Device, Tensor, Var};

fn gpu() -> Device {
    match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => panic!("these tests need CUDA device 0 (built with --features cuda): {e}"),
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // host-side deterministic data so CPU and GPU see identical values
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("host tensor")
}

/// f32 tolerance: TF32 is off by default in Candle and in our cuDNN path (`CUDNN_FMA_MATH`), so
/// only f32 reassociation error is allowed.
const F32_TOL: (f32, f32) = (1e-3, 1e-4);
/// bf16 storage (inputs rounded to bf16 on both sides, f32 accumulation, bf16 outputs).
const BF16_TOL: (f32, f32) = (1.5e-2, 1.5e-2);

fn close(got: &Tensor, want: &Tensor, what: &str) {
    close_tol(got, want, what, F32_TOL)
}

/// `|got - want| <= rel * |want| + abs * max|want|` elementwise.
fn close_tol(got: &Tensor, want: &Tensor, what: &str, (rel, abs): (f32, f32)) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let g: Vec<f32> = got
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("to host");
    let w: Vec<f32> = want.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
    let maxref = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let tol = rel * b.abs() + abs * maxref;
        assert!(
            (a - b).abs() <= tol && a.is_finite(),
            "{what}[{i}]: cuda {a} vs cpu {b} (tol {tol})"
        );
    }
}

type Op = dyn Fn(&Tensor, &[Tensor]) -> candle_core::Result<Tensor>;

/// Runs `f` on CPU and CUDA with the same inputs; compares output and all gradients.
fn check(name: &str, x_shape: &[usize], params: &[Vec<usize>], f: &Op) {
    check_dtype(name, x_shape, params, f, DType::F32, F32_TOL)
}

/// [`check`] with the CUDA side in `dtype`; the CPU reference runs in f32 on the same values
/// (rounded to `dtype` first).
fn check_dtype(
    name: &str,
    x_shape: &[usize],
    params: &[Vec<usize>],
    f: &Op,
    dtype: DType,
    tol: (f32, f32),
) {
    let dev = gpu();
    let round = |t: Tensor| {
        t.to_dtype(dtype)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("round")
    };
    let x = round(randn(x_shape, 1));
    let ps: Vec<Tensor> = params
        .iter()
        .enumerate()
        .map(|(i, s)| round((randn(s, 10 + i as u64) * 0.3).expect("scale")))
        .collect();
    let run = |d: &Device, dt: DType| {
        let on = |t: &Tensor| t.to_dtype(dt).and_then(|t| t.to_device(d)).expect("to dev");
        let xv = Var::from_tensor(&on(&x)).expect("var");
        let pv: Vec<Var> = ps
            .iter()
            .map(|p| Var::from_tensor(&on(p)).expect("var"))
            .collect();
        let pt: Vec<Tensor> = pv.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(xv.as_tensor(), &pt).unwrap_or_else(|e| panic!("{name} on {d:?}: {e}"));
        assert_eq!(y.dtype(), dt, "{name}: output dtype on {d:?}");
        let r = on(&round(randn(y.dims(), 99)));
        let g = (&y * &r)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .unwrap_or_else(|e| panic!("{name} backward on {d:?}: {e}"));
        let mut grads = vec![g.get(xv.as_tensor()).expect("dx").clone()];
        for v in &pv {
            grads.push(g.get(v.as_tensor()).expect("dparam").clone());
        }
        (y, grads)
    };
    let (yc, gc) = run(&Device::Cpu, DType::F32);
    let (yg, gg) = run(&dev, dtype);
    assert!(yg.device().is_cuda(), "{name}: output left the GPU");
    close_tol(&yg, &yc, &format!("{name} forward"), tol);
    for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
        close_tol(a, b, &format!("{name} grad {i}"), tol);
    }
}

/// With the `cudnn` feature the convolution tests must exercise cuDNN, not the fallback.
fn expect_cudnn(dev: &Device) {
    #[cfg(feature = "cudnn")]
    if let Err(e) = cudnn_available(dev) {
        panic!("built with --features cudnn but cuDNN is not usable: {e}");
    }
    let _ = dev;
}

#[test]
fn cuda_conv_matches_cpu() {
    expect_cudnn(&gpu());
    check(
        "conv2d k3 p1",
        &[2, 4, 9, 8],
        &[vec![5, 4, 3, 3], vec![5]],
        &|x, p| conv(x, &p[0], Some(&p[1]), &ConvOpts::new().padding([1])),
    );
    check(
        "conv2d k3 p1 s2",
        &[2, 4, 8, 8],
        &[vec![6, 4, 3, 3]],
        &|x, p| conv(x, &p[0], None, &ConvOpts::new().padding([1]).stride([2])),
    );
    check(
        "conv3d k3 p1",
        &[2, 3, 6, 7, 8],
        &[vec![4, 3, 3, 3, 3]],
        &|x, p| conv(x, &p[0], None, &ConvOpts::new().padding([1])),
    );
    check(
        "conv3d k(1,3,3) s(1,2,2) aniso",
        &[1, 3, 4, 8, 8],
        &[vec![4, 3, 1, 3, 3], vec![4]],
        &|x, p| {
            conv(
                x,
                &p[0],
                Some(&p[1]),
                &ConvOpts::new().padding([0, 1, 1]).stride([1, 2, 2]),
            )
        },
    );
    check(
        "conv3d groups 2 dil 2",
        &[1, 4, 7, 7, 7],
        &[vec![4, 2, 3, 3, 3]],
        &|x, p| {
            conv(
                x,
                &p[0],
                None,
                &ConvOpts::new().padding([2]).dilation([2]).groups(2),
            )
        },
    );
    check(
        "conv1d k3 s2 p1 bias",
        &[2, 3, 11],
        &[vec![4, 3, 3], vec![4]],
        &|x, p| {
            conv(
                x,
                &p[0],
                Some(&p[1]),
                &ConvOpts::new().padding([1]).stride([2]),
            )
        },
    );
    check(
        "conv2d depthwise groups 4 s(2,1)",
        &[2, 4, 9, 7],
        &[vec![8, 1, 3, 3], vec![8]],
        &|x, p| {
            conv(
                x,
                &p[0],
                Some(&p[1]),
                &ConvOpts::new().padding([1]).stride([2, 1]).groups(4),
            )
        },
    );
    check(
        "conv3d k3 s(1,2,2) p1 groups 2 bias",
        &[2, 4, 5, 8, 7],
        &[vec![6, 2, 3, 3, 3], vec![6]],
        &|x, p| {
            conv(
                x,
                &p[0],
                Some(&p[1]),
                &ConvOpts::new().padding([1]).stride([1, 2, 2]).groups(2),
            )
        },
    );
    check(
        "conv3d k(1,3,3) p(0,1,1) 1x1x1 follow-up",
        &[1, 3, 3, 6, 6],
        &[vec![5, 3, 1, 3, 3], vec![2, 5, 1, 1, 1]],
        &|x, p| {
            let h = conv(x, &p[0], None, &ConvOpts::new().padding([0, 1, 1]))?;
            conv(&h, &p[1], None, &ConvOpts::new())
        },
    );
}

#[test]
fn cuda_conv_grads_standalone_match_cpu() {
    let dev = gpu();
    expect_cudnn(&dev);
    let cases: [(&str, Vec<usize>, Vec<usize>, ConvOpts); 3] = [
        (
            "2d k3 s2 p1",
            vec![2, 4, 9, 8],
            vec![6, 4, 3, 3],
            ConvOpts::new().padding([1]).stride([2]),
        ),
        (
            "3d k(1,3,3) s(1,2,2) p(0,1,1)",
            vec![1, 3, 4, 8, 7],
            vec![5, 3, 1, 3, 3],
            ConvOpts::new().padding([0, 1, 1]).stride([1, 2, 2]),
        ),
        (
            "3d k3 groups 2 dil 2",
            vec![2, 4, 7, 6, 7],
            vec![6, 2, 3, 3, 3],
            ConvOpts::new().padding([2]).dilation([2]).groups(2),
        ),
    ];
    for (name, xs, ws, o) in cases {
        let x = randn(&xs, 1);
        let w = (randn(&ws, 2) * 0.3).expect("w");
        let y = conv(&x, &w, None, &o).expect("cpu conv");
        let dy = randn(y.dims(), 3);
        let on = |t: &Tensor| t.to_device(&dev).expect("to dev");
        let dw_c = conv_weight_grad(&x, &dy, &ws[2..], &o).expect("cpu dw");
        let dw_g = conv_weight_grad(&on(&x), &on(&dy), &ws[2..], &o).expect("cuda dw");
        close(&dw_g, &dw_c, &format!("{name} conv_weight_grad"));
        let dx_c = conv_input_grad(&dy, &w, &xs[2..], &o).expect("cpu dx");
        let dx_g = conv_input_grad(&on(&dy), &on(&w), &xs[2..], &o).expect("cuda dx");
        close(&dx_g, &dx_c, &format!("{name} conv_input_grad"));
        assert!(dw_g.device().is_cuda() && dx_g.device().is_cuda());
    }
}

#[test]
fn cuda_conv_bf16_matches_cpu() {
    expect_cudnn(&gpu());
    check_dtype(
        "bf16 conv3d k3 p1 bias",
        &[2, 4, 5, 6, 6],
        &[vec![6, 4, 3, 3, 3], vec![6]],
        &|x, p| conv(x, &p[0], Some(&p[1]), &ConvOpts::new().padding([1])),
        DType::BF16,
        BF16_TOL,
    );
    check_dtype(
        "bf16 convT3d k(1,2,2) s(1,2,2)",
        &[1, 4, 3, 4, 4],
        &[vec![4, 3, 1, 2, 2]],
        &|x, p| conv_transpose(x, &p[0], None, &ConvTransposeOpts::new().stride([1, 2, 2])),
        DType::BF16,
        BF16_TOL,
    );
}

/// The Candle-op composites on CUDA (the path without cuDNN) against the CPU kernels.
#[test]
fn cuda_conv_composite_matches_cpu() {
    check(
        "composite conv3d k(1,3,3) s(1,2,2) bias",
        &[1, 3, 4, 8, 8],
        &[vec![4, 3, 1, 3, 3], vec![4]],
        &|x, p| {
            if x.device().is_cpu() {
                conv(
                    x,
                    &p[0],
                    Some(&p[1]),
                    &ConvOpts::new().padding([0, 1, 1]).stride([1, 2, 2]),
                )
            } else {
                conv_composite(
                    x,
                    &p[0],
                    Some(&p[1]),
                    &ConvOpts::new().padding([0, 1, 1]).stride([1, 2, 2]),
                )
            }
        },
    );
    check(
        "composite convT3d k2 s2",
        &[2, 4, 3, 4, 5],
        &[vec![4, 3, 2, 2, 2]],
        &|x, p| {
            let o = ConvTransposeOpts::new().stride([2]);
            if x.device().is_cpu() {
                conv_transpose(x, &p[0], None, &o)
            } else {
                conv_transpose_composite(x, &p[0], None, &o)
            }
        },
    );
}

#[test]
fn cuda_conv_transpose_matches_cpu() {
    expect_cudnn(&gpu());
    check(
        "convT3d k2 s2",
        &[2, 4, 3, 4, 5],
        &[vec![4, 3, 2, 2, 2], vec![3]],
        &|x, p| conv_transpose(x, &p[0], Some(&p[1]), &ConvTransposeOpts::new().stride([2])),
    );
    check(
        "convT3d k(1,2,2)",
        &[1, 4, 3, 4, 4],
        &[vec![4, 2, 1, 2, 2]],
        &|x, p| conv_transpose(x, &p[0], None, &ConvTransposeOpts::new().stride([1, 2, 2])),
    );
    check(
        "convT2d k3 s2 p1 op1",
        &[2, 3, 5, 6],
        &[vec![3, 4, 3, 3]],
        &|x, p| {
            conv_transpose(
                x,
                &p[0],
                None,
                &ConvTransposeOpts::new()
                    .stride([2])
                    .padding([1])
                    .output_padding([1]),
            )
        },
    );
    check(
        "convT2d k=s=2 groups 2 bias",
        &[2, 4, 5, 6],
        &[vec![4, 3, 2, 2], vec![6]],
        &|x, p| {
            conv_transpose(
                x,
                &p[0],
                Some(&p[1]),
                &ConvTransposeOpts::new().stride([2]).groups(2),
            )
        },
    );
    check("convT1d k4 s2 p1", &[2, 3, 7], &[vec![3, 2, 4]], &|x, p| {
        conv_transpose(
            x,
            &p[0],
            None,
            &ConvTransposeOpts::new().stride([2]).padding([1]),
        )
    });
}

#[test]
fn cuda_pool_interp_norm_act_match_cpu() {
    check(
        "max_pool3d k3 s2 p1 ceil",
        &[2, 3, 7, 6, 5],
        &[],
        &|x, _| {
            max_pool(
                x,
                &PoolOpts::new([3]).stride([2]).padding([1]).ceil_mode(true),
            )
        },
    );
    check("avg_pool2d k2", &[2, 3, 8, 6], &[], &|x, _| {
        avg_pool(x, &PoolOpts::new([2]))
    });
    check("trilinear x2", &[1, 2, 3, 4, 5], &[], &|x, _| {
        interpolate(
            x,
            &InterpSize::Scale(vec![2.0]),
            InterpMode::Linear {
                align_corners: false,
            },
        )
    });
    check("nearest to size", &[1, 2, 5, 6], &[], &|x, _| {
        interpolate(x, &InterpSize::Size(vec![7, 9]), InterpMode::Nearest)
    });
    check(
        "instance_norm 3d affine",
        &[2, 3, 4, 5, 6],
        &[vec![3], vec![3]],
        &|x, p| instance_norm(x, NormAffine::new(Some(&p[0]), Some(&p[1])), 1e-5),
    );
    check(
        "instance_norm_leaky_relu 3d affine",
        &[2, 3, 4, 5, 6],
        &[vec![3], vec![3]],
        &|x, p| {
            let affine = NormAffine::new(Some(&p[0]), Some(&p[1]));
            instance_norm_leaky_relu(x, affine, 1e-5, 0.01)
        },
    );
    check("leaky_relu", &[2, 3, 4, 5], &[], &|x, _| {
        leaky_relu(x, 0.01)
    });
    check("softmax_channels", &[2, 3, 4, 5], &[], &|x, _| {
        softmax_channels(x)
    });
}

#[test]
fn cuda_ops_keep_dtype_and_device() {
    let dev = gpu();
    let x = Tensor::zeros((1, 2, 4, 4, 4), DType::F32, &dev).expect("zeros");
    let w = Tensor::zeros((3, 2, 3, 3, 3), DType::F32, &dev).expect("zeros");
    let y = conv(&x, &w, None, &ConvOpts::new().padding([1])).expect("conv");
    assert!(y.device().is_cuda());
    assert_eq!(y.dims(), &[1, 3, 4, 4, 4]);
    assert_eq!(y.dtype(), DType::F32);
}
