//! `--verify_dataset_integrity`: nnU-Net's checks of a raw dataset
//! (`experiment_planning/verify_dataset_integrity.py`), reporting every problem at once.
//!
//! Errors: `numTraining` differs from the cases found, a case has no label file, the labels of
//! dataset.json are not consecutive from 0, a label file holds values not declared in
//! dataset.json, an image holds NaN, a case's image and label shapes or spacings differ, a case
//! has the wrong number of channels, a file cannot be read. Warnings: origin/direction
//! differences between a case's files, label files that contain only background, label files
//! without images. (The required dataset.json keys are enforced by `DatasetJson::load`.)

use std::path::PathBuf;

use rayon::prelude::*;

use crate::error::DatasetError;
use crate::io::{allclose, read_images_detailed, read_seg};
use crate::layout::RawDir;
use crate::raw::{RawCase, RawDataset};

/// Outcome of a successful integrity check (no errors; warnings may be present).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyReport {
    pub folder: PathBuf,
    pub num_cases: usize,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

#[derive(Default)]
struct CaseResult {
    errors: Vec<String>,
    warnings: Vec<String>,
}

/// The label values that may occur in label files: all labels (regions flattened) plus the
/// ignore label, sorted.
pub fn expected_label_values(json: &plans::DatasetJson) -> Vec<i64> {
    let mut v = json.all_labels();
    if let Some(ig) = json.ignore_label() {
        v.push(ig);
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn expected_labels(ds: &RawDataset) -> Vec<i64> {
    expected_label_values(&ds.json)
}

/// Problems of the labels declared in dataset.json: they must start with background = 0 and
/// be consecutive (0, 1, 2, ...). Cheap (dataset.json only): checked always by the
/// fingerprint, and by `--verify_dataset_integrity`.
pub fn declared_label_problems(json: &plans::DatasetJson) -> Vec<String> {
    let expected = expected_label_values(json);
    let mut errors = Vec::new();
    if expected.first() != Some(&0) {
        errors.push(format!(
            "dataset.json labels must start with background = 0, found label values {expected:?}"
        ));
    }
    let gaps: Vec<String> = expected
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| format!("{} after {}", w[1], w[0]))
        .collect();
    if !gaps.is_empty() {
        errors.push(format!(
            "dataset.json labels must be consecutive (0, 1, 2, ...): found {expected:?} ({})",
            gaps.join(", ")
        ));
    }
    errors
}

/// The distinct values of a label array, sorted.
pub fn label_values<'a>(seg: impl IntoIterator<Item = &'a i16>) -> Vec<i64> {
    let mut present = vec![false; 1 << 16];
    for &v in seg {
        present[(v as i32 - i16::MIN as i32) as usize] = true;
    }
    present
        .iter()
        .enumerate()
        .filter(|(_, p)| **p)
        .map(|(i, _)| i as i64 + i16::MIN as i64)
        .collect()
}

/// Checks the dataset and returns a report, or an error listing every problem found. Cases are
/// checked in parallel on a pool of `num_workers` threads (one case in memory per worker).
pub fn verify_dataset_integrity(
    ds: &RawDataset,
    num_workers: usize,
) -> Result<VerifyReport, DatasetError> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let json = &ds.json;

    if json.num_training != ds.cases.len() {
        errors.push(format!(
            "dataset.json says numTraining = {}, but {} training case(s) were found",
            json.num_training,
            ds.cases.len()
        ));
    }

    let expected = expected_labels(ds);
    errors.extend(declared_label_problems(json));

    for c in ds.cases_without_label() {
        let where_ = if json.dataset.is_some() {
            "dataset.json's \"dataset\" entry has no \"label\"".to_string()
        } else {
            format!(
                "expected {}",
                ds.expected_label_path(&c.identifier).display()
            )
        };
        errors.push(format!(
            "case {}: label file missing ({where_})",
            c.identifier
        ));
    }

    if json.dataset.is_none() {
        warnings.extend(orphan_labels(ds));
    }

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(num_workers.max(1))
        .build()
        .map_err(|e| {
            DatasetError::Other(format!("cannot start {num_workers} worker threads: {e}"))
        })?;
    let per_case: Vec<CaseResult> = pool.install(|| {
        ds.cases
            .par_iter()
            .map(|c| check_case(ds, c, &expected))
            .collect()
    });
    for r in per_case {
        errors.extend(r.errors);
        warnings.extend(r.warnings);
    }

    if errors.is_empty() {
        Ok(VerifyReport {
            folder: ds.folder.clone(),
            num_cases: ds.cases.len(),
            errors,
            warnings,
        })
    } else {
        Err(DatasetError::Integrity {
            folder: ds.folder.clone(),
            errors,
            warnings,
        })
    }
}

/// Label files in labelsTr that belong to no case of imagesTr.
fn orphan_labels(ds: &RawDataset) -> Vec<String> {
    let raw = RawDir::new(&ds.folder);
    let dir = raw.labels_tr();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let ending = &ds.json.file_ending;
    let mut out: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .filter_map(|n| n.strip_suffix(ending.as_str()).map(str::to_string))
        .filter(|id| ds.case(id).is_none())
        .map(|id| {
            format!(
                "{} has no images in imagesTr and is ignored",
                raw.label_file(&id, ending).display()
            )
        })
        .collect();
    out.sort();
    out
}

fn check_case(ds: &RawDataset, case: &RawCase, expected: &[i64]) -> CaseResult {
    let mut r = CaseResult::default();
    let id = &case.identifier;
    let images = match read_images_detailed(&case.images) {
        Ok(d) => d,
        Err(e) => {
            r.errors.push(format!("case {id}: {e}"));
            return r;
        }
    };
    r.warnings
        .extend(images.warnings.iter().map(|w| format!("case {id}: {w}")));

    // NaN, per file
    let mut channel = 0;
    for (file, &nc) in case.images.iter().zip(&images.channels_per_file) {
        let nan = images
            .data
            .slice(ndarray::s![channel..channel + nc, .., .., ..])
            .iter()
            .filter(|v| v.is_nan())
            .count();
        if nan > 0 {
            r.errors.push(format!(
                "case {id}: {} contains {nan} NaN value(s)",
                file.display()
            ));
        }
        channel += nc;
    }

    let n_channels = images.data.shape()[0];
    let expected_channels = ds.json.num_channels();
    if n_channels != expected_channels {
        r.errors.push(format!(
            "case {id}: the images have {n_channels} channel(s) but dataset.json declares {expected_channels} in channel_names"
        ));
    }

    let Some(label_path) = &case.label else {
        return r;
    };
    let (seg, seg_props) = match read_seg(label_path) {
        Ok(s) => s,
        Err(e) => {
            r.errors.push(format!("case {id}: {e}"));
            return r;
        }
    };
    let first_image = case
        .images
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let img_shape = &images.data.shape()[1..];
    let seg_shape = &seg.shape()[1..];
    if img_shape != seg_shape {
        r.errors.push(format!(
            "case {id}: shape mismatch between image {first_image} {img_shape:?} and label {} {seg_shape:?} (z, y, x)",
            label_path.display()
        ));
    }
    if !allclose(&seg_props.spacing, &images.props.spacing, 1e-5, 1e-8) {
        r.errors.push(format!(
            "case {id}: spacing mismatch between image {first_image} {:?} and label {} {:?} (z, y, x)",
            images.props.spacing,
            label_path.display(),
            seg_props.spacing
        ));
    }
    if !allclose(&seg_props.origin, &images.props.origin, 1e-5, 1e-8) {
        r.warnings.push(format!(
            "case {id}: origin of image {first_image} {:?} differs from label {} {:?}",
            images.props.origin,
            label_path.display(),
            seg_props.origin
        ));
    }
    if !allclose(&seg_props.direction, &images.props.direction, 1e-5, 1e-8) {
        r.warnings.push(format!(
            "case {id}: direction of image {first_image} {:?} differs from label {} {:?}",
            images.props.direction,
            label_path.display(),
            seg_props.direction
        ));
    }

    // label values present in the file
    let found = label_values(seg.iter());
    let unexpected: Vec<i64> = found
        .iter()
        .copied()
        .filter(|v| expected.binary_search(v).is_err())
        .collect();
    if !unexpected.is_empty() {
        r.errors.push(format!(
            "case {id}: label file {} contains value(s) {unexpected:?} not declared in dataset.json labels (declared: {expected:?})",
            label_path.display()
        ));
    }
    // nnU-Net's verify_labels tests `len(found_labels) == 0 and found_labels[0] == 0`, which can
    // never be true (and would index an empty array), so its "only background" warning never
    // fires. Fixed here: warn when the file holds exactly one value, 0.
    if found == [0] {
        r.warnings.push(format!(
            "case {id}: label file {} only contains background (0); this may be intentional",
            label_path.display()
        ));
    }
    r
}

#[cfg(test)]
mod tests;
