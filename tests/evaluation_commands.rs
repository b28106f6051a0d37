//! End-to-end tests of the evaluation commands through the binary: `evaluate_simple`,
//! `accumulate_crossval_results`, `determine_postprocessing` (then `apply_postprocessing` with
//! its output), on small synthetic label maps.

mod common;

use std::path::Path;

use common::{json, Env};
use datasets::io::{write_seg, ImageProperties};
use ndarray::Array3;

/// A 1×8×8 label map: `fill` everywhere, then `(value, y0..y1, x0..x1)` boxes.
fn seg(boxes: &[(i16, usize, usize, usize, usize)]) -> Array3<i16> {
    let mut a = Array3::<i16>::zeros((1, 8, 8));
    for &(v, y0, y1, x0, x1) in boxes {
        for y in y0..y1 {
            for x in x0..x1 {
                a[[0, y, x]] = v;
            }
        }
    }
    a
}

fn write(path: &Path, a: &Array3<i16>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_seg(
        path,
        a.view(),
        &ImageProperties::with_spacing([1.0, 1.0, 1.0]),
    )
    .unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const DATASET_JSON: &str = r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
  "numTraining": 4, "file_ending": ".nii.gz"}"#;

#[test]
fn evaluate_simple_with_labels_and_ignore_label() {
    let env = Env::new();
    let (gt, pr) = (env.res.join("gt"), env.res.join("pr"));
    // label 1: 16 reference voxels, prediction shifted by one column: TP 12, FP 4, FN 4
    // label 2: a 2×2 box predicted exactly; label 3 is the ignore label: the prediction's
    // label 1 voxels under it count nowhere
    write(
        &gt.join("a.nii.gz"),
        &seg(&[(1, 0, 4, 0, 4), (2, 6, 8, 6, 8), (3, 0, 8, 5, 6)]),
    );
    write(
        &pr.join("a.nii.gz"),
        &seg(&[(1, 0, 4, 1, 5), (2, 6, 8, 6, 8), (1, 4, 8, 5, 6)]),
    );
    env.ok(&[
        "evaluate_simple",
        s(&gt),
        s(&pr),
        "-l",
        "1",
        "2",
        "-il",
        "3",
    ]);
    let v = json(&pr.join("summary.json"));
    let m1 = &v["metric_per_case"][0]["metrics"]["1"];
    // column x=4 of rows 0..4 is FP (4 voxels); column 0 is FN (4); x=5 is ignored
    assert_eq!(
        (m1["TP"].as_u64(), m1["FP"].as_u64(), m1["FN"].as_u64()),
        (Some(12), Some(4), Some(4)),
        "{m1}"
    );
    assert_eq!(m1["TN"].as_u64(), Some(64 - 8 - 12 - 4 - 4));
    assert_eq!(v["mean"]["2"]["Dice"].as_f64(), Some(1.0));
    let dice1 = 2.0 * 12.0 / (2.0 * 12.0 + 8.0);
    assert!((v["foreground_mean"]["Dice"].as_f64().unwrap() - (dice1 + 1.0) / 2.0).abs() < 1e-9);
    // -o elsewhere; without -il the ignore label's voxels count as background
    let out = env.res.join("s.json");
    env.ok(&["evaluate_simple", s(&gt), s(&pr), "-l", "1", "-o", s(&out)]);
    let v = json(&out);
    assert_eq!(
        v["metric_per_case"][0]["metrics"]["1"]["FP"].as_u64(),
        Some(8)
    );
    assert!(v["mean"].get("2").is_none());
    // a missing prediction is an error unless --chill; -l is required
    write(&gt.join("b.nii.gz"), &seg(&[(1, 0, 2, 0, 2)]));
    let err = env.fails(&["evaluate_simple", s(&gt), s(&pr), "-l", "1"]);
    assert!(err.contains("b"), "{err}");
    env.ok(&["evaluate_simple", s(&gt), s(&pr), "-l", "1", "--chill"]);
    let err = env.fails(&["evaluate_simple", s(&gt), s(&pr)]);
    assert!(err.contains("-l"), "{err}");
}

#[test]
fn accumulate_crossval_results_merges_and_evaluates_the_folds() {
    let env = Env::new();
    let name = "Dataset997_Cv";
    let gt = env.pre.join(name).join("gt_segmentations");
    let model = env.res.join(name).join("nnUNetTrainer__nnUNetPlans__2d");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("dataset.json"), DATASET_JSON).unwrap();
    // fold 0 validated c0, c1 (perfect); fold 1 validated c2, c3 (label 2 missed)
    for (fold, cases, perfect) in [(0, ["c0", "c1"], true), (1, ["c2", "c3"], false)] {
        for c in cases {
            let reference = seg(&[(1, 0, 4, 0, 4), (2, 6, 8, 6, 8)]);
            write(&gt.join(format!("{c}.nii.gz")), &reference);
            let pred = if perfect {
                reference
            } else {
                seg(&[(1, 0, 4, 0, 4)])
            };
            let val = model.join(format!("fold_{fold}/validation"));
            write(&val.join(format!("{c}.nii.gz")), &pred);
        }
    }
    env.ok(&[
        "accumulate_crossval_results",
        "997",
        "-c",
        "2d",
        "-f",
        "0",
        "1",
    ]);
    let merged = model.join("crossval_results_folds_0_1");
    for c in ["c0", "c1", "c2", "c3"] {
        assert!(merged.join(format!("{c}.nii.gz")).is_file(), "{c}");
    }
    assert!(merged.join("dataset.json").is_file());
    let v = json(&merged.join("summary.json"));
    assert_eq!(v["metric_per_case"].as_array().unwrap().len(), 4);
    assert_eq!(v["mean"]["1"]["Dice"].as_f64(), Some(1.0));
    assert_eq!(v["mean"]["2"]["Dice"].as_f64(), Some(0.5));

    // one fold into an explicit folder: only its cases are evaluated (chill, as nnU-Net)
    let out = env.res.join("cv_fold1");
    env.ok(&[
        "accumulate_crossval_results",
        "997",
        "-c",
        "2d",
        "-f",
        "1",
        "-o",
        s(&out),
    ]);
    let v = json(&out.join("summary.json"));
    assert_eq!(v["metric_per_case"].as_array().unwrap().len(), 2);
    assert_eq!(v["mean"]["2"]["Dice"].as_f64(), Some(0.0));

    // a fold that was not validated, and a model that was not trained
    let err = env.fails(&["accumulate_crossval_results", "997", "-c", "2d", "-f", "2"]);
    assert!(
        err.contains("fold_2") && err.contains("validation"),
        "{err}"
    );
    let err = env.fails(&["accumulate_crossval_results", "997", "-c", "3d_fullres"]);
    assert!(
        err.contains("nnUNetTrainer__nnUNetPlans__3d_fullres"),
        "{err}"
    );
}

#[test]
fn determine_postprocessing_then_apply_it() {
    let env = Env::new();
    let (gt, pr) = (env.res.join("gt"), env.res.join("pr"));
    std::fs::create_dir_all(&pr).unwrap();
    std::fs::write(pr.join("dataset.json"), DATASET_JSON).unwrap();
    // predictions are right plus a stray 1-voxel island of label 1: keeping the largest
    // component of the foreground removes it
    for c in ["c0", "c1", "c2"] {
        let reference = seg(&[(1, 0, 3, 0, 3), (2, 4, 6, 0, 3)]);
        write(&gt.join(format!("{c}.nii.gz")), &reference);
        let pred = seg(&[(1, 0, 3, 0, 3), (2, 3, 6, 0, 3), (1, 7, 8, 7, 8)]);
        write(&pr.join(format!("{c}.nii.gz")), &pred);
    }
    env.ok(&[
        "determine_postprocessing",
        "-i",
        s(&pr),
        "-ref",
        s(&gt),
        "-np",
        "2",
    ]);
    let pp = json(&pr.join("postprocessing.json"));
    let fns = pp["postprocessing_fns"].as_array().unwrap();
    assert!(!fns.is_empty(), "{pp}");
    assert_eq!(fns[0], "remove_all_but_largest_component_from_segmentation");
    assert!(pr.join("summary.json").is_file());
    let post = json(&pr.join("postprocessed/summary.json"));
    let before = pp["input_folder"]["foreground_mean"]["Dice"]
        .as_f64()
        .unwrap();
    let after = post["foreground_mean"]["Dice"].as_f64().unwrap();
    assert!(after > before, "{before} -> {after}");
    assert!(pr.join("postprocessed/c0.nii.gz").is_file());

    // --remove_postprocessed keeps only the decision
    std::fs::remove_dir_all(pr.join("postprocessed")).unwrap();
    env.ok(&[
        "determine_postprocessing",
        "-i",
        s(&pr),
        "-ref",
        s(&gt),
        "--remove_postprocessed",
        "-plans_json",
        s(&pr.join("plans.json")),
    ]);
    assert!(!pr.join("postprocessed").exists());

    // the decision applies to new predictions
    let out = env.res.join("pp_out");
    env.ok(&[
        "apply_postprocessing",
        "-i",
        s(&pr),
        "-o",
        s(&out),
        "-pp_pkl_file",
        s(&pr.join("postprocessing.json")),
    ]);
    let v = {
        env.ok(&["evaluate_simple", s(&gt), s(&out), "-l", "1", "2"]);
        json(&out.join("summary.json"))
    };
    assert_eq!(v["foreground_mean"]["Dice"].as_f64(), Some(after));

    // without a dataset.json the error says which flag gives one
    std::fs::remove_file(pr.join("dataset.json")).unwrap();
    let err = env.fails(&["determine_postprocessing", "-i", s(&pr), "-ref", s(&gt)]);
    assert!(err.contains("-dataset_json"), "{err}");
}
