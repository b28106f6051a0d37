//! Region-based training and the ignore label, end to end through the binary on two small
//! synthetic 2D datasets the test writes: plan_and_preprocess → train (a few iterations, with
//! the fold's validation) → predict → evaluate_folder.
//!
//! - `Dataset981_Regions` (BraTS-like): two channels, nested labels 1 ⊃ 2 ⊃ 3 trained as the
//!   regions whole tumor (1, 2, 3), tumor core (2, 3) and enhancing tumor (3) with
//!   `regions_class_order` [1, 2, 3].
//! - `Dataset982_Sparse`: one channel, cells (1) annotated only on every 4th row; every other
//!   pixel carries the `ignore` label (2).
//!
//! That ignored voxels change no loss value is shown on the loss itself
//! (`trainer::loss::tests::logits_at_ignored_voxels_do_not_change_the_loss`); here the ignore
//! label must reach training (no head for it, the labels loss with its mask), never appear in a
//! prediction, and be left out of every metric.

mod common;

use std::path::{Path, PathBuf};

use common::{json, Env};
use datasets::io::{read_seg, write_image, write_seg, ImageProperties};
use ndarray::Array3;

const SIZE: usize = 48;
const CASES: usize = 6;

/// Distance of (y, x) from the centre of case `i`'s tumour / cell.
fn dist(i: usize, y: usize, x: usize) -> f64 {
    let cy = 16.0 + (i * 7 % 16) as f64;
    let cx = 14.0 + (i * 11 % 20) as f64;
    ((y as f64 - cy).powi(2) + (x as f64 - cx).powi(2)).sqrt()
}

/// Deterministic texture so intensities are not constant.
fn noise(i: usize, y: usize, x: usize) -> f32 {
    (((i * 31 + y * 17 + x * 13) % 23) as f32) - 11.0
}

fn write_case(
    folder: &Path,
    case: &str,
    channels: &[Array3<f32>],
    seg: &Array3<i16>,
    props: &ImageProperties,
) {
    for (c, img) in channels.iter().enumerate() {
        let p = folder.join(format!("imagesTr/{case}_{c:04}.png"));
        write_image(&p, img.view(), props).unwrap();
    }
    write_seg(
        &folder.join(format!("labelsTr/{case}.png")),
        seg.view(),
        props,
    )
    .unwrap();
}

fn new_dataset(raw: &Path, name: &str, dataset_json: serde_json::Value) -> PathBuf {
    let folder = raw.join(name);
    for d in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(folder.join(d)).unwrap();
    }
    std::fs::write(
        folder.join("dataset.json"),
        serde_json::to_string_pretty(&dataset_json).unwrap(),
    )
    .unwrap();
    folder
}

/// BraTS-like: label 1 (edema) ring, 2 (core) inside, 3 (enhancing) at the centre.
fn make_regions_dataset(raw: &Path) -> PathBuf {
    let folder = new_dataset(
        raw,
        "Dataset981_Regions",
        serde_json::json!({
            "channel_names": {"0": "FLAIR", "1": "T1ce"},
            "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                       "enhancing tumor": [3]},
            "regions_class_order": [1, 2, 3],
            "numTraining": CASES,
            "file_ending": ".png"
        }),
    );
    let props = ImageProperties::natural_2d();
    for i in 0..CASES {
        let mut flair = Array3::<f32>::zeros((1, SIZE, SIZE));
        let mut t1ce = Array3::<f32>::zeros((1, SIZE, SIZE));
        let mut seg = Array3::<i16>::zeros((1, SIZE, SIZE));
        for y in 0..SIZE {
            for x in 0..SIZE {
                let d = dist(i, y, x);
                let label = if d < 3.0 {
                    3
                } else if d < 6.0 {
                    2
                } else if d < 11.0 {
                    1
                } else {
                    0
                };
                seg[[0, y, x]] = label;
                let n = noise(i, y, x);
                flair[[0, y, x]] = if label > 0 { 180.0 } else { 60.0 } + n;
                t1ce[[0, y, x]] = [50.0, 70.0, 150.0, 230.0][label as usize] + n;
            }
        }
        write_case(
            &folder,
            &format!("reg_{i:03}"),
            &[flair, t1ce],
            &seg,
            &props,
        );
    }
    folder
}

/// Sparse annotation: cells labelled on every 4th row only, the rest is `ignore` (2).
fn make_sparse_dataset(raw: &Path) -> PathBuf {
    let folder = new_dataset(
        raw,
        "Dataset982_Sparse",
        serde_json::json!({
            "channel_names": {"0": "microscopy"},
            "labels": {"background": 0, "cell": 1, "ignore": 2},
            "numTraining": CASES,
            "file_ending": ".png"
        }),
    );
    let props = ImageProperties::natural_2d();
    for i in 0..CASES {
        let mut img = Array3::<f32>::zeros((1, SIZE, SIZE));
        let mut seg = Array3::<i16>::zeros((1, SIZE, SIZE));
        for y in 0..SIZE {
            for x in 0..SIZE {
                let cell = dist(i, y, x) < 9.0;
                img[[0, y, x]] = if cell { 190.0 } else { 40.0 } + noise(i, y, x);
                seg[[0, y, x]] = if y % 4 != 0 { 2 } else { cell as i16 };
            }
        }
        write_case(&folder, &format!("sp_{i:03}"), &[img], &seg, &props);
    }
    folder
}

/// plan_and_preprocess (2d) and a 1-epoch training of fold 0 (3 + 1 iterations, then the
/// fold's validation); returns the fold folder.
fn plan_and_train(env: &Env, id: &str, name: &str) -> PathBuf {
    env.ok(&["plan_and_preprocess", id, "-c", "2d", "-np", "2"]);
    env.ok(&[
        "train",
        id,
        "2d",
        "0",
        "-tr",
        "nnUNetTrainer_1epoch",
        "--num_iterations_per_epoch",
        "3",
        "--num_val_iterations_per_epoch",
        "1",
        "--seed",
        "3",
    ]);
    env.res
        .join(name)
        .join("nnUNetTrainer_1epoch__nnUNetPlans__2d/fold_0")
}

/// Copies the first channel files of `cases` into a fresh input folder and predicts them with
/// fold 0 (probabilities saved); returns the output folder.
fn predict(env: &Env, raw: &Path, id: &str, cases: &[&str], channels: usize) -> PathBuf {
    let input = env.res.join(format!("in_{id}"));
    std::fs::create_dir_all(&input).unwrap();
    for case in cases {
        for c in 0..channels {
            let f = format!("{case}_{c:04}.png");
            std::fs::copy(raw.join("imagesTr").join(&f), input.join(&f)).unwrap();
        }
    }
    let out = env.res.join(format!("out_{id}"));
    env.ok(&[
        "predict",
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-d",
        id,
        "-c",
        "2d",
        "-f",
        "0",
        "-tr",
        "nnUNetTrainer_1epoch",
        "--save_probabilities",
    ]);
    out
}

fn evaluate(env: &Env, raw: &Path, out: &Path) -> serde_json::Value {
    env.ok(&[
        "evaluate_folder",
        raw.join("labelsTr").to_str().unwrap(),
        out.to_str().unwrap(),
        "-djfile",
        raw.join("dataset.json").to_str().unwrap(),
        "--chill",
    ]);
    json(&out.join("summary.json"))
}

#[test]
fn regions_train_predict_and_evaluate_as_regions() {
    let env = Env::new();
    let raw = make_regions_dataset(&env.raw);
    let fold = plan_and_train(&env, "981", "Dataset981_Regions");

    // region-based training: one sigmoid head per region, Dice + BCE
    let debug = json(&fold.join("debug.json"));
    assert_eq!(debug["loss"], "DC_and_BCE_loss", "{debug}");
    assert_eq!(debug["num_segmentation_heads"], 3, "{debug}");
    assert_eq!(debug["num_input_channels"], 2, "{debug}");
    // the fold's validation is evaluated per region
    let val = json(&fold.join("validation/summary.json"));
    let keys: Vec<&String> = val["mean"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["(1, 2, 3)", "(2, 3)", "3"], "{val}");

    let cases = ["reg_000", "reg_001"];
    let out = predict(&env, &raw, "981", &cases, 2);
    for case in cases {
        // the exported segmentation is the saved sigmoid probabilities thresholded at 0.5,
        // painted in regions_class_order: a later region overwrites an earlier one
        let (probs, _) =
            trainer::evaluation::load_probabilities(&out.join(format!("{case}.npz"))).unwrap();
        assert_eq!(probs.dim(), (3, 1, SIZE, SIZE));
        assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
        let (seg, _) = read_seg(&out.join(format!("{case}.png"))).unwrap();
        let mut expected = ndarray::Array3::<i16>::zeros((1, SIZE, SIZE));
        for (r, label) in [1i16, 2, 3].into_iter().enumerate() {
            for ((z, y, x), e) in expected.indexed_iter_mut() {
                if probs[[r, z, y, x]] > 0.5 {
                    *e = label;
                }
            }
        }
        assert_eq!(seg.index_axis(ndarray::Axis(0), 0), expected, "{case}");
    }
    let summary = evaluate(&env, &raw, &out);
    let keys: Vec<&String> = summary["mean"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["(1, 2, 3)", "(2, 3)", "3"]);
    // a region's counts are over the union of its labels: whole tumor has the most voxels
    let n_ref = |k: &str| {
        summary["metric_per_case"][0]["metrics"][k]["n_ref"]
            .as_f64()
            .unwrap()
    };
    assert!(n_ref("(1, 2, 3)") > n_ref("(2, 3)") && n_ref("(2, 3)") > n_ref("3"));
}

#[test]
fn ignore_label_is_never_predicted_and_never_counted() {
    let env = Env::new();
    let raw = make_sparse_dataset(&env.raw);
    let fold = plan_and_train(&env, "982", "Dataset982_Sparse");

    // label-based training with the ignore label masked: background + cell, no head for it
    let debug = json(&fold.join("debug.json"));
    assert_eq!(debug["loss"], "DC_and_CE_loss", "{debug}");
    assert_eq!(debug["num_segmentation_heads"], 2, "{debug}");
    let log = std::fs::read_dir(&fold)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("training_log")
        })
        .unwrap();
    let log = std::fs::read_to_string(log).unwrap();
    let train_loss_line = log.lines().find(|l| l.contains("train_loss")).unwrap();
    let loss: f64 = train_loss_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(loss.is_finite(), "{train_loss_line}");
    let val = json(&fold.join("validation/summary.json"));
    let keys: Vec<&String> = val["mean"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["1"], "the ignore label is no class: {val}");

    let cases = ["sp_000", "sp_001"];
    let out = predict(&env, &raw, "982", &cases, 1);
    let summary = evaluate(&env, &raw, &out);
    for (i, case) in cases.iter().enumerate() {
        let (seg, _) = read_seg(&out.join(format!("{case}.png"))).unwrap();
        assert!(
            seg.iter().all(|&v| v == 0 || v == 1),
            "{case}: ignore label predicted"
        );
        let (reference, _) = read_seg(&raw.join(format!("labelsTr/{case}.png"))).unwrap();
        let annotated = reference.iter().filter(|&&v| v != 2).count() as u64;
        assert_eq!(annotated, (SIZE * SIZE / 4) as u64);
        let m = &summary["metric_per_case"][i]["metrics"]["1"];
        let counted: u64 = ["TP", "FP", "FN", "TN"]
            .iter()
            .map(|k| m[k].as_u64().unwrap())
            .sum();
        assert_eq!(
            counted, annotated,
            "{case}: ignored pixels were counted: {m}"
        );
        // n_ref counts only annotated cell pixels
        let cells = reference.iter().filter(|&&v| v == 1).count() as u64;
        assert_eq!(m["n_ref"].as_u64(), Some(cells), "{m}");
    }
}
