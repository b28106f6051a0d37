//! End-to-end regressions of issue 19 ("Nothing half-done is ever trusted"), data part: the
//! `nnseg` binary on the synthetic 2D demo dataset.

use std::path::Path;

mod common;
use common::{json, Env};

const DATA_2D: &str = "Dataset991_Demo2D/nnUNetPlans_2d";

fn preprocess_2d(env: &Env) {
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "-d", "991", "-c", "2d", "-np", "1"]);
}

/// The first case of the preprocessed 2D demo.
fn first_case(data: &Path) -> String {
    let mut cases: Vec<String> = std::fs::read_dir(data)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix("_seg.npy").map(str::to_string)
        })
        .collect();
    cases.sort();
    cases.remove(0)
}

/// Killed after 11 of 12 cases, or a case missing its `.npy`/`.json`/`_seg.npy`: train used
/// to train on the rest (rc 0) and write an 11-case splits_final.json.
#[test]
fn train_refuses_a_partial_preprocessed_folder() {
    let env = Env::new();
    preprocess_2d(&env);
    let data = env.pre.join(DATA_2D);
    assert!(data.join("nnseg_complete.json").is_file());
    let case = first_case(&data);
    for suffix in [".npy", "_seg.npy"] {
        let f = data.join(format!("{case}{suffix}"));
        let saved = std::fs::read(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        let err = env.fails(&[
            "train",
            "991",
            "2d",
            "0",
            "--tr",
            "nnUNetTrainer_1epoch",
            "--num_iterations_per_epoch",
            "1",
            "--num_val_iterations_per_epoch",
            "1",
        ]);
        assert!(
            err.contains(&format!("case {case}")) && err.contains("nnseg preprocess"),
            "{suffix}: {err}"
        );
        std::fs::write(&f, saved).unwrap();
    }
    // no splits were made from the partial folder
    assert!(!env.pre.join("Dataset991_Demo2D/splits_final.json").exists());

    // An interrupted re-run keeps the complete folder: a failing re-run leaves it as it was.
    let rec = std::fs::read(data.join("nnseg_complete.json")).unwrap();
    let raw_img = env
        .raw
        .join(format!("Dataset991_Demo2D/imagesTr/{case}_0000.png"));
    let img = std::fs::read(&raw_img).unwrap();
    std::fs::write(&raw_img, b"not a png").unwrap();
    env.fails(&["preprocess", "991", "-c", "2d", "-np", "1"]);
    std::fs::write(&raw_img, img).unwrap();
    assert_eq!(
        std::fs::read(data.join("nnseg_complete.json")).unwrap(),
        rec
    );
    assert!(data.join(format!("{case}_seg.npy")).is_file());
}

/// A `dataset` map key such as `../../Dataset991_Demo2D/dataset` made plan_and_preprocess
/// write outside the dataset's folder and overwrite another dataset's dataset.json.
#[test]
fn dataset_map_keys_cannot_escape_the_dataset_folder() {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    env.ok(&["plan_and_preprocess", "-d", "991", "--no_pp"]);
    let victim = env.pre.join("Dataset991_Demo2D/dataset.json");
    let before = std::fs::read(&victim).unwrap();

    let raw = env.raw.join("Dataset991_Demo2D");
    let mut ds = json(&raw.join("dataset.json"));
    let mut map = serde_json::Map::new();
    let mut names: Vec<String> = std::fs::read_dir(raw.join("imagesTr"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for (i, n) in names.iter().enumerate() {
        let case = n.strip_suffix("_0000.png").unwrap();
        let key = if i == 0 {
            "../../Dataset991_Demo2D/dataset".to_string()
        } else {
            case.to_string()
        };
        map.insert(
            key,
            serde_json::json!({"images": [format!("imagesTr/{n}")],
                               "label": format!("labelsTr/{case}.png")}),
        );
    }
    ds["dataset"] = serde_json::Value::Object(map);
    // a copy of the demo as another dataset, so that the victim is a different dataset
    let evil = env.raw.join("Dataset992_Evil");
    std::fs::create_dir_all(&evil).unwrap();
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(evil.join(sub)).unwrap();
        for e in std::fs::read_dir(raw.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), evil.join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::write(
        evil.join("dataset.json"),
        serde_json::to_string_pretty(&ds).unwrap(),
    )
    .unwrap();
    for extra in [&[][..], &["--verify_dataset_integrity"][..]] {
        let mut args = vec!["plan_and_preprocess", "-d", "992", "-c", "2d", "-np", "1"];
        args.extend_from_slice(extra);
        let err = env.fails(&args);
        assert!(
            err.contains("\"../../Dataset991_Demo2D/dataset\"") && err.contains("\"dataset\" key"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(&victim).unwrap(), before);
}
