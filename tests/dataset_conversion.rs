//! End to end: `convert_MSD_dataset`, `convert_old_nnUNet_dataset` and
//! `move_plans_between_datasets` on tasks made from the 3D demo dataset, each result then
//! planned and preprocessed by nnseg.

use std::fs;
use std::path::{Path, PathBuf};

use ndarray::{Array4, Axis};
use nifti::writer::WriterOptions;
use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
use serde_json::json;

mod common;
use common::{json, Env};

const DEMO_3D: &str = "Dataset990_Demo3D";

fn demo_cases(env: &Env) -> Vec<String> {
    let mut cases: Vec<String> = fs::read_dir(env.raw.join(DEMO_3D).join("labelsTr"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".nii.gz").map(str::to_string))
        .collect();
    cases.sort();
    cases
}

fn copy_labels(env: &Env, task: &Path) {
    fs::create_dir_all(task.join("labelsTr")).unwrap();
    for case in demo_cases(env) {
        let name = format!("{case}.nii.gz");
        fs::copy(
            env.raw.join(DEMO_3D).join("labelsTr").join(&name),
            task.join("labelsTr").join(&name),
        )
        .unwrap();
    }
}

/// v1/MSD dataset.json of the demo's labels.
fn v1_json(channels: serde_json::Value, n: usize) -> serde_json::Value {
    json!({
        "name": "Demo", "tensorImageSize": "4D", "modality": channels,
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": n, "numTest": 0, "training": [], "test": []
    })
}

/// An MSD task: each demo image becomes a 4D file with two channels (the image and its
/// double), in the header of the source image.
fn make_msd_task(env: &Env, root: &Path) -> PathBuf {
    let task = root.join("Task09_DemoMSD");
    fs::create_dir_all(task.join("imagesTr")).unwrap();
    for case in demo_cases(env) {
        let src = env
            .raw
            .join(DEMO_3D)
            .join("imagesTr")
            .join(format!("{case}_0000.nii.gz"));
        let obj = ReaderOptions::new().read_file(&src).unwrap();
        let header = obj.header().clone();
        let img = obj.into_volume().into_ndarray::<f32>().unwrap();
        let img = img.into_dimensionality::<ndarray::Ix3>().unwrap();
        let (nx, ny, nz) = img.dim();
        let mut four = Array4::<f32>::zeros((nx, ny, nz, 2));
        four.index_axis_mut(Axis(3), 0).assign(&img);
        four.index_axis_mut(Axis(3), 1)
            .assign(&img.mapv(|v| 2.0 * v));
        WriterOptions::new(task.join("imagesTr").join(format!("{case}.nii.gz")))
            .reference_header(&header)
            .write_nifti(&four)
            .unwrap();
    }
    copy_labels(env, &task);
    let n = demo_cases(env).len();
    let j = v1_json(json!({"0": "CT", "1": "CT2"}), n);
    fs::write(task.join("dataset.json"), j.to_string()).unwrap();
    task
}

/// An nnU-Net v1 task: the demo's files as they are, a v1 dataset.json.
fn make_v1_task(env: &Env, root: &Path) -> PathBuf {
    let task = root.join("Task004_OldDemo");
    fs::create_dir_all(task.join("imagesTr")).unwrap();
    for case in demo_cases(env) {
        let name = format!("{case}_0000.nii.gz");
        fs::copy(
            env.raw.join(DEMO_3D).join("imagesTr").join(&name),
            task.join("imagesTr").join(&name),
        )
        .unwrap();
    }
    copy_labels(env, &task);
    let j = v1_json(json!({"0": "CT"}), demo_cases(env).len());
    fs::write(task.join("dataset.json"), j.to_string()).unwrap();
    task
}

#[test]
fn msd_and_v1_tasks_convert_and_plans_move_between_datasets() {
    let env = Env::new();
    env.ok(&["make_demo_dataset"]);
    let tasks = tempfile::tempdir().unwrap();

    // MSD: two channels per case, then planned and preprocessed as a 2-channel dataset
    let msd = make_msd_task(&env, tasks.path());
    env.ok(&[
        "convert_MSD_dataset",
        "-i",
        msd.to_str().unwrap(),
        "-overwrite_id",
        "993",
        "-np",
        "2",
    ]);
    let ds = env.raw.join("Dataset993_DemoMSD");
    let case = &demo_cases(&env)[0];
    assert!(ds.join(format!("imagesTr/{case}_0001.nii.gz")).is_file());
    let dj = json(&ds.join("dataset.json"));
    assert_eq!(dj["channel_names"], json!({"0": "CT", "1": "CT2"}));
    env.ok(&[
        "plan_and_preprocess",
        "-d",
        "993",
        "-c",
        "3d_fullres",
        "-np",
        "1",
    ]);
    let fp = json(&env.pre.join("Dataset993_DemoMSD/dataset_fingerprint.json"));
    let props = &fp["foreground_intensity_properties_per_channel"];
    let (m0, m1) = (
        props["0"]["mean"].as_f64().unwrap(),
        props["1"]["mean"].as_f64().unwrap(),
    );
    assert!(
        (m1 - 2.0 * m0).abs() < 1e-3 * m0.abs().max(1.0),
        "{m0} {m1}"
    );
    // the same task again: its id is taken now
    let e = env.fails(&[
        "convert_MSD_dataset",
        "-i",
        msd.to_str().unwrap(),
        "-overwrite_id",
        "993",
    ]);
    assert!(e.contains("-overwrite_id"), "{e}");

    // v1 → v2
    let old = make_v1_task(&env, tasks.path());
    env.ok(&[
        "convert_old_nnUNet_dataset",
        old.to_str().unwrap(),
        "Dataset994_OldDemo",
    ]);
    let dj = json(&env.raw.join("Dataset994_OldDemo/dataset.json"));
    assert_eq!(
        dj["labels"],
        json!({"background": 0, "organ": 1, "lesion": 2})
    );
    assert!(dj.get("training").is_none() && dj.get("modality").is_none());

    // the demo's plans moved to the converted dataset, then used to preprocess it
    env.ok(&["plan_and_preprocess", "-d", "990", "--no_pp"]);
    env.ok(&[
        "move_plans_between_datasets",
        "-s",
        "990",
        "-t",
        "994",
        "-sp",
        "nnUNetPlans",
        "-tp",
        "nnUNetPlans990",
    ]);
    let moved = json(&env.pre.join("Dataset994_OldDemo/nnUNetPlans990.json"));
    assert_eq!(moved["dataset_name"], "Dataset994_OldDemo");
    assert_eq!(
        moved["configurations"]["3d_fullres"]["data_identifier"],
        "nnUNetPlans990_3d_fullres"
    );
    env.ok(&[
        "preprocess",
        "-d",
        "994",
        "-plans_name",
        "nnUNetPlans990",
        "-c",
        "3d_fullres",
        "-np",
        "1",
    ]);
    let data = env.pre.join("Dataset994_OldDemo/nnUNetPlans990_3d_fullres");
    assert!(data.join("nnseg_complete.json").is_file());
    // a 2-channel target cannot take 1-channel plans
    let e = env.fails(&[
        "move_plans_between_datasets",
        "-s",
        "990",
        "-t",
        "993",
        "-sp",
        "nnUNetPlans",
    ]);
    assert!(
        e.contains("normalization_schemes") && e.contains("2 channel(s)"),
        "{e}"
    );
}
