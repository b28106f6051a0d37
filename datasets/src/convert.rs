//! nnU-Net's dataset conversions:
//! - [`convert_msd_dataset`] (`nnUNetv2_convert_MSD_dataset`): a Medical Segmentation Decathlon
//!   task folder `TaskXX_Name` → `nnUNet_raw/DatasetXXX_Name`, its 4D multi-modal images split
//!   into one file per channel (`{case}_{CCCC}.nii.gz`), labels copied, dataset.json converted;
//! - [`convert_old_nnunet_dataset`] (`nnUNetv2_convert_old_nnUNet_dataset`): an nnU-Net v1 task
//!   folder (channels already split) → a v2 dataset under a new `DatasetXXX_Name`.
//!
//! dataset.json follows nnU-Net's conversion: `modality` becomes `channel_names`, `labels` is
//! inverted to `{name: value}`, `file_ending` is `.nii.gz`, the v1 case lists are dropped.
//! Both build the dataset in a hidden folder beside the target and rename it into place when it
//! is complete, so an interrupted conversion never leaves a folder that looks like a dataset;
//! a rerun starts over.

use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::error::DatasetError;
use crate::layout::{channel_file_name, check_name, RawDir};
use crate::paths::{find_dataset_folder, parse_dataset_id, NnUnetPaths};

/// What `convert_MSD_dataset` converts.
#[derive(Debug, Clone)]
pub struct MsdConversion {
    /// The MSD task folder `TaskXX_Name` (with `imagesTr`, `labelsTr`, `dataset.json`).
    pub source: PathBuf,
    /// Dataset id of the result (default: the task's number), `-overwrite_id`.
    pub overwrite_id: Option<u32>,
    /// Parallel image conversions (`-np`).
    pub num_processes: usize,
}

/// A converted dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    pub dataset_name: String,
    pub folder: PathBuf,
    pub training_cases: usize,
    pub test_cases: usize,
}

/// The v1 case lists and sizes nnU-Net's v1 → v2 conversion drops from dataset.json.
const V1_ONLY_KEYS: [&str; 4] = ["tensorImageSize", "numTest", "training", "test"];
/// The keys the MSD conversion drops (it keeps `tensorImageSize` and `numTest`, as nnU-Net does).
const MSD_DROPPED_KEYS: [&str; 2] = ["training", "test"];
/// Optional v1 folders copied as they are besides `imagesTr` and `labelsTr`.
const V1_OPTIONAL_FOLDERS: [&str; 4] = ["imagesTs", "labelsTs", "imagesVal", "labelsVal"];

/// `nnUNetv2_convert_MSD_dataset`: converts an MSD task into `nnUNet_raw/DatasetXXX_Name`.
/// Fails when the id is taken in any of the roots that are set (as nnU-Net does).
pub fn convert_msd_dataset(
    c: &MsdConversion,
    paths: &NnUnetPaths,
) -> Result<Converted, DatasetError> {
    let (task_id, name) = parse_task_name(&c.source)?;
    let id = c.overwrite_id.unwrap_or(task_id);
    let dataset_name = format!("Dataset{id:03}_{name}");
    check_name("dataset name", &dataset_name)?;
    ensure_id_free(paths, id)?;
    let source = RawDir::new(&c.source);
    let json = read_json(&source.dataset_json())?;
    for folder in [source.images_tr(), source.labels_tr()] {
        if !folder.is_dir() {
            return Err(missing(&folder));
        }
    }
    let json = v1_json_to_v2(json, &MSD_DROPPED_KEYS, &source.dataset_json())?;
    let channels = json["channel_names"].as_object().map_or(0, Map::len);
    let raw_root = paths.raw_root()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(c.num_processes.max(1))
        .build()
        .map_err(|e| DatasetError::Other(format!("cannot start worker threads: {e}")))?;
    build_then_rename(raw_root, &dataset_name, |target| {
        let target = RawDir::new(target);
        let split = |from: &Path, to: &Path| {
            pool.install(|| split_all(from, to, channels, &source.dataset_json()))
        };
        let training_cases = split(&source.images_tr(), &target.images_tr())?;
        let images_ts = source.path().join("imagesTs");
        let test_cases = if images_ts.is_dir() {
            split(&images_ts, &target.path().join("imagesTs"))?
        } else {
            0
        };
        copy_niftis(&source.labels_tr(), &target.labels_tr())?;
        write_json(&target.dataset_json(), &json)?;
        Ok((training_cases, test_cases))
    })
    .map(|(folder, (training_cases, test_cases))| Converted {
        dataset_name,
        folder,
        training_cases,
        test_cases,
    })
}

/// `nnUNetv2_convert_old_nnUNet_dataset`: copies an nnU-Net v1 task folder to
/// `nnUNet_raw/{target_name}` (which must be a `DatasetXXX_Name` not yet in use) and converts its
/// dataset.json.
pub fn convert_old_nnunet_dataset(
    source: &Path,
    target_name: &str,
    paths: &NnUnetPaths,
) -> Result<Converted, DatasetError> {
    let id = parse_dataset_id(target_name)?;
    if !target_name.starts_with("Dataset") || !target_name.contains('_') {
        return Err(DatasetError::InvalidDatasetId {
            input: target_name.to_string(),
        });
    }
    check_name("dataset name", target_name)?;
    let raw_root = paths.raw_root()?;
    if let Some(existing) = find_dataset_folder(raw_root, id)? {
        return Err(DatasetError::Layout {
            folder: existing,
            message: format!(
                "dataset id {id} is already used in nnUNet_raw; pick another id for \
                 {target_name} (or delete the existing folder if it is a leftover)"
            ),
        });
    }
    let source = RawDir::new(source);
    let json = read_json(&source.dataset_json())?;
    let json = v1_json_to_v2(json, &V1_ONLY_KEYS, &source.dataset_json())?;
    for folder in [source.images_tr(), source.labels_tr()] {
        if !folder.is_dir() {
            return Err(missing(&folder));
        }
    }
    build_then_rename(raw_root, target_name, |target| {
        let target = RawDir::new(target);
        copy_tree(&source.images_tr(), &target.images_tr())?;
        copy_tree(&source.labels_tr(), &target.labels_tr())?;
        for name in V1_OPTIONAL_FOLDERS {
            let from = source.path().join(name);
            if from.is_dir() {
                copy_tree(&from, &target.path().join(name))?;
            }
        }
        write_json(&target.dataset_json(), &json)?;
        count_cases(&target.labels_tr())
    })
    .map(|(folder, training_cases)| Converted {
        dataset_name: target_name.to_string(),
        folder,
        training_cases,
        test_cases: 0,
    })
}

/// `TaskXX_Name` → `(XX, "Name")`.
fn parse_task_name(source: &Path) -> Result<(u32, String), DatasetError> {
    let bad = |why: &str| DatasetError::Layout {
        folder: source.to_path_buf(),
        message: format!(
            "{why}: an MSD task folder is named TaskXX_Name (e.g. Task04_Hippocampus)"
        ),
    };
    let folder_name = source
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad("no folder name"))?;
    let (task, name) = folder_name
        .split_once('_')
        .ok_or_else(|| bad("no '_' in the folder name"))?;
    let id = task
        .strip_prefix("Task")
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| bad("the folder name does not start with Task and a number"))?;
    if name.is_empty() {
        return Err(bad("empty task name"));
    }
    Ok((id, name.to_string()))
}

/// nnU-Net's `find_candidate_datasets`: the id must not be used in any root that is set.
fn ensure_id_free(paths: &NnUnetPaths, id: u32) -> Result<(), DatasetError> {
    let roots = [&paths.raw, &paths.preprocessed, &paths.results];
    for root in roots.into_iter().flatten() {
        if let Some(existing) = find_dataset_folder(root, id)? {
            return Err(DatasetError::Layout {
                folder: existing,
                message: format!(
                    "target dataset id {id} is already taken; choose another with -overwrite_id"
                ),
            });
        }
    }
    Ok(())
}

/// v1 (and MSD) dataset.json → v2: `labels` inverted to `{name: value}` in place, `file_ending`
/// `.nii.gz`, `channel_names` from `modality`, `drop` removed; other keys keep their order.
fn v1_json_to_v2(json: Value, drop: &[&str], path: &Path) -> Result<Value, DatasetError> {
    let Value::Object(mut obj) = json else {
        return Err(DatasetError::read(
            path,
            "dataset.json is not a JSON object",
        ));
    };
    let labels = match obj.get("labels") {
        Some(Value::Object(l)) => invert_labels(l, path)?,
        _ => {
            return Err(DatasetError::read(
                path,
                "labels: expected an object like {\"0\": \"background\", \"1\": \"tumour\"}",
            ))
        }
    };
    obj.insert("labels".into(), Value::Object(labels));
    obj.insert("file_ending".into(), Value::from(".nii.gz"));
    let modality = obj.shift_remove("modality").ok_or_else(|| {
        DatasetError::read(
            path,
            "modality: missing (a v1/MSD dataset.json names its channels there)",
        )
    })?;
    obj.insert("channel_names".into(), modality);
    for key in drop {
        obj.shift_remove(*key);
    }
    Ok(Value::Object(obj))
}

/// `{"0": "background", "1": "edema"}` → `{"background": 0, "edema": 1}`.
fn invert_labels(
    labels: &Map<String, Value>,
    path: &Path,
) -> Result<Map<String, Value>, DatasetError> {
    let mut out = Map::new();
    for (value, name) in labels {
        let v: i64 = value.trim().parse().map_err(|_| {
            DatasetError::read(
                path,
                format!("labels.{value}: the key must be an integer label value"),
            )
        })?;
        let name = name.as_str().ok_or_else(|| {
            DatasetError::read(
                path,
                format!("labels.{value}: expected the label's name (a string), got {name}"),
            )
        })?;
        out.insert(name.to_string(), Value::from(v));
    }
    Ok(out)
}

/// Builds `root/name` in `root/.name.partial` (a stale one is removed first) and renames it into
/// place when `build` succeeded; on failure the partial folder is removed.
fn build_then_rename<T>(
    root: &Path,
    name: &str,
    build: impl FnOnce(&Path) -> Result<T, DatasetError>,
) -> Result<(PathBuf, T), DatasetError> {
    let target = root.join(name);
    if target.exists() {
        return Err(DatasetError::Layout {
            folder: target,
            message: "already exists; delete it first if you want to convert again".into(),
        });
    }
    let partial = root.join(format!(".{name}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(|e| DatasetError::io(&partial, e))?;
    }
    fs::create_dir_all(&partial).map_err(|e| DatasetError::io(&partial, e))?;
    match build(&partial) {
        Ok(t) => {
            fs::rename(&partial, &target).map_err(|e| DatasetError::io(&target, e))?;
            Ok((target, t))
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

/// The `.nii.gz` files of a folder (not hidden, not starting with `_`, as nnU-Net filters MSD's
/// macOS `._` files), sorted.
fn nifti_files(folder: &Path) -> Result<Vec<String>, DatasetError> {
    let mut names = vec![];
    for entry in fs::read_dir(folder).map_err(|e| DatasetError::io(folder, e))? {
        let entry = entry.map_err(|e| DatasetError::io(folder, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.ends_with(".nii.gz") && !name.starts_with('.') && !name.starts_with('_') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Splits every image of `from` into `to/{case}_{CCCC}.nii.gz`; each must have `channels`
/// channels (the entries of `modality`). Returns the number of cases.
fn split_all(
    from: &Path,
    to: &Path,
    channels: usize,
    json_path: &Path,
) -> Result<usize, DatasetError> {
    fs::create_dir_all(to).map_err(|e| DatasetError::io(to, e))?;
    let names = nifti_files(from)?;
    names.par_iter().try_for_each(|name| {
        let case = name.trim_end_matches(".nii.gz");
        check_name("case identifier", case)?;
        let out = |c: usize| to.join(channel_file_name(case, c, ".nii.gz"));
        let found = crate::io::split_nifti_channels(&from.join(name), &out)?;
        if found != channels {
            return Err(DatasetError::read(
                from.join(name),
                format!(
                    "{found} channel(s), but {} declares {channels} in modality",
                    json_path.display()
                ),
            ));
        }
        Ok(())
    })?;
    Ok(names.len())
}

/// Copies the `.nii.gz` files of `from` (as filtered by [`nifti_files`]) into `to`.
fn copy_niftis(from: &Path, to: &Path) -> Result<usize, DatasetError> {
    fs::create_dir_all(to).map_err(|e| DatasetError::io(to, e))?;
    let names = nifti_files(from)?;
    for name in &names {
        check_name("case identifier", name.trim_end_matches(".nii.gz"))?;
        let dst = to.join(name);
        fs::copy(from.join(name), &dst).map_err(|e| DatasetError::io(&dst, e))?;
    }
    Ok(names.len())
}

/// Copies a folder tree (files and sub-folders; symbolic links are followed).
fn copy_tree(from: &Path, to: &Path) -> Result<(), DatasetError> {
    for entry in walkdir::WalkDir::new(from).follow_links(true) {
        let entry = entry.map_err(|e| DatasetError::Read {
            path: from.to_path_buf(),
            message: e.to_string(),
        })?;
        let rel = entry.path().strip_prefix(from).unwrap_or(entry.path());
        let dst = to.join(rel);
        if entry.file_type().is_dir() {
            fs::create_dir_all(&dst).map_err(|e| DatasetError::io(&dst, e))?;
        } else {
            fs::copy(entry.path(), &dst).map_err(|e| DatasetError::io(&dst, e))?;
        }
    }
    Ok(())
}

fn count_cases(labels: &Path) -> Result<usize, DatasetError> {
    let n = fs::read_dir(labels)
        .map_err(|e| DatasetError::io(labels, e))?
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count();
    Ok(n)
}

fn missing(folder: &Path) -> DatasetError {
    DatasetError::Layout {
        folder: folder.to_path_buf(),
        message: "missing: the source must be the task folder itself (with imagesTr, labelsTr \
                  and dataset.json)"
            .into(),
    }
}

fn read_json(path: &Path) -> Result<Value, DatasetError> {
    Ok(plans::io::read_json_file(path)?)
}

fn write_json(path: &Path, json: &Value) -> Result<(), DatasetError> {
    Ok(plans::io::write_json_atomic(path, json)?)
}

#[cfg(test)]
mod tests;
