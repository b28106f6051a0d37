use super::*;

fn cpu() -> OpCheckOptions {
    OpCheckOptions::new(&Device::Cpu)
}

#[test]
fn every_op_check_passes_on_cpu() {
    let checks = op_checks();
    let results = run_op_checks(&checks, &cpu());
    let bf16 = checks.iter().filter(|c| c.bf16).count();
    assert_eq!(results.len(), checks.len() + bf16);
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{r:?}"))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    for r in &results {
        let err = r.max_rel_err.unwrap_or(f64::INFINITY);
        assert!(err <= r.tolerance, "{r:?}");
        // f32 against f64 is far inside the stated tolerance
        if r.dtype == "f32" {
            assert!(err < 1e-5, "{r:?}");
        }
    }
    for fam in [
        "conv",
        "conv_transpose",
        "conv_weight_grad",
        "conv_input_grad",
        "pool",
        "interpolate",
        "norm",
        "fused_norm_act",
        "grn",
        "dynamic_conv",
        "pixel_shuffle",
        "activation",
    ] {
        assert!(results.iter().any(|r| r.family == fam), "no {fam} check");
    }
}

/// A check whose default path is `wrong(x)` and whose reference is the identity.
fn faulty(name: &str, wrong: fn(&Tensor) -> candle_core::Result<Tensor>) -> OpCheck {
    OpCheck::new("test", name, [2, 3, 4, 5], vec![], move |x, _, v| match v {
        Variant::Default => wrong(x),
        Variant::Reference => Ok(x.clone()),
    })
}

#[test]
fn a_wrong_op_fails_and_says_why() {
    let checks = [
        faulty("shifted output", |x| x + 0.01),
        // right value, gradient 3 instead of 1
        faulty("wrong gradient", |x| {
            let d = x.detach();
            (&d + ((x - &d)? * 3.0)?)? + 0.0
        }),
        faulty("no gradient", |x| Ok(x.detach())),
        faulty("op error", |_| candle_core::bail!("kernel missing")),
        faulty("op panic", |_| panic!("index out of bounds")),
        faulty("wrong dtype", |x| x.to_dtype(DType::F16)),
        faulty("wrong shape", |x| x.narrow(3, 0, 4)),
        faulty("nan", |x| x * f64::NAN),
        faulty("exact", |x| Ok(x.clone())),
    ];
    let r = run_op_checks(&checks, &cpu());
    assert_eq!(r.len(), checks.len());
    let err = |i: usize| r[i].max_rel_err.unwrap_or(-1.0);
    // 0.01 / max|x|, max|x| just below 1
    assert!(
        !r[0].passed && err(0) > 0.01 && err(0) < 0.011,
        "{:?}",
        r[0]
    );
    assert_eq!(r[0].worst.as_deref(), Some("output"));
    assert!(!r[1].passed && (err(1) - 2.0).abs() < 1e-6, "{:?}", r[1]);
    assert_eq!(r[1].worst.as_deref(), Some("grad input"));
    let text = |i: usize| r[i].error.clone().unwrap_or_default();
    assert!(
        text(2).contains("no gradient reached the input"),
        "{:?}",
        r[2]
    );
    assert!(text(3).contains("kernel missing"), "{:?}", r[3]);
    assert!(
        text(4).contains("panicked: index out of bounds"),
        "{:?}",
        r[4]
    );
    assert!(text(5).contains("output dtype f16"), "{:?}", r[5]);
    assert!(text(6).contains("differs from the reference"), "{:?}", r[6]);
    assert!(!r[7].passed && err(7).is_infinite(), "{:?}", r[7]);
    assert!(r[8].passed && err(8) == 0.0, "{:?}", r[8]);
    for x in &r[..8] {
        assert!(!x.passed, "{x:?}");
    }
}

#[test]
fn options_select_families_dtypes_and_tolerances() {
    let checks = op_checks();
    let o = cpu().families(&["grn", "pixel_shuffle"]);
    let r = run_op_checks(&checks, &o);
    assert!(!r.is_empty());
    assert!(r
        .iter()
        .all(|x| x.family == "grn" || x.family == "pixel_shuffle"));
    assert!(r.iter().any(|x| x.dtype == "bf16" && x.tolerance == 3e-2));
    let r = run_op_checks(&checks, &OpCheckOptions { bf16: false, ..o });
    assert!(r.iter().all(|x| x.dtype == "f32" && x.tolerance == 1e-4));
    assert!(r.iter().all(|x| x.path == "default"));
    assert_eq!(Tolerances::for_device(&Device::Cpu), Tolerances::CPU);
    assert!(cudnn_info(&Device::Cpu).is_none());
}

#[test]
fn rel_err_is_normwise() {
    let t = |v: &[f64]| Tensor::new(v, &Device::Cpu).unwrap();
    assert_eq!(rel_err(&t(&[1.0, 2.0]), &t(&[1.0, 2.0])).unwrap(), 0.0);
    let e = rel_err(&t(&[1.1, 4.0]), &t(&[1.0, 4.0])).unwrap();
    assert!((e - 0.025).abs() < 1e-12);
    assert_eq!(rel_err(&t(&[1e-40]), &t(&[0.0])).unwrap(), 1e-40);
    assert!(rel_err(&t(&[f64::INFINITY]), &t(&[1.0]))
        .unwrap()
        .is_infinite());
    assert!(rel_err(&t(&[1.0]), &t(&[1.0, 2.0])).is_err());
}
