use super::system::{cuda_version, curand_version, library_version, parse_maps};
use super::*;
use architectures::doctor::OpCheckOptions;

#[test]
fn loss_checks_pass_on_cpu() {
    let r = run_op_checks(&loss_checks(), &OpCheckOptions::new(&Device::Cpu));
    assert_eq!(r.len(), loss_checks().len());
    for o in &r {
        assert!(o.passed, "{o:?}");
        assert!(o.max_rel_err.is_some_and(|e| e < 1e-6), "{o:?}");
    }
}

#[test]
fn a_network_runs_forward_and_backward_and_a_broken_one_fails_cleanly() {
    let cases = network_cases();
    // nnU-Net's two networks and every preset, in 2D and 3D
    let presets = architectures::registry::Registry::default().presets().len();
    assert!(presets >= 17, "{presets}");
    assert_eq!(cases.len(), 2 * (2 + presets));
    assert!(cases
        .iter()
        .any(|c| c.name == "kiunet_minimal" && c.dims == 3));
    let case = cases
        .iter()
        .find(|c| c.name == "PlainConvUNet" && c.dims == 2)
        .unwrap();
    let r = run_network(case, &Device::Cpu, 1);
    assert!(r.passed, "{r:?}");
    // the lowest deep-supervision head has loss weight 0 (nnU-Net's weights): its conv
    // weight and bias get no gradient
    assert_eq!(
        (r.dtype.as_str(), r.batch_size, r.params_without_grad),
        ("f32", 2, 2)
    );
    assert!(r.params > 0 && r.loss.is_some_and(f64::is_finite));
    let mut broken = case.clone();
    broken
        .kwargs
        .insert("strides".into(), serde_json::json!("no"));
    let r = run_network(&broken, &Device::Cpu, 1);
    assert!(!r.passed);
    assert!(
        r.error.as_deref().is_some_and(|e| e.contains("strides")),
        "{r:?}"
    );
}

#[test]
fn report_exit_codes_and_json_contract() {
    let opts = DoctorOptions {
        ops: false,
        networks: false,
        ..DoctorOptions::default()
    };
    let mut r = run_doctor(&Device::Cpu, &opts);
    assert!(r.passed && r.error.is_none());
    assert_eq!(r.exit_code(), 0);
    assert_eq!(
        (r.device.name.as_str(), r.device.kind.as_str()),
        ("cpu", "cpu")
    );
    r.passed = false;
    assert_eq!(r.exit_code(), 1);
    let u = DoctorReport::unavailable("cuda:1", "no GPU 1");
    assert_eq!(u.exit_code(), 2);
    let v = serde_json::to_value(&u).unwrap();
    assert_eq!(v["passed"], false);
    assert_eq!(v["error"], "no GPU 1");
    assert_eq!(v["device"]["kind"], "cuda");
    assert_eq!(v["device"]["available"], false);
    for k in ["build", "ops", "networks", "summary"] {
        assert!(v.get(k).is_some(), "{k}");
    }
    assert!(render_text(&u).contains("error: no GPU 1"));
}

#[test]
fn text_report_lists_failures() {
    let mut r = run_doctor(
        &Device::Cpu,
        &DoctorOptions {
            networks: false,
            ..DoctorOptions::default()
        },
    );
    assert!(r.passed, "{}", render_text(&r));
    assert!(r.ops.len() > 60, "{}", r.ops.len());
    for fam in [
        "conv",
        "conv_transpose",
        "conv_weight_grad",
        "norm",
        "loss",
        "dynamic_conv",
    ] {
        assert!(r.ops.iter().any(|o| o.family == fam), "{fam}");
    }
    assert!(r.ops.iter().any(|o| o.dtype == "bf16"));
    r.ops[0].passed = false;
    r.ops[0].error = Some("boom".into());
    let text = render_text(&r);
    assert!(text.contains("FAIL  (boom)"), "{text}");
    assert!(text.contains("PASS"));
}

#[test]
fn proc_maps_and_versions() {
    let maps = "\
7f00-7f01 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06
7f01-7f02 r-xp 00001000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06
7f02-7f03 r--p 00000000 08:01 2 /opt/nvidia/cu13/lib/libcublasLt.so.13
7f03-7f04 r--p 00000000 08:01 3 /opt/nvidia/cu13/lib/libcublas.so.13
7f04-7f05 r--p 00000000 08:01 4 /usr/lib/libc.so.6
7f05-7f06 rw-p 00000000 00:00 0
7f06-7f07 r--p 00000000 08:01 5 /opt/cudnn/lib/libcudnn_cnn.so.9";
    let libs = parse_maps(maps);
    let names: Vec<&str> = libs.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "libcuda.so.580.65.06",
            "libcublasLt.so.13",
            "libcublas.so.13",
            "libcudnn_cnn.so.9"
        ]
    );
    assert_eq!(libs[2].path, "/opt/nvidia/cu13/lib/libcublas.so.13");
    assert_eq!(cuda_version(13000), "13.0");
    assert_eq!(cuda_version(12080), "12.8");
    assert_eq!(library_version(130102), "13.1.2");
    assert_eq!(curand_version(10400), "10.4.0");
}

#[test]
fn convunext_cases_start_small() {
    let cases = network_cases();
    let c = cases
        .iter()
        .find(|c| c.name == "convunext_xlarge" && c.dims == 3)
        .unwrap();
    assert_eq!(c.kwargs["variant"], "xlarge");
    assert_eq!(c.kwargs["initial_filters"], 8);
    assert_eq!(c.patch, [16, 32, 32]);
}
