//! Cross-check against nnU-Net 2.8.1's own planner code on 60 random fingerprints.
//!
//! `tests/data/crosscheck_nnunet281.json` was produced by running nnU-Net 2.8.1's
//! `ExperimentPlanner` / `nnUNetPlannerResEnc{M,L,XL}` classes unmodified, with torch and
//! dynamic-network-architectures replaced by stubs whose network estimate is a transcription of
//! dna 0.4.4's `compute_conv_feature_map_size` (verified separately against dna's own numbers
//! in `architectures::memory`). The cases cover anisotropic axes in every position (non-trivial
//! transposes), jittered spacings/shapes, 2D datasets (spacing 999), 1-3 channels with
//! different normalizations, the mask rule, custom GPU targets and numTraining != case count.

use planner::{plan_experiment_json, PlannerKind, PlannerOptions};
use plans::{DatasetJson, Fingerprint};
use serde_json::Value;

fn diff(got: &Value, want: &Value, path: &str, out: &mut Vec<String>) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let gk: Vec<&String> = g.keys().collect();
            let wk: Vec<&String> = w.keys().collect();
            if gk != wk {
                out.push(format!("{path}: keys {gk:?} != {wk:?}"));
                return;
            }
            for (k, wv) in w {
                diff(&g[k], wv, &format!("{path}.{k}"), out);
            }
        }
        (Value::Array(g), Value::Array(w)) if g.len() == w.len() => {
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                diff(gv, wv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {
            if got != want {
                out.push(format!("{path}: got {got}, want {want}"));
            }
        }
    }
}

#[test]
fn random_fingerprints_match_nnunet_planner() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/crosscheck_nnunet281.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 50);
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let kind = PlannerKind::from_name(case["planner"].as_str().unwrap()).unwrap();
        let opts = PlannerOptions {
            kind,
            gpu_memory_target_gb: case["gpu"].as_f64(),
            ..Default::default()
        };
        let dj = DatasetJson::from_value(&case["dataset_json"], "dataset.json").unwrap();
        let fp = Fingerprint::from_value(&case["fingerprint"], "fingerprint").unwrap();
        let got = plan_experiment_json(name, &dj, &fp, &opts).unwrap();
        let mut d = Vec::new();
        diff(&got, &case["expected"], name, &mut d);
        failures.extend(d.into_iter().take(5));
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
