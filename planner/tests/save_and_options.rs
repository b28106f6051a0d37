//! save_plans_merging and the planner options.

use planner::{
    plan_experiment, plan_experiment_json, save_plans_merging, PlannerError, PlannerKind,
    PlannerOptions,
};
use plans::{DatasetJson, Fingerprint, Plans};
use serde_json::{json, Value};

fn dataset_json() -> DatasetJson {
    let v = json!({"channel_names": {"0": "T2"}, "labels": {"background": 0, "a": 1}, "numTraining": 6,
                   "file_ending": ".nii.gz"});
    DatasetJson::from_value(&v, "dataset.json").unwrap()
}

fn fingerprint(spacing: [f64; 3], shape: [usize; 3]) -> Fingerprint {
    let v = json!({
        "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0,
            "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 0.1}},
        "median_relative_size_after_cropping": 0.6,
        "shapes_after_crop": vec![shape; 6],
        "spacings": vec![spacing; 6],
    });
    Fingerprint::from_value(&v, "fp").unwrap()
}

#[test]
fn merging_keeps_custom_configurations_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nnUNetPlans.json");
    let fp = fingerprint([1.0, 1.0, 1.0], [64, 64, 64]);
    let plans = plan_experiment(
        "Dataset001_X",
        &dataset_json(),
        &fp,
        &PlannerOptions::default(),
    )
    .unwrap();
    save_plans_merging(&plans, &path).unwrap();

    // the user adds a custom configuration, edits 2d and leaves a stale 3d_lowres behind
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cfgs = v["configurations"].as_object_mut().unwrap();
    cfgs.insert(
        "3d_fullres_bs8".into(),
        json!({"inherits_from": "3d_fullres", "batch_size": 8}),
    );
    cfgs["2d"]["batch_size"] = json!(99);
    cfgs.insert("3d_lowres".into(), cfgs["3d_fullres"].clone());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();

    save_plans_merging(&plans, &path).unwrap();
    let merged = Plans::load(&path).unwrap();
    assert_eq!(
        merged.configuration_names(),
        vec!["2d", "3d_fullres", "3d_fullres_bs8"]
    );
    assert_ne!(
        merged.configuration("2d").unwrap().batch_size,
        99,
        "default configurations are overwritten"
    );
    let custom = merged.configuration("3d_fullres_bs8").unwrap();
    assert_eq!(custom.batch_size, 8);
    assert_eq!(custom.patch_size, vec![64, 64, 64]);
    // no temp files left behind
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn merging_refuses_to_clobber_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nnUNetPlans.json");
    std::fs::write(&path, "{ not json").unwrap();
    let fp = fingerprint([1.0, 1.0, 1.0], [64, 64, 64]);
    let plans = plan_experiment(
        "Dataset001_X",
        &dataset_json(),
        &fp,
        &PlannerOptions::default(),
    )
    .unwrap();
    assert!(save_plans_merging(&plans, &path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ not json");
}

#[test]
fn mask_for_norm_and_plans_name_override() {
    let fp = fingerprint([1.0, 1.0, 1.0], [64, 64, 64]);
    let opts = PlannerOptions {
        overwrite_plans_name: Some("nnUNetPlans_custom".into()),
        ..Default::default()
    };
    let v = plan_experiment_json("Dataset001_X", &dataset_json(), &fp, &opts).unwrap();
    assert_eq!(v["plans_name"], "nnUNetPlans_custom");
    let c = &v["configurations"]["3d_fullres"];
    assert_eq!(c["data_identifier"], "nnUNetPlans_custom_3d_fullres");
    // T2 -> ZScore; median relative size 0.6 < 0.75 -> mask
    assert_eq!(c["normalization_schemes"], json!(["ZScoreNormalization"]));
    assert_eq!(c["use_mask_for_norm"], json!([true]));
}

#[test]
fn overwrite_target_spacing_affects_3d_fullres_only() {
    let fp = fingerprint([1.0, 1.0, 1.0], [100, 200, 200]);
    let opts = PlannerOptions {
        overwrite_target_spacing: Some(vec![2.0, 1.0, 1.0]),
        ..Default::default()
    };
    let v = plan_experiment_json("Dataset001_X", &dataset_json(), &fp, &opts).unwrap();
    let full = &v["configurations"]["3d_fullres"];
    assert_eq!(full["spacing"], json!([2.0, 1.0, 1.0]));
    assert_eq!(
        full["median_image_size_in_voxels"],
        json!([50.0, 200.0, 200.0])
    );
    let d2 = &v["configurations"]["2d"];
    assert_eq!(d2["spacing"], json!([1.0, 1.0]));
    assert_eq!(d2["median_image_size_in_voxels"], json!([200.0, 200.0]));
    // the transpose follows the (overwritten) 3d_fullres spacing, as in nnU-Net
    assert_eq!(v["transpose_forward"], json!([0, 1, 2]));
    let opts = PlannerOptions {
        overwrite_target_spacing: Some(vec![1.0, 1.0, 2.0]),
        ..Default::default()
    };
    let v = plan_experiment_json("Dataset001_X", &dataset_json(), &fp, &opts).unwrap();
    assert_eq!(v["transpose_forward"], json!([2, 0, 1]));
    assert_eq!(
        v["configurations"]["3d_fullres"]["spacing"],
        json!([2.0, 1.0, 1.0])
    );
}

#[test]
fn two_d_dataset_has_only_2d() {
    let fp = fingerprint([999.0, 0.5, 0.5], [1, 300, 400]);
    let v = plan_experiment_json(
        "Dataset002_Y",
        &dataset_json(),
        &fp,
        &PlannerOptions::default(),
    )
    .unwrap();
    let names: Vec<&String> = v["configurations"].as_object().unwrap().keys().collect();
    assert_eq!(names, vec!["2d"]);
    assert_eq!(v["configurations"]["2d"]["spacing"], json!([0.5, 0.5]));
    assert_eq!(v["configurations"]["2d"]["patch_size"], json!([320, 448]));
}

#[test]
fn gpu_target_scales_the_reference() {
    let fp = fingerprint([1.0, 1.0, 1.0], [400, 400, 400]);
    let patch = |kind, gpu| {
        let opts = PlannerOptions {
            kind,
            gpu_memory_target_gb: gpu,
            ..Default::default()
        };
        let v = plan_experiment_json("D", &dataset_json(), &fp, &opts).unwrap();
        let p: Vec<u64> = v["configurations"]["3d_fullres"]["patch_size"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        p.iter().product::<u64>()
    };
    // a non-default target on a preset only warns; more memory -> larger patches
    assert!(patch(PlannerKind::ResEncM, Some(24.0)) > patch(PlannerKind::ResEncM, None));
    assert_eq!(
        patch(PlannerKind::ResEncL, Some(24.0)),
        patch(PlannerKind::ResEncL, None)
    );
    assert!(
        patch(PlannerKind::ExperimentPlanner, Some(4.0))
            < patch(PlannerKind::ExperimentPlanner, None)
    );
    let opts = PlannerOptions {
        gpu_memory_target_gb: Some(0.0),
        ..Default::default()
    };
    assert!(matches!(
        plan_experiment_json("D", &dataset_json(), &fp, &opts),
        Err(PlannerError::InvalidOption {
            option: "-gpu_memory_target",
            ..
        })
    ));
}
