use super::*;
use ndarray::{Array3, Array4};
use nifti::writer::WriterOptions;
use nifti::NiftiHeader;
use serde_json::json;

/// An anisotropic, rotated-free but shifted geometry, so a lost header shows.
fn header() -> NiftiHeader {
    NiftiHeader {
        sform_code: 1,
        qform_code: 1,
        pixdim: [1.0, 0.7, 0.8, 3.0, 1.0, 0.0, 0.0, 0.0],
        srow_x: [-0.7, 0.0, 0.0, 12.5],
        srow_y: [0.0, -0.8, 0.0, -4.0],
        srow_z: [0.0, 0.0, 3.0, 30.0],
        quatern_b: 0.0,
        quatern_c: 0.0,
        quatern_d: 1.0,
        quatern_x: 12.5,
        quatern_y: -4.0,
        quatern_z: 30.0,
        ..Default::default()
    }
}

/// `[x, y, z, t]` test volume: value = 1000 t + 100 z + 10 y + x.
fn volume4(nt: usize) -> Array4<i16> {
    Array4::from_shape_fn((5, 4, 3, nt), |(x, y, z, t)| {
        (1000 * t + 100 * z + 10 * y + x) as i16
    })
}

fn write4(path: &Path, nt: usize) {
    WriterOptions::new(path)
        .reference_header(&header())
        .write_nifti(&volume4(nt))
        .unwrap();
}

fn write_label(path: &Path) {
    let lab = Array3::from_shape_fn((5, 4, 3), |(x, _, z)| ((x + z) % 3) as u8);
    WriterOptions::new(path)
        .reference_header(&header())
        .write_nifti(&lab)
        .unwrap();
}

fn msd_json() -> Value {
    json!({
        "name": "Prostate",
        "tensorImageSize": "4D",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": 1,
        "numTest": 1,
        "training": [{"image": "./imagesTr/prostate_00.nii.gz", "label": "./labelsTr/prostate_00.nii.gz"}],
        "test": ["./imagesTs/prostate_01.nii.gz"]
    })
}

/// A MSD-style task folder `root/Task05_Prostate` with one 2-channel training case (plus a
/// macOS `._` file that must be ignored) and one test case.
fn msd_task(root: &Path, channels_of_case: usize) -> PathBuf {
    let task = root.join("Task05_Prostate");
    for f in ["imagesTr", "labelsTr", "imagesTs"] {
        fs::create_dir_all(task.join(f)).unwrap();
    }
    write4(&task.join("imagesTr/prostate_00.nii.gz"), channels_of_case);
    fs::write(task.join("imagesTr/._prostate_00.nii.gz"), b"junk").unwrap();
    write_label(&task.join("labelsTr/prostate_00.nii.gz"));
    write4(&task.join("imagesTs/prostate_01.nii.gz"), 2);
    plans::io::write_json_atomic(&task.join("dataset.json"), &msd_json()).unwrap();
    task
}

fn roots(root: &Path) -> NnUnetPaths {
    NnUnetPaths {
        raw: Some(root.join("raw")),
        preprocessed: Some(root.join("pre")),
        results: Some(root.join("res")),
    }
}

fn conversion(task: &Path, overwrite_id: Option<u32>) -> MsdConversion {
    MsdConversion {
        source: task.to_path_buf(),
        overwrite_id,
        num_processes: 2,
    }
}

#[test]
fn msd_task_is_split_per_channel_with_its_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let task = msd_task(dir.path(), 2);
    let paths = roots(dir.path());
    fs::create_dir_all(paths.raw.as_ref().unwrap()).unwrap();
    let done = convert_msd_dataset(&conversion(&task, None), &paths).unwrap();
    assert_eq!(done.dataset_name, "Dataset005_Prostate");
    assert_eq!((done.training_cases, done.test_cases), (1, 1));
    let out = RawDir::new(&done.folder);
    let (label, label_props) =
        crate::io::read_seg(&out.label_file("prostate_00", ".nii.gz")).expect("label copied");
    assert_eq!(label.shape(), &[1, 3, 4, 5]);
    let expected = volume4(2);
    for c in 0..2 {
        let (img, props) =
            crate::io::read_images(&[out.image_file("prostate_00", c, ".nii.gz")]).unwrap();
        assert_eq!(img.shape(), &[1, 3, 4, 5], "channel {c}");
        for ((_, z, y, x), v) in img.indexed_iter() {
            assert_eq!(
                *v,
                expected[[x, y, z, c]] as f32,
                "channel {c} at {z},{y},{x}"
            );
        }
        assert_eq!(props.spacing, label_props.spacing);
        assert_eq!(props.origin, label_props.origin);
        assert_eq!(props.direction, label_props.direction);
    }
    assert_eq!(props_spacing(&out), [3.0, 0.8, 0.7].map(|v: f32| v as f64));
    assert!(out
        .path()
        .join("imagesTs/prostate_01_0001.nii.gz")
        .is_file());
    let files: Vec<_> = fs::read_dir(out.images_tr()).unwrap().collect();
    assert_eq!(files.len(), 2, "the ._ file is not a case");

    let j = plans::io::read_json_file(&out.dataset_json()).unwrap();
    let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "name",
            "tensorImageSize",
            "labels",
            "numTraining",
            "numTest",
            "file_ending",
            "channel_names"
        ]
    );
    assert_eq!(j["labels"], json!({"background": 0, "PZ": 1, "TZ": 2}));
    assert_eq!(j["channel_names"], json!({"0": "T2", "1": "ADC"}));
    assert_eq!(j["file_ending"], ".nii.gz");
    // the converted dataset reads as an nnU-Net v2 dataset
    plans::DatasetJson::load(&out.dataset_json()).unwrap();
    assert!(!dir.path().join("raw/.Dataset005_Prostate.partial").exists());
}

fn props_spacing(out: &RawDir) -> [f64; 3] {
    crate::io::read_images(&[out.image_file("prostate_00", 0, ".nii.gz")])
        .unwrap()
        .1
        .spacing
}

#[test]
fn a_taken_id_is_refused_and_overwrite_id_picks_another() {
    let dir = tempfile::tempdir().unwrap();
    let task = msd_task(dir.path(), 2);
    let paths = roots(dir.path());
    fs::create_dir_all(dir.path().join("pre/Dataset005_Other")).unwrap();
    let e = convert_msd_dataset(&conversion(&task, None), &paths).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("Dataset005_Other") && msg.contains("-overwrite_id"),
        "{msg}"
    );
    let done = convert_msd_dataset(&conversion(&task, Some(105)), &paths).unwrap();
    assert_eq!(done.dataset_name, "Dataset105_Prostate");
}

#[test]
fn a_channel_count_other_than_modality_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let task = msd_task(dir.path(), 3);
    let paths = roots(dir.path());
    let e = convert_msd_dataset(&conversion(&task, None), &paths).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("prostate_00.nii.gz") && msg.contains("3 channel(s)") && msg.contains("2"),
        "{msg}"
    );
    let left: Vec<_> = fs::read_dir(dir.path().join("raw")).unwrap().collect();
    assert!(left.is_empty(), "nothing may be left behind: {left:?}");
}

#[test]
fn task_folder_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let paths = roots(dir.path());
    for bad in ["Prostate", "Task_Prostate", "TaskX_Prostate", "Task05_"] {
        let folder = dir.path().join(bad);
        fs::create_dir_all(&folder).unwrap();
        let e = convert_msd_dataset(&conversion(&folder, None), &paths).unwrap_err();
        assert!(e.to_string().contains("TaskXX_Name"), "{bad}: {e}");
    }
}

#[test]
fn labels_must_be_integer_keyed_names() {
    let bad = json!({"modality": {"0": "CT"}, "labels": {"zero": "background"}});
    let e = v1_json_to_v2(bad, &[], Path::new("d.json")).unwrap_err();
    assert!(e.to_string().contains("labels.zero"), "{e}");
    let bad = json!({"modality": {"0": "CT"}, "labels": {"0": 1}});
    let e = v1_json_to_v2(bad, &[], Path::new("d.json")).unwrap_err();
    assert!(e.to_string().contains("labels.0"), "{e}");
    let bad = json!({"labels": {"0": "background"}});
    let e = v1_json_to_v2(bad, &[], Path::new("d.json")).unwrap_err();
    assert!(e.to_string().contains("modality"), "{e}");
}

/// A v1 task: channels already split, v1 dataset.json.
fn v1_task(root: &Path) -> PathBuf {
    let task = root.join("Task004_Hippocampus");
    for f in ["imagesTr", "labelsTr", "imagesTs"] {
        fs::create_dir_all(task.join(f)).unwrap();
    }
    for case in ["hippo_1", "hippo_2"] {
        write_label(&task.join(format!("imagesTr/{case}_0000.nii.gz")));
        write_label(&task.join(format!("labelsTr/{case}.nii.gz")));
    }
    write_label(&task.join("imagesTs/hippo_3_0000.nii.gz"));
    let j = json!({
        "name": "Hippocampus", "tensorImageSize": "3D", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": 2, "numTest": 1,
        "training": [], "test": []
    });
    plans::io::write_json_atomic(&task.join("dataset.json"), &j).unwrap();
    task
}

#[test]
fn old_nnunet_task_becomes_a_v2_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let task = v1_task(dir.path());
    let paths = roots(dir.path());
    let done = convert_old_nnunet_dataset(&task, "Dataset104_Hippo", &paths).unwrap();
    assert_eq!(done.training_cases, 2);
    let out = RawDir::new(&done.folder);
    assert!(out.image_file("hippo_2", 0, ".nii.gz").is_file());
    assert!(out.path().join("imagesTs/hippo_3_0000.nii.gz").is_file());
    let j = plans::io::read_json_file(&out.dataset_json()).unwrap();
    let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "name",
            "labels",
            "numTraining",
            "file_ending",
            "channel_names"
        ]
    );
    assert_eq!(
        j["labels"],
        json!({"background": 0, "Anterior": 1, "Posterior": 2})
    );
    plans::DatasetJson::load(&out.dataset_json()).unwrap();
    // same name again, or the same id under another name: refused
    let e = convert_old_nnunet_dataset(&task, "Dataset104_Hippo", &paths).unwrap_err();
    assert!(e.to_string().contains("already"), "{e}");
    let e = convert_old_nnunet_dataset(&task, "Dataset104_Other", &paths).unwrap_err();
    assert!(e.to_string().contains("id 104"), "{e}");
    for bad in ["Task004_Hippo", "Dataset104", "Hippo"] {
        let e = convert_old_nnunet_dataset(&task, bad, &paths).unwrap_err();
        assert!(
            matches!(e, DatasetError::InvalidDatasetId { .. }),
            "{bad}: {e}"
        );
    }
}
