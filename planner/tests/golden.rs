//! Golden tests: planning must reproduce plans files written by nnU-Net 2.8.1
//! (the workspace's `tests/fixtures/nnunet_examples`).

use std::path::PathBuf;

use planner::{plan_experiment, plan_experiment_json, PlannerKind, PlannerOptions};
use plans::{DatasetJson, Fingerprint};
use serde_json::{json, Value};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/nnunet_examples")
        .join(name)
}

fn read(name: &str) -> Value {
    let p = data(name);
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn dataset_json(num_training: usize) -> DatasetJson {
    let v = json!({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": num_training,
        "file_ending": ".nii.gz"
    });
    DatasetJson::from_value(&v, "dataset.json").unwrap()
}

/// Compare two JSON trees exactly (ints vs floats included), reporting the first difference.
fn assert_json_eq(got: &Value, want: &Value, path: &str) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let gk: Vec<&String> = g.keys().collect();
            let wk: Vec<&String> = w.keys().collect();
            assert_eq!(gk, wk, "{path}: keys (and their order) differ");
            for (k, wv) in w {
                assert_json_eq(&g[k], wv, &format!("{path}.{k}"));
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(
                g.len(),
                w.len(),
                "{path}: length differs: got {got}, want {want}"
            );
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                assert_json_eq(gv, wv, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(got, want, "{path}: got {got}, want {want}"),
    }
}

#[test]
fn dataset501_reproduces_nnunet_plans() {
    let fp = Fingerprint::from_value(&read("example_dataset_fingerprint_Dataset501.json"), "fp")
        .unwrap();
    let want = read("example_nnUNetPlans_Dataset501.json");
    let got = plan_experiment_json(
        "Dataset501_Synth3D",
        &dataset_json(12),
        &fp,
        &PlannerOptions::default(),
    )
    .unwrap();
    assert_json_eq(&got, &want, "plans");

    // the typed path works too and resolves every configuration
    let plans = plan_experiment(
        "Dataset501_Synth3D",
        &dataset_json(12),
        &fp,
        &PlannerOptions::default(),
    )
    .unwrap();
    assert_eq!(
        plans.configuration_names(),
        vec!["2d".to_string(), "3d_fullres".to_string()]
    );
    let c = plans.configuration("3d_fullres").unwrap();
    assert_eq!(c.patch_size, vec![32, 112, 96]);
    assert!(!c.batch_dice);
}

/// A fingerprint whose per-axis medians reproduce the fake LiTS-like dataset of
/// nnunet-v2.md §3.6: 131 cases, median spacing 1.0 x 0.751 x 0.751, median shape
/// 290 x 457 x 459 and, after resampling to the target spacing, median 340 x 447 x 458
/// (the values in the plans file). Each axis is built from five groups of cases so that the
/// median case differs between spacing, raw shape and resampled shape.
fn fake_liver_fingerprint() -> Fingerprint {
    let t = 0.7510548372420769;
    // (target spacing, raw median, resampled median)
    let axes = [(1.0, 290usize, 340usize), (t, 457, 447), (t, 459, 458)];
    let n = 131;
    let mut spacings = vec![vec![0.0; 3]; n];
    let mut shapes = vec![vec![0usize; 3]; n];
    for (a, &(t, n_med, m)) in axes.iter().enumerate() {
        for i in 0..n {
            let (s, sh) = match i {
                // 65 cases finer and larger than the median: resampled 500
                0 if m < n_med => (0.5 * t, 600), // resampled 300, below m
                0..=64 => (0.5 * t, 1000),
                65 => (t, n_med),
                66 if m > n_med => (1.7 * t, 200), // resampled 340 = m
                66 => (t, m),
                // 64 coarser and smaller cases: resampled 200
                _ => (2.0 * t, 100),
            };
            spacings[i][a] = s;
            shapes[i][a] = sh;
        }
    }
    let v = json!({
        "foreground_intensity_properties_per_channel": {"0": {"max": 1000.0, "mean": 99.4, "median": 101.0,
            "min": -1000.0, "percentile_00_5": -17.0, "percentile_99_5": 201.0, "std": 39.4}},
        "median_relative_size_after_cropping": 0.95,
        "shapes_after_crop": shapes,
        "spacings": spacings,
    });
    Fingerprint::from_value(&v, "fake liver fingerprint").unwrap()
}

#[test]
fn fake_liver_cascade_reproduces_nnunet_plans() {
    let fp = fake_liver_fingerprint();
    let want = read("example_nnUNetPlans_FakeLiver_cascade.json");
    let got = plan_experiment_json(
        "Dataset503_FakeLiverCT",
        &dataset_json(131),
        &fp,
        &PlannerOptions::default(),
    )
    .unwrap();
    assert_json_eq(&got, &want, "plans");
}

fn plan_cfg(kind: PlannerKind) -> Value {
    let fp = fake_liver_fingerprint();
    let opts = PlannerOptions {
        kind,
        ..Default::default()
    };
    plan_experiment_json("Dataset503_FakeLiverCT", &dataset_json(131), &fp, &opts).unwrap()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// nnunet-v2.md §3.6 table (observed with nnU-Net 2.8.1 on the same fake fingerprint).
#[test]
fn resenc_presets_match_reference_table() {
    let m = plan_cfg(PlannerKind::ResEncM);
    assert_eq!(m["plans_name"], "nnUNetResEncUNetMPlans");
    assert_eq!(m["experiment_planner_used"], "nnUNetPlannerResEncM");
    let c = &m["configurations"]["3d_fullres"];
    assert_eq!(usizes(&c["patch_size"]), vec![112, 128, 160]);
    assert_eq!(c["batch_size"], 2);
    assert_eq!(c["architecture"]["arch_kwargs"]["n_stages"], 6);
    assert_eq!(
        c["architecture"]["network_class_name"],
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    );
    assert_eq!(
        usizes(&c["architecture"]["arch_kwargs"]["n_blocks_per_stage"]),
        vec![1, 3, 4, 6, 6, 6]
    );
    assert_eq!(
        usizes(&c["architecture"]["arch_kwargs"]["n_conv_per_stage_decoder"]),
        vec![1; 5]
    );
    assert!(c["architecture"]["arch_kwargs"]
        .get("n_conv_per_stage")
        .is_none());
    assert_eq!(c["data_identifier"], "nnUNetPlans_3d_fullres");
    assert_eq!(
        m["configurations"]["2d"]["data_identifier"],
        "nnUNetPlans_2d"
    );

    let l = plan_cfg(PlannerKind::ResEncL);
    let c = &l["configurations"]["3d_fullres"];
    assert_eq!(usizes(&c["patch_size"]), vec![160, 192, 224]);
    assert_eq!(c["batch_size"], 2);
    assert_eq!(c["architecture"]["arch_kwargs"]["n_stages"], 6);
    let lr = &l["configurations"]["3d_lowres"];
    assert_eq!(lr["data_identifier"], "nnUNetResEncUNetLPlans_3d_lowres");
    assert_eq!(usizes(&lr["patch_size"]), vec![160, 192, 224]);
    let sp: Vec<f64> = lr["spacing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(
        format!("{:.3}x{:.2}x{:.2}", sp[0], sp[1], sp[2]),
        "1.384x1.04x1.04"
    );
    assert_eq!(
        l["configurations"]["3d_cascade_fullres"]["previous_stage"],
        "3d_lowres"
    );

    let xl = plan_cfg(PlannerKind::ResEncXL);
    let c = &xl["configurations"]["3d_fullres"];
    assert_eq!(usizes(&c["patch_size"]), vec![192, 256, 256]);
    assert_eq!(c["batch_size"], 2);
    assert_eq!(c["architecture"]["arch_kwargs"]["n_stages"], 7);
    assert!(
        xl["configurations"].get("3d_lowres").is_none(),
        "XL has no lowres"
    );
    assert!(xl["configurations"].get("3d_cascade_fullres").is_none());
    assert_eq!(c["batch_dice"], false);
}

#[test]
fn dataset501_file_is_byte_identical() {
    let fp = Fingerprint::from_value(&read("example_dataset_fingerprint_Dataset501.json"), "fp")
        .unwrap();
    let plans = plan_experiment(
        "Dataset501_Synth3D",
        &dataset_json(12),
        &fp,
        &PlannerOptions::default(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nnUNetPlans.json");
    planner::save_plans_merging(&plans, &path).unwrap();
    let got = std::fs::read_to_string(&path).unwrap();
    let want = std::fs::read_to_string(data("example_nnUNetPlans_Dataset501.json")).unwrap();
    assert_eq!(got.trim_end(), want.trim_end());
}

#[test]
fn fake_liver_file_is_byte_identical() {
    let plans = plan_experiment(
        "Dataset503_FakeLiverCT",
        &dataset_json(131),
        &fake_liver_fingerprint(),
        &PlannerOptions::default(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nnUNetPlans.json");
    planner::save_plans_merging(&plans, &path).unwrap();
    let got = std::fs::read_to_string(&path).unwrap();
    let want = std::fs::read_to_string(data("example_nnUNetPlans_FakeLiver_cascade.json")).unwrap();
    assert_eq!(got.trim_end(), want.trim_end());
}
