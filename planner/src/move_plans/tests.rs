use super::*;
use serde_json::json;
use std::fs;
use std::path::Path;

/// nnU-Net's own plans of a CT dataset with a cascade (1 channel, 3 configurations with data).
fn fixture_plans() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/nnunet_examples/example_nnUNetPlans_FakeLiver_cascade.json");
    assert!(p.is_file(), "missing fixture {}", p.display());
    p
}

/// Roots with the source's plans in `preprocessed/Dataset503_FakeLiverCT` and a raw target
/// `Dataset042_Target` with `channels` channels and `file_ending`.
fn setup(root: &Path, channels: usize, file_ending: &str) -> NnUnetPaths {
    let src = root.join("pre/Dataset503_FakeLiverCT");
    fs::create_dir_all(&src).unwrap();
    fs::copy(fixture_plans(), src.join("nnUNetPlans.json")).unwrap();
    let raw = root.join("raw/Dataset042_Target");
    fs::create_dir_all(raw.join("imagesTr")).unwrap();
    let names: serde_json::Map<String, Value> = (0..channels)
        .map(|c| (c.to_string(), json!(format!("ch{c}"))))
        .collect();
    let j = json!({"channel_names": names, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
        "numTraining": 1, "file_ending": file_ending});
    plans::io::write_json_atomic(&raw.join("dataset.json"), &j).unwrap();
    NnUnetPaths {
        raw: Some(root.join("raw")),
        preprocessed: Some(root.join("pre")),
        results: None,
    }
}

fn request(target_plans: Option<&str>) -> MovePlans {
    MovePlans {
        source: "503".into(),
        target: "42".into(),
        source_plans: "nnUNetPlans".into(),
        target_plans: target_plans.map(str::to_string),
    }
}

#[test]
fn plans_are_moved_with_the_targets_names_and_reader() {
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path(), 1, ".nii");
    let out = move_plans_between_datasets(&request(Some("nnUNetPlansTransfer")), &paths).unwrap();
    assert_eq!(
        out,
        dir.path()
            .join("pre/Dataset042_Target/nnUNetPlansTransfer.json")
    );
    let moved = Plans::load(&out).unwrap();
    let source = Plans::load(&fixture_plans()).unwrap();
    assert_eq!(moved.dataset_name, "Dataset042_Target");
    assert_eq!(moved.plans_name, "nnUNetPlansTransfer");
    assert_eq!(moved.image_reader_writer, "NibabelIO");
    for (name, expected) in [
        ("2d", "nnUNetPlansTransfer_2d"),
        ("3d_lowres", "nnUNetPlansTransfer_3d_lowres"),
        ("3d_fullres", "nnUNetPlansTransfer_3d_fullres"),
        // inherited from 3d_fullres, as in nnU-Net
        ("3d_cascade_fullres", "nnUNetPlansTransfer_3d_fullres"),
    ] {
        let c = moved.configuration(name).unwrap();
        assert_eq!(c.data_identifier, expected, "{name}");
        // everything else is the source's
        let s = source.configuration(name).unwrap();
        assert_eq!(c.patch_size, s.patch_size, "{name}");
        assert_eq!(c.spacing, s.spacing, "{name}");
    }
}

#[test]
fn same_identifier_keeps_data_identifiers_and_others_get_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path(), 1, ".nii.gz");
    let out = move_plans_between_datasets(&request(None), &paths).unwrap();
    let moved = Plans::load(&out).unwrap();
    assert_eq!(moved.plans_name, "nnUNetPlans");
    assert_eq!(moved.image_reader_writer, "SimpleITKIO");
    assert_eq!(
        moved.configuration("2d").unwrap().data_identifier,
        "nnUNetPlans_2d"
    );
    // an identifier not made from the plans name gets the new name as a prefix
    let mut plans = Plans::load(&fixture_plans()).unwrap();
    plans.configurations["2d"]["data_identifier"] = json!("custom_2d");
    rename_data_identifiers(&mut plans, "nnUNetPlans", "P2");
    assert_eq!(
        plans.configurations["2d"]["data_identifier"],
        "P2_custom_2d"
    );
    assert_eq!(
        plans.configurations["3d_fullres"]["data_identifier"],
        "P2_3d_fullres"
    );
}

#[test]
fn a_target_with_other_channels_or_missing_plans_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let paths = setup(dir.path(), 2, ".nii.gz");
    let e = move_plans_between_datasets(&request(None), &paths).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("normalization_schemes has 1 entries") && msg.contains("2 channel(s)"),
        "{msg}"
    );
    assert!(!dir.path().join("pre/Dataset042_Target").exists());

    let mut req = request(None);
    req.source_plans = "nnUNetResEncUNetMPlans".into();
    let e = move_plans_between_datasets(&req, &paths).unwrap_err();
    assert!(e.to_string().contains("nnUNetResEncUNetMPlans.json"), "{e}");
    req.source_plans = "nnUNetPlans".into();
    req.target_plans = Some("../evil".into());
    let e = move_plans_between_datasets(&req, &paths).unwrap_err();
    assert!(e.to_string().contains("plans identifier"), "{e}");
}
