use std::fs;
use std::path::{Path, PathBuf};

use ndarray::Array3;
use serde_json::json;

use super::*;
use crate::io::{write_image, write_seg, ImageProperties};

fn props(spacing: [f64; 3]) -> ImageProperties {
    ImageProperties::with_spacing(spacing)
}

/// Small 3D dataset: `n` cases of shape (3, 8, 8) with labels 0/1/2, spacing (2, 1, 1).
fn make_dataset(root: &Path, n: usize) -> PathBuf {
    let d = root.join("Dataset900_Verify");
    fs::create_dir_all(d.join("imagesTr")).unwrap();
    fs::create_dir_all(d.join("labelsTr")).unwrap();
    for i in 0..n {
        let img = Array3::from_shape_fn((3, 8, 8), |(z, y, x)| (z + y + x) as f32);
        let seg = Array3::from_shape_fn(
            (3, 8, 8),
            |(z, y, _)| if y < 2 { 0 } else { ((y + z) % 3) as i16 },
        );
        write_image(
            &d.join(format!("imagesTr/c{i}_0000.nii.gz")),
            img.view(),
            &props([2.0, 1.0, 1.0]),
        )
        .unwrap();
        write_seg(
            &d.join(format!("labelsTr/c{i}.nii.gz")),
            seg.view(),
            &props([2.0, 1.0, 1.0]),
        )
        .unwrap();
    }
    write_json(
        &d,
        json!({"0": "CT"}),
        json!({"background": 0, "a": 1, "b": 2}),
        n,
    );
    d
}

fn write_json(d: &Path, channels: serde_json::Value, labels: serde_json::Value, n: usize) {
    let v = json!({"channel_names": channels, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"});
    fs::write(
        d.join("dataset.json"),
        serde_json::to_string_pretty(&v).unwrap(),
    )
    .unwrap();
}

fn errors_of(d: &Path) -> (Vec<String>, Vec<String>, String) {
    let ds = RawDataset::open(d).unwrap();
    match verify_dataset_integrity(&ds, 2) {
        Ok(r) => panic!("expected errors, got {r:?}"),
        Err(e) => {
            let msg = e.to_string();
            match e {
                DatasetError::Integrity {
                    errors, warnings, ..
                } => (errors, warnings, msg),
                other => panic!("unexpected error {other}"),
            }
        }
    }
}

#[test]
fn valid_dataset_passes() {
    let t = tempfile::tempdir().unwrap();
    let d = make_dataset(t.path(), 3);
    let ds = RawDataset::open(&d).unwrap();
    for workers in [1, 3] {
        let r = verify_dataset_integrity(&ds, workers).unwrap();
        assert!(r.is_ok());
        assert_eq!(r.num_cases, 3);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }
}

#[test]
fn num_training_and_missing_labels() {
    let t = tempfile::tempdir().unwrap();
    let d = make_dataset(t.path(), 3);
    write_json(
        &d,
        json!({"0": "CT"}),
        json!({"background": 0, "a": 1, "b": 2}),
        4,
    );
    fs::remove_file(d.join("labelsTr/c1.nii.gz")).unwrap();
    let (errors, _, msg) = errors_of(&d);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(msg.contains("numTraining = 4, but 3"), "{msg}");
    assert!(
        msg.contains("case c1: label file missing") && msg.contains("labelsTr/c1.nii.gz"),
        "{msg}"
    );
    assert!(
        msg.contains("Dataset900_Verify failed the integrity check with 2 error(s)"),
        "{msg}"
    );
}

#[test]
fn undeclared_label_values_are_errors_naming_case_and_values() {
    let t = tempfile::tempdir().unwrap();
    let d = make_dataset(t.path(), 2);
    let mut seg = Array3::<i16>::zeros((3, 8, 8));
    seg[[0, 0, 0]] = 5;
    seg[[1, 0, 0]] = 7;
    seg[[2, 0, 0]] = 1;
    write_seg(
        &d.join("labelsTr/c1.nii.gz"),
        seg.view(),
        &props([2.0, 1.0, 1.0]),
    )
    .unwrap();
    let (errors, _, _) = errors_of(&d);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("case c1:"), "{}", errors[0]);
    assert!(
        errors[0].contains("[5, 7]") && errors[0].contains("declared: [0, 1, 2]"),
        "{}",
        errors[0]
    );
}

#[test]
fn nan_voxels_shape_and_spacing_mismatches_are_all_reported() {
    let t = tempfile::tempdir().unwrap();
    let d = make_dataset(t.path(), 3);
    let mut img = Array3::<f32>::zeros((3, 8, 8));
    img[[1, 2, 3]] = f32::NAN;
    write_image(
        &d.join("imagesTr/c0_0000.nii.gz"),
        img.view(),
        &props([2.0, 1.0, 1.0]),
    )
    .unwrap();
    let seg = Array3::<i16>::ones((3, 8, 9));
    write_seg(
        &d.join("labelsTr/c1.nii.gz"),
        seg.view(),
        &props([2.0, 1.0, 1.0]),
    )
    .unwrap();
    let seg = Array3::<i16>::ones((3, 8, 8));
    write_seg(
        &d.join("labelsTr/c2.nii.gz"),
        seg.view(),
        &props([2.5, 1.0, 1.0]),
    )
    .unwrap();
    let (errors, _, _) = errors_of(&d);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].contains("case c0") && errors[0].contains("c0_0000.nii.gz contains 1 NaN"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("case c1: shape mismatch")
            && errors[1].contains("[3, 8, 8]")
            && errors[1].contains("[3, 8, 9]"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("case c2: spacing mismatch") && errors[2].contains("2.5"),
        "{}",
        errors[2]
    );
}

#[test]
fn origin_differences_and_background_only_labels_only_warn() {
    let t = tempfile::tempdir().unwrap();
    let d = make_dataset(t.path(), 2);
    let mut p = props([2.0, 1.0, 1.0]);
    p.origin = [0.0, 0.0, 10.0];
    let seg = Array3::<i16>::zeros((3, 8, 8));
    write_seg(&d.join("labelsTr/c0.nii.gz"), seg.view(), &p).unwrap();
    fs::write(d.join("labelsTr/orphan.nii.gz"), b"").unwrap();
    let ds = RawDataset::open(&d).unwrap();
    let r = verify_dataset_integrity(&ds, 2).unwrap();
    assert_eq!(r.warnings.len(), 3, "{:?}", r.warnings);
    assert!(
        r.warnings[0].contains("orphan.nii.gz has no images"),
        "{:?}",
        r.warnings
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("case c0: origin")),
        "{:?}",
        r.warnings
    );
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("only contains background")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn non_consecutive_labels_and_channel_count() {
    let t = tempfile::tempdir().unwrap();
    let d = make_dataset(t.path(), 1);
    write_json(
        &d,
        json!({"0": "CT"}),
        json!({"background": 0, "a": 1, "b": 3}),
        1,
    );
    let (errors, _, _) = errors_of(&d);
    assert!(
        errors[0].contains("consecutive") && errors[0].contains("3 after 1"),
        "{errors:?}"
    );
    // label value 2 in the file is now undeclared
    assert!(errors.iter().any(|e| e.contains("[2]")), "{errors:?}");

    // an RGB dataset whose single file is grayscale: channel count mismatch
    let d2 = t.path().join("Dataset901_Rgb");
    fs::create_dir_all(d2.join("imagesTr")).unwrap();
    fs::create_dir_all(d2.join("labelsTr")).unwrap();
    let img = Array3::<f32>::from_elem((1, 4, 4), 7.0);
    write_image(
        &d2.join("imagesTr/x_0000.png"),
        img.view(),
        &ImageProperties::natural_2d(),
    )
    .unwrap();
    write_seg(
        &d2.join("labelsTr/x.png"),
        Array3::<i16>::ones((1, 4, 4)).view(),
        &ImageProperties::natural_2d(),
    )
    .unwrap();
    let v = json!({"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "x": 1},
        "numTraining": 1, "file_ending": ".png"});
    fs::write(d2.join("dataset.json"), v.to_string()).unwrap();
    let (errors, _, _) = errors_of(&d2);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("case x: the images have 1 channel(s)")
            && errors[0].contains("declares 3"),
        "{errors:?}"
    );
}

#[test]
fn ignore_label_and_regions_are_expected_values() {
    let t = tempfile::tempdir().unwrap();
    let d = make_dataset(t.path(), 1);
    let mut seg = Array3::from_shape_fn((3, 8, 8), |(z, y, _)| ((y + z) % 3) as i16);
    seg[[0, 0, 0]] = 3;
    write_seg(
        &d.join("labelsTr/c0.nii.gz"),
        seg.view(),
        &props([2.0, 1.0, 1.0]),
    )
    .unwrap();
    write_json(
        &d,
        json!({"0": "CT"}),
        json!({"background": 0, "a": 1, "b": 2, "ignore": 3}),
        1,
    );
    let ds = RawDataset::open(&d).unwrap();
    verify_dataset_integrity(&ds, 1).unwrap();
    let v = json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "x": 3},
        "regions_class_order": [1, 2, 3], "numTraining": 1, "file_ending": ".nii.gz"});
    fs::write(d.join("dataset.json"), v.to_string()).unwrap();
    let ds = RawDataset::open(&d).unwrap();
    verify_dataset_integrity(&ds, 1).unwrap();
}

#[test]
fn unreadable_files_are_errors_not_panics() {
    let t = tempfile::tempdir().unwrap();
    let d = make_dataset(t.path(), 2);
    fs::write(d.join("imagesTr/c0_0000.nii.gz"), b"junk").unwrap();
    fs::write(d.join("labelsTr/c1.nii.gz"), b"junk").unwrap();
    let (errors, _, _) = errors_of(&d);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("case c0") && errors[0].contains("c0_0000.nii.gz"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("case c1") && errors[1].contains("labelsTr/c1.nii.gz"),
        "{errors:?}"
    );
}
