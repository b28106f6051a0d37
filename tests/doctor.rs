//! End-to-end: `nnseg doctor` passes on the CPU (exit 0, one JSON object with `"passed": true`)
//! and, on a build without CUDA, a CUDA request fails cleanly (exit 2, a one-line error naming
//! what is missing, no panic).

mod common;
use common::Env;
use serde_json::Value;

#[test]
fn doctor_passes_on_cpu() {
    let env = Env::new();
    let out = env.nnseg(&["doctor", "--device", "cpu", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["passed"], true, "{v}");
    assert_eq!(v["device"]["kind"], "cpu");
    assert!(v["build"]["version"].is_string());
    let ops = v["ops"].as_array().unwrap();
    assert!(ops.len() > 60, "{}", ops.len());
    for o in ops {
        for k in [
            "name",
            "family",
            "dtype",
            "max_rel_err",
            "tolerance",
            "passed",
            "error",
        ] {
            assert!(o.get(k).is_some(), "op without {k}: {o}");
        }
        assert_eq!(o["passed"], true, "{o}");
    }
    let nets = v["networks"].as_array().unwrap();
    assert!(nets.len() >= 38, "{}", nets.len());
    for n in nets {
        for k in ["name", "dims", "patch", "passed", "seconds", "error"] {
            assert!(n.get(k).is_some(), "network without {k}: {n}");
        }
        assert_eq!(n["passed"], true, "{n}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = env.nnseg(&["doctor", "--no_networks"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("max rel err") && text.contains("PASS"),
        "{text}"
    );
    assert!(
        text.contains("0 of 0 networks") && text.contains("PASSED"),
        "{text}"
    );
}

#[test]
fn doctor_without_cuda_support_fails_cleanly() {
    if cfg!(feature = "cuda") {
        return; // a CUDA build: whether a GPU is present decides
    }
    let env = Env::new();
    let out = env.nnseg(&["doctor", "--device", "cuda"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: device cuda unavailable")
            && stderr.contains("no CUDA support")
            && stderr.contains("build_cuda.sh"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = env.nnseg(&["doctor", "--device", "cuda:1", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON even when unavailable");
    assert_eq!(v["passed"], false);
    assert!(v["error"].as_str().unwrap().contains("cuda:1"), "{v}");
    assert_eq!(v["device"]["available"], false);
    assert_eq!(v["ops"].as_array().map(Vec::len), Some(0));
}
