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

/// A 2D network small enough to train in well under a second (no preprocessing key changes).
fn tiny_2d_plans(env: &Env) {
    let path = env.pre.join("Dataset991_Demo2D/nnUNetPlans.json");
    let mut plans = json(&path);
    let c = &mut plans["configurations"]["2d"];
    let kw = c["architecture"]["arch_kwargs"].as_object_mut().unwrap();
    kw.insert("n_stages".into(), serde_json::json!(3));
    kw.insert("features_per_stage".into(), serde_json::json!([4, 8, 16]));
    kw.insert(
        "kernel_sizes".into(),
        serde_json::json!([[3, 3], [3, 3], [3, 3]]),
    );
    kw.insert(
        "strides".into(),
        serde_json::json!([[1, 1], [2, 2], [2, 2]]),
    );
    kw.insert("n_conv_per_stage".into(), serde_json::json!([1, 1, 1]));
    kw.insert("n_conv_per_stage_decoder".into(), serde_json::json!([1, 1]));
    c["patch_size"] = serde_json::json!([32, 32]);
    std::fs::write(&path, serde_json::to_string_pretty(&plans).unwrap()).unwrap();
}

/// The validation cases of fold 0 (from splits_final.json).
fn val_cases(env: &Env) -> Vec<String> {
    let splits = json(&env.pre.join("Dataset991_Demo2D/splits_final.json"));
    splits[0]["val"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// gt_segmentations, the reference of `train`'s final validation, `--val` and
/// `find_best_configuration`, was used as it was: a label changed (or missing) there was
/// evaluated against silently, and an interrupted copy was taken for a complete one. Also a
/// model trained with other labels than the preprocessed dataset.json was scored with them.
#[test]
fn validation_and_find_best_refuse_a_changed_ground_truth() {
    let env = Env::new();
    preprocess_2d(&env);
    tiny_2d_plans(&env);
    let train = [
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
    ];
    env.ok(&train);
    let find_best = [
        "find_best_configuration",
        "991",
        "-c",
        "2d",
        "--tr",
        "nnUNetTrainer_1epoch",
        "-f",
        "0",
        "--disable_ensembling",
        "--np",
        "1",
    ];
    env.ok(&find_best);
    let fix = "nnseg preprocess -d Dataset991_Demo2D --plans_name nnUNetPlans -c 2d";
    let val = val_cases(&env);
    let gt = env.pre.join("Dataset991_Demo2D/gt_segmentations");
    let (changed, other) = (&val[0], &val[1]);
    // a validation case's ground truth replaced by another case's
    let f = gt.join(format!("{changed}.png"));
    std::fs::copy(gt.join(format!("{other}.png")), &f).unwrap();
    let mut val_only = train.to_vec();
    val_only.push("--val");
    for args in [&find_best[..], &val_only[..]] {
        let e = env.fails(args);
        assert!(
            e.contains(&format!("case {changed}")) && e.contains("changed") && e.contains(fix),
            "{args:?}: {e}"
        );
    }
    // the fix command repairs it
    env.ok(&["preprocess", "991", "-c", "2d", "-np", "1"]);
    env.ok(&find_best);
    // a missing file
    std::fs::remove_file(&f).unwrap();
    let e = env.fails(&find_best);
    assert!(
        e.contains(&format!("case {changed}")) && e.contains("missing"),
        "{e}"
    );
    env.ok(&["preprocess", "991", "-c", "2d", "-np", "1"]);

    // the preprocessed dataset.json now declares other labels than the model was trained with
    let dj = env.pre.join("Dataset991_Demo2D/dataset.json");
    let saved = std::fs::read(&dj).unwrap();
    let mut ds = json(&dj);
    let n = ds["labels"].as_object().unwrap().len();
    ds["labels"]
        .as_object_mut()
        .unwrap()
        .insert("extra".into(), serde_json::json!(n));
    std::fs::write(&dj, serde_json::to_string_pretty(&ds).unwrap()).unwrap();
    let e = env.fails(&find_best);
    assert!(
        e.contains("other labels") && e.contains("nnUNetTrainer_1epoch"),
        "{e}"
    );
    std::fs::write(&dj, saved).unwrap();
    env.ok(&find_best);

    // preprocess killed after the data folder was swapped in but before the ground truth was
    // copied: the validation used to skip the evaluation with a warning (rc 0)
    std::fs::remove_dir_all(&gt).unwrap();
    let e = env.fails(&val_only);
    assert!(
        e.contains("gt_segmentations") && e.contains("does not exist") && e.contains(fix),
        "{e}"
    );
    env.ok(&["preprocess", "991", "-c", "2d", "-np", "1"]);
    env.ok(&val_only);
}

fn folder_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            (n, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// `preprocess --incremental` preprocesses only what is missing or changed and gives the same
/// folder as a full run.
#[test]
fn incremental_preprocess_redoes_only_the_missing_case() {
    let env = Env::new();
    preprocess_2d(&env);
    let data = env.pre.join(DATA_2D);
    let before = folder_files(&data);
    let case = first_case(&data);
    std::fs::remove_file(data.join(format!("{case}.npy"))).unwrap();
    let e = env.ok(&["preprocess", "991", "-c", "2d", "--incremental", "-np", "1"]);
    assert!(
        e.contains("preprocessed 1 cases") && e.contains("11 unchanged cases reused"),
        "{e}"
    );
    assert_eq!(folder_files(&data), before);
}
